"""What the spool says of the daemon: is it alive, paused, stalled, and did it carry out a request. Read by
the API's /healthz and by retailpulse-ctl, from daemon.json (spool/__init__.py documents its fields) and the
file system itself; no HTTP here."""
from __future__ import annotations

import os
import time

from spool import Control, Spool, pid_exists

#: The daemon writes its heartbeat every second; this much silence means it is stuck or gone.
HEARTBEAT_STALE_S = 10.0
#: Less free space than this where the spool lives is a full disk: a chunk's results file and its status
#: need more (and the daemon cannot even write its heartbeat then, so the API looks for itself).
FULL_DISK_BYTES = 64 * 1024


def daemon_health(beat: dict | None) -> str:
    """"ok", or what is wrong with the daemon as its heartbeat file (daemon.json) tells."""
    if beat is None:
        return "no heartbeat (daemon.json missing): daemon not running"
    age = time.time() - beat.get("heartbeat_at", 0)
    if age > HEARTBEAT_STALE_S:
        return f"last heartbeat {age:.0f} s ago"
    if not pid_exists(int(beat.get("pid", 0))):
        return f"process {beat.get('pid')} is gone"
    if beat.get("paused"):
        return "paused: cannot write results (disk full?)"
    return "ok"


def full_disk_checks(spool: Spool, beat: dict | None) -> dict:
    """The checks a full disk fails. Not inferred from the heartbeat: on a full disk the daemon cannot write
    that either, and would only look silent. A daemon alive on a full disk is paused (recording.py)."""
    try:
        fs = os.statvfs(spool.root)
    except OSError:
        return {}
    free = fs.f_bavail * fs.f_frsize
    if free >= FULL_DISK_BYTES and not (fs.f_files and fs.f_favail == 0):
        return {}
    full = f"the disk holding the spool is full ({free} bytes, {fs.f_favail} inodes free)"
    checks = {"spool_writable": full}
    if beat is not None and pid_exists(int(beat.get("pid", 0))):
        checks["daemon"] = f"paused: {full}; it cannot record results (or write its heartbeat) until space is freed"
    return checks


def worker_health(beat: dict) -> dict:
    """Checks naming the workers that hold work and finish none, or on which tasks fail (daemon.json's
    "stalled" and "failing"); nothing when all is well."""
    checks = {}
    stalled = [s for s in beat.get("stalled") or () if isinstance(s, dict)]
    if stalled:
        checks["stalled"] = "; ".join(f"{s.get('worker')} holds {s.get('tasks')} task(s) and finished none for "
                                      f"{s.get('seconds')} s" for s in stalled)
    failing = [f for f in beat.get("failing") or () if isinstance(f, dict)]
    if failing:
        checks["failing"] = "; ".join(f"tasks fail on {f.get('worker')}: {f.get('error')}" for f in failing)
    return checks


def carried_out(spool: Spool, job_id: int, verb: Control, timeout_s: float,
                clock=time.monotonic, sleep=time.sleep) -> bool:
    """Whether the daemon carried out the request (its control/ file gone) within ``timeout_s``; False at
    once when no daemon runs (the request waits for one)."""
    if daemon_health(spool.read_heartbeat()) != "ok":
        return False
    deadline = clock() + timeout_s
    while spool.request_pending(job_id, verb):
        if clock() >= deadline:
            return False
        sleep(0.02)
    return True
