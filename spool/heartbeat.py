"""The daemon's heartbeat (daemon.json, records.py Heartbeat) and what the spool says of the daemon through it:
alive, paused, stalled, on a full disk. Read by the API's /healthz and /metrics and by retailpulse-ctl, from
the heartbeat and the file system itself; no HTTP here, so neither of them needs the other."""
from __future__ import annotations

import os
import time

from msgspec import UNSET

from spool.files import CorruptFile, SpoolFiles, pid_exists, read_checked
from spool.records import Heartbeat

#: The daemon writes its heartbeat every second; this much silence means it is stuck or gone.
HEARTBEAT_STALE_S = 10.0
#: Less free space than this where the spool lives is a full disk: a chunk's results file and its status
#: need more (and the daemon cannot even write its heartbeat then, so readers look for themselves).
FULL_DISK_BYTES = 64 * 1024


class HeartbeatFile:
    """daemon.json: written every second by the daemon, read by everyone else."""

    def __init__(self, files: SpoolFiles):
        self.files, self.path = files, files.root / "daemon.json"

    def read(self) -> Heartbeat | None:
        """The last heartbeat; None when there is none (or it is unreadable). OSError passes (permissions)."""
        try:
            return read_checked(self.path, Heartbeat)
        except (FileNotFoundError, CorruptFile):
            return None

    def write(self, beat: Heartbeat) -> None:
        """Rewritten every second; not fsynced (after a crash it is stale anyway, and says so by its age)."""
        self.files.write(self.path, beat, durable=False)

    def health(self) -> str:
        """"ok", or what is wrong with the daemon as its heartbeat tells."""
        return daemon_health(self.read())

    def full_disk_checks(self, beat: Heartbeat | None) -> dict[str, str]:
        """The checks a full disk fails. Not inferred from the heartbeat: on a full disk the daemon cannot write
        that either, and would only look silent. A daemon alive on a full disk is paused."""
        try:
            fs = os.statvfs(self.files.root)
        except OSError:
            return {}
        free = fs.f_bavail * fs.f_frsize
        if free >= FULL_DISK_BYTES and not (fs.f_files and fs.f_favail == 0):
            return {}
        full = f"the disk holding the spool is full ({free} bytes, {fs.f_favail} inodes free)"
        checks = {"spool_writable": full}
        if beat is not None and pid_exists(beat.pid):
            checks["daemon"] = f"paused: {full}; it cannot record results (or write its heartbeat) until space is freed"
        return checks


#: A certificate that ends within this is said in /healthz (503) and by retailpulse-ctl health: time to renew.
CERTIFICATE_WARNING_S = 30 * 86400


def capacity_health(beat: Heartbeat) -> dict[str, str]:
    """{"capacity": ...} when the daemon sees fewer Dask workers than the operator expects (min_workers):
    work runs, slower; nothing when all is well or no capacity was stated."""
    expected = beat.workers_expected or 0
    if beat.workers >= expected:
        return {}
    return {"capacity": f"{beat.workers} Dask worker{'s' if beat.workers != 1 else ''} of the {expected} expected "
                        f"(min_workers)"}


def certificate_health(beat: Heartbeat, now: float | None = None) -> dict[str, str]:
    """{"certificates": ...} naming each cluster certificate that ends within CERTIFICATE_WARNING_S (or has)."""
    now = time.time() if now is None else now
    ending = [f"{c.role} {'ended' if c.not_after <= now else 'ends'} "
              f"{time.strftime('%Y-%m-%d', time.gmtime(c.not_after))} (in {max(0, c.not_after - now) / 86400:.0f} days)"
              for c in beat.certificates or () if c.not_after - now < CERTIFICATE_WARNING_S]
    return {"certificates": "; ".join(ending) + ": renew (docs/scale-out.md, Rotation)"} if ending else {}
_BOOT_ID: list[str] = []


def boot_id() -> str:
    """This boot of the machine (the kernel's random boot_id): monotonic clock readings compare only within one."""
    if not _BOOT_ID:
        try:
            _BOOT_ID.append(open("/proc/sys/kernel/random/boot_id").read().strip())
        except OSError:
            _BOOT_ID.append("")
    return _BOOT_ID[0]


def heartbeat_age(beat: Heartbeat, now: float | None = None) -> float:
    """Seconds since the beat, by the machine's monotonic clock when the beat carries it, which a step of the
    wall clock cannot move; else (an older daemon, or ``now`` given: Unix seconds) by the wall clock. A beat
    from before this boot is as old as can be: its boot id is another (when this process may read its own:
    the API's unit hides /proc/sys, ProcSubset=pid), or its monotonic time is ahead of this boot's."""
    if now is None and beat.monotonic_at is not UNSET:
        monotonic, mine = time.monotonic(), boot_id()
        if (beat.boot_id and mine and beat.boot_id != mine) or beat.monotonic_at > monotonic + 1:
            return float("inf")
        return max(0.0, monotonic - beat.monotonic_at)
    return (time.time() if now is None else now) - beat.heartbeat_at


def daemon_health(beat: Heartbeat | None, now: float | None = None) -> str:
    """"ok", or what is wrong with the daemon as its heartbeat tells."""
    if beat is None:
        return "no heartbeat (daemon.json missing): daemon not running"
    age = heartbeat_age(beat, now)
    if age == float("inf"):
        return "last heartbeat from before this machine started: daemon not running"
    if age > HEARTBEAT_STALE_S:
        return f"last heartbeat {age:.0f} s ago"
    if not pid_exists(beat.pid):
        return f"process {beat.pid} is gone"
    if beat.paused:
        return "paused: cannot make results durable (disk full or failing: the daemon's log says which); retrying"
    return "ok"


def worker_health(beat: Heartbeat) -> dict[str, str]:
    """Checks naming the workers that hold work and finish none, or on which tasks fail; nothing when all is
    well."""
    checks = {}
    if beat.stalled:
        checks["stalled"] = "; ".join(f"{s.worker} holds {s.tasks} task(s) and finished none for {s.seconds:g} s"
                                      for s in beat.stalled)
    if beat.failing:
        checks["failing"] = "; ".join(f"tasks fail on {f.worker}: {f.error}" for f in beat.failing)
    return checks
