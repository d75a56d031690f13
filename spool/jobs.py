"""Jobs in the spool: the job file (whose folder is its state), its meta file, its status file, and the ids
they are named by. The API stores jobs; only the daemon moves them and writes their status."""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import filelock
from msgspec import UNSET

from spool.files import FILE_MODE, CorruptFile, SpoolFiles, encode, ids_in, read_checked
from spool.records import Callback, JobFile, JobMeta, JobStatus, Visit
from spool.vocabulary import (FINISHED_FOLDERS, JOB_FOLDERS, DeliveryState, Folder, Phase, Status, utc_now)

#: A submit waits this long for another API process to take its id.
ID_LOCK_TIMEOUT_S = 30


class NotYetStored(FileNotFoundError):
    """A job file in incoming/ that its writer still holds: not there yet, for the daemon (Jobs.claim)."""


class Jobs:
    def __init__(self, files: SpoolFiles):
        self.files, self.root = files, files.root

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
        """Take the next job id. Ids only increase, even with several API processes and across restarts."""
        counter = self.root / "next_job_id"
        with filelock.FileLock(str(counter) + ".lock", timeout=ID_LOCK_TIMEOUT_S, mode=FILE_MODE):
            try:
                job_id = int(counter.read_text().strip() or "1")
            except FileNotFoundError:
                job_id = 1
            self.files.write_atomic(counter, f"{job_id + 1}\n".encode())
        return job_id

    def submit(self, count: int, visits: list[Visit], owner: str | None = None,
               callback_url: str | None = None) -> int:
        """Store a validated job in incoming/ and return its id. When this returns, the job is on disk."""
        job_id = self.next_id()
        self.store(job_id, count, visits, owner, callback_url=callback_url)
        return job_id

    def store(self, job_id: int, count: int, visits: list[Visit], owner: str | None,
              callback_url: str | None = None, idempotency_key: str | None = None) -> None:
        """submit() with the id taken: its meta file, then its job file (keys.py writes its key before)."""
        callback_url = UNSET if callback_url is None else callback_url
        job = JobFile(job_id, utc_now(), count, visits, callback_url)
        meta = JobMeta(job_id, job.images, owner, UNSET if idempotency_key is None else idempotency_key, callback_url)
        self.files.write(self.meta_path(job_id), meta)
        try:
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
        """A job file; CorruptFile when it is not one (saying what is wrong)."""
        return read_checked(path, JobFile)

    def claim(self, job_id: int) -> Path:
        """Move a job from incoming/ to active/; the daemon owns it from now on. NotYetStored while the API
        still holds it (SpoolFiles.publish: its folder's fsync has not returned, and may yet fail)."""
        src, dest = self.path(Folder.INCOMING, job_id), self.path(Folder.ACTIVE, job_id)
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            fd = None  # a link or a FIFO in its place: moved as it is, and the loader puts it aside
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise NotYetStored(errno.EAGAIN, "the API is still storing it", str(src)) from None
            self.files.rename(src, dest)
        finally:
            if fd is not None:
                os.close(fd)
        return dest

    def write_status(self, status: JobStatus) -> None:
        self.files.write(self.status_path(int(status.job_id)), status)

    def finish(self, job_id: int, status: Status) -> None:
        """Move a job out of active/ once its final status and every result are on disk.

        Called again after it raised (a folder's fsync failed, EIO): a move made but not proven durable is made
        again (the old name linked back, then moved as the first time), never taken as done."""
        folder = Folder.DONE if status is Status.COMPLETED else Folder.FAILED
        src, dest = self.path(Folder.ACTIVE, job_id), self.path(folder, job_id)
        if not src.exists() and dest.exists():
            os.link(dest, src, follow_symlinks=False)
        self.files.rename(src, dest)

    def reopen(self, job_id: int, folder: str) -> None:
        """Move a finished job back to active/, for the daemon to redo the images that lost their results."""
        self.files.rename(self.path(folder, job_id), self.path(Folder.ACTIVE, job_id))
