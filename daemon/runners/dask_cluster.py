"""DaskRunner: the image work on a Dask cluster (``executor = dask``), for when one machine is not enough.
This is the daemon's side; what runs on the workers (the engine plugin, the task) is dask_worker.py.

The API, the spool and the supervisor stay on their machine and keep every guarantee; only tasks travel.
Each Dask worker process runs the same engine as a local pool process (daemon/engine/), made once per
worker by the plugin the runner gives the scheduler. A task's result comes back as plain data the daemon
checks, never as a pickle it runs (plain_data.py).

Failures, mapped onto the supervisor's (Loss, daemon/runners/__init__.py; the policy: supervisor/jobs.py):
- a worker dies (kill -9, OOM, a crash): the scheduler must be run with
  ``distributed.scheduler.allowed-failures = 0`` (the shipped unit sets it), so each task it held ends at
  once in KilledWorker instead of being retried blindly on the next worker: Loss.DIED, and the chunk goes
  out again isolated (sandbox.py, on a worker), halved if it kills again, exactly as locally;
- a worker the scheduler removed because its heartbeats stopped (a partition, its host gone: the units set
  Dask's TCP timeout above the heartbeat deadline, so a cut link ends this way and not as a broken
  connection): its tasks end in KilledWorker too, but the scheduler's event log says why, and that is no
  fault of their images: Loss.AWAY, sent again as they were, and no death counts against them;
- a task fails on a worker (another version of the package there, a result that is not plain data):
  Loss.RAISED, counted against the chunk, sent again after a backoff; the worker is named in the log and in
  ``describe()`` (so /healthz), and no task is sent to it while others can take them, until it leaves the
  cluster (restarted: it may have been fixed);
- the scheduler goes away: every task in flight is lost, but through no fault of its images (Loss.AWAY):
  they go out again as they were once the client has reconnected, and meanwhile ``has_room`` is false, so
  nothing piles up. Dask's client gives up reconnecting after its timeout and closes; the runner then
  connects a new client in the background, every second, for as long as it takes;
- a worker closes (its scheduler went away, SIGTERM, or a restarted daemon gives the workers a new plugin):
  its tasks answer Loss.AWAY at once (dask_worker.py) and go out again as they were;
- a worker that holds tasks and finishes none for ``stall_timeout_s`` (Progress), or tasks that wait while
  nothing finishes anywhere: logged by name and listed in ``describe()`` (so /healthz says 503).

The supervisor's loop never waits on the network: every question to the scheduler (its workers, which task
is where, the certificates) is asked by a thread of the runner's own (``dask-watch``), and ``workers()``,
``has_room()``, ``describe()`` and ``watch()`` read its last answers. A daemon cut off from the cluster keeps
its heartbeat (and systemd's watchdog) going, and says 0 workers once the client knows the scheduler is gone.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from distributed import Client, KilledWorker, Security
from distributed.protocol.pickle import dumps as dask_dumps

from daemon.engine.outcome import TaskImages
from daemon.engine.settings import EngineSettings
from daemon.runners import Loss, OnEvent, Progress, TaskDone, TaskLost, TaskProgress
from daemon.runners.certificates import file_not_after, not_after
from daemon.runners.dask_worker import (PLUGIN_NAME, PROGRESS_TOPIC, EnginePlugin, cancel_on_worker,
                                        certificate_ends, measure_task)
from daemon.runners.plain_data import RESULT_DESERIALIZERS, InvalidResult, parse_result, refuse_code_from_the_cluster

log = logging.getLogger("retailpulse.daemon")

#: The first connection's deadline (the daemon's start: the scheduler may be on its way up).
CONNECT_TIMEOUT_S = 30
#: Each later one's, and how long a client that lost the scheduler may try to get it back by itself before
#: a new one is made. Within one try Dask's waits between attempts grow up to the deadline: with 30 s, the
#: daemon found a scheduler back from a restart up to 15 s late. Each try ends within this; a new one starts
#: a second later.
RECONNECT_TIMEOUT_S = 3
#: How long the workers the scheduler reported are used before asking again.
WORKERS_CHECK_INTERVAL_S = 0.5
#: How often the scheduler is asked which worker holds which task (the stall check).
PROCESSING_CHECK_INTERVAL_S = 1.0
#: Longest wait for the scheduler's answer on the watching thread (a stopped scheduler never answers).
SCHEDULER_CALL_TIMEOUT_S = 5.0
#: How often the certificates' ends are read again (the daemon's files, the scheduler's, each worker's).
CERTIFICATE_CHECK_INTERVAL_S = 3600.0
#: The stimulus of a worker the scheduler removed for missed heartbeats (distributed's check_worker_ttl).
HEARTBEAT_REMOVAL = "check-worker-ttl"
#: Tasks whose results are fetched at once. Dask calls every future's done-callback on one thread, and
#: fetching a result is a round trip to the worker through the scheduler: one at a time, 25 ms away, a
#: small job's result waited behind a big one's 64 per worker (2-28 s), and the daemon could not take in
#: more than a few tasks a second. The callback only hands the future to these threads.
RESULT_FETCHERS = 16
#: The holder that stands for all of the daemon's tasks: work is pending and nothing finishes anywhere.
CLUSTER = "the Dask cluster (all tasks)"


class NamedSchedulerSecurity(Security):
    """Dask's TLS, and the scheduler's name checked: Dask checks only that a peer's certificate was signed by
    the CA (its contexts set check_hostname = False), so any worker host's key, which serves too, could pose
    as the scheduler to the daemon. The daemon's context checks that the certificate names the address it
    dialled (an IP: in the subjectAltName, as systemd/dask-cert writes it)."""

    def _get_tls_context(self, tls, purpose):
        ctx = super()._get_tls_context(tls, purpose)
        if ctx is not None and purpose is ssl.Purpose.SERVER_AUTH:
            ctx.check_hostname = True
        return ctx


def security(ca_file: str, cert_file: str, key_file: str) -> Security | None:
    """Dask's TLS settings from ours: all three files, or none (plain TCP, for a private network or tests)."""
    if not (ca_file or cert_file or key_file):
        return None
    return NamedSchedulerSecurity(tls_ca_file=ca_file, tls_client_cert=cert_file, tls_client_key=key_file,
                                  require_encryption=True)


class DaskRunner:
    """A TaskRunner (daemon/runners/) on a Dask cluster."""

    def __init__(self, scheduler: str, settings: EngineSettings, on_event: OnEvent, images_per_worker: int,
                 tls: Security | None, stall_timeout_s: float, min_workers: int = 0):
        refuse_code_from_the_cluster()
        self.scheduler, self.images_per_worker, self.min_workers = scheduler, images_per_worker, min_workers
        self._on_event = on_event
        # guards _tasks, _progress, _failing, _addresses, _certificates: the main thread submits, the watching
        # thread looks at the cluster, the result fetchers complete
        self._lock = threading.Lock()
        self._tasks: dict[int, tuple[object, list]] = {}  # task id -> (future, images)
        self._keys: dict[str, int] = {}  # a task's Dask key -> its task id (the workers' progress names keys)
        self._progress = Progress(stall_timeout_s)
        self._processing: dict[str, set[str]] = {}  # worker -> keys of our tasks it ran at the last look
        self._failing: dict[str, str] = {}  # worker -> why tasks fail there (until it leaves the cluster)
        self._addresses: list[str] = []  # the workers the scheduler knows, at the last look
        self._certificates: dict[str, float] = {}  # whose certificate -> when it ends (Unix seconds)
        self._certificates_checked: tuple[float, frozenset] = (float("-inf"), frozenset())
        self._plugin = EnginePlugin(settings)
        self._fetchers = ThreadPoolExecutor(RESULT_FETCHERS, thread_name_prefix="dask-result")
        self._tls = tls
        self._client = self._connect()
        self._scheduler_id: str | None = None
        self._reconnecting: threading.Thread | None = None
        self._closing = threading.Event()
        self._connected, self._lost_at = True, 0.0
        self._workers_seen, self._workers_checked_at = 0, float("-inf")
        self._processing_checked_at = float("-inf")
        self._look()  # the first answer before the daemon says it is ready (its ready line names the workers)
        self._watching = threading.Thread(target=self._watch_forever, name="dask-watch", daemon=True)
        self._watching.start()

    def _connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> Client:
        # Results as msgpack only: a worker cannot make the daemon unpickle its answer (plain_data.py).
        client = Client(self.scheduler, security=self._tls, timeout=timeout_s, set_as_default=False,
                        deserializers=list(RESULT_DESERIALIZERS))
        client.subscribe_topic(PROGRESS_TOPIC, self._progressed)
        return client

    def _progressed(self, event) -> None:
        """A worker engine's progress report, (time, {task key: images}), on the client's thread: checked as
        plain data, and only for tasks of ours still running (keys of an earlier daemon's are not ours)."""
        try:
            _at, measured = event
        except (TypeError, ValueError):
            return
        if not isinstance(measured, dict):
            return
        with self._lock:
            held = {self._keys[key]: images for key, images in measured.items()
                    if isinstance(key, str) and key in self._keys
                    and type(images) is int and 0 <= images <= len(self._tasks[self._keys[key]][1])}
        if held:
            self._on_event(TaskProgress(held))

    def _reconnect(self) -> None:
        """A new client once the old one gave up (the background thread's body)."""
        log.warning("dask: the client gave up on %s; connecting again every second", self.scheduler)
        while not self._closing.is_set():
            try:
                client = self._connect(RECONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                log.debug("dask: %s still unreachable: %s", self.scheduler, exc)
                self._closing.wait(1)
                continue
            old, self._client = self._client, client
            old.close(timeout=1)
            return

    # ------------------------------------------------------------- TaskRunner
    def workers(self) -> int:
        """Workers the scheduler knows, at the watching thread's last look; 0 while it is away (the client
        reconnects by itself, or a new one is made). No round trip: the supervisor asks before every chunk."""
        return self._workers_seen if self._client.status == "running" else 0

    def _watch_forever(self) -> None:
        """The watching thread: every WORKERS_CHECK_INTERVAL_S, what the scheduler says (``_look``)."""
        while not self._closing.wait(WORKERS_CHECK_INTERVAL_S):
            try:
                self._look()
            except Exception:  # Dask's surprise: said, and the next look tries again
                log.exception("dask: looking at the cluster")

    def _look(self) -> None:
        """Ask the scheduler for its workers, which of our tasks each holds, and (hourly, or when the workers
        change) the certificates' ends. Round trips, each bounded: on the watching thread only."""
        if self._client.status != "running":
            if self._connected:
                log.warning("dask: lost the scheduler %s; its tasks go out again once it is back", self.scheduler)
                self._connected, self._lost_at = False, time.monotonic()
            if self._client.status == "connecting" and time.monotonic() > self._lost_at + RECONNECT_TIMEOUT_S:
                self._client.close(timeout=1)  # it tries on its own, its waits growing: a new one tries at once
            if self._client.status == "closed" and not self._closing.is_set() and \
                    (self._reconnecting is None or not self._reconnecting.is_alive()):
                self._reconnecting = threading.Thread(target=self._reconnect, name="dask-reconnect", daemon=True)
                self._reconnecting.start()
            self._workers_seen = 0
            return
        self._workers_seen, self._workers_checked_at = self._ask_scheduler(), time.monotonic()
        self._check_processing()
        self._check_certificates()

    def _ask_scheduler(self) -> int:
        try:  # on the supervisor's thread: bounded, so a hung scheduler cannot hold its loop (and watchdog)
            info = self._client.sync(self._client.scheduler.identity, n_workers=-1,
                                     callback_timeout=SCHEDULER_CALL_TIMEOUT_S)
        except (OSError, TimeoutError):  # the connection dropped since the status check, or it hangs: away
            return self._workers_seen if self._client.status == "running" else 0
        addresses = sorted(info.get("workers", {}))
        if info.get("id") != self._scheduler_id:
            # A new scheduler (first contact, or a restart) knows no plugin: give it ours, for every worker,
            # those that join later included.
            log.warning("dask: connected to the scheduler %s%s: %d worker(s): %s", self.scheduler,
                        " again (a new one: it restarted)" if self._scheduler_id else "", len(addresses),
                        ", ".join(addresses) or "none yet")
            self._register_plugin()
            self._scheduler_id = info.get("id")
        elif not self._connected:
            log.warning("dask: connected to the scheduler %s again: %d worker(s)", self.scheduler, len(addresses))
        self._connected = True
        with self._lock:
            for address in set(self._addresses) - set(addresses):
                self._forget_worker(address)
            self._addresses = addresses
        return len(addresses)

    def _register_plugin(self) -> None:
        """Give the scheduler our plugin; a worker that cannot install it cannot run our tasks: say which."""
        try:
            # The scheduler keeps the plugin for every worker before it asks them; a stopped worker would keep
            # it waiting: bounded, like every call on the supervisor's thread.
            answers = self._client.sync(self._client.scheduler.register_worker_plugin,
                                        plugin=dask_dumps(self._plugin), name=PLUGIN_NAME, idempotent=False,
                                        callback_timeout=2 * SCHEDULER_CALL_TIMEOUT_S)
        except (OSError, TimeoutError, TypeError, ValueError) as exc:
            log.error("dask: could not give the scheduler the engine plugin: %s", exc)
            return
        for worker, answer in sorted(answers.items()):
            if isinstance(answer, dict) and answer.get("status") == "error":
                self._mark_failing(worker, f"cannot install the engine: {answer.get('exception_text', '?')}")

    def has_room(self, images: int) -> bool:
        workers = self.workers()  # the last look: no round trip
        with self._lock:
            in_flight = sum(len(task_images) for _, task_images in self._tasks.values())
            usable = len([w for w in self._addresses if w not in self._failing]) or workers
        return workers > 0 and (in_flight == 0 or in_flight + images <= usable * self.images_per_worker)

    def describe(self) -> dict:
        workers = self.workers()  # first: it may refresh the list of workers
        with self._lock:
            # What each worker held at the last look (a second ago at most). Not less what finished since: tasks
            # shorter than a look would then never show, each gone before the next heartbeat.
            tasks_by_worker = {worker: len(self._processing.get(worker, ()))
                               for worker in (self._addresses if workers else ())}
            stalled = [stall.doc() for stall in self._progress.stalled(time.monotonic())]
            failing = [{"worker": worker, "error": why} for worker, why in sorted(self._failing.items())]
            certificates = [{"role": role, "not_after": end} for role, end in sorted(self._certificates.items())]
        return {"scheduler": self.scheduler, "workers": workers, "tasks_by_worker": tasks_by_worker,
                "stalled": stalled, "failing": failing, "certificates": certificates,
                **({"workers_expected": self.min_workers} if self.min_workers else {})}

    def submit(self, task_id: int, images: TaskImages, isolated: bool = False) -> None:
        with self._lock:
            healthy = [w for w in self._addresses if w not in self._failing]
            # Not to a worker whose tasks fail while another can take them (none left: anywhere, and the
            # chunk's count of failures ends it).
            restrict = healthy if self._failing and healthy else None
        key = f"retailpulse-{task_id}-{uuid.uuid4()}"
        future = self._client.submit(measure_task, list(images), isolated, key, key=key, pure=False, retries=0,
                                     workers=restrict, allow_other_workers=False)
        with self._lock:
            self._tasks[task_id] = (future, list(images))
            self._keys[key] = task_id
            self._progress.holding(CLUSTER, len(self._tasks), time.monotonic())
        future.add_done_callback(lambda f: self._fetchers.submit(self._finished, task_id, f))

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

    def watch(self) -> None:
        """Nothing on the supervisor's thread: the watching thread looks (``_check_processing``)."""

    def _check_processing(self) -> None:
        """Every PROCESSING_CHECK_INTERVAL_S: which worker holds which of our tasks (plain data from the
        scheduler); a worker whose tasks stay put, or tasks that wait while none finishes, are stalled."""
        now = time.monotonic()
        if now < self._processing_checked_at + PROCESSING_CHECK_INTERVAL_S or self._client.status != "running":
            return
        self._processing_checked_at = now
        try:
            processing = self._client.sync(self._client.scheduler.processing, workers=None,
                                           callback_timeout=SCHEDULER_CALL_TIMEOUT_S)
        except (OSError, TimeoutError):
            return
        with self._lock:
            ours = {future.key for future, _ in self._tasks.values()}
            for worker in set(self._processing) - set(processing):
                self._progress.forget(f"Dask worker {worker}")
            for worker, keys in processing.items():
                held = {key for key in keys if key in ours}
                if self._processing.get(worker, set()) - held:  # some left it since the last look
                    self._progress.finished(f"Dask worker {worker}", now)
                self._progress.holding(f"Dask worker {worker}", len(held), now)
                self._processing[worker] = held
            self._processing = {worker: keys for worker, keys in self._processing.items() if worker in processing}
            new, recovered = self._progress.changes(now)
        for stall in new:
            log.warning("dask: %s holds %d task(s) and finished none for %.0f s: stalled", stall.worker,
                        stall.tasks, stall.seconds)
        for holder in recovered:
            log.warning("dask: %s is making progress again", holder)

    def _check_certificates(self) -> None:
        """When each certificate ends: the daemon's own files, the scheduler's (as it shows it), each worker's
        (as its own process reads it). Hourly, and when the workers change."""
        with self._lock:
            addresses = frozenset(self._addresses)
        checked_at, seen = self._certificates_checked
        if self._tls is None or (time.monotonic() < checked_at + CERTIFICATE_CHECK_INTERVAL_S and addresses == seen):
            return
        self._certificates_checked = (time.monotonic(), addresses)
        ends: dict[str, float] = {}
        for role, path in (("the CA's (dask_tls_ca_file)", self._tls.tls_ca_file),
                           ("the daemon's (dask_tls_cert_file)", self._tls.tls_client_cert)):
            try:
                ends[role] = min(file_not_after(path))
            except (OSError, ValueError) as exc:
                log.warning("dask: cannot read the end of %s certificate %s: %s", role, path, exc)
        try:
            ends[f"the scheduler's ({self.scheduler})"] = not_after(self._scheduler_certificate())
        except (OSError, ValueError) as exc:
            log.warning("dask: cannot read the end of the scheduler's certificate: %s", exc)
        try:
            answers = self._client.sync(self._client._run, certificate_ends, on_error="return",
                                        callback_timeout=SCHEDULER_CALL_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            answers = {}
            log.warning("dask: cannot ask the workers when their certificates end: %s", exc)
        for worker, answer in answers.items():
            if isinstance(answer, list) and answer and all(isinstance(end, float) for end in answer):
                ends[f"worker {worker}'s"] = min(answer)
        with self._lock:
            self._certificates = ends

    def _scheduler_certificate(self) -> bytes:
        """The certificate the scheduler shows (DER), from a handshake of our own with the daemon's context."""
        where = urlsplit(self.scheduler)
        context = self._tls.get_connection_args("client")["ssl_context"]
        with socket.create_connection((where.hostname, where.port), timeout=SCHEDULER_CALL_TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname=where.hostname) as tls:
                return tls.getpeercert(binary_form=True)

    def close(self, timeout_s: float = 10) -> None:
        self._closing.set()
        with self._lock:
            futures = [future for future, _ in self._tasks.values()]
            self._tasks.clear()
            self._keys.clear()
        self._client.cancel(futures)
        self._client.close(timeout=timeout_s)
        self._fetchers.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- outcomes
    def _finished(self, task_id: int, future) -> None:
        with self._lock:
            entry = self._tasks.pop(task_id, None)
            self._keys.pop(future.key, None)
            now = time.monotonic()
            self._progress.finished(CLUSTER, now)
            self._progress.holding(CLUSTER, len(self._tasks), now)
        if entry is None:
            return  # closed meanwhile
        try:
            event = self._outcome(task_id, future, entry[1])
        except Exception as exc:  # Dask's surprise, or ours: the task is lost all the same, and counted
            log.exception("dask: task %d: cannot read its outcome", task_id)
            event = TaskLost(task_id, f"its outcome could not be read: {type(exc).__name__}: {exc}", Loss.RAISED)
        if isinstance(event, TaskLost) and event.cause is Loss.RAISED and event.where:
            self._mark_failing(event.where, event.why)
        self._on_event(event)

    def _outcome(self, task_id: int, future, images: list) -> TaskDone | TaskLost:
        """What the finished future says, checked."""
        if future.status == "cancelled":
            return TaskLost(task_id, "the Dask scheduler went away", Loss.AWAY)
        if future.status == "finished":
            try:
                event, worker = parse_result(task_id, future.result(), images)
            except (InvalidResult, TypeError, ValueError) as exc:  # TypeError: a result not sent as msgpack
                worker = self._holder_of(future)
                return TaskLost(task_id, f"Dask worker {worker} sent a result that is not what the task makes: "
                                f"{exc}", Loss.RAISED, where=worker)
            except (OSError, TimeoutError) as exc:  # the result could not be fetched: the scheduler went away
                return TaskLost(task_id, f"the result could not be fetched: {exc}", Loss.AWAY)
            if isinstance(event, TaskDone):
                self._recovered(worker)
            return event
        error = future.exception()
        if isinstance(error, KilledWorker):
            worker = getattr(error.last_worker, "address", "an unknown worker")
            if self._removed_for_heartbeats(worker):
                return TaskLost(task_id, f"Dask worker {worker} missed its heartbeats and the scheduler removed it "
                                "(a partition, or its host gone: not its images' doing)", Loss.AWAY)
            return TaskLost(task_id, f"Dask worker {worker} died", Loss.DIED, where=worker)
        workers, text = self._erred_on(future.key)
        worker = workers[-1] if workers else None
        return TaskLost(task_id, f"the task failed on Dask worker {worker or '(unknown)'}: "
                        f"{text or f'{type(error).__name__}: {error}'}", Loss.RAISED, where=worker)

    def _removed_for_heartbeats(self, worker: str) -> bool:
        """Whether the scheduler's event log says it removed ``worker`` for missed heartbeats (and not because
        its connection closed: a process that died, as one an image kills does)."""
        try:
            events = self._client.sync(self._client.scheduler.events, topic=worker,
                                       callback_timeout=SCHEDULER_CALL_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.debug("dask: cannot ask the scheduler why it removed %s: %s", worker, exc)
            return False
        removals = [event for _, event in events if isinstance(event, dict) and event.get("action") == "remove-worker"]
        return bool(removals) and str(removals[-1].get("stimulus_id", "")).startswith(HEARTBEAT_REMOVAL)

    def _holder_of(self, future) -> str | None:
        try:
            return next(iter(self._client.who_has([future]).get(future.key, ())), None)
        except (OSError, TimeoutError):
            return None

    def _erred_on(self, key) -> tuple[list[str], str]:
        """Where a task failed, and Dask's text of its error, from the scheduler: plain data both ways."""
        def erred_on(key, dask_scheduler=None):  # defined here, so it travels by value: no code of ours needed there
            task = dask_scheduler.tasks.get(key)
            return ([], "") if task is None else (sorted(task.erred_on or ()), str(task.exception_text or ""))

        try:
            workers, text = self._client.run_on_scheduler(erred_on, key)
            return [str(worker) for worker in workers], str(text)
        except Exception as exc:  # the scheduler refuses to run functions, or is gone: the error alone
            log.debug("dask: cannot ask the scheduler where task %s failed: %s", key, exc)
            return [], ""

    def _mark_failing(self, worker: str, why: str) -> None:
        with self._lock:
            known = worker in self._failing
            self._failing[worker] = why
        if not known:
            log.error("dask: tasks fail on worker %s: %s; none goes to it while other workers can take them, "
                      "until it leaves the cluster (fix it, then restart it)", worker, why)

    def _recovered(self, worker: str) -> None:
        with self._lock:
            known = self._failing.pop(worker, None) is not None
        if known:
            log.warning("dask: worker %s runs tasks again", worker)

    def _forget_worker(self, worker: str) -> None:
        """It left the cluster (under _lock): whatever we knew of it is stale."""
        if self._failing.pop(worker, None) is not None:
            log.warning("dask: worker %s left the cluster; tasks may go to it again when it is back", worker)
        self._processing.pop(worker, None)
        self._progress.forget(f"Dask worker {worker}")
