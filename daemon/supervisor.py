"""The supervisor: claims jobs from the spool, hands their images to the pool in chunks, records results.

One thread (the caller of ``Supervisor.run``) owns every job's bookkeeping. The pool's result thread only
puts finished tasks on a queue, so nothing is shared between threads but that queue.

Fairness: chunks are taken round-robin over the active jobs into pool tasks, and at most
``max_inflight_tasks`` tasks are in the pool at once, so a small job submitted behind a huge one waits for a
few tasks, not for the job, and many jobs progress together.
Resumption: a job found in active/ at start-up keeps its recorded results; only images with no results
file are dispatched again.
Dead pool processes: a chunk whose process died (kill -9, OOM) is split in two and both halves are
dispatched again, so an image that kills its process every time ends up alone in a chunk; alone, it is
failed once its process has died ``max_worker_deaths`` times with it.
Recording and disk trouble: daemon/recording.py. Chores on a clock: daemon/housekeeping.py.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from daemon.housekeeping import Housekeeping
from daemon.jobs import ActiveJob, Chunk, cancelled, uncovered, unknown_store
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.outcome import ErrorKind, ImageOutcome
from daemon.pool import WatchedPool
from daemon.recording import Recorder
from daemon.stores import Store
from spool import Control, CorruptFile, Folder, Phase, Spool, Status, status_document, utc_now

log = logging.getLogger("retailpulse.daemon")


@dataclass
class Task:
    """One pool task: its chunks, and for each item handed to the pool the (chunk, image index) it is."""

    task_id: int
    chunks: list[Chunk]
    keys: list[tuple[Chunk, int]]


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


class Supervisor:
    def __init__(self, spool: Spool, stores: dict[str, Store], pool: WatchedPool, settings: SupervisorSettings,
                 notifier: Notifier | None = None):
        self.spool = spool
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics()
        self.stores = stores
        self.pool = pool
        self.settings = settings
        self.recorder = Recorder(spool, stores, self.metrics, settings.disk_retry_interval_s)
        self.housekeeping = Housekeeping(spool, settings.retention_s)
        self.jobs: dict[int, ActiveJob] = {}
        self.rotation: deque[int] = deque()  # job ids, next to dispatch from first
        self.dispatched: dict[int, Task] = {}  # task id -> task, for every pool task we still wait for
        self.next_task_id = 1
        self.finished_tasks: queue.Queue = queue.Queue()  # (task id, outcomes or the exception), from the pool
        self.next_worker_check = 0.0

    @property
    def tasks_in_flight(self) -> int:
        return len(self.dispatched)

    @property
    def images_in_flight(self) -> int:
        return sum(chunk.images for task in self.dispatched.values() for chunk in task.chunks)

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
        self.housekeeping.clean_tmp()
        for job_id in self.spool.unreadable_status_ids():
            self.repair_status(job_id)
        for job_id in self.spool.job_ids(Folder.ACTIVE):
            self.load(job_id, self.spool.job_path(Folder.ACTIVE, job_id))

    def step(self) -> None:
        """One turn of the main loop: requests, admit, dispatch, record what finished, look for dead processes.

        Control requests come first: a job cancelled while it waited in incoming/ must not be dispatched."""
        self.handle_requests()
        self.forget_finished(self.recorder.retry())
        if self.recorder.paused:
            self.wait_for_tasks(min(self.settings.poll_interval_s, self.recorder.retry_at - time.monotonic()))
        else:
            self.admit_incoming()
            self.dispatch()
            self.wait_for_tasks(self.settings.poll_interval_s)
        self.check_workers()
        self.housekeeping.due(self.heartbeat)
        self.notifier.progress(self.status_line())

    def drain(self) -> None:
        """Record what is in flight, for drain_timeout_s at most in all; the rest is redone after a restart."""
        log.info("stopping: waiting for %d task(s) in flight", self.tasks_in_flight)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while (self.tasks_in_flight or self.recorder.paused) and time.monotonic() < deadline:
            self.forget_finished(self.recorder.retry())
            self.wait_for_tasks(min(deadline - time.monotonic(), self.settings.worker_check_interval_s))
            self.check_workers(requeue=False)
        if self.tasks_in_flight or self.recorder.paused:
            log.warning("stopping with %d task(s) and %d chunk(s) unrecorded; they are redone on restart",
                        self.tasks_in_flight, len(self.recorder.unrecorded))

    def heartbeat(self) -> dict:
        """The fields of daemon.json (spool/__init__.py documents them)."""
        return {"processes": self.pool.processes, "jobs_active": len(self.jobs),
                "tasks_in_flight": self.tasks_in_flight, "images_in_flight": self.images_in_flight,
                "images_remaining_active": sum(job.total - job.done for job in self.jobs.values()),
                "paused": self.recorder.paused, "metrics": self.metrics.snapshot()}

    def status_line(self) -> str:
        """For `systemctl status`: STATUS=3 jobs, 412 images in flight."""
        line = f"{len(self.jobs)} jobs, {self.images_in_flight} images in flight"
        return line + ", PAUSED: cannot write to the spool" if self.recorder.paused else line

    # ------------------------------------------------------- operator requests
    def handle_requests(self) -> None:
        """Carry out control/ requests (cancel, requeue, requeue-failed), then remove them."""
        for job_id, verb, path in self.spool.requests():
            try:
                if verb is Control.CANCEL:
                    self.cancel(job_id)
                else:
                    self.requeue(job_id, failed_only=verb is Control.REQUEUE_FAILED)
            except (OSError, CorruptFile) as exc:
                log.error("job %d: %s: %s; will try again", job_id, verb, exc)
                continue
            path.unlink(missing_ok=True)

    def cancel(self, job_id: int) -> None:
        """Images not yet dispatched get the result "cancelled by request"; those in flight finish normally."""
        if job_id not in self.jobs:
            if self.spool.job_folder(job_id) != Folder.INCOMING:
                log.info("job %d: cancel: not queued or running; nothing to do", job_id)
                return
            self.load(job_id, self.spool.claim(job_id))
            if job_id not in self.jobs:
                return
        job = self.jobs[job_id]
        chunks, job.pending = list(job.pending), deque()
        log.info("job %d: cancelled: %d images will not be processed", job_id, sum(c.images for c in chunks))
        for chunk in chunks:
            job.chunks_in_flight += 1
            self.record(job, chunk, [cancelled(i) for i in range(chunk.first, chunk.stop)])

    def requeue(self, job_id: int, failed_only: bool) -> None:
        """Send a finished job round again: all its images, or only the failed ones."""
        folder = self.spool.job_folder(job_id)
        if folder not in (Folder.DONE, Folder.FAILED):
            log.info("job %d: requeue: not finished; nothing to do", job_id)
            return
        redone = self.spool.forget_results(job_id, lambda line: not failed_only or line["error"] is not None)
        self.spool.reopen(job_id, folder)
        log.info("job %d: requeued, %d images to do again", job_id, redone)
        self.load(job_id, self.spool.job_path(Folder.ACTIVE, job_id))

    # ------------------------------------------------------------- admitting
    def admit_incoming(self) -> None:
        free = self.settings.max_active_jobs - len(self.jobs)
        if free <= 0:
            return
        for job_id in self.spool.job_ids(Folder.INCOMING)[:free]:
            try:
                path = self.spool.claim(job_id)
            except FileNotFoundError:
                continue  # another daemon took it
            self.load(job_id, path)

    def read_recorded(self, job: ActiveJob) -> list[tuple[int, int]]:
        """Count the job's recorded results; move unreadable results files aside. The (first, stop) covered."""
        covered = []
        for first, stop, path in self.spool.result_chunks(job.job_id):
            try:
                records = self.spool.read_results(first, stop, path)
            except CorruptFile as exc:
                self.spool.move_aside(path, f"results file unreadable, images redone: {exc}")
                continue
            for record in records:
                job.count(record.get("store_id", ""), record.get("error"), record.get("image_url"))
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
        self.forget_finished([job] if self.recorder.publish(job) else [])

    def repair_status(self, job_id: int) -> None:
        """A status file that does not parse: move it aside; rebuild it from the job's results."""
        self.spool.move_aside(self.spool.status_path(job_id), "status file unreadable; rebuilt from the results")
        for folder in (Folder.DONE, Folder.FAILED):
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
        while self.tasks_in_flight < self.settings.max_inflight_tasks:
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
            job.chunks_in_flight += 1
            for index in range(chunk.first, chunk.stop):
                store_id, _visit_time, url = job.images[index]
                if store_id in self.stores:
                    keys.append((chunk, index))
                    items.append((len(items), url))
        task_id, self.next_task_id = self.next_task_id, self.next_task_id + 1
        self.dispatched[task_id] = Task(task_id, [chunk for _, chunk in task], keys)
        if not items:  # every store unknown: nothing to download
            self.finished_tasks.put((task_id, []))
            return
        self.pool.submit(task_id, items, partial(self._task_finished, task_id))

    def _task_finished(self, task_id: int, outcome: list[ImageOutcome] | BaseException) -> None:
        """Runs on the pool's result thread: only hands the outcome to the main loop."""
        self.finished_tasks.put((task_id, outcome))

    def wait_for_tasks(self, timeout_s: float) -> None:
        """Record finished tasks: wait up to timeout_s for the first, then take whatever else is ready."""
        try:
            event = self.finished_tasks.get(timeout=max(timeout_s, 0))
            while True:
                self.task_returned(*event)
                event = self.finished_tasks.get_nowait()
        except queue.Empty:
            return

    def check_workers(self, requeue: bool = True) -> None:
        """Every worker_check_interval_s: chunks whose pool process died are split and dispatched again."""
        now = time.monotonic()
        if now < self.next_worker_check:
            return
        self.next_worker_check = now + self.settings.worker_check_interval_s
        for task_id, pid in self.pool.lost_tasks():
            task = self.dispatched.pop(task_id, None)
            if task is None:
                continue
            for chunk in task.chunks:
                self.chunk_lost(chunk, pid, requeue)

    def chunk_lost(self, chunk: Chunk, pid: int | None, requeue: bool) -> None:
        job = self.jobs[chunk.job_id]
        deaths = chunk.deaths + 1
        log.warning("job %d: images %d..%d: pool process %s died with them (death %d)",
                    chunk.job_id, chunk.first, chunk.stop - 1, pid or "(unknown)", deaths)
        if not requeue:
            job.chunks_in_flight -= 1
            return  # stopping: a restart redoes them
        if chunk.images == 1 and deaths >= self.settings.max_worker_deaths:
            why = f"the pool process died each time this image was processed ({deaths} attempts)"
            self.record(job, chunk, [ImageOutcome.failed(chunk.first, why, ErrorKind.WORKER_DIED)])
            return
        job.chunks_in_flight -= 1
        middle = (chunk.first + chunk.stop) // 2
        halves = [Chunk(chunk.job_id, chunk.first, middle, deaths), Chunk(chunk.job_id, middle, chunk.stop, deaths)]
        job.pending.extendleft(reversed([h for h in halves if h.images]))

    # -------------------------------------------------------------- recording
    def task_returned(self, task_id: int, outcome: list[ImageOutcome] | BaseException) -> None:
        task = self.dispatched.pop(task_id, None)
        self.pool.forget(task_id)
        if task is None:
            return  # given up as lost, and dispatched again: that dispatch's result is the one recorded
        measured: dict[Chunk, dict[int, ImageOutcome]] = {chunk: {} for chunk in task.chunks}
        if not isinstance(outcome, BaseException):
            for item in outcome:
                chunk, index = task.keys[item.index]
                measured[chunk][index] = item
        for chunk in task.chunks:
            job = self.jobs[chunk.job_id]
            self.record(job, chunk, [self.outcome_of(job, index, measured[chunk], outcome)
                                     for index in range(chunk.first, chunk.stop)])

    def outcome_of(self, job: ActiveJob, index: int, measured: dict[int, ImageOutcome], task_outcome) -> ImageOutcome:
        """Image ``index``'s outcome: measured, or why not (unknown store; a pool task that raised)."""
        if job.images[index][0] not in self.stores:
            return unknown_store(index)
        if index in measured:
            item = measured[index]
            return ImageOutcome(index, item.width, item.height, item.perimeter, item.error, item.kind,
                                item.seconds, item.bytes)
        # The pool task itself failed (it is written never to, so this is a bug worth its text).
        why = f"internal error: {type(task_outcome).__name__}: {task_outcome}"
        return ImageOutcome.failed(index, why, ErrorKind.INTERNAL)

    def record(self, job: ActiveJob, chunk: Chunk, outcomes: list[ImageOutcome]) -> None:
        self.forget_finished([job] if self.recorder.record(job, chunk, outcomes) else [])

    def forget_finished(self, jobs: list[ActiveJob]) -> None:
        """Jobs that left active/: no more bookkeeping for them."""
        for job in jobs:
            self.jobs.pop(job.job_id, None)
            if job.job_id in self.rotation:
                self.rotation.remove(job.job_id)
