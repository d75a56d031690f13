"""Runners: where a task runs. The seam between the supervisor and the processes (or machines) that measure.

A task is one chunk's images handed to a runner once, ``(index, url)`` pairs; it ends with a TaskDone (one
ImageOutcome per image) or a TaskLost (the process or worker holding it died, or the task could not run
there: its Loss says which, and the supervisor decides what becomes of its chunk, daemon/supervisor/jobs.py).
While it runs, TaskProgress says how many of its images have an outcome (the engine's per-image
completions, at most four times a second per process or worker): what people watch, never what is recorded.
Two runners run the same engine (daemon/engine/): LocalPool (pool.py, a multiprocessing.Pool on this
machine, the default; what each process runs: pool_process.py) and DaskRunner (dask_cluster.py, a Dask
cluster; what each worker runs: dask_worker.py). Their settings: settings.py. This package imports nothing
of ours but the engine.

Stalls: a pool process or worker that holds tasks and finishes none for ``stall_timeout_s`` is stalled
(Progress, below, the same rule for both runners). The runner logs it by name, ``describe()`` lists it, so
the heartbeat (daemon.json) and then /healthz (503) and /metrics show it, and the local pool replaces
(kills) such a process, so its tasks come back lost and are redone.

Isolated tasks: a task whose images were in flight in a process that died may hold an image that kills
whatever measures it. It runs alone in a throw-away process (sandbox.py), so a second death costs only that
process and tells exactly which images were in it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from daemon.engine.outcome import ImageOutcome, TaskImages

__all__ = ["Loss", "Message", "OnEvent", "Progress", "Stall", "TaskDone", "TaskImages", "TaskLost", "TaskProgress",
           "TaskRunner"]


class Message(StrEnum):
    """What travels between the supervisor and a pool process (first item of each message tuple)."""

    HELLO = "hello"  # process -> supervisor, once: (HELLO, pid)
    TASK = "task"  # supervisor -> process: (TASK, task_id, images, isolated)
    DONE = "done"  # process -> supervisor: (DONE, task_id, outcomes)
    LOST = "lost"  # process -> supervisor: (LOST, task_id, why, cause: a Loss value), as a Dask worker says it
    CANCEL = "cancel"  # supervisor -> process: (CANCEL, task_ids); each answers at once with a DONE
    PROGRESS = "progress"  # process -> supervisor: (PROGRESS, {task_id: images with an outcome}), while they finish


@dataclass(frozen=True)
class TaskProgress:
    """Of tasks still running, how many images each has measured (or failed) so far; only those that moved.
    Not recorded: the task may still be lost, and its chunk redone."""

    measured: dict[int, int]  # task id -> images with an outcome


@dataclass(frozen=True)
class TaskDone:
    task_id: int
    outcomes: list[ImageOutcome]  # one per image, in the task's order


class Loss(StrEnum):
    """Why a task was lost; the death policy (daemon/supervisor/jobs.py, after_loss) acts on it."""

    DIED = "died"  # the process or worker holding it died (or was replaced, stalled): its images are suspects
    RAISED = "raised"  # it could not run where it went (another version of the package on a worker, a
    #                    result that is not plain data): counted against the chunk, sent again after a backoff
    AWAY = "away"  # through no fault of its images nor of where it ran (the Dask scheduler went away, the
    #                worker's engine closed): sent again as it was


@dataclass(frozen=True)
class TaskLost:
    task_id: int
    why: str  # e.g. "pool process 1234 died", "Dask worker tls://10.0.0.7:40001 died"
    cause: Loss = Loss.DIED
    where: str | None = None  # the pool process or worker it was lost on, when known: the log names it

    @property
    def suspect(self) -> bool:
        """Whether its images may be the cause (a death), as opposed to where it ran or nothing at all."""
        return self.cause is Loss.DIED


#: Called from any thread of the runner: once per task with its end, and with progress while it runs; the
#: supervisor only queues it.
OnEvent = Callable[[TaskDone | TaskLost | TaskProgress], None]


class TaskRunner(Protocol):
    def has_room(self, images: int) -> bool:
        """Whether a task of this many images can start now without going over the bound of images in
        flight per process (a process with nothing in flight always has room)."""

    def submit(self, task_id: int, images: TaskImages, isolated: bool = False) -> None:
        """Start a task; its TaskDone or TaskLost comes through ``on_event``."""

    def cancel(self, task_ids: list[int]) -> None:
        """Stop these tasks where they are (their job was cancelled): downloads and GPU waits are dropped and
        the processes' room freed. Best effort, never blocking: the supervisor has already recorded their
        images as cancelled and ignores whatever the tasks still answer."""

    def workers(self) -> int:
        """Processes (or Dask workers) that can take tasks now."""

    def describe(self) -> dict:
        """What the heartbeat (daemon.json) and /metrics show of the runner: its workers by name with the
        tasks each holds, and the stalled ones (spool/__init__.py documents the fields)."""

    def watch(self) -> None:
        """Called by the supervisor on every turn of its loop: look for stalled workers (Progress); log
        them, and replace those that can be (a local pool process). Cheap when there is nothing to do."""

    def close(self, timeout_s: float) -> None:
        """Stop the processes; tasks still running are abandoned (the supervisor has drained first)."""


@dataclass(frozen=True)
class Stall:
    worker: str  # "pool process 1234", "Dask worker tls://10.0.0.7:8790", "the Dask scheduler's queue"
    tasks: int  # tasks it holds
    seconds: float  # since it last finished one (or took its first)

    def doc(self) -> dict:
        """As daemon.json carries it."""
        return {"worker": self.worker, "tasks": self.tasks, "seconds": round(self.seconds)}


class Progress:
    """The stall rule, for both runners: a holder (a pool process, a Dask worker) that holds tasks and has
    finished none for ``timeout_s`` is stalled. The clock starts when it takes work while holding none, and
    again each time it finishes a task. No clock of its own and no I/O: the runner passes ``now``."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._since: dict[str, float] = {}  # holder -> when it last finished a task, or took work when idle
        self._held: dict[str, int] = {}
        self._reported: set[str] = set()

    def holding(self, holder: str, tasks: int, now: float) -> None:
        """How many tasks ``holder`` holds now (0 forgets it)."""
        if tasks <= 0:
            self._since.pop(holder, None)
            self._held.pop(holder, None)
            return
        self._since.setdefault(holder, now)
        self._held[holder] = tasks

    def finished(self, holder: str, now: float) -> None:
        """``holder`` finished a task: it is making progress."""
        if holder in self._since:
            self._since[holder] = now

    def forget(self, holder: str) -> None:
        self.holding(holder, 0, 0.0)

    def stalled(self, now: float) -> list[Stall]:
        return [Stall(holder, self._held[holder], now - since) for holder, since in sorted(self._since.items())
                if now - since >= self.timeout_s]

    def changes(self, now: float) -> tuple[list[Stall], list[str]]:
        """(holders stalled since the last call, holders no longer stalled): what to log, once each."""
        stalled = {stall.worker: stall for stall in self.stalled(now)}
        new = [stall for holder, stall in stalled.items() if holder not in self._reported]
        recovered = sorted(self._reported - set(stalled))
        self._reported = set(stalled)
        return new, recovered
