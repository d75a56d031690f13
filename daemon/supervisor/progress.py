"""Progress a person can watch: a job's "images_processed", moving while its images finish, not a chunk at a time.

A chunk is recorded (results file, then status) only once all of its images are done, so "images_done" moves
in steps of 64 (and a job of 5 images in one). The runners report, for each task still running, how many of
its images have an outcome (TaskProgress, from the engine's per-image completions); the job counts them
(ActiveJob.measuring) beside what is recorded, and this writes the job's status when that figure moved, at
most every WRITE_INTERVAL_S per job.

What it is not: durable. Those images are counted before they are on disk, so the figure has a name of its
own ("images_processed"; "images_done" still counts only recorded images), these writes fsync no folder, and
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
#: A job's first figure is written no sooner than this after the daemon took it up (see write_due).
FIRST_WRITE_AFTER_S = 0.5


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

    def next_due(self, jobs: dict[int, ActiveJob]) -> float:
        """clock() when write_due has a figure to write next (inf: none moved): the loop waits no longer."""
        due = [at + WRITE_INTERVAL_S for job_id, (at, figure) in self.written.items()
               if job_id in jobs and not jobs[job_id].finished and jobs[job_id].processed() != figure]
        return min(due, default=float("inf"))

    def write_due(self, jobs: dict[int, ActiveJob]) -> None:
        """Write the status of each running job whose figure moved, if its last write here is WRITE_INTERVAL_S old."""
        now = self.clock()
        for job_id in [job_id for job_id in self.written if job_id not in jobs]:
            del self.written[job_id]
        for job in jobs.values():
            if job.finished:
                continue  # its final status is the recorder's to write, durably
            # A job just seen waits FIRST_WRITE_AFTER_S for its first figure: its loading wrote a status, and a
            # job done by then (the common one, a visit of a few photos: its slowest wait is 0.4 s) needs none
            # between that and its end.
            at, figure = self.written.setdefault(job.job_id, (now - WRITE_INTERVAL_S + FIRST_WRITE_AFTER_S,
                                                               job.recorded))
            if now < at + WRITE_INTERVAL_S or job.processed() == figure:
                continue
            status = job.status()
            # Its bytes fsynced, its folder not (as the recorder writes a running job's status): the figure is not
            # durable anyway, but a status is never garbage after a power cut (spool/files.py, write_all).
            [error] = self.spool.jobs.write_statuses([status], durable=False)
            if error is not None:  # a full disk: the recorder pauses and says so; progress can wait
                log.debug("job %d: progress not written: %s", job.job_id, error)
                continue
            self.written[job.job_id] = (now, status.images_processed)
