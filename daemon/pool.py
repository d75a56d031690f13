"""A ``multiprocessing.Pool`` that notices when a pool process dies in the middle of a task.

A plain Pool replaces a dead process but waits forever for the task it held (CPython gh-66587). Here every
task first tells, over a pipe, which process runs it; the supervisor asks ``lost_tasks()`` now and then,
and a task whose process no longer exists is reported lost, so the supervisor can hand its images out again.

A process could die after taking a task and before saying so. The Pool's task queue is first in, first out,
so a task that has not started while a later one has (for longer than ``STARTED_GRACE_S``) was taken by a
process that died before it could say so: it is reported lost too. A wrong guess costs a second download of
the task's images, never a second result: the supervisor records only the dispatch it is still waiting for.
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.worker import WorkerSettings, init_process, run_task
from spool import pid_exists

log = logging.getLogger("retailpulse.daemon")

STARTED_GRACE_S = 2.0
TERMINATE_TIMEOUT_S = 10.0


@dataclass
class _Task:
    dispatched_at: float
    pid: int | None = None
    started_at: float | None = None


class WatchedPool:
    def __init__(self, processes: int, settings: WorkerSettings):
        # forkserver: pool processes start from a clean interpreter, not a fork of a threaded supervisor.
        context = multiprocessing.get_context("forkserver")
        self._started, started_writer = context.Pipe(duplex=False)
        # The writer stays open here: the Pool passes it to every process it starts, replacements included.
        self._started_writer = started_writer
        self._pool = context.Pool(processes, initializer=init_process, initargs=(settings, started_writer))
        self._tasks: dict[int, _Task] = {}
        self.processes = processes

    def submit(self, task_id: int, items: list[tuple[int, str]], done: Callable[[object], None]) -> None:
        """Run run_task(task_id, items); ``done`` gets its outcome (on the pool's result thread)."""
        self._tasks[task_id] = _Task(dispatched_at=time.monotonic())
        self._pool.apply_async(run_task, (task_id, items), callback=done, error_callback=done)

    def forget(self, task_id: int) -> None:
        """The supervisor has the task's outcome (or gave up on it)."""
        self._tasks.pop(task_id, None)

    def _read_started(self) -> None:
        now = time.monotonic()
        while self._started.poll():
            task_id_text, pid_text = self._started.recv_bytes().decode().split()
            task = self._tasks.get(int(task_id_text))
            if task is not None:
                task.pid, task.started_at = int(pid_text), now

    def _unjam_task_queue(self, now: float) -> None:
        """Give back the task queue's read lock if a dead pool process took it with it.

        An idle pool process waits for a task holding that lock (multiprocessing's SimpleQueue.get); killed
        there (kill -9, the OOM killer), it never releases it and no process gets a task again. The lock is
        free whenever every process is busy, and a live holder reads the next task within microseconds; so
        tasks waiting unstarted for STARTED_GRACE_S, none started meanwhile, and the lock taken, mean its
        holder is dead. This reaches into the Pool (``_inqueue``): there is no public way to it.
        """
        waiting = [t for t in self._tasks.values() if t.pid is None and now - t.dispatched_at > STARTED_GRACE_S]
        recent = [t for t in self._tasks.values() if t.started_at and now - t.started_at < STARTED_GRACE_S]
        if not waiting or recent:
            return
        lock = self._pool._inqueue._rlock
        if lock._semlock._get_value() == 0:
            log.warning("pool: %d task(s) waiting and the task queue lock held by no live reader; releasing it",
                        len(waiting))
            try:
                lock.release()
            except ValueError:  # released meanwhile
                pass
            for task in waiting:
                task.dispatched_at = now  # give the next check a fresh grace period

    def lost_tasks(self) -> list[tuple[int, int | None]]:
        """(task_id, pid) of the tasks whose process died; they are forgotten here and will never complete."""
        self._read_started()
        now = time.monotonic()
        self._unjam_task_queue(now)
        latest_start = {}  # task_id -> started_at, for the ordering rule
        for task_id, task in self._tasks.items():
            if task.started_at is not None:
                latest_start[task_id] = task.started_at
        lost = []
        for task_id, task in self._tasks.items():
            if task.pid is not None:
                if not pid_exists(task.pid):
                    lost.append((task_id, task.pid))
            elif any(later > task_id and now - started > STARTED_GRACE_S for later, started in latest_start.items()):
                lost.append((task_id, None))
        for task_id, _pid in lost:
            del self._tasks[task_id]
        return lost

    def terminate(self, timeout_s: float = TERMINATE_TIMEOUT_S) -> None:
        """Stop the pool processes, waiting timeout_s at most.

        Pool.terminate() first takes the task queue's read lock, which an idle pool process holds while it
        waits for a task; if that process was killed (a SIGTERM to the whole process group, the OOM killer),
        the lock is never released and terminate() waits forever. So it runs on a thread we stop waiting
        for; the processes left behind see their forkserver go with us and exit on their own.
        """
        stopper = threading.Thread(target=self._pool.terminate, name="pool-terminate", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            log.warning("pool did not stop within %g s (a pool process died holding the task queue lock); "
                        "exiting without it", timeout_s)
            return
        self._pool.join()
        self._started.close()
        self._started_writer.close()
