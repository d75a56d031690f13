"""Jobs in the spool: the job file (whose folder is its state), its meta file, its status file, and the ids
they are named by. The API stores jobs; only the daemon moves them and writes their status."""
from __future__ import annotations

import os
from pathlib import Path

import filelock
from msgspec import UNSET

from spool.files import FILE_MODE, CorruptFile, SpoolFiles, ids_in, read_checked
from spool.records import Callback, JobFile, JobMeta, JobStatus, Visit
from spool.vocabulary import (FINISHED_FOLDERS, JOB_FOLDERS, DeliveryState, Folder, Phase, Status, parse_job_id,
                              utc_now)

#: A submit waits this long for another API process to take its id.
ID_LOCK_TIMEOUT_S = 30
#: What a job file must hold, for the note of one that does not: a hand may have dropped a submit body in.
JOB_FILE_NEEDS = ('a job file is what the API writes: {"job_id": <the id of its name>, "submitted_at": "<UTC time>", '
                  '"count": <visits>, "visits": [{"store_id": ..., "visit_time": ..., "image_url": [...]}]}; '
                  "to submit a job, POST its body to /api/submit/")


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
        """The folder (= state) a job file is in: incoming, active, done, failed; None if there is none."""
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

    def reserve_id(self, job_id: int) -> None:
        """Make sure next_id() never gives ``job_id``: a job file that did not come from it (dropped into
        incoming/ by hand) keeps its id, and no later submit is given the same one."""
        counter = self.root / "next_job_id"
        with filelock.FileLock(str(counter) + ".lock", timeout=ID_LOCK_TIMEOUT_S, mode=FILE_MODE):
            try:
                next_id = int(counter.read_text().strip() or "1")
            except FileNotFoundError:
                next_id = 1
            if next_id <= job_id:
                self.files.write_atomic(counter, f"{job_id + 1}\n".encode())

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
            self.files.write(self.path(Folder.INCOMING, job_id), job)
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
        """Move a job from incoming/ to active/; the daemon owns it from now on."""
        dest = self.path(Folder.ACTIVE, job_id)
        self.files.rename(self.path(Folder.INCOMING, job_id), dest)
        return dest

    def write_status(self, status: JobStatus) -> None:
        self.files.write(self.status_path(int(status.job_id)), status)

    def finish(self, job_id: int, status: Status) -> None:
        """Move a job out of active/ once its final status and every result are on disk."""
        folder = Folder.DONE if status is Status.COMPLETED else Folder.FAILED
        self.files.rename(self.path(Folder.ACTIVE, job_id), self.path(folder, job_id))

    def reopen(self, job_id: int, folder: str) -> None:
        """Move a finished job back to active/, for the daemon to redo the images that lost their results."""
        self.files.rename(self.path(folder, job_id), self.path(Folder.ACTIVE, job_id))
