"""The supervisor: claims jobs from the spool, hands their images to the runner in chunks, records results.

One thread (the caller of ``Supervisor.run``) owns every job's bookkeeping. The runner's threads only put
TaskDone and TaskLost events on a queue, so nothing is shared between threads but that queue.

Fairness: whenever the runner has room, the next chunk is taken from the next active job in turn, so a
small job submitted behind a huge one waits for one chunk's worth of room, not for the job, and many jobs
progress together. Each chunk is recorded as soon as its own images are done.
Resumption: a job found in active/ at start-up keeps its recorded results; only images with no results
file are dispatched again.
Dead processes: the chunks a dead process (kill -9, OOM) held are dispatched again, isolated: each alone in
a throw-away process (daemon/sandbox.py). An isolated chunk that dies again is split in two, so an image
that kills whatever measures it ends up alone; alone, it is failed once ``max_worker_deaths`` processes
have died with it. Innocent images never share a process with it again, so they are never failed for it.
Recording and disk trouble: daemon/recording.py. Chores on a clock: daemon/housekeeping.py.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.housekeeping import Housekeeping
from daemon.jobs import ActiveJob, Chunk, cancelled, uncovered, unknown_store
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.outcome import ErrorKind, ImageOutcome
from daemon.recording import Recorder
from daemon.runner import TaskDone, TaskLost, TaskRunner
from daemon.stores import Store
from spool import Control, CorruptFile, DamagedResults, Folder, Phase, Spool, Status, status_document, utc_now

log = logging.getLogger("retailpulse.daemon")


@dataclass
class Task:
    """A chunk handed to the runner, and which of its images it measures (not those of unknown stores)."""

    task_id: int
    chunk: Chunk
    measured: list[int]


@dataclass(frozen=True)
class SupervisorSettings:
    chunk_images: int = 64  # images per chunk: the unit of fairness, of results files and of redoing
    max_active_jobs: int = 32  # jobs progressing at once; more wait in incoming/, but for small ones
    small_job_images: int = 1000  # a job this small is started at once, however many jobs run
    poll_interval_s: float = 0.1  # how often incoming/ is looked at while idle
    drain_timeout_s: float = 60.0  # on stop, how long in-flight chunks may take to finish and be recorded
    max_worker_deaths: int = 3  # an image alone in a chunk whose process died this often is failed
    disk_retry_interval_s: float = 5.0  # while writes fail (disk full), how often they are tried again
    retention_s: float = 7 * 86400  # finished jobs older than this are deleted; 0 keeps them forever


class Supervisor:
    def __init__(self, spool: Spool, stores: dict[str, Store], settings: SupervisorSettings,
                 notifier: Notifier | None = None):
        self.spool = spool
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics()
        self.stores = stores
        self.settings = settings
        self.recorder = Recorder(spool, stores, self.metrics, settings.disk_retry_interval_s)
        self.housekeeping = Housekeeping(spool, settings.retention_s)
        self.jobs: dict[int, ActiveJob] = {}
        self.rotation: deque[int] = deque()  # job ids, next to dispatch from first
        self.dispatched: dict[int, Task] = {}  # task id -> task, for every task we still wait for
        self.next_task_id = 1
        self.events: queue.Queue[TaskDone | TaskLost] = queue.Queue()  # from the runner's threads
        self.runner: TaskRunner | None = None
        self.queued_images: dict[int, int] = {}  # job id -> images, of the jobs waiting in incoming/

    def attach(self, runner: TaskRunner) -> None:
        """The runner reports to ``self.events.put``; it is made with that callback, then attached here."""
        self.runner = runner

    @property
    def images_in_flight(self) -> int:
        return sum(task.chunk.images for task in self.dispatched.values())

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
            self.wait_for_events(min(self.settings.poll_interval_s, self.recorder.retry_at - time.monotonic()))
        else:
            self.admit_incoming()
            self.dispatch()
            self.wait_for_events(self.settings.poll_interval_s)
        self.housekeeping.due(self.heartbeat)
        self.notifier.progress(self.status_line())

    def drain(self) -> None:
        """Record what is in flight, for drain_timeout_s at most in all; the rest is redone after a restart."""
        log.info("stopping: waiting for %d chunk(s) in flight", len(self.dispatched))
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while (self.dispatched or self.recorder.paused) and time.monotonic() < deadline:
            self.forget_finished(self.recorder.retry())
            self.wait_for_events(min(deadline - time.monotonic(), self.settings.poll_interval_s), stopping=True)
        if self.dispatched or self.recorder.paused:
            log.warning("stopping with %d chunk(s) unrecorded; they are redone on restart",
                        len(self.dispatched) + len(self.recorder.unrecorded))

    def heartbeat(self) -> dict:
        """The fields of daemon.json (spool/__init__.py documents them)."""
        return {**self.runner.describe(), "jobs_active": len(self.jobs),
                "tasks_in_flight": len(self.dispatched), "images_in_flight": self.images_in_flight,
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
            except (OSError, CorruptFile, DamagedResults) as exc:
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
        """Claim queued jobs, oldest first, while fewer than max_active_jobs run; a small job (at most
        small_job_images) is claimed at once whatever runs, so it never waits behind a crowd of big ones."""
        for job_id in self.spool.job_ids(Folder.INCOMING):
            crowded = len(self.jobs) >= self.settings.max_active_jobs
            if crowded and self.images_of(job_id) > self.settings.small_job_images:
                continue
            self.queued_images.pop(job_id, None)
            try:
                path = self.spool.claim(job_id)
            except FileNotFoundError:
                continue  # cancelled and claimed meanwhile
            self.load(job_id, path)

    def images_of(self, job_id: int) -> int:
        """A queued job's size, from its meta file (read once: it never changes); unknown counts as big."""
        if job_id not in self.queued_images:
            images = (self.spool.read_meta(job_id) or {}).get("images")
            self.queued_images[job_id] = images if isinstance(images, int) else 2**62
        return self.queued_images[job_id]

    def read_recorded(self, job: ActiveJob) -> list[tuple[int, int]]:
        """Count the job's recorded results; move unreadable results files aside. The (first, stop) covered."""
        covered = []
        for first, stop, path in self.spool.result_chunks(job.job_id):
            try:
                records = self.spool.read_results(job.job_id, first, stop, path)
            except DamagedResults as exc:
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
        """While the runner has room, hand it the next chunk of the next job in turn.

        A chunk whose process died goes out isolated (see the module's docstring)."""
        while True:
            job = self.next_job()
            if job is None or not self.runner.has_room(job.pending[0].images):
                return
            chunk = job.pending.popleft()
            self.rotation.rotate(-1)
            job.chunks_in_flight += 1
            measured = [i for i in range(chunk.first, chunk.stop) if job.images[i][0] in self.stores]
            if not measured:  # every store unknown: nothing to download
                self.record_chunk(job, chunk, {})
                continue
            task_id, self.next_task_id = self.next_task_id, self.next_task_id + 1
            self.dispatched[task_id] = Task(task_id, chunk, measured)
            self.runner.submit(task_id, [(i, job.images[i][2]) for i in measured], isolated=chunk.deaths > 0)

    def next_job(self) -> ActiveJob | None:
        """The next job in turn that has a chunk waiting (it stays first until its chunk is taken)."""
        for _ in range(len(self.rotation)):
            job = self.jobs[self.rotation[0]]
            if job.pending:
                return job
            self.rotation.rotate(-1)
        return None

    def wait_for_events(self, timeout_s: float, stopping: bool = False) -> None:
        """Handle the runner's events: wait up to timeout_s for the first, then take whatever else is ready."""
        try:
            event = self.events.get(timeout=max(timeout_s, 0))
            while True:
                if isinstance(event, TaskDone):
                    self.task_done(event)
                else:
                    self.task_lost(event, requeue=not stopping)
                event = self.events.get_nowait()
        except queue.Empty:
            return

    def task_lost(self, event: TaskLost, requeue: bool) -> None:
        """The process holding a task died: dispatch its chunk again, isolated; halve it if it was already."""
        task = self.dispatched.pop(event.task_id, None)
        if task is None:
            return
        chunk, job = task.chunk, self.jobs[task.chunk.job_id]
        if not event.suspect:
            log.warning("job %d: images %d..%d: %s; dispatched again", chunk.job_id, chunk.first, chunk.stop - 1,
                        event.why)
            job.chunks_in_flight -= 1
            job.pending.appendleft(chunk)
            return
        deaths = chunk.deaths + 1
        log.warning("job %d: images %d..%d: %s (death %d)", chunk.job_id, chunk.first, chunk.stop - 1, event.why,
                    deaths)
        if not requeue:
            job.chunks_in_flight -= 1
            return  # stopping: a restart redoes them
        if chunk.images == 1 and chunk.deaths and deaths >= self.settings.max_worker_deaths:
            why = f"the process measuring this image died each time ({deaths} attempts)"
            self.record(job, chunk, [ImageOutcome.failed(chunk.first, why, ErrorKind.WORKER_DIED)])
            return
        job.chunks_in_flight -= 1
        if chunk.deaths == 0:  # it shared a process that died: alone, it will tell whether it was the cause
            job.pending.appendleft(Chunk(chunk.job_id, chunk.first, chunk.stop, deaths))
            return
        middle = (chunk.first + chunk.stop) // 2
        halves = [Chunk(chunk.job_id, chunk.first, middle, deaths), Chunk(chunk.job_id, middle, chunk.stop, deaths)]
        job.pending.extendleft(reversed([h for h in halves if h.images]))

    # -------------------------------------------------------------- recording
    def task_done(self, event: TaskDone) -> None:
        task = self.dispatched.pop(event.task_id, None)
        if task is None:
            return
        self.record_chunk(self.jobs[task.chunk.job_id], task.chunk, {o.index: o for o in event.outcomes})

    def record_chunk(self, job: ActiveJob, chunk: Chunk, measured: dict[int, ImageOutcome]) -> None:
        """Record one outcome per image of the chunk: measured, or why not (unknown store)."""
        outcomes = []
        for index in range(chunk.first, chunk.stop):
            if job.images[index][0] not in self.stores:
                outcomes.append(unknown_store(index))
            elif index in measured:
                outcomes.append(measured[index])
            else:  # the engine answers every item; a gap is a bug, and worth its own text
                outcomes.append(ImageOutcome.failed(index, "internal error: no outcome for this image",
                                                    ErrorKind.INTERNAL))
        self.record(job, chunk, outcomes)

    def record(self, job: ActiveJob, chunk: Chunk, outcomes: list[ImageOutcome]) -> None:
        self.forget_finished([job] if self.recorder.record(job, chunk, outcomes) else [])

    def forget_finished(self, jobs: list[ActiveJob]) -> None:
        """Jobs that left active/: no more bookkeeping for them."""
        for job in jobs:
            self.jobs.pop(job.job_id, None)
            if job.job_id in self.rotation:
                self.rotation.remove(job.job_id)
