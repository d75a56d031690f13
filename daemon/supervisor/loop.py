"""The supervisor: claims jobs from the spool, hands their images to the runner in chunks, records results.

One thread (the caller of ``Supervisor.run``) owns every job's bookkeeping. The runner's threads only put
TaskDone and TaskLost events on a queue, so nothing is shared between threads but that queue.

Fairness: whenever the runner has room, the next chunk is taken from the next active job in turn, so a
small job submitted behind a huge one waits for one chunk's worth of room, not for the job, and many jobs
progress together. Each chunk is recorded as soon as its own images are done.
Resumption: a job found in active/ at start-up keeps its recorded results; only images with no results
file are dispatched again (loading.py).
Lost tasks: what becomes of their chunks is the death policy, ``after_loss`` in jobs.py.
Cancel: every image of the job without a result is recorded "cancelled by request" at once, and the runner
drops the job's tasks where they are (TaskRunner.cancel); their late answers are ignored.
Recording and disk trouble: recording.py. Chores on a clock: housekeeping.py.
Time comes from ``clock`` (monotonic seconds), so tests can drive the waits without waiting.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from daemon.engine.outcome import ErrorKind, ImageOutcome
from daemon.notifications.outbox import Outbox
from daemon.runners import Loss, TaskDone, TaskLost, TaskProgress, TaskRunner
from daemon.supervisor.housekeeping import Housekeeping
from daemon.supervisor.jobs import ActiveJob, Chunk, after_loss, cancelled, spans, unknown_store
from daemon.supervisor.loading import JobLoader
from daemon.supervisor.metrics import Metrics
from daemon.supervisor.notify import Notifier
from daemon.supervisor.progress import ProgressWriter
from daemon.supervisor.recording import Recorder
from daemon.supervisor.settings import SupervisorSettings
from daemon.supervisor.stores import Store
from daemon.supervisor.trouble import Trouble
from spool import FINISHED_FOLDERS, Control, CorruptFile, DamagedResults, Executor, Folder, Spool
from spool.heartbeat import boot_id
from spool.records import Heartbeat, RunnerView
from spool.watch import Watch

log = logging.getLogger("retailpulse.daemon")

Events = queue.Queue  # of TaskDone | TaskLost | WAKE, put by other threads, taken by the supervisor's
#: The event that says a file arrived in incoming/ or control/ (spool/watch.py): look now, not at the next look.
WAKE = "wake"
#: How soon to look again at a job file the API still holds (its folder's fsync running: spool/files.py publish).
NOT_YET_STORED_LOOK_S = 0.01
#: The longest the loop waits for an event: the runner looks for stalled processes this often (LocalPool).
MAX_WAIT_S = 0.5
#: Most images a cancel records in one results file (about 1 MiB of lines).
CANCEL_FILE_IMAGES = 4096


@dataclass
class Task:
    """A chunk handed to the runner once, and which of its images it measures (not those of unknown stores)."""

    task_id: int
    chunk: Chunk
    measured: list[int]


class Supervisor:
    """``events``: the queue the runner was made to report to (``runner = make(on_event=events.put)``)."""

    def __init__(self, spool: Spool, stores: dict[str, Store], settings: SupervisorSettings,
                 runner: TaskRunner, events: Events, executor: Executor = Executor.LOCAL,
                 notifier: Notifier | None = None, clock: Callable[[], float] = time.monotonic,
                 outbox: Outbox | None = None):
        self.spool = spool
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics()
        self.stores = stores
        self.settings = settings
        self.runner, self.events, self.executor = runner, events, Executor(executor)
        self.clock = clock
        self.recorder = Recorder(spool, stores, self.metrics, settings.disk_retry_interval_s, clock, outbox)
        self.trouble = Trouble(clock)
        self.housekeeping = Housekeeping(spool, settings.retention_days * 86400, clock, self.trouble)
        self.loader = JobLoader(spool, settings.chunk_images, self.trouble, clock)
        self.progress = ProgressWriter(spool, clock)  # images_processed, while chunks run (progress.py)
        self.jobs: dict[int, ActiveJob] = {}
        self.rotation: deque[int] = deque()  # job ids, next to dispatch from first
        self.dispatched: dict[int, Task] = {}  # task id -> task, for every task we still wait for
        # Chunks whose task failed, waiting out their backoff (jobs.after_loss): (clock() due, seq, chunk).
        # Still counted in their job's chunks_in_flight, so the job cannot finish without them.
        self.delayed: list[tuple[float, int, Chunk]] = []
        self.delayed_seq = itertools.count()  # a tie-breaker in the heap: chunks never compare
        self.next_task_id = 1
        self.incoming_images: dict[int, int] = {}  # job id -> images, of the jobs waiting in incoming/
        self.woken = True  # a file arrived in incoming/ or control/ (WAKE): look at once
        self.next_look = 0.0  # clock(): when to look at incoming/ and control/ without a wake-up

    @property
    def images_in_flight(self) -> int:
        return sum(task.chunk.images for task in self.dispatched.values())

    # ------------------------------------------------------------ main loop
    def run(self, stop_requested: Callable[[], bool], ready: Callable[[], None] = lambda: None) -> None:
        """Recover, call ``ready()``, work until ``stop_requested()``; then let in-flight chunks be recorded.
        Files arriving in incoming/ and control/ wake the loop (spool/watch.py); it also looks every poll_interval_s."""
        wakeups = Watch([self.spool.root / Folder.INCOMING, self.spool.root / Folder.CONTROL],
                        lambda _changes: self.events.put(WAKE))
        try:
            self.recover()
            ready()
            while not stop_requested():
                try:
                    self.step()
                except OSError as exc:  # the spool (permissions, a full disk): never the end of the daemon
                    self.trouble.failed("the spool", exc)
                    self.wait_for_events(self.settings.poll_interval_s)
            self.drain()
        finally:
            wakeups.close()

    def recover(self) -> None:
        """Start-up: remove stale tmp/ files, repair unreadable status files, resume the jobs in active/. What
        the daemon may not read is trouble (logged, tried again later), never an exit that every start repeats."""
        self.housekeeping.clean_tmp()
        try:
            for job_id in self.spool.upkeep.unreadable_status_ids():
                self.loader.repair_status(job_id)
        except OSError as exc:
            self.trouble.failed("checking status/", exc)
        try:
            ids, strays = self.spool.jobs.listing(Folder.ACTIVE)
        except OSError as exc:
            self.trouble.failed("listing active/", exc)
            return
        for name, why in strays.items():
            self.loader.set_aside(self.spool.root / Folder.ACTIVE / name, why)
        for job_id in ids:
            self.load(job_id, self.spool.jobs.path(Folder.ACTIVE, job_id))
        self.forget_finished(self.recorder.flush())

    def step(self) -> None:
        """One turn of the main loop: requests, admit, dispatch, wait for what finishes, record all of it at
        once, chores. incoming/ and control/ are looked at when a file arrived (WAKE) or poll_interval_s passed.

        Control requests come first: a job cancelled while it waited in incoming/ must not be dispatched."""
        looking = self.look_due()
        if looking:
            self.handle_requests()
        for job_id, path in self.loader.due():  # jobs that could not be read before (permissions, a full disk)
            self.load(job_id, path)
        self.forget_finished(self.recorder.retry())
        if not self.recorder.paused:
            if looking:
                self.admit_incoming()
            self.dispatch()
        self.wait_for_events(self.wait_timeout())
        self.forget_finished(self.recorder.flush())
        self.runner.watch()  # just before the heartbeat, which shows what it saw of the workers
        self.housekeeping.due(self.heartbeat)
        self.progress.write_due(self.jobs)
        self.notifier.progress(self.status_line())

    def look_due(self) -> bool:
        """Whether to look at incoming/ and control/ now: woken, or poll_interval_s since the last look."""
        now = self.clock()
        if not self.woken and now < self.next_look:
            return False
        self.woken, self.next_look = False, now + self.settings.poll_interval_s
        return True

    def wait_timeout(self) -> float:
        """How long the loop may wait for an event: until the next look, chore, delayed chunk or retry."""
        now = self.clock()
        due = [self.next_look, self.housekeeping.next_due(), self.progress.next_due(self.jobs), now + MAX_WAIT_S]
        if self.delayed:
            due.append(self.delayed[0][0])
        if self.recorder.paused:
            due.append(self.recorder.retry_at)
        return max(0.0, min(due) - now)

    def drain(self) -> None:
        """Record what is in flight, for drain_timeout_s at most in all; the rest is redone after a restart."""
        log.info("stopping: waiting for %d chunk(s) in flight", len(self.dispatched))
        deadline = self.clock() + self.settings.drain_timeout_s
        while (self.dispatched or self.recorder.paused) and self.clock() < deadline:
            self.forget_finished(self.recorder.retry())
            self.wait_for_events(min(deadline - self.clock(), MAX_WAIT_S), stopping=True)
            self.forget_finished(self.recorder.flush())
        if self.dispatched or self.recorder.paused:
            log.warning("stopping with %d chunk(s) unrecorded; they are redone on restart",
                        len(self.dispatched) + len(self.recorder.unrecorded))

    def heartbeat(self, pid: int, now: float) -> Heartbeat:
        """daemon.json (spool/records.py, Heartbeat): the runner's view, what is in flight, the counters."""
        webhooks = self.recorder.outbox.snapshot()
        view = msgspec.convert(self.runner.describe(), RunnerView)  # checked: the runners cannot import spool/
        return Heartbeat(pid=pid, heartbeat_at=now, executor=self.executor, monotonic_at=round(time.monotonic(), 3),
                         boot_id=boot_id(), **msgspec.structs.asdict(view),
                         jobs_active=len(self.jobs), tasks_in_flight=len(self.dispatched),
                         images_in_flight=self.images_in_flight,
                         images_remaining_active=sum(job.total - job.recorded for job in self.jobs.values()),
                         paused=self.recorder.paused, metrics=self.metrics.snapshot(),
                         **({"webhooks": webhooks} if webhooks is not None else {}))

    def status_line(self) -> str:
        """For `systemctl status`: STATUS=3 jobs, 412 images in flight."""
        line = f"{len(self.jobs)} jobs, {self.images_in_flight} images in flight"
        return line + ", PAUSED: cannot write to the spool" if self.recorder.paused else line

    # ------------------------------------------------------- operator requests
    def handle_requests(self) -> None:
        """Carry out control/ requests (cancel, requeue, requeue-failed), then remove them."""
        try:
            requests = self.spool.control.waiting()
        except OSError as exc:
            self.trouble.failed("reading control/", exc)
            return
        self.trouble.ok("reading control/")
        for request in requests:
            job_id, verb = request.job_id, request.verb
            try:
                if verb is Control.CANCEL:
                    self.cancel(job_id)
                else:
                    self.requeue(job_id, failed_only=verb is Control.REQUEUE_FAILED)
            except (OSError, CorruptFile, DamagedResults) as exc:
                log.error("job %d: %s: %s; will try again", job_id, verb, exc)
                continue
            self.forget_finished(self.recorder.flush())  # what a cancel records is on disk before it is done
            if verb is Control.CANCEL and self.recorder.owes(job_id):
                continue  # some of what it cancelled waits for the disk: the request stays until it is written
            self.spool.control.carried_out(request)

    def cancel(self, job_id: int) -> None:
        """Every image of the job without a result gets "cancelled by request", now: those waiting and those
        in flight, whose tasks the runner drops (whatever they still answer is ignored, as for any task no
        longer dispatched). Recorded like any result, so a crash part-way leaves each image with one
        result or none, and the request, still in control/, is carried out again at restart."""
        if job_id not in self.jobs:
            if self.spool.jobs.folder_of(job_id) != Folder.INCOMING:
                log.info("job %d: cancel: not queued or running; nothing to do", job_id)
                return
            path = self.loader.claim(job_id)
            if path is not None:
                self.load(job_id, path)
            if job_id not in self.jobs:
                return
        job = self.jobs[job_id]
        in_flight = [task_id for task_id, task in self.dispatched.items() if task.chunk.job_id == job_id]
        flying = [self.dispatched.pop(task_id).chunk for task_id in in_flight]
        chunks = [*job.pending, *flying]
        if not chunks:
            return  # done already (a request kept while the disk was full)
        job.pending, job.chunks_in_flight = deque(), job.chunks_in_flight - len(flying)
        if in_flight:
            self.runner.cancel(in_flight)
        log.info("job %d: cancelled: %d images will not be processed, %d of them were in flight", job_id,
                 sum(c.images for c in chunks), sum(c.images for c in flying))
        for first, stop in spans(chunks, CANCEL_FILE_IMAGES):
            job.chunks_in_flight += 1
            self.record(job, Chunk(job_id, first, stop), [cancelled(i) for i in range(first, stop)])

    def requeue(self, job_id: int, failed_only: bool) -> None:
        """Send a finished job round again: all its images, or only the failed ones."""
        folder = self.spool.jobs.folder_of(job_id)
        if folder not in FINISHED_FOLDERS:
            log.info("job %d: requeue: not finished; nothing to do", job_id)
            return
        redone = self.spool.results.forget(job_id, lambda line: not failed_only or line.error is not None)
        self.spool.jobs.reopen(job_id, folder)
        log.info("job %d: requeued, %d images to do again", job_id, redone)
        self.load(job_id, self.spool.jobs.path(Folder.ACTIVE, job_id))

    # ------------------------------------------------------------- admitting
    def admit_incoming(self) -> None:
        """Claim queued jobs, oldest first, while fewer than max_active_jobs run; a small job (at most
        small_job_images) is claimed at once whatever runs, so it never waits behind a crowd of big ones.
        Names in incoming/ that are no job file's are moved aside, saying why."""
        try:
            ids, strays = self.spool.jobs.listing(Folder.INCOMING)
        except OSError as exc:
            self.trouble.failed("listing incoming/", exc)
            return
        self.trouble.ok("listing incoming/")
        for name, why in strays.items():
            self.loader.set_aside(self.spool.root / Folder.INCOMING / name, why)
        taken = []
        for job_id in ids:
            crowded = len(self.jobs) + len(taken) >= self.settings.max_active_jobs
            if crowded and self.images_of(job_id) > self.settings.small_job_images:
                continue
            self.incoming_images.pop(job_id, None)
            taken.append(job_id)
        # One claim for all (their renames share the folders' fsyncs).
        claimed, storing = self.loader.claim_all(taken)
        for job_id, path in claimed:
            self.load(job_id, path)
        if storing:  # the API's close wakes us again; look soon all the same
            self.next_look = min(self.next_look, self.clock() + NOT_YET_STORED_LOOK_S)

    def images_of(self, job_id: int) -> int:
        """A queued job's size, from its meta file (read once: it never changes); unknown counts as big."""
        if job_id not in self.incoming_images:
            meta = self.spool.jobs.read_meta(job_id)
            self.incoming_images[job_id] = meta.images if meta is not None else 2**62
        return self.incoming_images[job_id]

    def load(self, job_id: int, path: Path) -> None:
        """Start (or resume) a job: its recorded results counted, the images still to do queued."""
        job = self.loader.open(job_id, path)
        if job is None:
            return
        self.jobs[job_id] = job
        self.rotation.append(job_id)
        self.recorder.touch(job)

    # ------------------------------------------------------------ dispatching
    def dispatch(self) -> None:
        """While the runner has room, hand it the next chunk of the next job in turn.

        A chunk whose process died goes out isolated (see the module's docstring)."""
        self.release_delayed()
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
        """Handle the runner's events and wake-ups: wait up to timeout_s for the first, then take whatever else is
        ready (recorded together at the turn's flush)."""
        try:
            event = self.events.get(timeout=max(timeout_s, 0))
            while True:
                if event is WAKE:
                    self.woken = True
                    event = self.events.get_nowait()
                    continue
                self.progress.note(event, self.dispatched, self.jobs)
                if isinstance(event, TaskProgress):
                    pass
                elif isinstance(event, TaskDone):
                    self.task_done(event)
                else:
                    self.task_lost(event, requeue=not stopping)
                event = self.events.get_nowait()
        except queue.Empty:
            return

    def task_lost(self, event: TaskLost, requeue: bool) -> None:
        """The task will not answer: its chunk goes out again as the death policy says (jobs.after_loss)."""
        task = self.dispatched.pop(event.task_id, None)
        if task is None:
            return
        chunk, job = task.chunk, self.jobs[task.chunk.job_id]
        log.warning("job %d: images %d..%d: %s%s", chunk.job_id, chunk.first, chunk.stop - 1, event.why,
                    {Loss.DIED: f" (death {chunk.deaths + 1})", Loss.RAISED: f" (failure {chunk.failures + 1})"}
                    .get(event.cause, "; dispatched again"))
        if event.cause is not Loss.AWAY and not requeue:
            job.chunks_in_flight -= 1
            return  # stopping: a restart redoes them
        verdict = after_loss(chunk, event.cause, self.settings.max_worker_deaths, event.why)
        if verdict.give_up is not None:
            self.record_chunk(job, chunk, {i: ImageOutcome.failed(i, verdict.give_up, verdict.kind)
                                           for i in task.measured})
            return
        if verdict.delay_s:
            for again in verdict.retry:
                heapq.heappush(self.delayed, (self.clock() + verdict.delay_s, next(self.delayed_seq), again))
            return
        job.chunks_in_flight -= 1
        job.pending.extendleft(reversed(verdict.retry))

    def release_delayed(self) -> None:
        """Chunks whose backoff is over go back to the front of their job's queue."""
        while self.delayed and self.delayed[0][0] <= self.clock():
            _, _, chunk = heapq.heappop(self.delayed)
            job = self.jobs[chunk.job_id]
            job.chunks_in_flight -= 1
            job.pending.appendleft(chunk)

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
        self.recorder.record(job, chunk, outcomes)

    def forget_finished(self, jobs: list[ActiveJob]) -> None:
        """Jobs that left active/: no more bookkeeping for them."""
        for job in jobs:
            self.jobs.pop(job.job_id, None)
            if job.job_id in self.rotation:
                self.rotation.remove(job.job_id)
