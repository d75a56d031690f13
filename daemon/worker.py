"""What runs inside a pool process: one chunk of images at a time, many images of it at once on threads.

A pool task that waited through each image's download and 0.1-0.4 s sleep in turn would keep a core idle;
threads overlap the waits, and the process pool spreads the CPU part (HTTP, header parsing) over the cores.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from daemon.download import DownloadLimits, fetch_with_retries, make_session
from daemon.measure import ImageError, image_size, perimeter
from daemon.netguard import AddressPolicy

#: (index, width, height, perimeter, error, seconds, bytes): small and picklable; exactly one of perimeter
#: and error is None. seconds: download + measure + GPU wait; bytes: downloaded (0 if the download failed).
Outcome = tuple[int, "int | None", "int | None", "int | None", "str | None", float, int]


@dataclass(frozen=True)
class WorkerSettings:
    threads_per_process: int = 512
    gpu_sleep_min_s: float = 0.1
    gpu_sleep_max_s: float = 0.4
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)  # public addresses only, by default


def process_image(session: requests.Session, url: str, settings: WorkerSettings) -> tuple:
    """Download, measure, then the simulated GPU work. (width, height, perimeter, error, seconds, bytes)."""
    started = time.perf_counter()
    size = 0
    try:
        body = fetch_with_retries(session, url, settings.limits)
        size = body.size
        width, height = image_size(body)
    except ImageError as exc:
        return None, None, None, str(exc), time.perf_counter() - started, size
    time.sleep(random.uniform(settings.gpu_sleep_min_s, settings.gpu_sleep_max_s))
    return width, height, perimeter(width, height), None, time.perf_counter() - started, size


class _ProcessState:
    """The thread pool and HTTP session of one pool process, made once by the pool's initializer."""

    def __init__(self, settings: WorkerSettings, started_writer):
        self.settings = settings
        self.started_writer = started_writer
        self.session = make_session(settings.threads_per_process, settings.addresses, settings.limits.max_redirects)
        self.executor = ThreadPoolExecutor(settings.threads_per_process, thread_name_prefix="image")

    def run(self, items: list[tuple[int, str]]) -> list[Outcome]:
        futures = [(index, self.executor.submit(process_image, self.session, url, self.settings))
                   for index, url in items]
        outcomes = []
        for index, future in futures:
            try:
                outcomes.append((index, *future.result()))
            except Exception as exc:  # a bug must fail one image with its cause, not lose the chunk
                outcomes.append((index, None, None, None, f"internal error: {type(exc).__name__}: {exc}", 0.0, 0))
        return outcomes


# Pool tasks receive nothing but their arguments, so each pool process keeps its one _ProcessState here.
_state: _ProcessState | None = None

ORPHAN_CHECK_INTERVAL_S = 0.5


def _exit_when_orphaned(parent: int) -> None:
    """If the supervisor is killed (-9, OOM), its forkserver exits and we are re-parented: stop downloading."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_INTERVAL_S)
    os._exit(1)


def init_process(settings: WorkerSettings, started_writer) -> None:
    """Pool initializer. Ctrl-C goes to the supervisor, which decides how to stop; children ignore it."""
    global _state
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _state = _ProcessState(settings, started_writer)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), name="orphan-check", daemon=True).start()


def process_chunk(token: int, items: list[tuple[int, str]]) -> list[Outcome]:
    """Pool task: measure each (index, url). Never raises; each failure is in its image's outcome.

    It first says which process runs it (one write of a few bytes to a pipe is atomic, so the pool's
    processes share the pipe without a lock a dying process could leave held).
    """
    assert _state is not None, "init_process did not run in this process"
    _state.started_writer.send_bytes(f"{token} {os.getpid()}".encode())
    return _state.run(items)
