"""``python -m daemon``: run the supervisor and its process pool until SIGTERM or Ctrl-C."""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import sys
import threading

import filelock

from config import Config
from config.startup import StartupError, load_webhook_secrets, open_spool, run_main, start
from daemon.engine.netguard import AddressPolicy
from daemon.engine.settings import EngineSettings
from daemon.runners import OnEvent, TaskRunner
from daemon.runners.pool import LocalPool
from daemon.runners.sandbox import deadline_s
from daemon.runners.settings import RunnerSettings
from daemon.settings import CLASSES, SECTIONS
from daemon.supervisor.loop import WAKE, Events, Supervisor
from daemon.supervisor.notify import Notifier
from daemon.notifications.settings import WebhookSettings
from daemon.supervisor.settings import SupervisorSettings
from daemon.notifications.delivery import Deliveries
from daemon.notifications.outbox import Outbox
from daemon.supervisor.stores import StoreMasterError, load_store_master
from spool import Executor, Spool

FILES_BESIDE_SOCKETS = 64
log = logging.getLogger("retailpulse.daemon")


def load_config(argv: list[str] | None) -> Config:
    """The daemon's settings, with the checks that span two settings. Raises StartupError."""
    config = start("retailpulse-daemon", __doc__, CLASSES, SECTIONS, argv)
    if config.gpu_sleep_min_s > config.gpu_sleep_max_s:
        raise StartupError(f"gpu_sleep_min_s ({config.source('gpu_sleep_min_s')}): must not exceed "
                           f"gpu_sleep_max_s ({config.gpu_sleep_max_s})")
    if config.executor == Executor.DASK and not config.dask_scheduler:
        raise StartupError(f"dask_scheduler ({config.source('dask_scheduler')}): must be set when executor is dask")
    tls_files = [config.dask_tls_ca_file, config.dask_tls_cert_file, config.dask_tls_key_file]
    if any(tls_files) and not all(tls_files):
        raise StartupError("dask_tls_ca_file, dask_tls_cert_file, dask_tls_key_file: set all three or none")
    return config


def make_deliveries(config: Config, spool: Spool, engine: EngineSettings) -> Outbox:
    """The completion webhooks' outbox and its delivery thread (not started), or, without a secrets file, an
    outbox that only writes: the API then takes no callback_url, so there is nothing to send."""
    secrets = load_webhook_secrets(config)
    if secrets is None:
        waiting = spool.outbox.ids()
        if waiting:
            log.warning("%d webhook(s) wait in %s but webhook_secrets_file is not set: they are not sent",
                        len(waiting), spool.root / "outbox")
        return Outbox(spool)
    settings = config.build(WebhookSettings)
    policy = AddressPolicy(allow_private=engine.addresses.allow_private, allowed_networks=settings.allowed_networks)
    return Deliveries(spool, secrets, engine.limits, policy, settings)


def _stop_when_signalled(stop_read: int, stop: threading.Event, events: Events) -> None:
    """The stop thread: the first byte a stop signal's handler wrote sets ``stop`` and wakes the loop."""
    while True:
        try:
            if os.read(stop_read, 64):
                break
        except InterruptedError:
            continue
    stop.set()
    events.put(WAKE)


def raise_open_file_limit(wanted: int) -> int:
    """Raise our soft limit on open files to the hard one (children inherit it); the files we may open.

    Each download in flight holds a socket; the usual soft limit (1,024) is below what a pool process keeps
    in flight. The systemd unit raises the hard limit (LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def make_runner(config: Config, runner: RunnerSettings, executor: Executor, processes: int, engine: EngineSettings,
                on_event: OnEvent) -> TaskRunner:
    """Where tasks run: the local pool, or the Dask cluster (imported only then: an optional extra)."""
    if runner.stall_timeout_s < deadline_s(engine):
        log.warning("stall_timeout_s (%s) is %g s, less than one image may take with these download limits "
                    "(%.0f s): a healthy process may be reported stalled", config.source("stall_timeout_s"),
                    runner.stall_timeout_s, deadline_s(engine))
    if executor == Executor.LOCAL:
        return LocalPool(processes, engine, on_event, runner.images_per_process, runner.stall_timeout_s)
    try:
        from daemon.runners.dask_cluster import DaskRunner, security
    except ImportError as exc:
        raise StartupError(f"executor ({config.source('executor')}): dask needs the dask extra "
                           f"(pip install 'retail-pulse[dask]'): {exc}") from None
    tls = security(runner.dask_tls_ca_file, runner.dask_tls_cert_file, runner.dask_tls_key_file)
    try:
        return DaskRunner(runner.dask_scheduler, engine, on_event, runner.images_per_process, tls,
                          runner.stall_timeout_s, min_workers=runner.min_workers)
    except (OSError, TimeoutError) as exc:
        # Not exit 2: the scheduler may be on its way up; systemd tries again (Restart=on-failure).
        raise SystemExit(f"retailpulse-daemon: cannot reach the Dask scheduler {runner.dask_scheduler}: {exc}")


def describe_workers(executor: str, runner: dict, processes: int) -> str:
    """For the ready line: where the work runs, and on which workers. "2 pool processes" or
    "Dask scheduler tls://10.0.0.5:8786, 2 workers: tls://10.0.0.7:8790, tls://10.0.0.8:8790"."""
    if executor == Executor.LOCAL:
        return f"{processes} pool processes"
    names = sorted(runner.get("tasks_by_worker", ()))
    return f"Dask scheduler {runner.get('scheduler')}, {runner.get('workers', 0)} workers" + \
        (f": {', '.join(names)}" if names else "")


def main(argv: list[str] | None = None) -> int:
    return run_main("retailpulse-daemon", lambda: serve(argv))


def serve(argv: list[str] | None) -> int:
    config = load_config(argv)
    settings, runner_settings = config.build(SupervisorSettings), config.build(RunnerSettings)
    engine = config.build(EngineSettings)
    try:
        stores = load_store_master(settings.store_master)
    except StoreMasterError as exc:
        raise StartupError(f"store_master ({config.source('store_master')}): {exc}") from None
    spool = open_spool(config)
    lock = spool.daemon_lock()
    try:
        lock.acquire()
    except filelock.Timeout:
        raise StartupError(f"another daemon is working on {spool.root} (it holds {lock.lock_file})") from None
    processes = runner_settings.processes or os.cpu_count() or 1
    # Sockets in flight, plus room for the files and pipes a process has anyway.
    downloads = min(engine.max_transfers, runner_settings.images_per_process)
    open_files = raise_open_file_limit(downloads + FILES_BESIDE_SOCKETS)
    max_transfers = max(1, min(downloads, open_files - FILES_BESIDE_SOCKETS))
    if max_transfers < downloads:
        log.warning("open-file limit %d: at most %d downloads at once per process (downloads_per_process is %d); "
                    "raise LimitNOFILE", open_files, max_transfers, downloads)
    engine = dataclasses.replace(engine, max_transfers=max_transfers)

    stop = threading.Event()
    # A handler only writes a byte to a pipe; a thread reading it sets the flag and wakes the main loop (an
    # event on its queue), which then drains. No lock in the handler: a second stop signal can run it again
    # in the middle of the first (Ctrl-C and make run's SIGTERM come together), and Event.set() there waited
    # for ever on the lock its first call held.
    stop_read, stop_write = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(stop_write, False)  # a handler never waits

    def stop_signalled(*_) -> None:
        try:
            os.write(stop_write, b"x")
        except BlockingIOError:  # the pipe is full of earlier stop signals: one is enough
            pass

    signal.signal(signal.SIGTERM, stop_signalled)
    signal.signal(signal.SIGINT, stop_signalled)

    notifier = Notifier()
    # glibc gives each thread its own malloc arena; two are plenty for a pool process (an engine thread and
    # a reader), and fewer arenas keep its memory flat. Inherited by the pool processes, so set first.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    events: Events = Events()
    threading.Thread(target=_stop_when_signalled, args=(stop_read, stop, events), name="stop", daemon=True).start()
    outbox = make_deliveries(config, spool, engine)
    runner = make_runner(config, runner_settings, settings.executor, processes, engine, events.put)
    supervisor = Supervisor(spool, stores, settings, runner, events, settings.executor, notifier, outbox=outbox)
    try:
        def ready() -> None:  # after the recovery scan: systemd starts counting us up only now
            where = describe_workers(settings.executor, runner.describe(), processes)
            per_process = runner_settings.images_per_process
            log.info("daemon ready: spool %s, %d stores, executor %s: %s, %d images in flight each",
                     spool.root, len(stores), settings.executor, where, per_process)
            notifier.send(READY=1, STATUS=f"ready: {where}, {per_process} images each")

        def stopping() -> bool:
            if stop.is_set():
                notifier.send(STOPPING=1, STATUS="stopping: recording the images in flight")
            return stop.is_set()

        if isinstance(outbox, Deliveries):
            outbox.start()
        supervisor.run(stopping, ready)
    finally:
        if isinstance(outbox, Deliveries):
            outbox.close()
        runner.close()
        lock.release()
    log.info("daemon stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
