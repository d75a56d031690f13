"""``python -m daemon.runners.sandbox``: measure one isolated task in a process of its own.

A task whose images were in flight when their process died may hold an image that kills whatever measures
it (a decoder crash, the OOM killer, a hostile server's doing). Run alone here, its death costs this one
process, not a pool process and its other tasks, and says exactly which images were in it. The parent hands
the settings and the task's images over stdin and reads the outcomes from stdout (pickles between the same program).
"""
from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import threading
import time

from daemon.engine.loop import measure
from daemon.engine.outcome import ImageOutcome, TaskImages
from daemon.engine.settings import EngineSettings
from daemon.runners import Loss


def deadline_s(settings: EngineSettings) -> float:
    """Longest an isolated task can take when nothing is wrong with the process measuring it."""
    limits = settings.limits
    return limits.attempts * (limits.total_timeout_s + limits.max_backoff_s) + settings.gpu_sleep_max_s + 30


#: Why run_isolated gave up when told to stop: not the images' doing (the caller sends them again as they were).
STOPPED = "the isolated process was stopped: its worker is closing"


def loss_of(why: str) -> Loss:
    """What run_isolated's answer of a lost task means: the process died with its images (suspects), or
    it was stopped (STOPPED), through no fault of theirs."""
    return Loss.AWAY if why == STOPPED else Loss.DIED
#: How often a run that may be told to stop looks at its ``stopping`` event.
STOP_CHECK_S = 0.2


def run_isolated(images: TaskImages, settings: EngineSettings,
                 stopping: threading.Event | None = None) -> list[ImageOutcome] | str:
    """The outcomes, or why the process died (a string): the caller treats that as a death of the task, but
    for STOPPED (``loss_of`` says which): ``stopping`` set (a Dask worker closing) kills the process and
    returns that at once."""
    proc = subprocess.Popen([sys.executable, "-m", "daemon.runners.sandbox"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    data: bytes | None = pickle.dumps((settings, list(images)))
    deadline = time.monotonic() + deadline_s(settings)
    while True:
        left = deadline - time.monotonic()
        try:
            stdout, stderr = proc.communicate(data, timeout=max(0.0, min(left, STOP_CHECK_S) if stopping else left))
            break
        except subprocess.TimeoutExpired:
            data = None  # already handed over: communicate() goes on writing it
            if (stopping is None or not stopping.is_set()) and time.monotonic() < deadline:
                continue
            proc.kill()
            proc.communicate()
            return STOPPED if stopping is not None and stopping.is_set() else \
                f"the isolated process did not finish within {deadline_s(settings):g} s"
    if proc.returncode < 0:
        return f"the isolated process was killed by {signal.Signals(-proc.returncode).name}"
    if proc.returncode != 0:
        return f"the isolated process exited with {proc.returncode}: {stderr.decode(errors='replace')[-300:]}"
    return pickle.loads(stdout)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides how to stop
    settings, images = pickle.load(sys.stdin.buffer)
    outcomes = measure(images, settings)
    sys.stdout.buffer.write(pickle.dumps(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
