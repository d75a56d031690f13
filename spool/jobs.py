"""Jobs in the spool: the job file (whose folder is its state), its meta file, its status file, and the ids
they are named by. The API stores jobs; only the daemon moves them and writes their status."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path

from msgspec import UNSET

from spool.files import FILE_MODE, CorruptFile, SpoolFiles, encode, ids_in, read_checked
from spool.records import Callback, JobFile, JobMeta, JobStatus, Visit
from spool.vocabulary import (FINISHED_FOLDERS, JOB_FOLDERS, DeliveryState, Folder, Phase, Status, parse_job_id,
                              utc_now)


#: What a job file must hold, for the note of one that does not: a hand may have dropped a submit body in.
JOB_FILE_NEEDS = ('a job file is what the API writes: {"job_id": <the id of its name>, "submitted_at": "<UTC time>", '
                  '"count": <visits>, "visits": [{"store_id": ..., "visit_time": ..., "image_url": [...]}]}; '
                  "to submit a job, POST its body to /api/submit/")


def _read_counter(fd: int) -> int:
    """The counter's value; 0 when it is empty or not a number (a power loss can leave it so)."""
    text = os.pread(fd, 32, 0).split(b"\n", 1)[0].strip()
    return int(text) if text.isdigit() and len(text) < 18 else 0


class NotYetStored(FileNotFoundError):
    """A job file in incoming/ that its writer still holds: not there yet, for the daemon (Jobs.claim)."""


class Jobs:
    def __init__(self, files: SpoolFiles):
        self.files, self.root = files, files.root
        self._counter_fd: int | None = None
        self._counter_pid = 0
        self._counter_thread_lock = threading.Lock()
        self._text = {folder: os.path.join(files.root, folder) for folder in Folder}  # for the batched writes

    # ------------------------------------------------------------------ names
    def path(self, folder: str, job_id: int) -> Path:
        return self.root / folder / f"{job_id}.json"

    def meta_path(self, job_id: int) -> Path:
        return self.root / Folder.META / f"{job_id}.json"

    def status_path(self, job_id: int) -> Path:
        return self.root / Folder.STATUS / f"{job_id}.json"

    def ids(self, folder: str) -> list[int]:
        """Ids of the well-named ``<id>.json`` files in ``folder``, oldest (smallest) first."""
        return ids_in(self.root / folder)

    def listing(self, folder: str) -> tuple[list[int], dict[str, str]]:
        """(ids of the well-named ``<id>.json`` files in ``folder``, oldest first; {every other name: why it is
        no job file's}). For the daemon, which moves the others aside rather than leave them unexplained."""
        ids, strays = [], {}
        for entry in os.scandir(self.root / folder):
            stem, dot, ext = entry.name.partition(".")
            job_id = parse_job_id(stem)
            if job_id is not None and ext == "json":
                ids.append(job_id)
            elif ext == "json" and stem.isascii() and stem.isdigit():
                strays[entry.name] = (f"{folder}/{entry.name}: {stem[:40]} is not a job id (job ids are 1 to 16 "
                                      "digits, without a leading zero)")
            else:
                strays[entry.name] = f"{folder}/{entry.name}: not a job file's name (job files are named <id>.json)"
        return sorted(ids), strays

    def folder_of(self, job_id: int) -> Folder | None:
        """The folder (= state) a job file is in: incoming, active, done, failed; None if there is none.

        Looked at in the order jobs move, so a job moving on while we look is found in its new folder. After a
        power cut a job file can have two names (a move whose second folder fsync never happened) until the
        daemon's start-up removes the stale one (Upkeep.remove_stale_names); the status file says the rest."""
        for folder in JOB_FOLDERS:
            if self.path(folder, job_id).exists():
                return folder
        return None

    def exists(self, job_id: int) -> bool:
        return self.folder_of(job_id) is not None or self.status_path(job_id).exists()

    # ------------------------------------------------------------------ the API's side
    def next_id(self) -> int:
        """Take the next job id. Ids only increase and never repeat, across API processes, crashes and power
        loss, and taking one costs no fsync and no wait: the counter is read and rewritten in place under
        an flock (held for two system calls, microseconds; the kernel lets go of it when a holder dies).
        What makes a given id durable is its job's own meta file, written durably before anyone is told the
        id; after a power loss the counter may be older than that, so every program raises it at start-up
        above every id the spool holds (restore_counter), and purge makes it durable before it deletes a job
        (remember_counter). The counter only grows, so an in-place write never leaves a longer old number's
        tail behind it; one torn by a power loss reads as no number, and start-up restores it."""
        with self._counter_locked() as fd:
            job_id = max(_read_counter(fd), 1)
            os.pwrite(fd, f"{job_id + 1}\n".encode(), 0)
        return job_id

    @contextlib.contextmanager
    def _counter_locked(self):
        """The counter file's descriptor, locked against every other thread and process (one descriptor per
        process, opened again after a fork: flock excludes open files, not threads, so a lock for this
        process's threads goes with it)."""
        with self._counter_thread_lock:
            if self._counter_fd is None or self._counter_pid != os.getpid():
                self._counter_fd = os.open(self.root / "next_job_id", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                           FILE_MODE)
                self._counter_pid = os.getpid()
            fcntl.flock(self._counter_fd, fcntl.LOCK_EX)
            try:
                yield self._counter_fd
            finally:
                fcntl.flock(self._counter_fd, fcntl.LOCK_UN)

    def highest_id(self) -> int:
        """The highest job id anything in the spool names: a meta file (written durably before its id is
        given to anyone), a job file, a status file. Key records name jobs written after their meta file
        (keys.py), so they need no look of their own."""
        folders = (Folder.META, *JOB_FOLDERS, Folder.STATUS)
        return max((ids[-1] for folder in folders if (ids := self.ids(folder))), default=0)

    def restore_counter(self) -> int:
        """At start-up: raise the counter above every id the spool holds, durably (a power loss may have
        left it older than the last id given). The next id."""
        return self.remember_counter()

    def remember_counter(self) -> int:
        """Make the counter durable, above every id the spool holds: before a purge deletes the files that
        name the highest ids, and at start-up. The next id."""
        with self._counter_locked() as fd:
            next_id = max(_read_counter(fd), self.highest_id() + 1, 1)
            os.pwrite(fd, f"{next_id}\n".encode(), 0)
            os.fsync(fd)
        self.files.sync_folder(self.root)  # the counter file's own name, made when it was first opened
        return next_id

    def reserve_id(self, job_id: int) -> None:
        """Make sure next_id() never gives ``job_id``: a job file that did not come from it (dropped into
        incoming/ by hand) keeps its id, and no later submit is given the same one. Not fsynced, like
        next_id: the job file names the id, and start-up raises the counter above it (restore_counter)."""
        with self._counter_locked() as fd:
            if _read_counter(fd) <= job_id:
                os.pwrite(fd, f"{job_id + 1}\n".encode(), 0)

    def submit(self, count: int, visits: list[Visit], owner: str | None = None,
               callback_url: str | None = None) -> int:
        """Store a validated job in incoming/ and return its id. When this returns, the job is on disk."""
        job_id = self.next_id()
        self.store(job_id, count, visits, owner, callback_url=callback_url)
        return job_id

    def store(self, job_id: int, count: int, visits: list[Visit], owner: str | None,
              callback_url: str | None = None, idempotency_key: str | None = None,
              between: Callable[[], None] = lambda: None) -> None:
        """submit() with the id taken: its meta file, then ``between()`` (keys.py writes the key record
        there), then its job file, each durable before the next: the meta file is what makes the id taken for
        good (next_id), and a job file never exists without its meta."""
        callback_url = UNSET if callback_url is None else callback_url
        job = JobFile(job_id, utc_now(), count, visits, callback_url)
        meta = JobMeta(job_id, job.images, owner, UNSET if idempotency_key is None else idempotency_key, callback_url)
        self.files.write(self.meta_path(job_id), meta)
        try:
            between()
            self.files.publish(self.path(Folder.INCOMING, job_id), encode(job))
        except BaseException:
            self.meta_path(job_id).unlink(missing_ok=True)  # no half-made job (a kill here: upkeep's orphans)
            raise

    def read_meta(self, job_id: int) -> JobMeta | None:
        """The job's meta file, or None when it has none (or an unreadable one)."""
        try:
            return read_checked(self.meta_path(job_id), JobMeta)
        except (FileNotFoundError, CorruptFile):
            return None

    def read_status(self, job_id: int) -> JobStatus | None:
        """The status the daemon last wrote, the queued status if it has not started, or None if unknown. The
        callback's delivery is not filled in here (Spool.status does it from the outbox).

        Raises OSError when the spool cannot be read (permissions): that is the operator's to fix, and no
        answer may be guessed from it."""
        doc = self._status_file(job_id)
        if doc is not None:
            return doc
        folder = self.folder_of(job_id)
        if folder is None:
            return None
        doc = self._status_file(job_id)  # the daemon may have written it between the two looks
        if doc is not None:
            return doc
        if folder in FINISHED_FOLDERS:
            # The status file is unreadable (the daemon moves it aside and rebuilds it); the folder alone
            # says the job is finished, and a status never goes back to ongoing.
            status = Status.COMPLETED if folder is Folder.DONE else Status.FAILED
            return JobStatus(str(job_id), status, Phase.FINISHED,
                             note="status file unreadable; the daemon rebuilds it from the results")
        meta = self.read_meta(job_id)
        if meta is not None and meta.callback_url:  # no status file yet: the meta file knows the URL
            return JobStatus(str(job_id), Status.ONGOING, Phase.QUEUED,
                             callback=Callback(meta.callback_url, DeliveryState.WAITING))
        return JobStatus(str(job_id), Status.ONGOING, Phase.QUEUED)

    def _status_file(self, job_id: int) -> JobStatus | None:
        try:
            return read_checked(self.status_path(job_id), JobStatus)
        except (FileNotFoundError, CorruptFile):
            return None

    # ------------------------------------------------------------------ the daemon's side
    def read(self, path: Path) -> JobFile:
        """A job file; CorruptFile when it is not one, saying what is wrong and what a job file holds."""
        try:
            job = read_checked(path, JobFile)
        except CorruptFile as exc:
            raise CorruptFile(f"{exc}; {JOB_FILE_NEEDS}") from exc
        if str(job.job_id) != path.name.partition(".")[0]:
            raise CorruptFile(f"{path.name}: says job_id {job.job_id}, not the id of its name; {JOB_FILE_NEEDS}")
        return job

    def claim(self, job_id: int) -> Path:
        """Move a job from incoming/ to active/; the daemon owns it from now on. NotYetStored while the API
        still holds it (SpoolFiles.publish: its folder's fsync has not returned, and may yet fail)."""
        [error] = self.claim_all([job_id])
        if error is not None:
            raise error
        return self.path(Folder.ACTIVE, job_id)

    def claim_all(self, job_ids: list[int]) -> list[OSError | None]:
        """claim() several jobs, sharing the folders' fsyncs: what one turn of the daemon admits. For each: None,
        or its error (FileNotFoundError: claimed or cancelled meanwhile; NotYetStored: still being stored)."""
        incoming, active = self._text[Folder.INCOMING], self._text[Folder.ACTIVE]
        errors: list[OSError | None] = [None] * len(job_ids)
        held, moves, where = [], [], []
        try:
            for i, job_id in enumerate(job_ids):
                src = f"{incoming}/{job_id}.json"
                try:
                    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError as exc:
                    errors[i] = exc
                    continue
                except OSError:
                    fd = None  # a link or a FIFO in its place: moved as it is, and the loader puts it aside
                if fd is not None:
                    held.append(fd)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:
                        errors[i] = NotYetStored(errno.EAGAIN, "the API is still storing it", src)
                        continue
                moves.append((src, f"{active}/{job_id}.json"))
                where.append(i)
            for i, error in zip(where, self.files.rename_all(moves)):
                errors[i] = error
        finally:
            for fd in held:
                os.close(fd)
        return errors

    def write_status(self, status: JobStatus) -> None:
        self.files.write(self.status_path(int(status.job_id)), status)

    def write_statuses(self, statuses: list[JobStatus], durable: bool) -> list[OSError | None]:
        """Several status files at once, sharing status/'s fsync when ``durable``; otherwise each file's bytes are
        fsynced but not the folder (files.py, write_all): a status that may be lost, never one that is garbage.
        For each: None or its error."""
        folder = self._text[Folder.STATUS]
        return self.files.write_all([(f"{folder}/{s.job_id}.json", encode(s)) for s in statuses], durable=True,
                                    folders=durable)

    def finish_all(self, finished: list[tuple[int, Status]]) -> list[OSError | None]:
        """finish() several jobs, sharing the folders' fsyncs. For each: None, or its error.

        Called again after it failed (a folder's fsync failed, EIO): a move made but not proven durable is made
        again (the old name linked back, then moved as the first time), never taken as done."""
        active, done, failed = self._text[Folder.ACTIVE], self._text[Folder.DONE], self._text[Folder.FAILED]
        moves = [(f"{active}/{job_id}.json", f"{done if status is Status.COMPLETED else failed}/{job_id}.json")
                 for job_id, status in finished]
        for src, dest in moves:
            if not os.path.exists(src) and os.path.exists(dest):
                os.link(dest, src, follow_symlinks=False)
        return self.files.rename_all(moves)

    def finish(self, job_id: int, status: Status) -> None:
        """Move a job out of active/ once its final status and every result are on disk."""
        [error] = self.finish_all([(job_id, status)])
        if error is not None:
            raise error

    def reopen(self, job_id: int, folder: str) -> None:
        """Move a finished job back to active/, for the daemon to redo the images that lost their results."""
        self.files.rename(self.path(folder, job_id), self.path(Folder.ACTIVE, job_id))
