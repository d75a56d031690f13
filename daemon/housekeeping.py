"""The daemon's chores on a clock: tmp/ leftovers, retention of finished jobs, the heartbeat file.

None of them touches a running job, so they live apart from the supervisor's bookkeeping.
"""
from __future__ import annotations

import logging
import os
import time

from spool import Spool

log = logging.getLogger("retailpulse.daemon")

TMP_LEFTOVER_AGE_S = 3600
TMP_CLEAN_INTERVAL_S = 600
RETENTION_INTERVAL_S = 600
HEARTBEAT_INTERVAL_S = 1.0


class Housekeeping:
    def __init__(self, spool: Spool, retention_s: float):
        self.spool = spool
        self.retention_s = retention_s  # 0 keeps finished jobs forever
        self.next_tmp_clean = self.next_retention = self.next_heartbeat = 0.0  # monotonic

    def due(self, heartbeat) -> None:
        """Do whatever is due now. ``heartbeat()`` builds the heartbeat document when one is due."""
        now = time.monotonic()
        if now >= self.next_tmp_clean:
            self.clean_tmp()
        if now >= self.next_retention:
            self.apply_retention()
        if now >= self.next_heartbeat:
            self.beat(heartbeat())

    def clean_tmp(self) -> None:
        self.next_tmp_clean = time.monotonic() + TMP_CLEAN_INTERVAL_S
        removed = self.spool.clean_tmp(older_than_s=TMP_LEFTOVER_AGE_S)
        if removed:
            log.info("removed %d unfinished file(s) left in tmp/ by a crashed writer", removed)

    def apply_retention(self) -> None:
        self.next_retention = time.monotonic() + RETENTION_INTERVAL_S
        if not self.retention_s:
            return
        old = self.spool.finished_before(time.time() - self.retention_s)
        purged = sum(self.spool.purge(job_id) for job_id in old)
        if purged:
            log.info("retention: deleted %d finished job(s) older than %g days", purged, self.retention_s / 86400)

    def beat(self, doc: dict) -> None:
        """Write daemon.json: the API's health check and backpressure read it; operators can cat it."""
        self.next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
        try:
            self.spool.write_heartbeat({"pid": os.getpid(), "heartbeat_at": round(time.time(), 3), **doc})
        except OSError as exc:
            log.warning("cannot write the heartbeat: %s", exc)
