"""The daemon's chores on a clock: tmp/ leftovers, retention of finished jobs, the heartbeat file.

None of them touches a running job, so they live apart from the supervisor's bookkeeping.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable

from msgspec import UNSET

from daemon.supervisor.trouble import Trouble
from spool import FINISHED_FOLDERS, Spool, UnreadableResults
from spool.heartbeat import boot_id
from spool.records import Heartbeat

log = logging.getLogger("retailpulse.daemon")

TMP_LEFTOVER_AGE_S = 3600
ORPHAN_META_AGE_S = 60  # longer than any submit takes between its meta file and its job file
TMP_CLEAN_INTERVAL_S = 600
RETENTION_INTERVAL_S = 600
RESULTS_CHECK_INTERVAL_S = 600
RESULTS_CHECK_BUDGET_S = 0.05  # per turn of the main loop, which also beats the watchdog
HEARTBEAT_INTERVAL_S = 1.0
CLOCK_STEP_S = 60.0  # the wall clock this far from the monotonic count: a step (NTP, a hand, a VM resumed)


class Housekeeping:
    def __init__(self, spool: Spool, retention_s: float, clock: Callable[[], float] = time.monotonic,
                 trouble: Trouble | None = None):
        self.spool, self.clock = spool, clock
        self.trouble = trouble or Trouble(clock)  # a chore the spool refuses is tried at its next time
        self.retention_s = retention_s  # 0 keeps finished jobs forever
        self.next_tmp_clean = self.next_retention = self.next_heartbeat = self.next_results_check = 0.0  # clock()
        self.results_checked_at = 0.0  # Unix s: finished jobs with a status written before it are queued
        self.results_to_check: deque[int] = deque()  # finished jobs whose results files are still to check
        self.steady = SteadyClock(last_beat(spool))  # retention's clock: no step of the wall clock ages a job

    def due(self, heartbeat) -> None:
        """Do whatever is due now. ``heartbeat(pid, now)`` builds the heartbeat when one is due. A chore whose
        write fails (a full or failing disk: EIO from an fsync) is logged and tried again at its next turn,
        never taken as done and never the end of the daemon."""
        now = self.clock()
        if now >= self.next_tmp_clean:
            self.clean_tmp()
        if now >= self.next_retention:
            self.chore("retention", self.apply_retention)
        if self.results_to_check or now >= self.next_results_check:
            self.chore("checking finished jobs' results", self.check_finished_results)
        if now >= self.next_heartbeat:
            self.beat(heartbeat)

    def next_due(self) -> float:
        """clock() when the next chore is due (now, while finished jobs wait for their results check)."""
        if self.results_to_check:
            return self.clock()
        return min(self.next_tmp_clean, self.next_retention, self.next_heartbeat, self.next_results_check)

    def chore(self, what: str, do: Callable[[], None]) -> None:
        """Do a chore; an OSError (a folder it may not read) is trouble, and the chore waits for its next time."""
        try:
            do()
        except OSError as exc:
            self.trouble.failed(what, exc)
        else:
            self.trouble.ok(what)

    def clean_tmp(self) -> None:
        """Leftovers of writes that never finished: tmp/ files, and meta files without their job."""
        self.chore("cleaning tmp/", self._clean_tmp)

    def _clean_tmp(self) -> None:
        self.next_tmp_clean = self.clock() + TMP_CLEAN_INTERVAL_S
        for job_id, folder in self.spool.upkeep.remove_stale_names():
            log.warning("job %d: its file was in two folders after a power cut; removed the stale name in %s/",
                        job_id, folder)
        removed = self.spool.upkeep.clean_tmp(older_than_s=TMP_LEFTOVER_AGE_S)
        if removed:
            log.info("removed %d unfinished file(s) left in tmp/ by a crashed writer", removed)
        orphans = self.spool.upkeep.remove_orphan_metas(older_than_s=ORPHAN_META_AGE_S)
        if orphans:
            log.info("removed the meta file of %d submission(s) that never got their job file: %s",
                     len(orphans), ", ".join(map(str, orphans)))
        keys = self.spool.keys.remove_orphans(older_than_s=ORPHAN_META_AGE_S)
        if keys:
            log.info("removed %d Idempotency-Key record(s) whose job was never written or is purged", keys)

    def check_finished_results(self, budget_s: float = RESULTS_CHECK_BUDGET_S) -> None:
        """A finished job's results files must be whole: one cut short (a disk that lied, a hand) is moved to
        corrupt/ with a .why note, and the API then names the gap instead of serving fewer results as all.
        Its status stays as it was (a status never goes back); `retailpulse-ctl requeue` redoes the images.

        At start-up every finished job is queued for the check; every RESULTS_CHECK_INTERVAL_S, the jobs
        finished since. Each call checks for ``budget_s`` at most: a spool holding a week of big jobs is read
        a slice per turn of the main loop, never holding it (or the watchdog) for the whole read."""
        if self.clock() >= self.next_results_check:
            self.next_results_check = self.clock() + RESULTS_CHECK_INTERVAL_S
            since, self.results_checked_at = self.results_checked_at, time.time() - 1
            self.results_to_check.extend(self.spool.upkeep.finished_before(float("inf"), since=since))
        deadline = self.clock() + budget_s
        while self.results_to_check:  # one job at least, then as many as the budget allows
            self.check_results_of(self.results_to_check.popleft())
            if self.clock() >= deadline:
                return

    def check_results_of(self, job_id: int) -> None:
        if self.spool.jobs.folder_of(job_id) not in FINISHED_FOLDERS:
            return  # requeued or purged since it was queued
        try:
            status = self.spool.jobs.read_status(job_id)
            total = status.images_total if status is not None and status.images_total else None
            damage = self.spool.results.damage(job_id, total)
        except (OSError, UnreadableResults) as exc:  # permissions: the operator's to fix; nothing to move
            log.error("job %d: cannot check its results: %s", job_id, getattr(exc, "why", exc))
            return
        if damage is None:
            return
        path, why = damage
        log.error("job %d: %s; requeue the job to redo its images", job_id, why)
        if path is not None:
            self.spool.files.move_aside(path, f"{why}; the job's other results are intact")

    def apply_retention(self) -> None:
        self.next_retention = self.clock() + RETENTION_INTERVAL_S
        if not self.retention_s:
            return
        old = self.spool.upkeep.finished_before(self.steady.now() - self.retention_s)
        purged = len(self.spool.upkeep.purge_all(old)) if old else 0
        if purged:
            log.info("retention: deleted %d finished job(s) older than %g days", purged, self.retention_s / 86400)

    def beat(self, heartbeat: Callable[[int, float], Heartbeat]) -> None:
        """Write daemon.json: the API's health check and backpressure read it; operators can cat it."""
        self.next_heartbeat = self.clock() + HEARTBEAT_INTERVAL_S
        self.steady.look()
        try:
            self.spool.heartbeat.write(heartbeat(os.getpid(), round(time.time(), 3)))
        except OSError as exc:
            self.trouble.failed("writing the heartbeat (daemon.json)", exc)
        else:
            self.trouble.ok("writing the heartbeat (daemon.json)")


def last_beat(spool: Spool) -> Heartbeat | None:
    """The heartbeat a previous daemon left, if it can be read."""
    try:
        return spool.heartbeat.read()
    except OSError:
        return None


class SteadyClock:
    """Unix seconds for retention, which a step of the wall clock cannot move ahead: the wall clock, but never
    further on than the monotonic clock has counted since a reading taken as good, the daemon's start or, if
    earlier by that count, the last heartbeat a daemon wrote this boot (so a daemon started after a step
    forward, by NTP or by hand, inherits the time its predecessor saw). A step back is taken as it is:
    retention then waits longer, the safe side. After a step forward that was a correction, retention
    catches up at the daemon's next start."""

    def __init__(self, last: Heartbeat | None, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.wall, self.monotonic = wall, monotonic
        start_wall, start = wall(), monotonic()
        if (last is not None and last.monotonic_at is not UNSET and last.monotonic_at <= start
                and not (last.boot_id and boot_id() and last.boot_id != boot_id())):  # a beat of this boot
            start_wall = min(start_wall, last.heartbeat_at + (start - last.monotonic_at))
        self.anchor = (start_wall, start)
        self.stepped = False  # said so in the log

    def counted(self) -> float:
        """The anchor's wall time plus what the monotonic clock has counted since."""
        return self.anchor[0] + (self.monotonic() - self.anchor[1])

    def now(self) -> float:
        return min(self.wall(), self.counted())

    def look(self) -> None:
        """Say once when the wall clock and the monotonic count part by CLOCK_STEP_S or more."""
        apart = self.wall() - self.counted()
        if abs(apart) >= CLOCK_STEP_S and not self.stepped:
            log.warning("the wall clock is %+.0f s from what the monotonic clock counted since the daemon started: "
                        "retention counts %s", apart, "by the monotonic clock" if apart > 0 else "by the wall clock")
        self.stepped = abs(apart) >= CLOCK_STEP_S
