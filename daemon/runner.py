"""Where a task runs: the seam between the supervisor and the processes (or machines) that measure images.

A task is one chunk's images, ``(index, url)`` pairs; it ends with a TaskDone (one ImageOutcome per image)
or a TaskLost (the process or worker holding it died: the supervisor splits it and hands it out again).
Two implementations: LocalPool (daemon/pool.py, a multiprocessing.Pool on this machine, the default) and
DaskRunner (daemon/dask_runner.py, a Dask cluster). Both run the same engine (daemon/engine.py).

Isolated tasks: a task whose images were in flight in a process that died may hold an image that kills
whatever measures it. It runs alone in a throw-away process (daemon/sandbox.py), so a second death costs
only that process and tells exactly which images were in it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from daemon.outcome import ImageOutcome

Items = Sequence[tuple[int, str]]


@dataclass(frozen=True)
class TaskDone:
    task_id: int
    outcomes: list[ImageOutcome]  # one per item, in item order


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

    def submit(self, task_id: int, items: Items, isolated: bool = False) -> None:
        """Start a task; its TaskDone or TaskLost comes through ``on_event``."""

    def workers(self) -> int:
        """Processes (or Dask workers) that can take tasks now."""

    def describe(self) -> dict:
        """What the heartbeat (daemon.json) and /metrics show of the runner."""

    def close(self, timeout_s: float) -> None:
        """Stop the processes; tasks still running are abandoned (the supervisor has drained first)."""
