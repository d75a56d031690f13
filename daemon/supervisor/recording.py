"""Recording: finished chunks' results files, then their jobs' statuses, then (once every image of a job has a
result) the job's move out of active/. The order is the crash promise: nothing is counted before it is on
disk, and no job moves to done/ or failed/ before its results and its final status are.

Batched: the supervisor hands over what finished during one turn of its loop (``record`` and ``touch``), and
``flush`` writes it all at once, each step for every job before the next step for any, so that jobs that
finish together share their folders' fsyncs (spool/files.py, write_all and rename_all): forty small jobs
finishing in one turn cost one fsync of status/, of done/ and of active/, not forty of each. A status of a
job still running is fsynced but not its folder: it only says how far the job got, which its results files
(durable) say too, so after a power cut it may read older (the daemon rewrites it when it loads the job
again), never garbage.

Disk trouble: when a write fails (ENOSPC, EIO), the chunk or status is kept here, in memory, and tried
again every ``retry_interval_s``; the supervisor dispatches nothing new meanwhile (``paused``), and a job
never moves on without its results.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from daemon.engine.outcome import ImageOutcome
from daemon.notifications.outbox import Outbox
from daemon.supervisor.jobs import ActiveJob, Chunk
from daemon.supervisor.metrics import Metrics
from daemon.supervisor.stores import Store
from spool import Spool
from spool.records import JobStatus

log = logging.getLogger("retailpulse.daemon")


class Recorder:
    def __init__(self, spool: Spool, stores: dict[str, Store], metrics: Metrics, retry_interval_s: float,
                 clock: Callable[[], float] = time.monotonic, outbox: Outbox | None = None):
        self.spool, self.stores, self.metrics, self.clock = spool, stores, metrics, clock
        self.outbox = outbox or Outbox(spool)  # completion notifications (daemon/notifications/)
        self.retry_interval_s = retry_interval_s
        self.batch: list[tuple[ActiveJob, Chunk, list[ImageOutcome]]] = []  # this turn's finished chunks
        self.touched: dict[int, ActiveJob] = {}  # this turn's jobs whose status is to be written
        self.unrecorded: deque[tuple[ActiveJob, Chunk, list[ImageOutcome]]] = deque()
        self.unpublished: dict[int, ActiveJob] = {}
        self.retry_at = 0.0  # clock(); no writes are tried again before it

    @property
    def paused(self) -> bool:
        """Some results or statuses could not be written; nothing new should be dispatched until they are."""
        return bool(self.unrecorded or self.unpublished)

    def owes(self, job_id: int) -> bool:
        """Whether some of the job's results or its status are still to be written."""
        return (job_id in self.unpublished or job_id in self.touched
                or any(job.job_id == job_id for job, _, _ in (*self.unrecorded, *self.batch)))

    def record(self, job: ActiveJob, chunk: Chunk, outcomes: list[ImageOutcome]) -> None:
        """A chunk's outcomes (one per image, in order), to be written at the next flush. The chunk stays
        counted in flight in its job until its results are on disk."""
        self.batch.append((job, chunk, outcomes))

    def touch(self, job: ActiveJob) -> None:
        """The job's status is to be written at the next flush (a job just loaded: how far it got)."""
        self.touched[job.job_id] = job

    def flush(self) -> list[ActiveJob]:
        """Write this turn's results files, then the statuses of their jobs, then move the jobs that finished.
        The jobs that finished and left active/."""
        batch, self.batch = self.batch, []
        if batch:
            self._write_results(batch)
        touched, self.touched = self.touched, {}
        return self._publish(list(touched.values())) if touched else []

    def _write_results(self, batch: list[tuple[ActiveJob, Chunk, list[ImageOutcome]]]) -> None:
        lines = [[job.result_line(o.index, o, self.stores) for o in outcomes] for job, _, outcomes in batch]
        errors = self.spool.results.write_many([(job.job_id, chunk.first, chunk.stop, chunk_lines)
                                                for (job, chunk, _), chunk_lines in zip(batch, lines)])
        for (job, chunk, outcomes), chunk_lines, error in zip(batch, lines, errors, strict=True):
            if error is not None:
                self._failed(f"job {job.job_id}: cannot write results of images {chunk.first}..{chunk.stop - 1}",
                             error)
                self.unrecorded.append((job, chunk, outcomes))
                continue
            job.chunks_in_flight -= 1
            for line, outcome in zip(chunk_lines, outcomes, strict=True):
                job.count(line.store_id, line.error, line.image_url)
                self.metrics.image(outcome)
            self.touched[job.job_id] = job

    def _publish(self, jobs: list[ActiveJob]) -> list[ActiveJob]:
        """Statuses, then the moves out of active/: running jobs' statuses as they are, finished jobs' durably,
        after their notification (a job with a callback_url) and before their move."""
        statuses = {job.job_id: job.status() for job in jobs}
        finished = [job for job in jobs if job.finished]
        ready = [job for job in finished if self._notification_written(job, statuses[job.job_id])]
        running = [job for job in jobs if not job.finished]
        written = self._statuses(running, statuses, durable=False) + self._statuses(ready, statuses, durable=True)
        done = [job for job in written if job.finished]
        moved = []
        for job, error in zip(done, self.spool.jobs.finish_all([(job.job_id, statuses[job.job_id].status)
                                                               for job in done])):
            if error is not None:
                self._owe_status(job, f"job {job.job_id}: cannot move it out of active/", error)
                continue
            self.unpublished.pop(job.job_id, None)
            if job.callback_url:
                self.outbox.ready(job.job_id)
            self.metrics.job(statuses[job.job_id].status)
            log.info("job %d: %s, %d images, %d failed", job.job_id, statuses[job.job_id].status, job.total,
                     job.failed)
            moved.append(job)
        return moved

    def _notification_written(self, job: ActiveJob, status: JobStatus) -> bool:
        """A finished job's notification, in outbox/ before its status says finished: no crash loses it."""
        if not job.callback_url:
            return True
        try:
            self.outbox.add(job.job_id, job.callback_url, status)
        except OSError as exc:
            self._owe_status(job, f"job {job.job_id}: cannot write its notification", exc)
            return False
        return True

    def _statuses(self, jobs: list[ActiveJob], statuses: dict[int, JobStatus], durable: bool) -> list[ActiveJob]:
        """Write the jobs' statuses; the jobs whose status is written (the others are owed)."""
        written = []
        errors = self.spool.jobs.write_statuses([statuses[job.job_id] for job in jobs], durable)
        for job, error in zip(jobs, errors, strict=True):
            if error is not None:
                self._owe_status(job, f"job {job.job_id}: cannot write its status", error)
                continue
            if not job.finished:
                self.unpublished.pop(job.job_id, None)
            written.append(job)
        return written

    def _owe_status(self, job: ActiveJob, what: str, exc: OSError) -> None:
        self._failed(what, exc)
        self.unpublished[job.job_id] = job

    def retry(self) -> list[ActiveJob]:
        """Try the owed writes again, when it is time. The jobs that finished thereby."""
        if not self.paused or self.clock() < self.retry_at:
            return []
        for _ in range(len(self.unrecorded)):
            self.batch.append(self.unrecorded.popleft())
        self.touched.update(self.unpublished)
        finished = self.flush()
        if not self.paused:
            log.info("disk writes work again; resuming")
        return finished

    def _failed(self, what: str, exc: OSError) -> None:
        if not self.paused:
            log.error("%s: %s; pausing, retrying every %g s", what, exc, self.retry_interval_s)
        self.retry_at = self.clock() + self.retry_interval_s
