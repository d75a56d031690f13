"""``python -m daemon``: run the supervisor and its process pool until SIGTERM or Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import filelock

from daemon.download import DownloadLimits
from daemon.stores import StoreMasterError, load_store_master
from daemon.supervisor import Supervisor, SupervisorSettings
from daemon.worker import WorkerSettings, init_process
from spool import Spool
from spool.settings import DEFAULT_SPOOL_DIR, env_default

DEFAULT_STORE_MASTER = Path(__file__).resolve().parent.parent / "data" / "stores.csv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m daemon", description=__doc__)
    add = p.add_argument
    add("--spool-dir", default=env_default("SPOOL_DIR", DEFAULT_SPOOL_DIR), help="spool folder [%(default)s]")
    add("--store-master", default=env_default("STORE_MASTER", DEFAULT_STORE_MASTER),
        help="CSV with AreaCode,StoreName,StoreID [%(default)s]")
    add("--processes", type=int, default=env_default("PROCESSES", os.cpu_count() or 1),
        help="pool processes [cores: %(default)s]")
    add("--threads-per-process", type=int, default=env_default("THREADS_PER_PROCESS", 64),
        help="images in flight per pool process [%(default)s]")
    add("--chunk-images", type=int, default=env_default("CHUNK_IMAGES", 128),
        help="images per pool task [%(default)s]")
    add("--max-inflight-chunks", type=int, default=env_default("MAX_INFLIGHT_CHUNKS", 0),
        help="pool tasks queued or running at once [0: 2 per process]")
    add("--max-active-jobs", type=int, default=env_default("MAX_ACTIVE_JOBS", 32),
        help="jobs progressing at once [%(default)s]")
    add("--gpu-sleep-min-s", type=float, default=env_default("GPU_SLEEP_MIN_S", 0.1),
        help="simulated GPU work per image, lower bound [%(default)s]")
    add("--gpu-sleep-max-s", type=float, default=env_default("GPU_SLEEP_MAX_S", 0.4),
        help="simulated GPU work per image, upper bound [%(default)s]")
    add("--download-connect-timeout-s", type=float, default=env_default("DOWNLOAD_CONNECT_TIMEOUT_S", 5.0))
    add("--download-read-timeout-s", type=float, default=env_default("DOWNLOAD_READ_TIMEOUT_S", 10.0))
    add("--download-total-timeout-s", type=float, default=env_default("DOWNLOAD_TOTAL_TIMEOUT_S", 30.0))
    add("--max-image-bytes", type=int, default=env_default("MAX_IMAGE_BYTES", 50 * 1024 * 1024))
    add("--log-level", default=env_default("LOG_LEVEL", "INFO"))
    return p


def check(args: argparse.Namespace) -> str | None:
    """The first unusable setting, named, or None."""
    for name in ("processes", "threads_per_process", "chunk_images", "max_active_jobs", "max_image_bytes"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if not 0 <= args.gpu_sleep_min_s <= args.gpu_sleep_max_s:
        return "--gpu-sleep-min-s must be >= 0 and <= --gpu-sleep-max-s"
    for name in ("download_connect_timeout_s", "download_read_timeout_s", "download_total_timeout_s"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = check(args)
    if problem:
        print(f"daemon: {problem}", file=sys.stderr)
        return 2
    try:
        stores = load_store_master(args.store_master)
    except StoreMasterError as exc:
        print(f"daemon: store master: {exc}", file=sys.stderr)
        return 2
    spool = Spool(args.spool_dir).create()
    lock = spool.daemon_lock()
    try:
        lock.acquire()
    except filelock.Timeout:
        print(f"daemon: another daemon is working on {spool.root} (it holds {lock.lock_file})", file=sys.stderr)
        return 2
    worker_settings = WorkerSettings(
        threads_per_process=args.threads_per_process,
        gpu_sleep_min_s=args.gpu_sleep_min_s, gpu_sleep_max_s=args.gpu_sleep_max_s,
        limits=DownloadLimits(connect_timeout_s=args.download_connect_timeout_s,
                              read_timeout_s=args.download_read_timeout_s,
                              total_timeout_s=args.download_total_timeout_s,
                              max_image_bytes=args.max_image_bytes))
    settings = SupervisorSettings(chunk_images=args.chunk_images,
                                  max_inflight_chunks=args.max_inflight_chunks or 2 * args.processes,
                                  max_active_jobs=args.max_active_jobs)

    stop = threading.Event()
    # Handlers only set the flag; the main loop notices it within poll_interval_s and drains.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    # forkserver: pool processes start from a clean interpreter, not a fork of a threaded supervisor.
    context = multiprocessing.get_context("forkserver")
    with context.Pool(args.processes, initializer=init_process, initargs=(worker_settings,)) as pool:
        logging.getLogger("retailpulse.daemon").info(
            "daemon ready: spool %s, %d stores, %d processes x %d threads",
            spool.root, len(stores), args.processes, args.threads_per_process)
        Supervisor(spool, stores, pool, settings).run(stop.is_set)
        pool.terminate()
    lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
