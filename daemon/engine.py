"""TEMPORARY stand-in with the engine's interface (threads + requests), until the libcurl engine lands."""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from daemon.download import DownloadLimits, fetch_with_retries, make_session
from daemon.measure import ImageError, image_size, perimeter
from daemon.metrics import failure_reason
from daemon.netguard import AddressPolicy
from daemon.outcome import ErrorKind, ImageOutcome


@dataclass(frozen=True)
class EngineSettings:
    max_transfers: int = 1024
    gpu_sleep_min_s: float = 0.1
    gpu_sleep_max_s: float = 0.4
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)


class Engine:
    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.session = make_session(min(settings.max_transfers, 256), settings.addresses, settings.limits.max_redirects)
        self.executor = ThreadPoolExecutor(min(settings.max_transfers, 256))

    def start(self):
        pass

    def close(self, timeout_s: float = 5):
        self.executor.shutdown(wait=False)

    def _one(self, index, url):
        s = self.settings
        started = time.perf_counter()
        size = 0
        try:
            body = fetch_with_retries(self.session, url, s.limits)
            size = body.size
            width, height = image_size(body)
        except ImageError as exc:
            return ImageOutcome.failed(index, str(exc), ErrorKind(failure_reason(str(exc))),
                                       time.perf_counter() - started, size)
        time.sleep(random.uniform(s.gpu_sleep_min_s, s.gpu_sleep_max_s))
        return ImageOutcome(index, width, height, perimeter(width, height), None, None,
                            time.perf_counter() - started, size)

    def submit(self, items, done):
        items = list(items)
        results = [None] * len(items)
        left = [len(items)]
        lock = threading.Lock()

        def finish(position, future):
            results[position] = future.result()
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                done(results)

        for position, (index, url) in enumerate(items):
            self.executor.submit(self._one, index, url).add_done_callback(lambda f, p=position: finish(p, f))


def measure(items, settings):
    engine = Engine(settings)
    out = []
    ev = threading.Event()
    engine.submit(items, lambda r: (out.extend(r), ev.set()))
    ev.wait()
    engine.close()
    return out
