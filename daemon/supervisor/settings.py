"""The supervisor's settings. The defaults here are the settings table's defaults (config/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SupervisorSettings:
    chunk_images: int = 64  # images per chunk: the unit of fairness, of results files and of redoing
    max_active_jobs: int = 32  # jobs progressing at once; more wait in incoming/, but for small ones
    small_job_images: int = 1000  # a job this small is started at once, however many jobs run
    poll_interval_s: float = 0.1  # how often incoming/ is looked at while idle
    drain_timeout_s: float = 60.0  # on stop, how long in-flight chunks may take to finish and be recorded
    max_worker_deaths: int = 3  # an image alone in a chunk whose process died this often is failed
    disk_retry_interval_s: float = 5.0  # while writes fail (disk full), how often they are tried again
    retention_days: float = 7.0  # finished jobs older than this are deleted; 0 keeps them forever
    # A pool process or Dask worker holding tasks that finishes none for this long is stalled (reported, and
    # replaced if local). Well above the longest one image can take with the default download limits
    # (3 attempts x 30 s, 2 backoffs of at most 10 s, the GPU wait: about 111 s).
    stall_timeout_s: float = 180.0


@dataclass(frozen=True)
class WebhookSettings:
    """Completion notifications (daemon/supervisor/webhooks.py)."""

    retry_for_s: float = 86400.0  # a notification is retried for this long after its job finished, then given up
    backoff_s: float = 1.0  # wait before the 2nd attempt; doubled before each later one, with jitter
    max_backoff_s: float = 600.0  # longest wait between two attempts, whatever Retry-After or the doubling say
    deliveries_at_once: int = 32  # attempts in flight at once: receivers that hang hold only these slots
    max_answer_bytes: int = 64 * 1024  # of a receiver's answer; only its status code matters
