"""What the daemon counts for /metrics. Pure bookkeeping: the supervisor feeds it outcomes, the heartbeat
file carries ``snapshot()`` to the API, which renders it for Prometheus (webapi/metrics.py).

Counters start at zero when the daemon starts; Prometheus' rate() treats that as a counter reset.
"""
from __future__ import annotations

import bisect

from daemon.engine.outcome import ErrorKind, ImageOutcome
from spool.records import ImageCounts

#: Upper bounds (seconds) of the per-image processing time histogram: download + measure + GPU wait.
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

class Metrics:
    def __init__(self):
        self.images_ok = 0
        self.images_failed: dict[str, int] = {}
        self.download_bytes = 0
        self.seconds_buckets = [0] * (len(SECONDS_BUCKETS) + 1)  # the last one is +Inf
        self.seconds_sum = 0.0
        self.jobs_finished: dict[str, int] = {}

    def image(self, outcome: ImageOutcome) -> None:
        if outcome.error is None:
            self.images_ok += 1
        else:
            reason = str(outcome.kind or ErrorKind.OTHER)  # the kind travels with the outcome: no wording parsed
            self.images_failed[reason] = self.images_failed.get(reason, 0) + 1
        self.download_bytes += outcome.bytes
        if outcome.seconds:  # images that were never processed (unknown store, cancelled) took no time
            self.seconds_buckets[bisect.bisect_left(SECONDS_BUCKETS, outcome.seconds)] += 1
            self.seconds_sum += outcome.seconds

    def job(self, status: str) -> None:
        self.jobs_finished[status] = self.jobs_finished.get(status, 0) + 1

    def snapshot(self) -> ImageCounts:
        return ImageCounts(images_ok=self.images_ok, images_failed=dict(self.images_failed),
                           download_bytes=self.download_bytes, seconds_buckets=list(SECONDS_BUCKETS),
                           seconds_counts=list(self.seconds_buckets), seconds_sum=round(self.seconds_sum, 6),
                           jobs_finished=dict(self.jobs_finished))
