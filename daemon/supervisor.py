"""The supervisor: claims jobs from the spool, feeds their images to the pool in chunks, records results.

One thread (the caller of ``Supervisor.run``) owns every job's bookkeeping. The pool's result thread only
puts finished chunks on a queue, so nothing is shared between threads but that queue.

Fairness: chunks are dispatched round-robin over the active jobs, and at most ``max_inflight_chunks`` are
in the pool at once, so a small job submitted behind a huge one waits for a few chunks, not for the job.
Resumption: a job found in active/ at start-up keeps its recorded results; only images with no results
file are dispatched again.
"""
from __future__ import annotations

import json
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from daemon.stores import Store
from daemon.worker import Outcome, process_chunk
from spool import CorruptFile, Phase, Spool, Status, status_document, utc_now

log = logging.getLogger("retailpulse.daemon")

UNKNOWN_STORE = "store_id not in the store master"
TMP_LEFTOVER_AGE_S = 3600


@dataclass(frozen=True)
class SupervisorSettings:
    chunk_images: int = 128  # images per pool task
    max_inflight_chunks: int = 4  # pool tasks queued or running at once: bounds memory and queueing delay
    max_active_jobs: int = 32  # jobs progressing at once; more wait in incoming/
    poll_interval_s: float = 0.1  # how often incoming/ is looked at while idle
    drain_timeout_s: float = 60.0  # on stop, how long in-flight chunks may take to finish and be recorded


class ActiveJob:
    """Bookkeeping of one claimed job: which images are waiting, in flight, done, and which stores failed."""

    def __init__(self, job_id: int, doc: dict):
        self.job_id = job_id
        self.submitted_at = doc.get("submitted_at")
        # One (store_id, visit_time, url) per image, in submission order; the position is the image index.
        self.images = [(visit["store_id"], visit["visit_time"], url)
                       for visit in doc["visits"] for url in visit["image_url"]]
        self.pending: deque[tuple[int, int]] = deque()
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.failed_stores: dict[str, list] = {}  # store_id -> [first error, its image_url, images failed]

    @property
    def total(self) -> int:
        return len(self.images)

    @property
    def finished(self) -> bool:
        return self.done >= self.total and not self.pending and not self.in_flight

    def record(self, store_id: str, error: str | None, url: str) -> None:
        self.done += 1
        if error is not None:
            self.failed += 1
            entry = self.failed_stores.setdefault(store_id, [error, url, 0])
            entry[2] += 1

    def status_doc(self) -> dict:
        if not self.finished:
            status, phase = Status.ONGOING, Phase.RUNNING
        else:
            status = Status.FAILED if self.failed_stores else Status.COMPLETED
            phase = Phase.FINISHED
        doc = status_document(self.job_id, status, phase, images_total=self.total, images_done=self.done,
                              images_failed=self.failed, submitted_at=self.submitted_at, updated_at=utc_now())
        if status is Status.FAILED:
            doc["error"] = [{"store_id": store_id, "error": error, "image_url": url, "images_failed": count}
                            for store_id, (error, url, count) in self.failed_stores.items()]
        return doc


def uncovered(total: int, covered: list[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    """Split the image indices 0..total-1 not in any ``covered`` (first, stop) range into chunks."""
    position = 0
    for first, stop in sorted(covered) + [(total, total)]:
        while position < min(first, total):
            end = min(position + size, first, total)
            yield position, end
            position = end
        position = max(position, stop)


class Supervisor:
    def __init__(self, spool: Spool, stores: dict[str, Store], pool, settings: SupervisorSettings):
        self.spool = spool
        self.stores = stores
        self.pool = pool
        self.settings = settings
        self.jobs: dict[int, ActiveJob] = {}
        self.rotation: deque[int] = deque()  # job ids, next to dispatch from first
        self.in_flight = 0
        self.finished_chunks: queue.Queue = queue.Queue()

    # ------------------------------------------------------------ main loop
    def run(self, stop_requested: Callable[[], bool]) -> None:
        """Work until ``stop_requested()``; then let in-flight chunks finish and be recorded."""
        # The API may be writing into tmp/ right now; a write takes milliseconds, so an hour-old file is a leftover.
        removed = self.spool.clean_tmp(older_than_s=TMP_LEFTOVER_AGE_S)
        if removed:
            log.info("removed %d unfinished file(s) from tmp/", removed)
        for job_id in self.spool.job_ids("active"):
            self.load(job_id, self.spool.job_path("active", job_id))
        while not stop_requested():
            self.admit_incoming()
            self.dispatch()
            self.wait_for_chunks(self.settings.poll_interval_s)
        self.drain()

    def drain(self) -> None:
        """Record what is in flight, for drain_timeout_s at most in all; the rest is redone after a restart."""
        log.info("stopping: waiting for %d chunk(s) in flight", self.in_flight)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.in_flight and time.monotonic() < deadline:
            self.wait_for_chunks(deadline - time.monotonic())
        if self.in_flight:
            log.warning("stopping with %d chunk(s) unrecorded; they are redone on restart", self.in_flight)

    def wait_for_chunks(self, timeout_s: float) -> None:
        """Record finished chunks: wait up to timeout_s for the first, then take whatever else is ready."""
        try:
            event = self.finished_chunks.get(timeout=max(timeout_s, 0))
            while True:
                self.record_chunk(*event)
                event = self.finished_chunks.get_nowait()
        except queue.Empty:
            return

    # ------------------------------------------------------------- admitting
    def admit_incoming(self) -> None:
        free = self.settings.max_active_jobs - len(self.jobs)
        if free <= 0:
            return
        for job_id in self.spool.job_ids("incoming")[:free]:
            try:
                path = self.spool.claim(job_id)
            except FileNotFoundError:
                continue  # another daemon took it
            self.load(job_id, path)

    def load(self, job_id: int, path: Path) -> None:
        """Start (or resume) a job: read its file and recorded results, queue the images still to do."""
        try:
            job = ActiveJob(job_id, self.spool.read_job(path))
        except (CorruptFile, KeyError, TypeError) as exc:
            self.reject(job_id, path, f"job file unreadable: {exc}")
            return
        covered = []
        for first, stop, result_path in self.spool.result_chunks(job_id):
            try:
                records = [json.loads(line) for line in result_path.read_bytes().splitlines()]
                if len(records) != stop - first:
                    raise ValueError(f"{len(records)} results for {stop - first} images")
            except (ValueError, RecursionError) as exc:
                self.spool.move_aside(result_path, f"results file unreadable, images redone: {exc}")
                continue
            for record in records:
                job.record(record.get("store_id", ""), record.get("error"), record.get("image_url"))
            covered.append((first, stop))
        job.pending.extend(uncovered(job.total, covered, self.settings.chunk_images))
        self.jobs[job_id] = job
        self.rotation.append(job_id)
        log.info("job %d: %s, %d images, %d already recorded", job_id,
                 "resumed" if covered else "started", job.total, job.done)
        self.publish(job)

    def reject(self, job_id: int, path: Path, why: str) -> None:
        log.error("job %d: %s", job_id, why)
        self.spool.move_aside(path, why)
        self.spool.write_status(job_id, status_document(
            job_id, Status.FAILED, Phase.FINISHED, images_total=0, images_done=0, images_failed=0,
            updated_at=utc_now(), error=[{"store_id": "", "error": why}]))

    # ------------------------------------------------------------ dispatching
    def dispatch(self) -> None:
        """Hand chunks to the pool, one job after another, until the in-flight bound is reached."""
        idle_turns = 0
        while self.in_flight < self.settings.max_inflight_chunks and idle_turns < len(self.rotation):
            job = self.jobs[self.rotation[0]]
            self.rotation.rotate(-1)
            if not job.pending:
                idle_turns += 1
                continue
            idle_turns = 0
            first, stop = job.pending.popleft()
            self.submit_chunk(job, first, stop)

    def submit_chunk(self, job: ActiveJob, first: int, stop: int) -> None:
        items = [(i, job.images[i][2]) for i in range(first, stop) if job.images[i][0] in self.stores]
        job.in_flight += 1
        self.in_flight += 1
        done = partial(self._chunk_finished, job.job_id, first, stop)
        if not items:  # every store unknown: nothing to download
            done([])
            return
        self.pool.apply_async(process_chunk, (items,), callback=done, error_callback=done)

    def _chunk_finished(self, job_id: int, first: int, stop: int, outcome: list[Outcome] | BaseException):
        """Runs on the pool's result thread (or inline): only hands the outcome to the main loop."""
        self.finished_chunks.put((job_id, first, stop, outcome))

    # -------------------------------------------------------------- recording
    def record_chunk(self, job_id: int, first: int, stop: int, outcome: list[Outcome] | BaseException) -> None:
        job = self.jobs[job_id]
        job.in_flight -= 1
        self.in_flight -= 1
        measured = {} if isinstance(outcome, BaseException) else {o[0]: o for o in outcome}
        lines = []
        for index in range(first, stop):
            store_id, visit_time, url = job.images[index]
            store = self.stores.get(store_id)
            width = height = perim = None
            if store is None:
                error = UNKNOWN_STORE
            elif index in measured:
                _, width, height, perim, error = measured[index]
            else:  # the pool task itself failed (it is written never to, so this is a bug worth its text)
                error = f"internal error: {type(outcome).__name__}: {outcome}"
            lines.append({"index": index, "store_id": store_id,
                          "store_name": store.name if store else None,
                          "area_code": store.area_code if store else None,
                          "visit_time": visit_time, "image_url": url,
                          "width": width, "height": height, "perimeter": perim, "error": error})
        self.spool.write_results(job_id, first, stop, lines)
        for line in lines:
            job.record(line["store_id"], line["error"], line["image_url"])
        self.publish(job)

    def publish(self, job: ActiveJob) -> None:
        """Write the job's status; once every image has a result, move the job out of active/."""
        doc = job.status_doc()
        self.spool.write_status(job.job_id, doc)
        if job.finished:
            self.spool.finish(job.job_id, Status(doc["status"]))
            del self.jobs[job.job_id]
            self.rotation.remove(job.job_id)
            log.info("job %d: %s, %d images, %d failed", job.job_id, doc["status"], job.total, job.failed)
