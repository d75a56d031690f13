"""The supervisor: claims jobs from the spool, feeds their images to the pool in chunks, records results.

One thread (the caller of ``Supervisor.run``) owns every job's bookkeeping. The pool's result thread only
puts finished chunks on a queue, so nothing is shared between threads but that queue.

Fairness: chunks are taken round-robin over the active jobs into pool tasks, and at most
``max_inflight_tasks`` tasks are in the pool at once, so a small job submitted behind a huge one waits for a
few tasks, not for the job, and many jobs progress together.
Resumption: a job found in active/ at start-up keeps its recorded results; only images with no results
file are dispatched again.
Dead pool processes: a chunk whose process died (kill -9, OOM) is split in two and both halves are
dispatched again, so an image that kills its process every time ends up alone in a chunk; alone, it is
failed once its process has died ``max_worker_deaths`` times with it.
Disk trouble: when results or status cannot be written (ENOSPC, EIO), the outcome is kept in memory, nothing
new is dispatched, and the write is tried again every ``disk_retry_interval_s``; a job never moves on
without its results.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.pool import WatchedPool
from daemon.stores import Store
from daemon.worker import Outcome
from spool import CorruptFile, Phase, Spool, Status, status_document, utc_now

log = logging.getLogger("retailpulse.daemon")

UNKNOWN_STORE = "store_id not in the store master"
TMP_LEFTOVER_AGE_S = 3600
TMP_CLEAN_INTERVAL_S = 600
RETENTION_INTERVAL_S = 600
CANCELLED = "cancelled by request"
HEARTBEAT_INTERVAL_S = 1.0


@dataclass
class Task:
    """One pool task: its chunks, and for each item handed to the pool the (chunk, image index) it is."""

    chunks: list[Chunk]
    keys: list[tuple[Chunk, int]]


@dataclass(frozen=True)
class Chunk:
    """Images first..stop-1 of a job; ``deaths``: pool processes that died while holding these images."""

    job_id: int
    first: int
    stop: int
    deaths: int = 0


@dataclass(frozen=True)
class SupervisorSettings:
    chunk_images: int = 64  # images per chunk: the unit of fairness, of results files and of redoing
    task_chunks: int = 8  # chunks per pool task, from different jobs where there are several
    max_inflight_tasks: int = 2  # pool tasks queued or running at once: bounds memory and queueing delay
    max_active_jobs: int = 32  # jobs progressing at once; more wait in incoming/
    poll_interval_s: float = 0.1  # how often incoming/ is looked at while idle
    drain_timeout_s: float = 60.0  # on stop, how long in-flight chunks may take to finish and be recorded
    worker_check_interval_s: float = 0.5  # how often dead pool processes are looked for
    max_worker_deaths: int = 3  # an image alone in a chunk whose process died this often is failed
    disk_retry_interval_s: float = 5.0  # while writes fail (disk full), how often they are tried again
    retention_s: float = 7 * 86400  # finished jobs older than this are deleted; 0 keeps them forever


class ActiveJob:
    """Bookkeeping of one claimed job: which images are waiting, in flight, done, and which stores failed."""

    def __init__(self, job_id: int, doc: dict):
        self.job_id = job_id
        self.submitted_at = doc.get("submitted_at")
        # One (store_id, visit_time, url) per image, in submission order; the position is the image index.
        self.images = [(visit["store_id"], visit["visit_time"], url)
                       for visit in doc["visits"] for url in visit["image_url"]]
        self.pending: deque[Chunk] = deque()
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
    def __init__(self, spool: Spool, stores: dict[str, Store], pool: WatchedPool, settings: SupervisorSettings,
                 notifier: Notifier | None = None):
        self.spool = spool
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics()
        self.stores = stores
        self.pool = pool
        self.settings = settings
        self.jobs: dict[int, ActiveJob] = {}
        self.rotation: deque[int] = deque()  # job ids, next to dispatch from first
        self.dispatched: dict[int, Task] = {}  # token -> task, for every pool task we still wait for
        self.next_token = 1
        self.finished_chunks: queue.Queue = queue.Queue()
        self.unrecorded: deque[tuple[int, list[Outcome] | BaseException, Chunk]] = deque()  # disk trouble
        self.unpublished: set[int] = set()  # job ids whose status could not be written
        self.disk_retry_at = 0.0  # monotonic; no dispatching before it while the disk is in trouble
        self.next_worker_check = 0.0
        self.next_tmp_clean = 0.0
        self.next_heartbeat = 0.0
        self.next_retention = 0.0

    @property
    def in_flight(self) -> int:
        return len(self.dispatched)

    @property
    def images_in_flight(self) -> int:
        return sum(chunk.stop - chunk.first for task in self.dispatched.values() for chunk in task.chunks)

    @property
    def paused(self) -> bool:
        """Some results or statuses could not be written; nothing new is dispatched until they are."""
        return bool(self.unrecorded or self.unpublished)

    # ------------------------------------------------------------ main loop
    def run(self, stop_requested: Callable[[], bool], ready: Callable[[], None] = lambda: None) -> None:
        """Recover, call ``ready()``, work until ``stop_requested()``; then let in-flight chunks be recorded."""
        self.recover()
        ready()
        while not stop_requested():
            self.step()
        self.drain()

    def recover(self) -> None:
        """Start-up: remove stale tmp/ files, repair unreadable status files, resume the jobs in active/."""
        self.clean_tmp()
        for job_id in self.spool.unreadable_status_ids():
            self.repair_status(job_id)
        for job_id in self.spool.job_ids("active"):
            self.load(job_id, self.spool.job_path("active", job_id))

    def clean_tmp(self) -> None:
        self.next_tmp_clean = time.monotonic() + TMP_CLEAN_INTERVAL_S
        removed = self.spool.clean_tmp(older_than_s=TMP_LEFTOVER_AGE_S)
        if removed:
            log.info("removed %d unfinished file(s) left in tmp/ by a crashed writer", removed)

    def step(self) -> None:
        """One turn of the main loop: requests, admit, dispatch, record what finished, look for dead processes.

        Control requests come first: a job cancelled while it waited in incoming/ must not be dispatched."""
        self.handle_requests()
        if self.disk_trouble():
            self.wait_for_chunks(min(self.settings.poll_interval_s, self.disk_retry_at - time.monotonic()))
        else:
            self.admit_incoming()
            self.dispatch()
            self.wait_for_chunks(self.settings.poll_interval_s)
        self.check_workers()
        if time.monotonic() >= self.next_tmp_clean:
            self.clean_tmp()
        if time.monotonic() >= self.next_heartbeat:
            self.beat()
        if time.monotonic() >= self.next_retention:
            self.apply_retention()
        self.notifier.progress(self.status_line())

    # ------------------------------------------------------- operator requests
    def handle_requests(self) -> None:
        """Carry out control/ requests (cancel, requeue, requeue-failed), then remove them."""
        for job_id, verb, path in self.spool.requests():
            try:
                if verb == "cancel":
                    self.cancel(job_id)
                else:
                    self.requeue(job_id, failed_only=verb == "requeue-failed")
            except OSError as exc:
                log.error("job %d: %s: %s; will try again", job_id, verb, exc)
                continue
            path.unlink(missing_ok=True)

    def cancel(self, job_id: int) -> None:
        """Images not yet dispatched get the result "cancelled by request"; those in flight finish normally."""
        if job_id not in self.jobs:
            if self.spool.job_folder(job_id) != "incoming":
                log.info("job %d: cancel: not queued or running; nothing to do", job_id)
                return
            self.load(job_id, self.spool.claim(job_id))
            if job_id not in self.jobs:
                return
        job = self.jobs[job_id]
        chunks, job.pending = list(job.pending), deque()
        log.info("job %d: cancelled: %d images will not be processed", job_id, sum(c.stop - c.first for c in chunks))
        for chunk in chunks:
            if job_id in self.jobs:
                self.record_chunk(job, chunk, [(i, None, None, None, CANCELLED, None, 0)
                                               for i in range(chunk.first, chunk.stop)])

    def requeue(self, job_id: int, failed_only: bool) -> None:
        """Send a finished job round again: all its images, or only the failed ones."""
        folder = self.spool.job_folder(job_id)
        if folder not in ("done", "failed"):
            log.info("job %d: requeue: not finished; nothing to do", job_id)
            return
        redone = 0
        for first, _stop, path in self.spool.result_chunks(job_id):
            lines = path.read_bytes().splitlines()
            records = [json.loads(line) for line in lines]
            keep = [] if not failed_only else [r["error"] is None for r in records]
            if failed_only and all(keep):
                continue
            # Remove first, then write back the good runs: a crash in between redoes good images, never
            # counts one twice.
            path.unlink()
            start = None
            for offset, ok in enumerate(keep + [False]):
                if ok and start is None:
                    start = offset
                elif not ok and start is not None:
                    self.spool.write_results(job_id, first + start, first + offset,
                                             [json.loads(line) for line in lines[start:offset]])
                    start = None
            redone += len(records) - sum(keep)
        self.spool.reopen(job_id, folder)
        log.info("job %d: requeued, %d images to do again", job_id, redone)
        self.load(job_id, self.spool.job_path("active", job_id))

    def apply_retention(self) -> None:
        self.next_retention = time.monotonic() + RETENTION_INTERVAL_S
        if not self.settings.retention_s:
            return
        old = self.spool.finished_before(time.time() - self.settings.retention_s)
        purged = sum(self.spool.purge(job_id) for job_id in old)
        if purged:
            log.info("retention: deleted %d finished job(s) older than %g days", purged,
                     self.settings.retention_s / 86400)

    def status_line(self) -> str:
        """For `systemctl status`: STATUS=3 jobs, 412 images in flight."""
        images = self.images_in_flight
        line = f"{len(self.jobs)} jobs, {images} images in flight"
        return line + ", PAUSED: cannot write to the spool" if self.paused else line

    def beat(self) -> None:
        """Write daemon.json: the API's health check and backpressure read it; operators can cat it."""
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
        doc = {"pid": os.getpid(), "heartbeat_at": round(time.time(), 3), "processes": self.pool.processes,
               "jobs_active": len(self.jobs), "chunks_in_flight": self.in_flight,
               "images_in_flight": self.images_in_flight,
               "images_remaining_active": sum(job.total - job.done for job in self.jobs.values()),
               "paused": self.paused, "metrics": self.metrics.snapshot()}
        try:
            self.spool.write_heartbeat(doc)
        except OSError as exc:
            log.warning("cannot write the heartbeat: %s", exc)

    def drain(self) -> None:
        """Record what is in flight, for drain_timeout_s at most in all; the rest is redone after a restart."""
        log.info("stopping: waiting for %d chunk(s) in flight", self.in_flight)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while (self.in_flight or self.unrecorded) and time.monotonic() < deadline:
            self.disk_trouble()
            self.wait_for_chunks(min(deadline - time.monotonic(), self.settings.worker_check_interval_s))
            self.check_workers(requeue=False)
        if self.in_flight or self.unrecorded:
            log.warning("stopping with %d chunk(s) unrecorded; they are redone on restart",
                        self.in_flight + len(self.unrecorded))

    def wait_for_chunks(self, timeout_s: float) -> None:
        """Record finished chunks: wait up to timeout_s for the first, then take whatever else is ready."""
        try:
            event = self.finished_chunks.get(timeout=max(timeout_s, 0))
            while True:
                self.task_returned(*event)
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

    def read_recorded(self, job: ActiveJob) -> list[tuple[int, int]]:
        """Count the job's recorded results; move unreadable results files aside. The (first, stop) covered."""
        covered = []
        for first, stop, result_path in self.spool.result_chunks(job.job_id):
            try:
                records = [json.loads(line) for line in result_path.read_bytes().splitlines()]
                if len(records) != stop - first or not all(isinstance(r, dict) for r in records):
                    raise ValueError(f"{len(records)} results for {stop - first} images")
            except (ValueError, RecursionError) as exc:
                self.spool.move_aside(result_path, f"results file unreadable, images redone: {exc}")
                continue
            for record in records:
                job.record(record.get("store_id", ""), record.get("error"), record.get("image_url"))
            covered.append((first, stop))
        return covered

    def load(self, job_id: int, path: Path) -> None:
        """Start (or resume) a job: read its file and recorded results, queue the images still to do."""
        try:
            job = ActiveJob(job_id, self.spool.read_job(path))
        except (CorruptFile, KeyError, TypeError) as exc:
            self.reject(job_id, path, f"job file unreadable: {exc}")
            return
        covered = self.read_recorded(job)
        job.pending.extend(Chunk(job_id, first, stop)
                           for first, stop in uncovered(job.total, covered, self.settings.chunk_images))
        self.jobs[job_id] = job
        self.rotation.append(job_id)
        log.info("job %d: %s, %d images, %d already recorded", job_id,
                 "resumed" if covered else "started", job.total, job.done)
        self.publish(job)

    def repair_status(self, job_id: int) -> None:
        """A status file that does not parse: move it aside; rebuild it from the job's results."""
        self.spool.move_aside(self.spool.status_path(job_id), "status file unreadable; rebuilt from the results")
        for folder in ("done", "failed"):
            path = self.spool.job_path(folder, job_id)
            if path.exists():
                try:
                    job = ActiveJob(job_id, self.spool.read_job(path))
                except (CorruptFile, KeyError, TypeError):
                    return  # the job file itself is broken; its status stays unknown
                self.read_recorded(job)
                if job.finished:
                    self.spool.write_status(job_id, job.status_doc())
                    log.warning("job %d: status file was unreadable; rebuilt from its results", job_id)
                else:  # results went missing too: do the missing images again
                    self.spool.reopen(job_id, folder)
                    log.warning("job %d: status and results incomplete; back to active/ to redo them", job_id)
                return
        # incoming/ or active/: load() and the daemon's next write replace it.

    def reject(self, job_id: int, path: Path, why: str) -> None:
        log.error("job %d: %s", job_id, why)
        self.spool.move_aside(path, why)
        self.spool.write_status(job_id, status_document(
            job_id, Status.FAILED, Phase.FINISHED, images_total=0, images_done=0, images_failed=0,
            updated_at=utc_now(), error=[{"store_id": "", "error": why}]))

    # ------------------------------------------------------------ dispatching
    def dispatch(self) -> None:
        """Fill pool tasks with chunks taken one job after another, until the in-flight bound is reached.

        A task holds up to task_chunks chunks, from as many jobs as there are: a process works on all of them
        at once, so twenty small jobs progress together instead of a few at a time. A chunk whose process
        died travels alone, so that halving it finds the image that kills (see check_workers)."""
        while self.in_flight < self.settings.max_inflight_tasks:
            task: list[tuple[ActiveJob, Chunk]] = []
            idle_turns = 0
            while len(task) < self.settings.task_chunks and idle_turns < len(self.rotation):
                job = self.jobs[self.rotation[0]]
                if not job.pending:
                    self.rotation.rotate(-1)
                    idle_turns += 1
                    continue
                if job.pending[0].deaths and task:
                    break
                chunk = job.pending.popleft()
                self.rotation.rotate(-1)
                idle_turns = 0
                task.append((job, chunk))
                if chunk.deaths:
                    break
            if not task:
                return
            self.submit_task(task)

    def submit_task(self, task: list[tuple[ActiveJob, Chunk]]) -> None:
        items, keys = [], []  # items[k] = (k, url); keys[k] = (chunk, image index) it belongs to
        for job, chunk in task:
            job.in_flight += 1
            for index in range(chunk.first, chunk.stop):
                store_id, _visit_time, url = job.images[index]
                if store_id in self.stores:
                    keys.append((chunk, index))
                    items.append((len(items), url))
        token, self.next_token = self.next_token, self.next_token + 1
        self.dispatched[token] = Task([chunk for _, chunk in task], keys)
        if not items:  # every store unknown: nothing to download
            self.finished_chunks.put((token, []))
            return
        self.pool.submit(token, items, partial(self._task_finished, token))

    def _task_finished(self, token: int, outcome: list[Outcome] | BaseException) -> None:
        """Runs on the pool's result thread: only hands the outcome to the main loop."""
        self.finished_chunks.put((token, outcome))

    def check_workers(self, requeue: bool = True) -> None:
        """Every worker_check_interval_s: chunks whose pool process died are split and dispatched again."""
        now = time.monotonic()
        if now < self.next_worker_check:
            return
        self.next_worker_check = now + self.settings.worker_check_interval_s
        for token, pid in self.pool.lost_tasks():
            task = self.dispatched.pop(token, None)
            if task is None:
                continue
            for chunk in task.chunks:
                self.chunk_lost(chunk, pid, requeue)

    def chunk_lost(self, chunk: Chunk, pid: int | None, requeue: bool) -> None:
        job = self.jobs[chunk.job_id]
        job.in_flight -= 1
        deaths = chunk.deaths + 1
        log.warning("job %d: images %d..%d: pool process %s died with them (death %d)",
                    chunk.job_id, chunk.first, chunk.stop - 1, pid or "(unknown)", deaths)
        if not requeue:
            return  # stopping: a restart redoes them
        if chunk.stop - chunk.first == 1 and deaths >= self.settings.max_worker_deaths:
            why = f"the pool process died each time this image was processed ({deaths} attempts)"
            self.record_chunk(job, Chunk(chunk.job_id, chunk.first, chunk.stop, deaths),
                              [(chunk.first, None, None, None, why, None, 0)])
            return
        middle = (chunk.first + chunk.stop) // 2
        halves = [Chunk(chunk.job_id, chunk.first, middle, deaths), Chunk(chunk.job_id, middle, chunk.stop, deaths)]
        job.pending.extendleft(reversed([h for h in halves if h.stop > h.first]))

    # -------------------------------------------------------------- recording
    def task_returned(self, token: int, outcome: list[Outcome] | BaseException) -> None:
        task = self.dispatched.pop(token, None)
        self.pool.forget(token)
        if task is None:
            return  # given up as lost, and dispatched again: that dispatch's result is the one recorded
        per_chunk: dict[Chunk, list] = {chunk: [] for chunk in task.chunks}
        if not isinstance(outcome, BaseException):
            for key, *measured in outcome:
                chunk, index = task.keys[key]
                per_chunk[chunk].append((index, *measured))
        for chunk in task.chunks:
            job = self.jobs[chunk.job_id]
            job.in_flight -= 1
            self.record_chunk(job, chunk, outcome if isinstance(outcome, BaseException) else per_chunk[chunk])

    def record_chunk(self, job: ActiveJob, chunk: Chunk, outcome: list[Outcome] | BaseException) -> None:
        measured = {} if isinstance(outcome, BaseException) else {o[0]: o for o in outcome}
        lines, costs = [], []
        for index in range(chunk.first, chunk.stop):
            store_id, visit_time, url = job.images[index]
            store = self.stores.get(store_id)
            width = height = perim = seconds = None
            nbytes = 0
            if store is None:
                error = UNKNOWN_STORE
            elif index in measured:
                _, width, height, perim, error, seconds, nbytes = measured[index]
            else:  # the pool task itself failed (it is written never to, so this is a bug worth its text)
                error = f"internal error: {type(outcome).__name__}: {outcome}"
            costs.append((seconds, nbytes))
            lines.append({"index": index, "store_id": store_id,
                          "store_name": store.name if store else None,
                          "area_code": store.area_code if store else None,
                          "visit_time": visit_time, "image_url": url,
                          "width": width, "height": height, "perimeter": perim, "error": error})
        try:
            self.spool.write_results(job.job_id, chunk.first, chunk.stop, lines)
        except OSError as exc:
            self.disk_failed(f"job {job.job_id}: cannot write results of images {chunk.first}..{chunk.stop - 1}",
                             exc)
            job.in_flight += 1  # still owed: kept in memory until the disk takes it
            self.unrecorded.append((job.job_id, outcome, chunk))
            return
        for line, (seconds, nbytes) in zip(lines, costs, strict=True):
            job.record(line["store_id"], line["error"], line["image_url"])
            self.metrics.image(line["error"], seconds, nbytes)
        self.publish(job)

    def publish(self, job: ActiveJob) -> None:
        """Write the job's status; once every image has a result, move the job out of active/."""
        doc = job.status_doc()
        try:
            self.spool.write_status(job.job_id, doc)
            if job.finished:
                self.spool.finish(job.job_id, Status(doc["status"]))
        except OSError as exc:
            self.disk_failed(f"job {job.job_id}: cannot write its status", exc)
            self.unpublished.add(job.job_id)
            return
        self.unpublished.discard(job.job_id)
        if job.finished:
            self.metrics.job(doc["status"])
            del self.jobs[job.job_id]
            self.rotation.remove(job.job_id)
            log.info("job %d: %s, %d images, %d failed", job.job_id, doc["status"], job.total, job.failed)

    # ----------------------------------------------------------- disk trouble
    def disk_failed(self, what: str, exc: OSError) -> None:
        if not self.unrecorded and not self.unpublished:
            log.error("%s: %s; pausing, retrying every %g s", what, exc, self.settings.disk_retry_interval_s)
        self.disk_retry_at = time.monotonic() + self.settings.disk_retry_interval_s

    def disk_trouble(self) -> bool:
        """Retry the writes that failed, when it is time; True while some are still owed."""
        if not self.unrecorded and not self.unpublished:
            return False
        if time.monotonic() < self.disk_retry_at:
            return True
        for _ in range(len(self.unrecorded)):
            job_id, outcome, chunk = self.unrecorded.popleft()
            job = self.jobs[job_id]
            job.in_flight -= 1
            self.record_chunk(job, chunk, outcome)
        for job_id in sorted(self.unpublished):
            if job_id in self.jobs:
                self.publish(self.jobs[job_id])
        if not self.unrecorded and not self.unpublished:
            log.info("disk writes work again; resuming")
            return False
        return True
