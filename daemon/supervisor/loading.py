"""Reading a claimed job back: its job file and whatever results are already on disk, at claim, at start-up
and after a requeue; and repairing what a crash or a bad disk left (an unreadable status or results file).

A job whose file cannot be parsed (or is a folder or link) is failed at once, with the reason in its status,
and its file moved to corrupt/; a damaged results file is moved aside and its images are done again. A file
this process may not read (permissions) is neither: it is logged and the job is left where it is, for the
operator to fix and the daemon to resume at its next start, never a crash that every restart repeats.
"""
from __future__ import annotations

import logging
from pathlib import Path

from daemon.supervisor.jobs import ActiveJob, Chunk, uncovered
from spool import FINISHED_FOLDERS, CorruptFile, DamagedResults, Phase, Spool, Status, UnreadableResults, utc_now
from spool.records import JobStatus, StoreFailure

log = logging.getLogger("retailpulse.daemon")


class JobLoader:
    def __init__(self, spool: Spool, chunk_images: int):
        self.spool, self.chunk_images = spool, chunk_images

    def open(self, job_id: int, path: Path) -> ActiveJob | None:
        """The job at ``path`` with its recorded results counted and the rest queued as chunks; None (and
        the job failed, naming why) when its file cannot be read."""
        try:
            job = ActiveJob(job_id, self.spool.jobs.read(path))
        except CorruptFile as exc:
            self.reject(job_id, path, f"job file unreadable: {exc}")
            return None
        except OSError as exc:
            log.error("job %d: cannot read %s/%s (%s); left there: fix its owner or mode, then restart the daemon",
                      job_id, path.parent.name, path.name, exc.strerror or exc)
            return None
        try:
            covered = self.read_recorded(job)
        except UnreadableResults as exc:
            log.error("job %d: %s; left in active/: fix its owner or mode, then restart the daemon", job_id, exc.why)
            return None
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
        """Count the job's recorded results; move unreadable results files aside. The (first, stop) covered."""
        covered = []
        for first, stop, path in self.spool.results.chunks(job.job_id):
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
        """A status file that does not parse: move it aside; rebuild it from the job's results."""
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
        log.error("job %d: %s", job_id, why)
        self.spool.files.move_aside(path, why)
        self.spool.jobs.write_status(JobStatus(
            str(job_id), Status.FAILED, Phase.FINISHED, images_total=0, images_done=0, images_failed=0,
            updated_at=utc_now(), error=[StoreFailure("", why)]))
