"""The supervisor's side of completion notifications: when a job with a ``callback_url`` finishes, the
recorder calls ``Outbox.add`` before it writes the final status, so the notification is on disk (outbox/)
before anyone can see the job finished: no crash loses it; ``ready`` once the job file is in done/ or
failed/. Without webhooks (no secrets file) this is all there is: the API then takes no callback_url."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from spool import Spool
from spool.outbox import new_notification
from spool.records import JobStatus, WebhookCounts


class Outbox:
    def __init__(self, spool: Spool, clock: Callable[[], float] = time.time):
        self.spool, self.clock = spool, clock
        self.lock = threading.Lock()  # the supervisor's writes against the delivery thread's rewrites

    def add(self, job_id: int, url: str, final: JobStatus) -> None:
        """The job's final status goes into outbox/<id>.json; raises OSError when it cannot be written (the
        recorder then retries the whole publish, as for the status itself)."""
        meta = self.spool.jobs.read_meta(job_id)
        record = new_notification(url, meta.owner if meta is not None else None, final, self.clock())
        with self.lock:
            self.spool.outbox.write(record)

    def ready(self, job_id: int) -> None:
        """The job's file is in done/ or failed/ now: its notification may go."""

    def snapshot(self) -> WebhookCounts | None:
        """The delivery counters for the heartbeat; None when nothing delivers."""
        return None
