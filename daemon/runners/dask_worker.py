"""What runs inside a Dask worker (``executor = dask``): the engine plugin, the task, the cancel. The daemon's
side, which sends them, is dask_cluster.py (DaskRunner).

The daemon gives the scheduler an EnginePlugin, which every worker installs (those that join later too): one
engine per worker process, on a thread of its own, with the daemon's EngineSettings, so the address policy
and every download limit apply on the workers as in a local pool process. A task is one chunk:
``measure_task`` runs on a worker thread that hands its images to that engine and waits, so a worker with
``--nthreads 64`` keeps 64 chunks (4,096 images) in flight on one event loop. It never raises: it answers
with plain data (plain_data.encode_result), its outcomes or why it was lost with the Loss that says what the
daemon makes of it. ``cancel_on_worker`` (run on each worker by DaskRunner.cancel) drops tasks from the engine.

A worker that closes (its scheduler went away, SIGTERM, or a restarted daemon gives it a new plugin) tears
the plugin down: the engine closes and answers every task it holds (Loss.AWAY), so no worker thread is left
waiting and the worker exits at once, busy or not.

``dask_setup`` (the unit's ``--preload daemon.runners.dask_worker``) bounds that exit: once the worker starts
closing, the process ends within EXIT_GRACE_S. Dask's own close can wait on its scheduler (a SIGTERM that
reaches the worker and its scheduler together, as a host shutting down sends, left workers running 15 s, until
systemd's SIGKILL); nothing of a closing worker is worth waiting for, its tasks are redone by the daemon.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from distributed import WorkerPlugin, get_worker

from daemon.engine.loop import Engine
from daemon.engine.outcome import ImageOutcome, TaskImages
from daemon.engine.settings import EngineSettings
from daemon.runners import Loss
from daemon.runners.plain_data import encode_result
from daemon.runners.pool_process import exit_on_engine_death
from daemon.runners.sandbox import loss_of, run_isolated

#: The name the plugin is registered under, on the scheduler and on each worker.
PLUGIN_NAME = "retailpulse-engine"
#: Longest a closing worker process lives on (dask_setup): enough for Dask to say goodbye to a scheduler there.
EXIT_GRACE_S = 1.5
#: How long a task waits for the worker's engine plugin (being replaced by a restarted daemon) to be there.
PLUGIN_WAIT_S = 10.0
#: The Dask event topic of the engine's progress reports ({task key: images with an outcome}), which the
#: daemon's client subscribes to (DaskRunner): plain data, through the scheduler.
PROGRESS_TOPIC = "retailpulse-progress"


class EnginePlugin(WorkerPlugin):
    """Runs on every worker (those that join later too): one engine per worker process, on its own thread."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.engine: Engine | None = None
        self.closing: threading.Event | None = None  # made on the worker (it does not pickle); set on teardown

    def setup(self, worker) -> None:
        self.closing = threading.Event()
        self.engine = Engine(self.settings, on_progress=lambda measured: worker.log_event(PROGRESS_TOPIC, measured))
        self.engine.start(on_death=exit_on_engine_death)  # as a pool process: its tasks end in KilledWorker

    def teardown(self, worker) -> None:
        """The worker is closing, or a daemon gave it a new plugin: every task waiting here is answered
        (as lost, so the daemon sends it again) and the worker's threads are free at once."""
        if self.closing is not None:
            self.closing.set()  # isolated tasks stop too
        if self.engine is not None:
            self.engine.close(timeout_s=5)


def dask_setup(worker) -> None:
    """The preload's hook (Dask calls it as the worker starts): every way a worker closes goes through its
    ``close`` (a signal, a lost scheduler, the scheduler's "close" message, its handlers table), so this one
    starts a timer that ends the process EXIT_GRACE_S later if Dask has not."""
    close = worker.close

    async def close_within_grace(*args, **kwargs):
        timer = threading.Timer(EXIT_GRACE_S, _exit_now)
        timer.daemon = True
        timer.start()
        return await close(*args, **kwargs)

    worker.close = close_within_grace
    for handlers in (worker.handlers, worker.stream_handlers):
        if "close" in handlers:
            handlers["close"] = close_within_grace


def _exit_now() -> None:
    logging.getLogger("retailpulse.worker").warning(
        "the worker is still closing %.1f s on (Dask waits on its scheduler): exiting now", EXIT_GRACE_S)
    logging.shutdown()
    os._exit(0)


def measure_task(images: TaskImages, isolated: bool, cancel_key: str | None = None) -> bytes:
    """The Dask task: encode_result's JSON. Never raises: an image's trouble is its outcome, and anything
    else is said in the answer, with this worker's address. ``cancel_key``: what cancel_on_worker() knows
    the task's images by in the worker's engine."""
    worker = get_worker()
    try:
        plugin = _plugin_of(worker)
        if plugin is None:
            return encode_result(worker.address, lost="this Dask worker has no engine: the daemon's plugin is not "
                                 "installed on it", cause=Loss.RAISED)
        if isolated:
            result = run_isolated(images, plugin.settings, plugin.closing)
            if isinstance(result, str):
                return encode_result(worker.address, lost=result, cause=loss_of(result))
            return encode_result(worker.address, result)
        finished = threading.Event()
        answer: list[list[ImageOutcome] | None] = []

        def done(outcomes: list[ImageOutcome] | None) -> None:
            answer.append(outcomes)
            finished.set()

        plugin.engine.submit(images, done, key=cancel_key)
        finished.wait()
        if answer[0] is None:
            return encode_result(worker.address, lost="the worker's engine closed (the worker is stopping, or a "
                                 "new daemon gave it a new one)", cause=Loss.AWAY)
        return encode_result(worker.address, answer[0])
    except Exception as exc:  # our bug on this worker: say so, with the worker's name
        return encode_result(worker.address, lost=f"{type(exc).__name__}: {exc}", cause=Loss.RAISED)


def cancel_on_worker(cancel_keys: list[str], dask_worker=None) -> None:
    """Run on each worker by DaskRunner.cancel (``Client.run``): the worker's engine drops these tasks' images
    and answers them at once, so the threads waiting in measure_task return."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    if plugin is not None and plugin.engine is not None:
        plugin.engine.cancel(cancel_keys)


def certificate_ends(dask_worker=None) -> list[float]:
    """Run on each worker by DaskRunner (``Client.run``): when this worker's own certificate ends (the one in
    its --tls-cert file, as this process reads it), so the daemon's /healthz can say so before it does."""
    from daemon.runners.certificates import file_not_after
    path = getattr(dask_worker.security, "tls_worker_cert", None) if dask_worker is not None else None
    return file_not_after(path) if path else []


def _plugin_of(worker, wait_s: float = PLUGIN_WAIT_S) -> EnginePlugin | None:
    """The worker's engine plugin. While a restarted daemon replaces it (the old one torn down, the new one
    being set up) there is none for a moment: wait for it rather than count a failure against the chunk."""
    deadline = time.monotonic() + wait_s
    while True:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if plugin is not None and plugin.engine is not None:
            return plugin
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
