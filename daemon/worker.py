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
from daemon.metrics import failure_reason
from daemon.netguard import AddressPolicy
from daemon.outcome import ErrorKind, ImageOutcome


@dataclass(frozen=True)
class WorkerSettings:
    threads_per_process: int = 512
    gpu_sleep_min_s: float = 0.1
    gpu_sleep_max_s: float = 0.4
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)  # public addresses only, by default


def process_image(session: requests.Session, index: int, url: str, settings: WorkerSettings) -> ImageOutcome:
    """Download, measure, then the simulated GPU work."""
    started = time.perf_counter()
    size = 0
    try:
        body = fetch_with_retries(session, url, settings.limits)
        size = body.size
        width, height = image_size(body)
    except ImageError as exc:
        kind = ErrorKind(failure_reason(str(exc)))
        return ImageOutcome.failed(index, str(exc), kind, time.perf_counter() - started, size)
    time.sleep(random.uniform(settings.gpu_sleep_min_s, settings.gpu_sleep_max_s))
    return ImageOutcome(index, width, height, perimeter(width, height), None, None, time.perf_counter() - started,
                        size)


class _ProcessState:
    """The thread pool and HTTP session of one pool process, made once by the pool's initializer."""

    def __init__(self, settings: WorkerSettings, started_writer):
        self.settings = settings
        self.started_writer = started_writer
        self.session = make_session(settings.threads_per_process, settings.addresses, settings.limits.max_redirects)
        self.executor = ThreadPoolExecutor(settings.threads_per_process, thread_name_prefix="image")

    def run(self, items: list[tuple[int, str]]) -> list[ImageOutcome]:
        futures = [(index, self.executor.submit(process_image, self.session, index, url, self.settings))
                   for index, url in items]
        outcomes = []
        for index, future in futures:
            try:
                outcomes.append(future.result())
            except Exception as exc:  # a bug must fail one image with its cause, not lose the chunk
                why = f"internal error: {type(exc).__name__}: {exc}"
                outcomes.append(ImageOutcome.failed(index, why, ErrorKind.INTERNAL))
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


def run_task(task_id: int, items: list[tuple[int, str]]) -> list[ImageOutcome]:
    """Pool task: measure each (index, url). Never raises; each failure is in its image's outcome.

    It first says which process runs it (one write of a few bytes to a pipe is atomic, so the pool's
    processes share the pipe without a lock a dying process could leave held).
    """
    assert _state is not None, "init_process did not run in this process"
    _state.started_writer.send_bytes(f"{task_id} {os.getpid()}".encode())
    return _state.run(items)
