"""``python -m daemon``: run the supervisor and its process pool until SIGTERM or Ctrl-C."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import filelock

from config import Config
from config.startup import StartupError, open_spool, run_main, start
from daemon.download import DownloadLimits
from daemon.netguard import AddressPolicy, parse_networks
from daemon.notify import Notifier
from daemon.pool import WatchedPool
from daemon.stores import StoreMasterError, load_store_master
from daemon.supervisor import Supervisor, SupervisorSettings
from daemon.worker import WorkerSettings

SECTIONS = ("daemon", "download")
log = logging.getLogger("retailpulse.daemon")


def load_config(argv: list[str] | None) -> Config:
    """The daemon's settings, with the checks that span two settings. Raises StartupError."""
    config = start("retailpulse-daemon", __doc__, SECTIONS, argv)
    if config.gpu_sleep_min_s > config.gpu_sleep_max_s:
        raise StartupError(f"gpu_sleep_min_s ({config.source('gpu_sleep_min_s')}): must not exceed "
                           f"gpu_sleep_max_s ({config.gpu_sleep_max_s})")
    try:
        parse_networks(config.download_allowed_networks)
    except ValueError as exc:
        raise StartupError(f"download_allowed_networks ({config.source('download_allowed_networks')}): "
                           f"{exc}") from None
    return config


def worker_settings(config: Config) -> WorkerSettings:
    return WorkerSettings(
        threads_per_process=config.threads_per_process,
        gpu_sleep_min_s=config.gpu_sleep_min_s, gpu_sleep_max_s=config.gpu_sleep_max_s,
        limits=DownloadLimits(connect_timeout_s=config.download_connect_timeout_s,
                              read_timeout_s=config.download_read_timeout_s,
                              total_timeout_s=config.download_total_timeout_s,
                              max_image_bytes=config.max_image_bytes,
                              attempts=config.download_attempts, backoff_s=config.download_backoff_s,
                              max_redirects=config.max_redirects),
        addresses=AddressPolicy(allow_private=config.allow_private_addresses,
                                allowed_networks=parse_networks(config.download_allowed_networks)))


def main(argv: list[str] | None = None) -> int:
    return run_main("retailpulse-daemon", lambda: serve(argv))


def serve(argv: list[str] | None) -> int:
    config = load_config(argv)
    try:
        stores = load_store_master(config.store_master)
    except StoreMasterError as exc:
        raise StartupError(f"store_master ({config.source('store_master')}): {exc}") from None
    spool = open_spool(config)
    lock = spool.daemon_lock()
    try:
        lock.acquire()
    except filelock.Timeout:
        raise StartupError(f"another daemon is working on {spool.root} (it holds {lock.lock_file})") from None
    processes = config.processes or os.cpu_count() or 1
    settings = SupervisorSettings(
        chunk_images=config.chunk_images, task_chunks=config.task_chunks,
        max_inflight_tasks=config.max_inflight_tasks or processes,
        max_active_jobs=config.max_active_jobs, drain_timeout_s=config.drain_timeout_s,
        worker_check_interval_s=config.worker_check_interval_s, max_worker_deaths=config.max_worker_deaths,
        retention_s=config.retention_days * 86400)

    stop = threading.Event()
    # Handlers only set the flag; the main loop notices it within poll_interval_s and drains.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    notifier = Notifier()
    # glibc gives each thread its own malloc arena; with hundreds of download threads per pool process the
    # arenas, not the data, make up most of the memory. Two arenas: measured RSS per pool process drops by
    # more than half, CPU unchanged (bench/README.md). Read by the forkserver when it starts, so set first.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    pool = WatchedPool(processes, worker_settings(config))
    try:
        def ready() -> None:  # after the recovery scan: systemd starts counting us up only now
            log.info("daemon ready: spool %s, %d stores, %d processes x %d threads",
                     spool.root, len(stores), processes, config.threads_per_process)
            notifier.send(READY=1, STATUS=f"ready: {processes} processes x {config.threads_per_process} threads")

        def stopping() -> bool:
            if stop.is_set():
                notifier.send(STOPPING=1, STATUS="stopping: recording the images in flight")
            return stop.is_set()

        Supervisor(spool, stores, pool, settings, notifier).run(stopping, ready)
    finally:
        pool.terminate()
        lock.release()
    log.info("daemon stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
