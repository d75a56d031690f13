"""The engine: measure many images at once on one thread, with libcurl's multi interface.

``Engine.submit(images, done)`` takes one task's images, ``(index, url)`` pairs, and calls ``done(outcomes)``
once every image has its ImageOutcome (in the task's order), or ``done(None)`` if the engine is closed first:
every task handed in is answered exactly once, so nothing waiting for one (a Dask worker's thread) waits
for ever, and whoever sent it can send it again. ``Engine.cancel(keys)`` stops tasks handed in with those
keys: they answer at once, their images not yet measured "cancelled by request". It knows nothing of pool
processes or Dask: a local pool process and a Dask worker each run one Engine, and ``measure()`` runs one
for a single task (tests, isolated tasks).

Progress: a task answers only when its last image is done, but people watch images, not chunks. Given
``on_progress``, the engine calls it from its loop, at most every PROGRESS_INTERVAL_S and only while images
finish, with each keyed task still running whose count changed: ``{key: images of it with an outcome}``.
The cost per image is one attribute set; the report walks the running tasks (a few dozen) four times a second.

One loop serves everything: libcurl's sockets (its socket and timer callbacks drive an epoll selector), a
wake-up socket for tasks handed in by other threads, and a heap of deadlines. An image's simulated GPU
work (0.1-0.4 s) is such a deadline: its outcome is released only when the wait is over, so the wait stays
real for every image but costs no thread. A retry's backoff is a deadline too. At most ``max_transfers``
downloads run at once; the rest wait, and a free slot goes to the next task in turn (one image from each
task with images waiting), so a task that arrives behind big ones starts at once instead of queueing
behind their images: the supervisor's chunks of different jobs share the process fairly.

A slow path makes a job slower, never failed: how many downloads run at once adapts to what the path
delivers. An attempt that runs out of its whole time (total_timeout_s) while bytes were arriving, with more
than MIN_TRANSFERS others running, says the path is shared by too many: the limit halves, and the attempt is
not counted against its image, which starts again at once with a larger share. Each download that completes
raises the limit by one, back up to max_transfers. At MIN_TRANSFERS or fewer, or past FORGIVEN_SLOW such
attempts of one image, it counts as any other, so a server that trickles is still cut off (the total bound
kept, one attempt longer).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import pycurl

from daemon.engine.backoff import JITTER, backoff_s
from daemon.engine.measure import BodyReader, ImageError, perimeter
from daemon.engine.outcome import CANCELLED_BY_REQUEST, ErrorKind, ImageOutcome, TaskImages
from daemon.engine.settings import EngineSettings
from daemon.engine.transfer import Failure, Transfer, finished

log = logging.getLogger("retailpulse.engine")

#: The fewest downloads the adaptive limit keeps running; an attempt too slow with no more than these running
#: is the server's or the image's doing, and counts.
MIN_TRANSFERS = 4
#: How many too-slow attempts of one image go uncounted: past them, it counts (a trickle stays bounded by
#: (FORGIVEN_SLOW + download_attempts) x total_timeout_s, however busy the path). One is enough: a round of
#: attempts running out together takes the limit down to what the path delivers at once. And one keeps the
#: bounds that rest on an image's longest time: 4 x 30 s + 2 backoffs, under stall_timeout_s (180 s) and
#: an isolated task's deadline (sandbox.deadline_s, 150 s).
FORGIVEN_SLOW = 1

#: Called once per task: its outcomes, or None when the engine closed before the task finished (nothing of
#: it was recorded: send it again).
Done = Callable[[list[ImageOutcome] | None], None]
#: Called from the loop while images finish: {task key: images of the task with an outcome so far}.
OnProgress = Callable[[dict[Hashable, int]], None]
#: How often progress is reported while images finish: four times a second, so that what a person watches
#: (written once a second by the supervisor) is never more than a quarter of a second behind.
PROGRESS_INTERVAL_S = 0.25


class _Task:
    def __init__(self, size: int, done: Done, key: Hashable | None = None):
        self.outcomes: list[ImageOutcome | None] = [None] * size
        self.left, self.done = size, done
        self.todo: deque[_Image] = deque()  # images not yet started (or back for a retry)
        self.key, self.indices, self.cancelled = key, [0] * size, False
        self.reported = 0  # images with an outcome at the last progress report
        self.answered = False  # set under the engine's _answer_lock: a task is answered once, by whoever comes first


@dataclass
class _Image:
    task: _Task
    position: int
    index: int
    url: str
    started: float = 0.0  # perf_counter at its first attempt
    attempt: int = 0
    forgiven: int = 0  # attempts too slow on a shared path, not counted (at most FORGIVEN_SLOW)


class Engine:
    """``clock``: monotonic seconds, for the deadlines (GPU waits, retry backoff); tests may pass their own."""

    def __init__(self, settings: EngineSettings, clock: Callable[[], float] = time.monotonic,
                 on_progress: OnProgress | None = None):
        self.settings, self.clock = settings, clock
        self._on_progress = on_progress
        self._progressed = False  # an image finished since the last progress report
        self._next_progress = 0.0  # time.monotonic() of the next report, at the earliest
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self._selector = selectors.EpollSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._inbox: deque[tuple[TaskImages, Done, Hashable | None]] = deque()  # from other threads
        self._cancels: list[Hashable] = []  # keys of tasks to cancel, from other threads (under _inbox_lock)
        self._keyed: dict[Hashable, _Task] = {}  # tasks handed in with a key, until they answer
        self._inbox_lock = threading.Lock()
        self._waiting: deque[_Task] = deque()  # tasks with images to start, served in turn
        self._idle: list[Transfer] = []  # easy handles ready for reuse
        self._running: dict[int, Transfer] = {}  # id(curl) -> transfer
        self._limit = float(settings.max_transfers)  # downloads at once now: adapts to the path (see above)
        self._deadlines: list[tuple[float, int, Callable[[], None]]] = []  # (clock(), seq, action)
        self._seq = itertools.count()
        self._curl_timer_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # images submitted and not yet answered, for images_in_flight
        self._tasks: set[_Task] = set()  # taken from the inbox, not answered yet: what close() answers with None
        self._answer_lock = threading.Lock()  # close() may answer from another thread if the loop is stuck
        self._closed = False  # under _inbox_lock: a task submitted after close() is answered at once

    # ----------------------------------------------------------- interface
    def submit(self, images: TaskImages, done: Done, key: Hashable | None = None) -> None:
        """Hand a task in (from any thread). ``done`` is called on the engine's thread, or at once with None
        on the caller's thread if the engine is closed. ``key``: what cancel() knows the task by (the
        runner's task id), or None for a task nobody cancels."""
        with self._inbox_lock:
            if not self._closed:
                self._inbox.append((images, done, key))
                images = None
        if images is not None:
            self._answer(_Task(len(images), done), lost=True)
            return
        self._wake()

    def cancel(self, keys: Iterable[Hashable]) -> None:
        """Stop the tasks handed in with these keys (from any thread): their downloads leave the event loop,
        their GPU waits and retries are dropped, and each answers at once, every image not yet measured
        failed "cancelled by request" (ErrorKind.CANCELLED). Keys of tasks that answered already are ignored."""
        with self._inbox_lock:
            self._cancels.extend(keys)
        self._wake()

    def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        """Run the loop on a thread of its own. ``on_death(exc)``: called on that thread if the loop itself
        raises (a bug, not an image's fault: those become outcomes), so the process can end instead of
        staying connected with nothing serving its tasks (daemon/runners/pool_process.py)."""
        self._thread = threading.Thread(target=self._run_guarded, args=(on_death,), name="engine", daemon=True)
        self._thread.start()

    def _run_guarded(self, on_death: Callable[[BaseException], None] | None) -> None:
        try:
            self.run()
        except BaseException as exc:
            log.critical("engine: the event loop died, %d images in flight", self._in_flight, exc_info=True)
            if on_death is not None:
                on_death(exc)
            raise

    def close(self, timeout_s: float = 5) -> None:
        """Stop the loop and answer every task not finished yet with None (lost), those still in the inbox
        and those submitted from now on included. If the loop does not stop within ``timeout_s`` (stuck in
        a system call), its tasks are answered from here; a late answer of the loop's is then dropped."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._abandon()

    @property
    def images_in_flight(self) -> int:
        return self._in_flight

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The loop. Runs until close(), or until ``until()`` is true after a turn."""
        while not self._stop.is_set() and not until():
            self._turn()
        if self._stop.is_set():
            self._abandon()
        for transfer in [*self._running.values(), *self._idle]:
            transfer.close()
        self._multi.close()

    def _abandon(self) -> None:
        """Closed: no task will be served any more. Answer each one still held, or handed in, with None."""
        with self._inbox_lock:
            self._closed = True
            inbox, self._inbox = self._inbox, deque()
        held = [task for task in list(self._tasks) if not task.answered]
        held += [_Task(len(images), done) for images, done, _key in inbox]
        self._keyed.clear()
        for task in held:
            self._answer(task, lost=True)

    # ----------------------------------------------------------- the loop
    def _turn(self) -> None:
        waits = []  # seconds until libcurl's timer (real time) and the first deadline (our clock)
        if self._curl_timer_at is not None:
            waits.append(self._curl_timer_at - time.monotonic())
        if self._deadlines:
            waits.append(self._deadlines[0][0] - self.clock())
        if self._progressed:
            waits.append(self._next_progress - time.monotonic())
        timeout = max(0.0, min(waits)) if waits else 1.0
        if self._waiting and len(self._running) < self._limit:
            timeout = 0.0  # work that can start now
        for key, mask in self._selector.select(min(timeout, 1.0)):
            if key.fileobj is self._wake_reader:
                self._drain_wake()
                continue
            action = (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0) | \
                     (pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0)
            self._multi.socket_action(key.fd, action)
        if self._curl_timer_at is not None and time.monotonic() >= self._curl_timer_at:
            self._curl_timer_at = None
            self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        self._fire_deadlines()
        self._take_inbox()
        self._start_waiting()
        self._finish_transfers()  # after every socket_action of this turn, the kick of new ones included
        if self._progressed and time.monotonic() >= self._next_progress:
            self._report_progress()

    def _report_progress(self) -> None:
        """Tell on_progress how far each keyed task that moved has got (its images with an outcome)."""
        self._progressed = False
        self._next_progress = time.monotonic() + PROGRESS_INTERVAL_S
        moved = {}
        for key, task in self._keyed.items():
            done = len(task.outcomes) - task.left
            if done != task.reported:
                task.reported = moved[key] = done
        if moved:
            try:
                self._on_progress(moved)
            except Exception:  # the caller's bug must not stop the loop that serves every task
                log.exception("engine: the progress callback failed")

    def _on_socket(self, what: int, fd: int, multi, data) -> None:
        """libcurl says which sockets to watch for what."""
        if what == pycurl.POLL_REMOVE:
            if fd in self._selector.get_map():
                self._selector.unregister(fd)
            return
        events = {pycurl.POLL_IN: selectors.EVENT_READ, pycurl.POLL_OUT: selectors.EVENT_WRITE,
                  pycurl.POLL_INOUT: selectors.EVENT_READ | selectors.EVENT_WRITE}[what]
        if fd in self._selector.get_map():
            self._selector.modify(fd, events)
        else:
            self._selector.register(fd, events)

    def _on_timer(self, timeout_ms: int) -> None:
        self._curl_timer_at = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            tasks, self._inbox = self._inbox, deque()
            cancels, self._cancels = self._cancels, []
        for images, done, key in tasks:
            task = _Task(len(images), done, key)
            self._tasks.add(task)
            self._in_flight += len(images)
            if not images:
                self._answer(task)
                continue
            if key is not None:
                self._keyed[key] = task
            task.indices = [index for index, _ in images]
            task.todo.extend(_Image(task, position, index, url) for position, (index, url) in enumerate(images))
            self._waiting.append(task)
        for key in cancels:  # after the tasks: a cancel that follows its task in the inbox finds it
            task = self._keyed.pop(key, None)
            if task is not None:
                self._cancel(task)

    def _cancel(self, task: _Task) -> None:
        """Drop a task's work wherever it is, and answer it now. Its deadlines (GPU waits, retry backoffs)
        stay on the heap but find it cancelled and do nothing."""
        task.cancelled = True
        if task.todo:
            task.todo.clear()
            self._waiting.remove(task)
        for handle, transfer in list(self._running.items()):
            if transfer.image.task is task:
                del self._running[handle]
                self._multi.remove_handle(transfer.curl)  # libcurl closes the connection; nothing more is read
                transfer.release()
                self._idle.append(transfer)
        for position, outcome in enumerate(task.outcomes):
            if outcome is None:
                task.outcomes[position] = ImageOutcome.failed(task.indices[position], CANCELLED_BY_REQUEST,
                                                              ErrorKind.CANCELLED)
        self._in_flight -= task.left
        task.left = 0
        self._answer(task)

    def _start_waiting(self) -> None:
        started = False
        while self._waiting and len(self._running) < self._limit:
            task = self._waiting[0]
            image = task.todo.popleft()
            if task.todo:
                self._waiting.rotate(-1)  # the next image goes to the next task
            else:
                self._waiting.popleft()
            if not image.attempt:
                image.started = time.perf_counter()
            image.attempt += 1
            transfer = self._idle.pop() if self._idle else Transfer(self.settings.limits, self.settings.addresses)
            try:
                transfer.begin(image.url, image)
            except (ValueError, TypeError, pycurl.error) as exc:  # this URL's fault: its image fails, alone
                transfer.release()
                self._idle.append(transfer)
                self._record(image, ImageOutcome.failed(image.index, f"invalid URL: {exc} (permanent, 1 attempt)",
                                                        ErrorKind.INVALID_URL, self._age(image)))
                continue
            self._running[id(transfer.curl)] = transfer
            self._multi.add_handle(transfer.curl)
            started = True
        if started:
            self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)  # let libcurl start the new ones now

    def _finish_transfers(self) -> None:
        for curl, code, message in finished(self._multi):
            self._transfer_ended(curl, code, message)

    def _transfer_ended(self, curl, code: int, message: str) -> None:
        transfer = self._running.pop(id(curl), None)
        if transfer is None:
            return  # its task was cancelled (the handle left the loop then)
        self._multi.remove_handle(curl)
        image, attempt = transfer.image, transfer.attempt
        failure = transfer.failure(code, message)
        transfer.release()  # an idle handle keeps no body
        self._idle.append(transfer)
        if failure is None:
            self._limit = min(float(self.settings.max_transfers), self._limit + 1)
            self._measured(image, attempt.body)
        elif failure.slow and len(self._running) >= MIN_TRANSFERS and image.forgiven < FORGIVEN_SLOW:
            self._shared_too_thin(image, failure)
        else:  # an error page is no image body: only bytes of bodies that could have been images count
            http_error = failure.kind in (ErrorKind.HTTP_4XX, ErrorKind.HTTP_5XX, ErrorKind.HTTP_OTHER)
            self._failed_attempt(image, failure, 0 if http_error else attempt.size)

    def _fire_deadlines(self) -> None:
        now = self.clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, action = heapq.heappop(self._deadlines)
            action()

    def _after(self, delay_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._deadlines, (self.clock() + delay_s, next(self._seq), action))

    # ----------------------------------------------------------- outcomes
    def _measured(self, image: _Image, body: BodyReader) -> None:
        try:
            width, height = body.finish()
        except ImageError as exc:
            self._record(image, ImageOutcome.failed(image.index, str(exc), exc.kind, self._age(image), body.size))
            return
        except Exception as exc:  # a decoder bug that these bytes trigger: this image's outcome, not the loop's end
            log.warning("engine: image %d: measuring raised %r", image.index, exc)
            self._record(image, ImageOutcome.failed(image.index, f"internal error measuring this image: {exc!r}"[:300],
                                                    ErrorKind.INTERNAL, self._age(image), body.size))
            return
        wait_s = random.uniform(self.settings.gpu_sleep_min_s, self.settings.gpu_sleep_max_s)
        nbytes = body.size  # the wait keeps numbers only: the body's bytes are freed now, not after the wait
        self._after(wait_s, lambda: self._record(image, ImageOutcome(
            image.index, width, height, perimeter(width, height), None, None, self._age(image), nbytes)))

    def _failed_attempt(self, image: _Image, failure: Failure, nbytes: int) -> None:
        limits = self.settings.limits
        if failure.transient and image.attempt < limits.attempts:
            wait = backoff_s(image.attempt, limits.backoff_s, limits.max_backoff_s, random.uniform(*JITTER),
                             failure.retry_after_s)
            self._after(wait, lambda: self._retry(image))
            return
        if failure.transient:
            reason = f"{failure.reason} (transient, gave up after {image.attempt} attempts)"
        else:
            tries = "1 attempt" if image.attempt == 1 else f"after {image.attempt} attempts"
            reason = f"{failure.reason} (permanent, {tries})"
        self._record(image, ImageOutcome.failed(image.index, reason, failure.kind, self._age(image), nbytes))

    def _shared_too_thin(self, image: _Image, failure: Failure) -> None:
        """Its attempt ran out of time while others shared the path: fewer at once, and it starts again at once,
        the attempt not counted (see the module's docstring)."""
        limit = max(float(MIN_TRANSFERS), (len(self._running) + 1) / 2)
        if limit < self._limit:
            log.warning("engine: %s with %d downloads at once: %d at once from now on", failure.reason,
                        len(self._running) + 1, limit)
            self._limit = limit
        image.attempt -= 1
        image.forgiven += 1
        self._retry(image)

    def _retry(self, image: _Image) -> None:
        """Back to the front of its task's queue once its backoff is over; its task's turn comes next."""
        task = image.task
        if task.cancelled:
            return
        if not task.todo:
            self._waiting.appendleft(task)
        task.todo.appendleft(image)

    @staticmethod
    def _age(image: _Image) -> float:
        return time.perf_counter() - image.started

    def _record(self, image: _Image, outcome: ImageOutcome) -> None:
        task = image.task
        if task.cancelled:
            return  # a GPU wait that ended after its task was cancelled: the task has answered
        task.outcomes[image.position] = outcome
        task.left -= 1
        self._in_flight -= 1
        self._progressed = self._on_progress is not None
        if task.left == 0:
            self._keyed.pop(task.key, None)
            self._answer(task)

    def _answer(self, task: _Task, lost: bool = False) -> None:
        with self._answer_lock:
            if task.answered:
                return
            task.answered = True
        self._tasks.discard(task)
        try:
            task.done(None if lost else task.outcomes)
        except Exception:  # the caller's bug must not stop the loop that serves every other task
            log.exception("engine: a task's done callback failed")


def measure(images: TaskImages, settings: EngineSettings) -> list[ImageOutcome]:
    """Measure one task on the calling thread; its outcomes, in the task's order."""
    engine = Engine(settings)
    outcomes: list[ImageOutcome] = []
    engine.submit(images, outcomes.extend)
    engine.run(until=lambda: len(outcomes) == len(images) and not engine._inbox)
    return outcomes
