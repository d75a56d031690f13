"""What runs inside a pool process: the engine, fed over the process's own connection to the supervisor.

``serve`` is the Pool's initializer, and it never returns: it connects, starts the engine, and reads tasks
until its connection closes, then exits. So the Pool's own task loop never runs here, and no pool process
ever holds the Pool's task-queue lock (a process killed holding it would stall the Pool's shutdown).
Nothing here is global: the threads hold what they need.
"""
from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from multiprocessing.connection import Client, Connection

from daemon.engine.loop import Engine
from daemon.engine.outcome import ImageOutcome, TaskImages
from daemon.engine.settings import EngineSettings
from daemon.runners import Loss, Message
from daemon.runners.sandbox import loss_of, run_isolated

#: Isolated tasks (sandbox.py) one pool process runs at once, each in a process of its own.
ISOLATED_AT_ONCE = 8
#: How much lower than the supervisor's the pool processes' CPU priority is (nice(2)).
POOL_NICE_INCREMENT = 10
#: A pool process whose engine died exits with this (EX_SOFTWARE, sysexits.h).
EXIT_ENGINE_DIED = 70
#: What stops the daemon and must not stop a pool process: the supervisor decides how to stop (pool.py blocks
#: them while it starts processes, so that one still importing the engine cannot die of Ctrl-C either).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def exit_on_engine_death(exc: BaseException) -> None:
    """The engine's thread died (its loop raised; the engine has logged why). A process without its engine
    would stay connected and be handed tasks that nothing serves: end it, so its connection closes, its
    tasks are lost and redone isolated like after any death, and a fresh process takes its place."""
    os._exit(EXIT_ENGINE_DIED)


class _PoolProcess:
    def __init__(self, conn: Connection, settings: EngineSettings):
        self.conn, self.settings = conn, settings
        self.send_lock = threading.Lock()  # the engine thread and the isolation threads both answer
        self.engine = Engine(settings, on_progress=self.progress)
        self.isolated = ThreadPoolExecutor(ISOLATED_AT_ONCE, thread_name_prefix="isolated")

    def send(self, message: tuple) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
        except OSError:
            os._exit(0)  # the supervisor is gone

    def read_forever(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the supervisor is gone (stopped, or killed): stop downloading at once
            if message[0] == Message.CANCEL:
                self.engine.cancel(message[1])  # isolated tasks are not the engine's: they run to their end
                continue
            _kind, task_id, images, isolated = message
            if isolated:
                self.isolated.submit(self.run_isolated, task_id, images)
            else:
                self.engine.submit(images, partial(self.done, task_id), key=task_id)

    def progress(self, measured: dict) -> None:
        """The engine's progress report (its task keys are our task ids), on the engine's thread."""
        self.send((Message.PROGRESS, measured))

    def done(self, task_id: int, outcomes: list[ImageOutcome] | None) -> None:
        if outcomes is None:  # the engine closed under it: not the images' doing
            self.send((Message.LOST, task_id, "the pool process's engine closed", Loss.AWAY.value))
            return
        self.send((Message.DONE, task_id, outcomes))

    def run_isolated(self, task_id: int, images: TaskImages) -> None:
        result = run_isolated(images, self.settings)
        if isinstance(result, str):
            self.send((Message.LOST, task_id, result, loss_of(result).value))
        else:
            self.send((Message.DONE, task_id, result))


def serve(address: str, authkey: bytes, settings: EngineSettings) -> None:
    """Pool initializer; never returns. Ctrl-C and a SIGTERM to the whole process group go to the supervisor
    too, which decides how to stop (drain, then close our connection): pool processes ignore both. They were
    blocked since this process started (LocalPool), so one that came while it imported is dropped here, not
    a KeyboardInterrupt. The pool runs below the supervisor's and the API's priority: the API must stay quick
    while we saturate."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones are ignored, so discarded
    os.nice(POOL_NICE_INCREMENT)
    try:
        conn = Client(address, family="AF_UNIX", authkey=authkey)
    except OSError:
        os._exit(0)  # the supervisor is stopping (its socket is gone): nothing to do
    process = _PoolProcess(conn, settings)
    process.engine.start(on_death=exit_on_engine_death)
    conn.send((Message.HELLO, os.getpid()))
    process.read_forever()
