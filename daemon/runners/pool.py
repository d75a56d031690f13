"""LocalPool: the image work on this machine, in the processes of a ``multiprocessing.Pool``.

The Pool starts the processes, one per core, and starts a new one when one dies; each process runs the
engine (pool_process.py). The work itself does not go through the Pool's task queue, for two reasons
measured on this service: a task runs to its end before its process takes another, so one slow image held
a whole process idle; and the queue is one pipe behind one lock, which a process killed while waiting for a
task keeps for ever, stalling every process. Instead each process connects back over a Unix socket of its
own (authenticated with a key only the daemon and its children know) and tasks and outcomes travel on it:

    supervisor --(TASK, id, images, isolated)--> process      process --(DONE, id, outcomes)--> supervisor
    supervisor --(CANCEL, ids)-------------------> process      process --(LOST, id, why, cause)-> supervisor
                                                                process --(PROGRESS, {id: images})-> supervisor

(the Message enum, daemon/runners/__init__.py).

A process that dies closes its socket, so its tasks are reported lost at once (no polling, no guessing);
a supervisor that dies closes the other end, and every process exits at once instead of downloading on.
A process that lives but holds tasks and finishes none for ``stall_timeout_s`` (stopped, stuck in a system
call, its engine thread gone) is stalled: it is reported for REPORT_BEFORE_REPLACE_S, then killed, so its
tasks come back lost like any death's and the Pool starts a new process.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, Listener

from daemon.engine.outcome import TaskImages
from daemon.engine.settings import EngineSettings
from daemon.runners import Loss, Message, OnEvent, Progress, TaskDone, TaskLost, TaskProgress
from daemon.runners.pool_process import STOP_SIGNALS, serve

log = logging.getLogger("retailpulse.daemon")

STOP_TIMEOUT_S = 10.0
#: How long a stalled process is shown (heartbeat, /healthz) before it is killed and replaced: two
#: heartbeats, so that whoever watches /healthz or the metrics sees it, not only the log.
REPORT_BEFORE_REPLACE_S = 2.0
WATCH_INTERVAL_S = 0.5


@dataclass
class _Connected:
    pid: int
    conn: Connection
    tasks: dict[int, int] = field(default_factory=dict)  # task id -> images, for every task not answered yet

    @property
    def images(self) -> int:
        return sum(self.tasks.values())

    @property
    def name(self) -> str:
        return f"pool process {self.pid}"


def _hang_up(conn: Connection) -> None:
    """Close a connection that another thread may be reading: close() alone would leave that read blocked
    and the socket open (the read holds it), so the process at the other end would never see the end."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
    conn.close()


def _pool_born_deaf(context, processes: int, initargs: tuple):
    """The Pool, its processes started with Ctrl-C and SIGTERM blocked. A process takes a second to import the
    engine (pycurl, Pillow) before serve() can ignore them, and a Ctrl-C to the process group meanwhile was a
    KeyboardInterrupt traceback from each. A blocked signal waits, and serve() drops it. The mask passes to
    every process through fork and exec, and to the Pool's own threads, which start replacements later: so
    made here, on this thread, then put back (as multiprocessing does for its resource tracker, bpo-33613).
    The tracker unblocks both when it starts, so it is started first."""
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return context.Pool(processes, initializer=serve, initargs=initargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def answer_event(kind: Message, task_id: int, payload: list, holder: str) -> TaskDone | TaskLost:
    """A pool process's answer: DONE with the outcomes, or LOST with why and the Loss (as a Dask worker's)."""
    if kind == Message.DONE:
        (outcomes,) = payload
        return TaskDone(task_id, outcomes)
    why, cause = payload
    return TaskLost(task_id, why, Loss(cause), where=holder)


class LocalPool:
    """A TaskRunner (daemon/runners/) on this machine."""

    def __init__(self, processes: int, settings: EngineSettings, on_event: OnEvent, images_per_process: int,
                 stall_timeout_s: float):
        self.processes, self.images_per_process = processes, images_per_process
        self._on_event = on_event
        self._lock = threading.Lock()  # guards _connected, _progress, _replacing: accept, reader, main threads
        self._connected: dict[int, _Connected] = {}
        self._progress = Progress(stall_timeout_s)
        self._replacing: dict[int, str] = {}  # pid -> why it was killed, for the loss of its tasks
        self._replaced = 0  # stalled processes killed since start
        self._closing = False  # under _lock: close() has hung up; a process connecting now is hung up at once
        self._next_watch = 0.0  # monotonic time of the next look for stalls
        self._folder = tempfile.mkdtemp(prefix="retailpulse-pool-")  # 0700: only we reach the socket
        authkey = secrets.token_bytes(32)
        self._listener = Listener(os.path.join(self._folder, "pool.sock"), family="AF_UNIX", authkey=authkey)
        threading.Thread(target=self._accept_forever, name="pool-accept", daemon=True).start()
        # spawn: pool processes start from a clean interpreter, not a fork of a threaded supervisor, and with
        # no forkserver in between, whose death (a SIGTERM to the process group) would leave the Pool unable
        # to start or stop processes.
        context = multiprocessing.get_context("spawn")
        self._pool = _pool_born_deaf(context, processes, (self._listener.address, authkey, settings))

    # ------------------------------------------------------------- TaskRunner
    def has_room(self, images: int) -> bool:
        with self._lock:
            return any(p.images == 0 or p.images + images <= self.images_per_process
                       for p in self._connected.values())

    def workers(self) -> int:
        with self._lock:
            return len(self._connected)

    def describe(self) -> dict:
        with self._lock:
            tasks_by_worker = {p.name: len(p.tasks) for p in self._connected.values()}
            stalled = [stall.doc() for stall in self._progress.stalled(time.monotonic())]
            workers = len(self._connected)
        return {"processes": self.processes, "workers": workers, "tasks_by_worker": tasks_by_worker,
                "stalled": stalled, "stalled_replaced": self._replaced}

    def watch(self) -> None:
        """Log a process when it stalls; kill it REPORT_BEFORE_REPLACE_S later if it is stalled still.
        Looks at most every WATCH_INTERVAL_S: the supervisor calls it on every turn of its loop."""
        now = time.monotonic()
        if now < self._next_watch:
            return
        self._next_watch = now + WATCH_INTERVAL_S
        with self._lock:
            new, _recovered = self._progress.changes(now)
            doomed = [(int(stall.worker.rsplit(" ", 1)[1]), stall) for stall in self._progress.stalled(now)
                      if stall.seconds >= self._progress.timeout_s + REPORT_BEFORE_REPLACE_S]
            doomed = [(pid, stall) for pid, stall in doomed if pid not in self._replacing]
            for pid, stall in doomed:
                self._replacing[pid] = f"pool process {pid} stalled (it held {stall.tasks} task(s) and finished " \
                                       f"none for {stall.seconds:.0f} s) and was replaced"
        for stall in new:
            log.warning("pool: %s holds %d task(s) and finished none for %.0f s: stalled; replacing it in %g s",
                        stall.worker, stall.tasks, stall.seconds, REPORT_BEFORE_REPLACE_S)
        for pid, _stall in doomed:
            log.warning("pool: killing stalled pool process %d; its tasks are redone", pid)
            self._replaced += 1
            try:
                os.kill(pid, signal.SIGKILL)  # works on a stopped process too; the Pool starts a new one
            except ProcessLookupError:
                pass

    def submit(self, task_id: int, images: TaskImages, isolated: bool = False) -> None:
        with self._lock:
            target = max(self._connected.values(), key=lambda p: self.images_per_process - p.images, default=None)
            if target is None:
                raise RuntimeError("no pool process is connected; check has_room() first")
            target.tasks[task_id] = len(images)
            self._progress.holding(target.name, len(target.tasks), time.monotonic())
        try:
            target.conn.send((Message.TASK, task_id, list(images), isolated))
        except OSError:
            pass  # it just died: its reader reports the task lost with the others

    def cancel(self, task_ids: list[int]) -> None:
        """Tell each process holding some of these tasks to drop them; each answers them at once (DONE), which
        frees its room here. An isolated task is not stopped: it ends within its deadline (sandbox.py)."""
        wanted = set(task_ids)
        with self._lock:
            held = [(p.conn, sorted(wanted & p.tasks.keys())) for p in self._connected.values()]
        for conn, ids in held:
            if ids:
                try:
                    conn.send((Message.CANCEL, ids))
                except OSError:
                    pass  # it just died: its reader reports its tasks lost

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the processes: no replacements, then close their sockets (they exit on that), then join."""
        self._pool.close()
        self._listener.close()
        with self._lock:
            self._closing = True
            for process in self._connected.values():
                _hang_up(process.conn)
        joiner = threading.Thread(target=self._pool.join, name="pool-join", daemon=True)
        joiner.start()
        joiner.join(timeout_s)
        if joiner.is_alive():  # a process stuck (SIGSTOP, a hung system call): they ignore SIGTERM
            log.warning("pool processes did not stop within %g s; killing them", timeout_s)
            with self._lock:
                pids = list(self._connected)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            joiner.join(timeout_s)
        shutil.rmtree(self._folder, ignore_errors=True)

    # ------------------------------------------------------------ connections
    def _accept_forever(self) -> None:
        while True:
            try:
                conn = self._listener.accept()  # checks the key; a stranger gets an error here
                kind, pid = conn.recv()
            except OSError:
                return  # closed: we are stopping
            except Exception as exc:  # a peer without the key, or one that said nothing sensible
                log.warning("pool: refused a connection: %s", exc)
                continue
            if kind != Message.HELLO:
                conn.close()
                continue
            process = _Connected(pid, conn)
            with self._lock:
                if self._closing:  # it connected as we stopped (at start-up, say): it would wait for ever
                    _hang_up(conn)
                    return
                self._connected[pid] = process
            log.info("pool: process %d connected", pid)
            threading.Thread(target=self._read_forever, args=(process,), name=f"pool-{pid}", daemon=True).start()

    def _progressed(self, process: _Connected, measured: dict) -> None:
        """A process's progress report, for the tasks it still holds (a late report of an answered one is stale)."""
        with self._lock:
            held = {task_id: images for task_id, images in measured.items() if task_id in process.tasks}
        if held:
            self._on_event(TaskProgress(held))

    def _read_forever(self, process: _Connected) -> None:
        while True:
            try:
                message = process.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == Message.PROGRESS:
                self._progressed(process, message[1])
                continue
            kind, task_id, *payload = message
            with self._lock:
                known = process.tasks.pop(task_id, None) is not None
                now = time.monotonic()
                self._progress.finished(process.name, now)
                self._progress.holding(process.name, len(process.tasks), now)
            if known:
                self._on_event(answer_event(kind, task_id, payload, process.name))
        with self._lock:
            self._connected.pop(process.pid, None)
            lost, process.tasks = list(process.tasks), {}
            self._progress.forget(process.name)
            why = self._replacing.pop(process.pid, f"pool process {process.pid} died")
        if lost:
            log.warning("pool: process %d died with %d task(s)", process.pid, len(lost))
        for task_id in lost:
            self._on_event(TaskLost(task_id, why, where=process.name))
