"""A claimed job's bookkeeping (its images, which chunks wait, how many are in flight and recorded, which
stores failed, and the status document that says so), and what becomes of a chunk whose task was lost.
No I/O and no clock: the supervisor reads and writes the spool, so all of this is tested in milliseconds.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from daemon.engine.backoff import backoff_s
from daemon.engine.outcome import CANCELLED_BY_REQUEST, ErrorKind, ImageOutcome
from daemon.runners import Loss
from daemon.supervisor.stores import Store
from spool import DeliveryState, Phase, Status, utc_now
from spool.records import UNSET, Callback, JobFile, JobStatus, ResultLine, StoreFailure

UNKNOWN_STORE = "store_id not in the store master"
CANCELLED = CANCELLED_BY_REQUEST


@dataclass(frozen=True)
class Chunk:
    """Images first..stop-1 of a job: the unit of fairness, of results files and of work redone after a crash.

    ``deaths``: processes that died while holding these images; ``failures``: tasks of it that could not
    run where they went (see ``after_loss``)."""

    job_id: int
    first: int
    stop: int
    deaths: int = 0
    failures: int = 0

    @property
    def images(self) -> int:
        return self.stop - self.first


def uncovered(total: int, covered: list[tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    """Split the image indices 0..total-1 not in any ``covered`` (first, stop) range into chunks."""
    position = 0
    for first, stop in sorted(covered) + [(total, total)]:
        while position < min(first, total):
            end = min(position + size, first, total)
            yield position, end
            position = end
        position = max(position, stop)


class ActiveJob:
    """Bookkeeping of one claimed job: which images are waiting, in flight, done, and which stores failed."""

    def __init__(self, job_id: int, job: JobFile):
        self.job_id = job_id
        self.submitted_at = job.submitted_at
        # One (store_id, visit_time, url) per image, in submission order; the position is the image index.
        self.images = [(visit.store_id, visit.visit_time, url) for visit in job.visits for url in visit.image_url]
        self.pending: deque[Chunk] = deque()
        self.chunks_in_flight = 0
        self.recorded = 0  # images with a result on disk ("images_done" on the wire)
        self.measuring: dict[int, int] = {}  # task id -> images of it with an outcome, not recorded yet (progress.py)
        self.processed_high = 0  # the highest "images_processed" said so far: it never goes back
        self.failed = 0
        self.cancelled = 0  # of the failed, those "cancelled by request" ("images_cancelled")
        self.failed_stores: dict[str, list] = {}  # store_id -> [first error, its image_url, images failed]
        self.callback_url: str | None = job.callback_url or None  # told when the job finishes (notifications/)

    @property
    def total(self) -> int:
        return len(self.images)

    @property
    def finished(self) -> bool:
        return self.recorded >= self.total and not self.pending and not self.chunks_in_flight

    def processed(self) -> int:
        """Images with an outcome, recorded or not yet ("images_processed"): what people watch. Held at its
        highest, so a lost task (redone) or a restart never takes it back; it waits for the redo to pass it."""
        now = min(self.total, self.recorded + sum(self.measuring.values()))
        self.processed_high = max(self.processed_high, now)
        return self.processed_high

    def count(self, store_id: str, error: str | None, url: str) -> None:
        """One more image with a recorded result."""
        self.recorded += 1
        if error is not None:
            self.failed += 1
            self.cancelled += error == CANCELLED
            entry = self.failed_stores.setdefault(store_id, [error, url, 0])
            entry[2] += 1

    def result_line(self, index: int, outcome: ImageOutcome, stores: dict[str, Store]) -> ResultLine:
        """The results file's line for image ``index``."""
        store_id, visit_time, url = self.images[index]
        store = stores.get(store_id)
        return ResultLine(index, store_id, store.name if store else None, store.area_code if store else None,
                          visit_time, url, outcome.width, outcome.height, outcome.perimeter, outcome.error)

    def status(self) -> JobStatus:
        """The job's status document, as of now."""
        if not self.finished:
            status, phase = Status.ONGOING, Phase.RUNNING
        else:
            status = Status.FAILED if self.failed_stores else Status.COMPLETED
            phase = Phase.FINISHED
        errors = UNSET
        if status is Status.FAILED:
            errors = [StoreFailure(store_id, error, url, count)
                      for store_id, (error, url, count) in self.failed_stores.items()]
        callback = UNSET
        if self.callback_url:
            callback = Callback(self.callback_url,
                                DeliveryState.PENDING if phase is Phase.FINISHED else DeliveryState.WAITING)
        return JobStatus(str(self.job_id), status, phase, images_total=self.total, images_done=self.recorded,
                         images_processed=self.processed(), images_failed=self.failed,
                         images_cancelled=self.cancelled or UNSET,
                         submitted_at=self.submitted_at, updated_at=not_before(utc_now(), self.submitted_at),
                         error=errors, callback=callback)


def not_before(now: str, earlier: str) -> str:
    """``now`` (the daemon's clock), but never before ``earlier`` (the API's): a status is updated after its job
    was submitted, whatever either machine's clock says. Both are the spool's ISO form, which sorts as text."""
    return earlier if len(earlier) == len(now) and earlier.endswith("Z") and earlier > now else now


def spans(chunks: list[Chunk], most_images: int) -> list[tuple[int, int]]:
    """The images of ``chunks`` as few (first, stop) ranges as possible, each of at most ``most_images``:
    what a cancel records, so cancelling a job of 200,000 images writes some fifty results files, not 3,000."""
    merged: list[list[int]] = []
    for chunk in sorted(chunks, key=lambda c: c.first):
        if merged and merged[-1][1] == chunk.first:
            merged[-1][1] = chunk.stop
        else:
            merged.append([chunk.first, chunk.stop])
    return [(start, min(start + most_images, stop)) for first, stop in merged
            for start in range(first, stop, most_images)]


def unknown_store(index: int) -> ImageOutcome:
    return ImageOutcome.failed(index, UNKNOWN_STORE, ErrorKind.UNKNOWN_STORE)


def cancelled(index: int) -> ImageOutcome:
    return ImageOutcome.failed(index, CANCELLED, ErrorKind.CANCELLED)


#: Wait before a chunk whose task failed goes out again: this, doubled for each failure, up to the cap.
FAILURE_BACKOFF_S = 1.0
MAX_FAILURE_BACKOFF_S = 30.0


@dataclass(frozen=True)
class AfterLoss:
    """What becomes of a chunk whose task was lost: sent out again as ``retry`` (chunks, first first), not
    before ``delay_s``; or its images failed with ``give_up`` (the reason their results say, of ``kind``):
    an image alone whose processes kept dying, or a whole chunk whose task failed every time."""

    retry: tuple[Chunk, ...] = ()
    give_up: str | None = None
    kind: ErrorKind = ErrorKind.WORKER_DIED
    delay_s: float = 0.0


def after_loss(chunk: Chunk, cause: Loss, max_deaths: int, why: str = "") -> AfterLoss:
    """The death policy. A chunk lost through no fault of its images (Loss.AWAY: the Dask scheduler went
    away) goes out again as it was, at once.

    A task that could not run where it went (Loss.RAISED: another version of the package on a worker, a
    result that was not plain data) says nothing about its images but counts against the chunk all the same:
    it goes out again whole after FAILURE_BACKOFF_S, doubled each time, and after ``max_deaths`` failures its
    images fail with the last error (``why``), instead of going round for ever.

    A death (Loss.DIED) counts against it: the first time it goes out again whole, isolated (it shared a
    process; alone, it tells whether it was the cause); an isolated chunk that dies again is halved, so an
    image that kills whatever measures it ends up alone; alone, it is failed once ``max_deaths`` processes
    have died with it. Innocent images never share a process with it again."""
    if cause is Loss.AWAY:
        return AfterLoss(retry=(chunk,))
    if cause is Loss.RAISED:
        failures = chunk.failures + 1
        if failures >= max_deaths:
            return AfterLoss(give_up=f"the task could not run on the cluster ({failures} attempts): {why}"[:1000],
                             kind=ErrorKind.TASK_FAILED)
        again = Chunk(chunk.job_id, chunk.first, chunk.stop, chunk.deaths, failures)
        return AfterLoss(retry=(again,), delay_s=backoff_s(failures, FAILURE_BACKOFF_S, MAX_FAILURE_BACKOFF_S))
    deaths = chunk.deaths + 1
    if chunk.images == 1 and chunk.deaths and deaths >= max_deaths:
        return AfterLoss(give_up=f"the process measuring this image died each time ({deaths} attempts)")
    if chunk.deaths == 0:
        return AfterLoss(retry=(Chunk(chunk.job_id, chunk.first, chunk.stop, deaths, chunk.failures),))
    middle = (chunk.first + chunk.stop) // 2
    halves = (Chunk(chunk.job_id, chunk.first, middle, deaths, chunk.failures),
              Chunk(chunk.job_id, middle, chunk.stop, deaths, chunk.failures))
    return AfterLoss(retry=tuple(half for half in halves if half.images))
