"""Progress a person can watch: a job's "images_processed", moving while its images finish, not a chunk at a time.

A chunk is recorded (results file, then status) only once all of its images are done, so "images_done" moves
in steps of 64 (and a job of 5 images in one). The runners report, for each task still running, how many of
its images have an outcome (TaskProgress, from the engine's per-image completions); the job counts them
(ActiveJob.measuring) beside what is recorded, and this writes the job's status when that figure moved, at
most every WRITE_INTERVAL_S per job.

What it is not: durable. Those images are counted before they are on disk, so the figure has a name of its
own ("images_processed"; "images_done" still counts only recorded images), these writes are not fsynced, and
a crash may take them back: the chunk is redone. Clients never see it go back: a restarted daemon starts a
resumed job's figure where the last status left it (loading.py), and it holds still until the redone images
pass it (ActiveJob.processed).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from daemon.runners import TaskDone, TaskLost, TaskProgress
from daemon.supervisor.jobs import ActiveJob
from spool import Spool

log = logging.getLogger("retailpulse.daemon")

#: A job's progress is written at most this often, and, while its images finish, about this often.
WRITE_INTERVAL_S = 1.0


class ProgressWriter:
    def __init__(self, spool: Spool, clock: Callable[[], float] = time.monotonic):
        self.spool, self.clock = spool, clock
        self.written: dict[int, tuple[float, int]] = {}  # job id -> (clock() of the last write, figure written)

    @staticmethod
    def note(event: TaskDone | TaskLost | TaskProgress, dispatched: dict, jobs: dict[int, ActiveJob]) -> None:
        """Count a task's progress in its job; a task that ended (done or lost) is no longer counted there:
        done, its images are recorded next; lost, they are redone. Called for every event, before it is handled."""
        if isinstance(event, TaskProgress):
            for task_id, images in event.measured.items():
                task = dispatched.get(task_id)
                if task is not None:
                    jobs[task.chunk.job_id].measuring[task_id] = images
            return
        task = dispatched.get(event.task_id)
        if task is not None:
            jobs[task.chunk.job_id].measuring.pop(event.task_id, None)

    def write_due(self, jobs: dict[int, ActiveJob]) -> None:
        """Write the status of each running job whose figure moved, if its last write here is WRITE_INTERVAL_S old."""
        now = self.clock()
        for job_id in [job_id for job_id in self.written if job_id not in jobs]:
            del self.written[job_id]
        for job in jobs.values():
            if job.finished:
                continue  # its final status is the recorder's to write, durably
            at, figure = self.written.get(job.job_id, (float("-inf"), job.recorded))
            if now < at + WRITE_INTERVAL_S or job.processed() == figure:
                continue
            status = job.status()
            try:
                # not fsynced: the figure is not durable anyway, and an fsync a second per job would cost the loop
                self.spool.files.write(self.spool.jobs.status_path(job.job_id), status, durable=False)
            except OSError as exc:  # a full disk: the recorder pauses and says so; progress can wait
                log.debug("job %d: progress not written: %s", job.job_id, exc)
                continue
            self.written[job.job_id] = (now, status.images_processed)
