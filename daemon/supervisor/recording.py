"""Recording: a finished chunk's results file, then its job's status, then (once every image has a result)
the job's move out of active/. The order is the crash promise: nothing is counted before it is on disk.

Disk trouble: when a write fails (ENOSPC, EIO), the chunk or status is kept here, in memory, and tried
again every ``retry_interval_s``; the supervisor dispatches nothing new meanwhile (``paused``), and a job
never moves on without its results.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from daemon.supervisor.jobs import ActiveJob, Chunk
from daemon.supervisor.metrics import Metrics
from daemon.engine.outcome import ImageOutcome
from daemon.supervisor.stores import Store
from daemon.supervisor.webhooks import Outbox
from spool import Spool, Status

log = logging.getLogger("retailpulse.daemon")


class Recorder:
    def __init__(self, spool: Spool, stores: dict[str, Store], metrics: Metrics, retry_interval_s: float,
                 clock: Callable[[], float] = time.monotonic, outbox: Outbox | None = None):
        self.spool, self.stores, self.metrics, self.clock = spool, stores, metrics, clock
        self.outbox = outbox or Outbox(spool)  # completion webhooks (webhooks.py)
        self.retry_interval_s = retry_interval_s
        self.unrecorded: deque[tuple[ActiveJob, Chunk, list[ImageOutcome]]] = deque()
        self.unpublished: dict[int, ActiveJob] = {}
        self.retry_at = 0.0  # clock(); no writes are tried again before it

    @property
    def paused(self) -> bool:
        """Some results or statuses could not be written; nothing new should be dispatched until they are."""
        return bool(self.unrecorded or self.unpublished)

    def owes(self, job_id: int) -> bool:
        """Whether some of the job's results or its status are still to be written."""
        return job_id in self.unpublished or any(job.job_id == job_id for job, _, _ in self.unrecorded)

    def record(self, job: ActiveJob, chunk: Chunk, outcomes: list[ImageOutcome]) -> bool:
        """Write a chunk's results (one outcome per image, in order), count them, publish the status.

        True once the job has finished and left active/; the job's chunk stays counted in flight until its
        results are on disk."""
        lines = [job.result_line(o.index, o, self.stores) for o in outcomes]
        try:
            self.spool.write_results(job.job_id, chunk.first, chunk.stop, lines)
        except OSError as exc:
            self._failed(f"job {job.job_id}: cannot write results of images {chunk.first}..{chunk.stop - 1}", exc)
            self.unrecorded.append((job, chunk, outcomes))
            return False
        job.chunks_in_flight -= 1
        for line, outcome in zip(lines, outcomes, strict=True):
            job.count(line["store_id"], line["error"], line["image_url"])
            self.metrics.image(outcome)
        return self.publish(job)

    def publish(self, job: ActiveJob) -> bool:
        """Write the job's status; once every image has a result, move the job out of active/. True then."""
        doc = job.status_doc()
        try:
            if job.finished and job.callback_url:  # before the status says finished: no crash loses it
                self.outbox.add(job.job_id, job.callback_url, doc)
            self.spool.write_status(job.job_id, doc)
            if job.finished:
                self.spool.finish(job.job_id, Status(doc["status"]))
        except OSError as exc:
            self._failed(f"job {job.job_id}: cannot write its status", exc)
            self.unpublished[job.job_id] = job
            return False
        self.unpublished.pop(job.job_id, None)
        if job.finished:
            if job.callback_url:
                self.outbox.ready(job.job_id)
            self.metrics.job(doc["status"])
            log.info("job %d: %s, %d images, %d failed", job.job_id, doc["status"], job.total, job.failed)
        return job.finished

    def retry(self) -> list[ActiveJob]:
        """Try the owed writes again, when it is time. The jobs that finished thereby."""
        if not self.paused or self.clock() < self.retry_at:
            return []
        finished = []
        for _ in range(len(self.unrecorded)):
            job, chunk, outcomes = self.unrecorded.popleft()
            if self.record(job, chunk, outcomes):
                finished.append(job)
        for job in list(self.unpublished.values()):
            if self.publish(job):
                finished.append(job)
        if not self.paused:
            log.info("disk writes work again; resuming")
        return finished

    def _failed(self, what: str, exc: OSError) -> None:
        if not self.paused:
            log.error("%s: %s; pausing, retrying every %g s", what, exc, self.retry_interval_s)
        self.retry_at = self.clock() + self.retry_interval_s
