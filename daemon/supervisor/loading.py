"""Reading a claimed job back: its job file and whatever results are already on disk, at claim, at start-up
and after a requeue; and repairing what a crash or a bad disk left (an unreadable status or results file).

Whatever is not what it should be is moved to corrupt/ with a note saying why: a name in incoming/ that is
no job file's, a job file that does not parse (or is a folder or link; the job is failed, the reason in
its status), a job file whose id another job already has, a damaged results file or a file where a job's
results folder should be (its images are done again). A job file dropped in by hand keeps its id, and the
API never gives that id (Jobs.reserve_id). What this process may not read, list or move (permissions, a
disk too full for the status) is neither: it is logged (trouble.py), the job is left where it is, and it
is tried again every RETRY_S, never a crash that every restart repeats.
"""
from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

from daemon.supervisor.jobs import ActiveJob, Chunk, uncovered
from daemon.supervisor.trouble import Trouble
from spool import (FINISHED_FOLDERS, CorruptFile, DamagedResults, Folder, Phase, Spool, Status, UnreadableResults,
                   utc_now)
from spool.jobs import NotYetStored
from spool.records import JobStatus, StoreFailure

log = logging.getLogger("retailpulse.daemon")

#: A job that could not be read or failed (permissions, a full disk) is tried again this often.
RETRY_S = 5.0


class JobLoader:
    def __init__(self, spool: Spool, chunk_images: int, trouble: Trouble | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.spool, self.chunk_images, self.clock = spool, chunk_images, clock
        self.trouble = trouble or Trouble(clock)
        self.retry_at: dict[int, float] = {}  # job id (in active/) -> clock() when to open it again

    def claim(self, job_id: int) -> Path | None:
        """Move a job from incoming/ to active/ and return its path there; None when it is not to be run:
        its id is another job's already (moved aside), or it went meanwhile (cancelled and claimed).
        NotYetStored while the API still holds it (the caller tries again)."""
        claimed, storing = self.claim_all([job_id])
        if storing:
            raise NotYetStored(errno.EAGAIN, "the API is still storing it", str(self.spool.jobs.path(Folder.INCOMING,
                                                                                                      job_id)))
        return claimed[0][1] if claimed else None

    def claim_all(self, job_ids: list[int]) -> tuple[list[tuple[int, Path]], bool]:
        """claim() several jobs, sharing the folders' fsyncs (Jobs.claim_all): what one turn admits. (The jobs
        claimed, with their paths in active/; whether any was still being stored, to be looked at again soon.)
        What may not be moved (permissions) is trouble, and tried again at the next look."""
        jobs, fresh = self.spool.jobs, []
        for job_id in job_ids:
            other = next((folder for folder in (Folder.ACTIVE, *FINISHED_FOLDERS)
                          if jobs.path(folder, job_id).exists()), None)
            if other is not None:
                self.set_aside(jobs.path(Folder.INCOMING, job_id),
                               f"incoming/{job_id}.json: job {job_id} exists already ({other}/{job_id}.json); job ids "
                               "are the API's to give (POST /api/submit/)")
                continue
            if not jobs.meta_path(job_id).exists():  # not from the API, which writes the meta file first: by hand
                jobs.reserve_id(job_id)
            fresh.append(job_id)
        claimed, storing = [], False
        for job_id, error in zip(fresh, jobs.claim_all(fresh)):
            if error is None:
                claimed.append((job_id, jobs.path(Folder.ACTIVE, job_id)))
            elif isinstance(error, NotYetStored):
                storing = True
            elif not isinstance(error, FileNotFoundError):  # gone meanwhile: cancelled and claimed
                self.trouble.failed(f"claiming incoming/{job_id}.json", error)
        return claimed, storing

    def set_aside(self, path: Path, why: str) -> None:
        """Move a spool entry that is not what it should be to corrupt/, saying why; trouble if it will not go."""
        try:
            self.spool.files.move_aside(path, why)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.trouble.failed(f"cannot move {path.parent.name}/{path.name} aside ({why})", exc)
            return
        log.error("moved to corrupt/: %s", why)

    def due(self) -> list[tuple[int, Path]]:
        """The jobs to open again now (those that could not be read or failed before): (id, path in active/)."""
        if not self.retry_at:
            return []
        now = self.clock()
        ready = [job_id for job_id, at in self.retry_at.items() if at <= now]
        for job_id in ready:
            del self.retry_at[job_id]
        return [(job_id, self.spool.jobs.path(Folder.ACTIVE, job_id)) for job_id in ready
                if self.spool.jobs.path(Folder.ACTIVE, job_id).exists()]

    def later(self, job_id: int, what: str, exc: OSError | str) -> None:
        """The job cannot be opened now: trouble, and another try in RETRY_S."""
        self.trouble.failed(what, exc)
        self.retry_at[job_id] = self.clock() + RETRY_S

    def open(self, job_id: int, path: Path) -> ActiveJob | None:
        """The job at ``path`` with its recorded results counted and the rest queued as chunks; None (and
        the job failed, naming why) when its file cannot be read, or (tried again later) may not be."""
        try:
            job = ActiveJob(job_id, self.spool.jobs.read(path))
        except CorruptFile as exc:
            self.reject(job_id, path, f"job file unreadable: {exc}")
            return None
        except OSError as exc:
            self.later(job_id, f"job {job_id}: cannot read {path.parent.name}/{path.name}; left there: fix its "
                               "owner or mode", exc)
            return None
        try:
            covered = self.read_recorded(job)
        except UnreadableResults as exc:
            self.later(job_id, f"job {job_id}: left in active/: fix its owner or mode", exc.why)
            return None
        except OSError as exc:  # a damaged results file that may not be moved aside
            self.later(job_id, f"job {job_id}: left in active/", exc)
            return None
        self.trouble.ok(f"job {job_id}: left in active/: fix its owner or mode")
        job.pending.extend(Chunk(job_id, first, stop) for first, stop in uncovered(job.total, covered, self.chunk_images))
        self.resume_progress(job)
        log.info("job %d: %s, %d images, %d already recorded", job_id,
                 "resumed" if covered else "started", job.total, job.recorded)
        return job

    def resume_progress(self, job: ActiveJob) -> None:
        """A job that was running (a restart): its images_processed starts where its last status left it, so
        that clients never see it go back while the images that were not recorded are redone (progress.py).
        Not after a requeue: that status says finished, and the job is counted afresh."""
        try:
            last = self.spool.jobs.read_status(job.job_id)
        except OSError:
            return  # unreadable: the next write replaces it
        if last is not None and last.phase is Phase.RUNNING and last.images_processed:
            job.processed_high = min(last.images_processed, job.total)

    def read_recorded(self, job: ActiveJob) -> list[tuple[int, int]]:
        """Count the job's recorded results; move unreadable results files aside (and a file where the
        results folder should be: all its images are done again). The (first, stop) covered."""
        covered = []
        try:
            chunks = self.spool.results.chunks(job.job_id)
        except DamagedResults as exc:
            self.spool.files.move_aside(exc.path, f"{exc.why}; the job's images are done again")
            log.error("job %d: %s; moved to corrupt/, its images are done again", job.job_id, exc.why)
            return covered
        for first, stop, path in chunks:
            try:
                records = self.spool.results.read(job.job_id, first, stop, path)
            except DamagedResults as exc:
                self.spool.files.move_aside(path, f"results file unreadable, images redone: {exc}")
                continue
            for record in records:
                job.count(record.store_id, record.error, record.image_url)
            covered.append((first, stop))
        return covered

    def repair_status(self, job_id: int) -> None:
        """A status file that does not parse: move it aside; rebuild it from the job's results. What the
        daemon may not do (permissions, a full disk) is trouble: the API answers from the job's folder."""
        try:
            self._repair_status(job_id)
        except OSError as exc:
            self.trouble.failed(f"job {job_id}: cannot repair its status file", exc)

    def _repair_status(self, job_id: int) -> None:
        self.spool.files.move_aside(self.spool.jobs.status_path(job_id),
                                    "status file unreadable; rebuilt from the results")
        for folder in FINISHED_FOLDERS:
            path = self.spool.jobs.path(folder, job_id)
            if path.exists():
                try:
                    job = ActiveJob(job_id, self.spool.jobs.read(path))
                    self.read_recorded(job)
                except (CorruptFile, OSError, UnreadableResults) as exc:
                    log.error("job %d: status not rebuilt: %s", job_id, exc)
                    return  # the job file itself is broken or unreadable; its status stays unknown
                if job.finished:
                    self.spool.jobs.write_status(job.status())
                    log.warning("job %d: status file was unreadable; rebuilt from its results", job_id)
                else:  # results went missing too: do the missing images again
                    self.spool.jobs.reopen(job_id, folder)
                    log.warning("job %d: status and results incomplete; back to active/ to redo them", job_id)
                return
        # incoming/ or active/: open() and the daemon's next write replace it.

    def reject(self, job_id: int, path: Path, why: str) -> None:
        """Fail a job whose file is no job file: its status first (what clients read), then the file aside.
        Neither done (a full disk, permissions): the file stays in active/ and is looked at again later."""
        try:
            self.spool.jobs.write_status(JobStatus(
                str(job_id), Status.FAILED, Phase.FINISHED, images_total=0, images_done=0, images_failed=0,
                updated_at=utc_now(), error=[StoreFailure("", why)]))
            self.spool.files.move_aside(path, why)
        except OSError as exc:
            self.later(job_id, f"job {job_id}: cannot fail it ({why})", exc)
            return
        log.error("job %d: %s", job_id, why)
