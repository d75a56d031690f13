"""Runners: where a task runs. The seam between the supervisor and the processes (or machines) that measure.

A task is one chunk's images handed to a runner once, ``(index, url)`` pairs; it ends with a TaskDone (one
ImageOutcome per image) or a TaskLost (the process or worker holding it died, or the task could not run
there; the supervisor decides what becomes of its chunk, daemon/supervisor/jobs.py). Two runners run the
same engine (daemon/engine/): LocalPool (pool.py, a multiprocessing.Pool on this machine, the default) and
DaskRunner (dask_cluster.py, a Dask cluster). This package imports nothing of ours but the engine.

Isolated tasks: a task whose images were in flight in a process that died may hold an image that kills
whatever measures it. It runs alone in a throw-away process (sandbox.py), so a second death costs only that
process and tells exactly which images were in it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from daemon.engine import ImageOutcome, TaskImages

__all__ = ["Message", "OnEvent", "TaskDone", "TaskImages", "TaskLost", "TaskRunner"]


class Message(StrEnum):
    """What travels between the supervisor and a pool process (first item of each message tuple)."""

    HELLO = "hello"  # process -> supervisor, once: (HELLO, pid)
    TASK = "task"  # supervisor -> process: (TASK, task_id, images, isolated)
    DONE = "done"  # process -> supervisor: (DONE, task_id, outcomes)
    LOST = "lost"  # process -> supervisor: (LOST, task_id, why), an isolated task's process died
    CANCEL = "cancel"  # supervisor -> process: (CANCEL, task_ids); each answers at once with a DONE


@dataclass(frozen=True)
class TaskDone:
    task_id: int
    outcomes: list[ImageOutcome]  # one per image, in the task's order


@dataclass(frozen=True)
class TaskLost:
    task_id: int
    why: str  # e.g. "pool process 1234 died", "Dask worker tls://10.0.0.7:40001 died"
    suspect: bool = True  # False: lost through no fault of its images (the Dask scheduler went away)


#: Called from any thread of the runner, once per task; the supervisor only queues it.
OnEvent = Callable[[TaskDone | TaskLost], None]


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
        """What the heartbeat (daemon.json) and /metrics show of the runner."""

    def close(self, timeout_s: float) -> None:
        """Stop the processes; tasks still running are abandoned (the supervisor has drained first)."""
