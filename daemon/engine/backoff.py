"""The wait before trying again, one rule for every retry in the service: a download's next attempt (the
engine), a failed task's chunk (supervisor/jobs.py), a completion webhook's next POST
(daemon/notifications/delivery.py).

    wait = base_s * 2 ** (failures - 1) * jitter, at least the server's Retry-After, at most max_s

Pure: the caller draws the jitter (``random.uniform(*JITTER)``, or 1.0 for none), so a schedule is tested
without waiting and without chance.
"""
from __future__ import annotations

#: The range jitter is drawn from: waits spread over half to one and a half times the doubling, so retries
#: that failed together do not come back together.
JITTER = (0.5, 1.5)
#: Doublings beyond this change nothing (2**62 times any base is past any cap) and would overflow a float
#: (a webhook retried for 30 days makes thousands of attempts).
_MAX_DOUBLINGS = 62


def backoff_s(failures: int, base_s: float, max_s: float, jitter: float = 1.0,
              retry_after_s: float | None = None) -> float:
    """Seconds to wait after ``failures`` failed tries (1 before the 2nd try) before the next one."""
    wait = base_s * 2 ** min(max(failures - 1, 0), _MAX_DOUBLINGS) * jitter
    return min(max(wait, retry_after_s or 0.0), max_s)
