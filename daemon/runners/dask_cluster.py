"""DaskRunner: the image work on a Dask cluster (``executor = dask``), for when one machine is not enough.

The API, the spool and the supervisor stay on their machine and keep every guarantee; only tasks travel.
Each Dask worker process runs the same engine as a local pool process (daemon/engine/), made once per
worker by a worker plugin, so the address policy and every download limit apply on the workers. A task is
one chunk: it runs on a worker thread that hands its images to the worker's engine and waits, so a worker
with ``--nthreads 16`` keeps 16 chunks (about 1,000 images) in flight on one event loop.

Failures, mapped onto the supervisor's (daemon/supervisor/jobs.py):
- a worker dies (kill -9, OOM, its machine): the scheduler must be run with
  ``distributed.scheduler.allowed-failures = 0`` (the shipped unit sets it), so each task it held ends at
  once in KilledWorker instead of being retried blindly on the next worker; that is a TaskLost, and the
  supervisor sends the chunk out again isolated (sandbox.py, on a worker), halving it if it kills
  again, exactly as locally;
- the scheduler goes away: every task in flight is lost, but through no fault of its images (TaskLost with
  ``suspect=False``): they go out again as they were once the client has reconnected, and meanwhile
  ``has_room`` is false, so nothing piles up. Dask's client gives up reconnecting after its timeout and
  closes; the runner then connects a new client in the background, every second, for as long as it takes
  (a scheduler that systemd restarts may be away for minutes).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

from distributed import Client, KilledWorker, Security, WorkerPlugin, get_worker

from daemon.engine import Engine, EngineSettings, ImageOutcome, TaskImages
from daemon.runners import OnEvent, TaskDone, TaskLost
from daemon.runners.pool_process import exit_on_engine_death
from daemon.runners.sandbox import run_isolated

log = logging.getLogger("retailpulse.daemon")

PLUGIN_NAME = "retailpulse-engine"
CONNECT_TIMEOUT_S = 30
#: How long the number of workers the scheduler reported is used before asking again.
WORKERS_CHECK_INTERVAL_S = 0.5


class EnginePlugin(WorkerPlugin):
    """Runs on every worker (those that join later too): one engine per worker process, on its own thread."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.engine: Engine | None = None

    def setup(self, worker) -> None:
        self.engine = Engine(self.settings)
        self.engine.start(on_death=exit_on_engine_death)  # as a pool process: its tasks end in KilledWorker

    def teardown(self, worker) -> None:
        if self.engine is not None:
            self.engine.close(timeout_s=5)


def measure_task(images: TaskImages, isolated: bool, cancel_key: str | None = None,
                 ) -> tuple[str, list[ImageOutcome] | str]:
    """The Dask task: ("done", outcomes), ("lost", why), or ("retry", why) when this worker has no engine yet
    (it joined a restarted scheduler before the daemon gave it the plugin). Never raises for an image's sake.
    ``cancel_key``: what cancel_on_worker() knows the task's images by in the worker's engine."""
    plugin: EnginePlugin | None = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.engine is None:
        return "retry", "the Dask worker has no engine yet"
    if isolated:
        result = run_isolated(images, plugin.settings)
        return ("lost", result) if isinstance(result, str) else ("done", result)
    finished = threading.Event()
    outcomes: list[ImageOutcome] = []

    def done(measured: list[ImageOutcome]) -> None:
        outcomes.extend(measured)
        finished.set()

    plugin.engine.submit(images, done, key=cancel_key)
    finished.wait()
    return "done", outcomes


def cancel_on_worker(cancel_keys: list[str], dask_worker=None) -> None:
    """Run on each worker by DaskRunner.cancel (``Client.run``): the worker's engine drops these tasks' images
    and answers them at once, so the threads waiting in measure_task return."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    if plugin is not None and plugin.engine is not None:
        plugin.engine.cancel(cancel_keys)


def security(ca_file: str, cert_file: str, key_file: str) -> Security | None:
    """Dask's TLS settings from ours: all three files, or none (plain TCP, for a private network or tests)."""
    if not (ca_file or cert_file or key_file):
        return None
    return Security(tls_ca_file=ca_file, tls_client_cert=cert_file, tls_client_key=key_file,
                    require_encryption=True)


class DaskRunner:
    """A TaskRunner (daemon/runners/) on a Dask cluster."""

    def __init__(self, scheduler: str, settings: EngineSettings, on_event: OnEvent, images_per_worker: int,
                 tls: Security | None = None):
        self.scheduler, self.images_per_worker = scheduler, images_per_worker
        self._on_event = on_event
        self._lock = threading.Lock()  # guards _tasks: the main thread submits, the client's thread completes
        self._tasks: dict[int, tuple[object, int]] = {}  # task id -> (future, images)
        self._plugin = EnginePlugin(settings)
        self._tls = tls
        self._client = self._connect()
        self._scheduler_id: str | None = None
        self._reconnecting: threading.Thread | None = None
        self._closing = threading.Event()
        self._workers_seen, self._workers_checked_at = 0, float("-inf")
        self.workers()

    def _connect(self) -> Client:
        return Client(self.scheduler, security=self._tls, timeout=CONNECT_TIMEOUT_S, set_as_default=False)

    def _reconnect(self) -> None:
        """A new client once the old one gave up (the background thread's body)."""
        log.warning("dask: the client gave up on %s; connecting again every second", self.scheduler)
        while not self._closing.is_set():
            try:
                client = self._connect()
            except (OSError, TimeoutError) as exc:
                log.debug("dask: %s still unreachable: %s", self.scheduler, exc)
                self._closing.wait(1)
                continue
            old, self._client = self._client, client
            old.close(timeout=1)
            log.warning("dask: connected to %s again", self.scheduler)
            return

    # ------------------------------------------------------------- TaskRunner
    def workers(self) -> int:
        """Workers the scheduler knows; 0 while it is away (the client reconnects by itself, or a new one is
        made). Asking the scheduler is a round trip, and the supervisor asks before every chunk it
        dispatches: the answer is kept for WORKERS_CHECK_INTERVAL_S."""
        if self._client.status != "running":
            if self._client.status == "closed" and not self._closing.is_set() and \
                    (self._reconnecting is None or not self._reconnecting.is_alive()):
                self._reconnecting = threading.Thread(target=self._reconnect, name="dask-reconnect", daemon=True)
                self._reconnecting.start()
            self._workers_checked_at = float("-inf")  # ask as soon as it is back
            return 0
        if time.monotonic() >= self._workers_checked_at + WORKERS_CHECK_INTERVAL_S:
            self._workers_seen, self._workers_checked_at = self._ask_scheduler(), time.monotonic()
        return self._workers_seen

    def _ask_scheduler(self) -> int:
        try:
            info = self._client.scheduler_info(n_workers=-1)
        except (OSError, TimeoutError):  # the connection dropped since the status check: away, for now
            return 0
        if info.get("id") != self._scheduler_id:
            # A new scheduler (first contact, or a restart) knows no plugin: give it ours, for every worker,
            # those that join later included.
            self._client.register_plugin(self._plugin, name=PLUGIN_NAME)
            self._scheduler_id = info.get("id")
        return len(info.get("workers", {}))

    def has_room(self, images: int) -> bool:
        workers = self.workers()
        with self._lock:
            in_flight = sum(n for _, n in self._tasks.values())
        return workers > 0 and (in_flight == 0 or in_flight + images <= workers * self.images_per_worker)

    def describe(self) -> dict:
        return {"scheduler": self.scheduler, "workers": self.workers()}

    def submit(self, task_id: int, images: TaskImages, isolated: bool = False) -> None:
        key = f"retailpulse-{task_id}-{uuid.uuid4()}"
        future = self._client.submit(measure_task, list(images), isolated, key, key=key, pure=False, retries=0)
        with self._lock:
            self._tasks[task_id] = (future, len(images))
        future.add_done_callback(lambda f: self._finished(task_id, f))

    def cancel(self, task_ids: list[int]) -> None:
        """Stop these tasks on the cluster, from a thread of its own (each step is a round trip): the workers'
        engines drop the running ones (they then finish, and free their room), the scheduler forgets the
        ones not started yet."""
        with self._lock:
            futures = [self._tasks[task_id][0] for task_id in task_ids if task_id in self._tasks]
        if futures:
            threading.Thread(target=self._cancel_on_cluster, args=(futures,), name="dask-cancel", daemon=True).start()

    def _cancel_on_cluster(self, futures: list) -> None:
        try:
            self._client.run(cancel_on_worker, [future.key for future in futures], on_error="ignore")
            self._client.cancel([future for future in futures if not future.done()])
        except (OSError, TimeoutError) as exc:  # the scheduler is away: its tasks are lost anyway
            log.info("dask: cancelling %d task(s): %s", len(futures), exc)

    def close(self, timeout_s: float = 10) -> None:
        self._closing.set()
        with self._lock:
            futures = [future for future, _ in self._tasks.values()]
            self._tasks.clear()
        self._client.cancel(futures)
        self._client.close(timeout=timeout_s)

    # -------------------------------------------------------------- outcomes
    def _finished(self, task_id: int, future) -> None:
        with self._lock:
            if self._tasks.pop(task_id, None) is None:
                return  # closed meanwhile
        if future.status == "finished":
            kind, payload = future.result()
            if kind == "done":
                self._on_event(TaskDone(task_id, payload))
            else:
                self._on_event(TaskLost(task_id, payload, suspect=kind == "lost"))
            return
        if future.status == "cancelled":
            self._on_event(TaskLost(task_id, "the Dask scheduler went away", suspect=False))
            return
        error = future.exception()
        if isinstance(error, KilledWorker):
            self._on_event(TaskLost(task_id, f"Dask worker {error.last_worker.address} died"
                                    if getattr(error, "last_worker", None) else "a Dask worker died"))
        else:  # the task itself raised: infrastructure (it never raises for an image), not the images' doing
            log.error("dask: task %d failed: %s: %s", task_id, type(error).__name__, error)
            self._on_event(TaskLost(task_id, f"Dask task failed: {type(error).__name__}: {error}", suspect=False))
