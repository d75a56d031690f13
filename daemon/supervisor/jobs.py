"""A claimed job's bookkeeping (its images, which chunks wait, how many are in flight and recorded, which
stores failed, and the status document that says so), and what becomes of a chunk whose task was lost.
No I/O and no clock: the supervisor reads and writes the spool, so all of this is tested in milliseconds.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from daemon.engine import ErrorKind, ImageOutcome
from daemon.supervisor.stores import Store
from spool import DeliveryState, Phase, Status, status_document, utc_now

UNKNOWN_STORE = "store_id not in the store master"
CANCELLED = "cancelled by request"


@dataclass(frozen=True)
class Chunk:
    """Images first..stop-1 of a job: the unit of fairness, of results files and of work redone after a crash.

    ``deaths``: processes that died while holding these images (see ``after_loss``)."""

    job_id: int
    first: int
    stop: int
    deaths: int = 0

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

    def __init__(self, job_id: int, doc: dict):
        self.job_id = job_id
        self.submitted_at = doc.get("submitted_at")
        # One (store_id, visit_time, url) per image, in submission order; the position is the image index.
        self.images = [(visit["store_id"], visit["visit_time"], url)
                       for visit in doc["visits"] for url in visit["image_url"]]
        self.pending: deque[Chunk] = deque()
        self.chunks_in_flight = 0
        self.recorded = 0  # images with a result on disk ("images_done" on the wire)
        self.failed = 0
        self.failed_stores: dict[str, list] = {}  # store_id -> [first error, its image_url, images failed]
        self.callback_url: str | None = doc.get("callback_url")  # told when the job finishes (webhooks.py)

    @property
    def total(self) -> int:
        return len(self.images)

    @property
    def finished(self) -> bool:
        return self.recorded >= self.total and not self.pending and not self.chunks_in_flight

    def count(self, store_id: str, error: str | None, url: str) -> None:
        """One more image with a recorded result."""
        self.recorded += 1
        if error is not None:
            self.failed += 1
            entry = self.failed_stores.setdefault(store_id, [error, url, 0])
            entry[2] += 1

    def result_line(self, index: int, outcome: ImageOutcome, stores: dict[str, Store]) -> dict:
        """The results file's line for image ``index`` (format: spool/__init__.py)."""
        store_id, visit_time, url = self.images[index]
        store = stores.get(store_id)
        return {"index": index, "store_id": store_id, "store_name": store.name if store else None,
                "area_code": store.area_code if store else None, "visit_time": visit_time, "image_url": url,
                "width": outcome.width, "height": outcome.height, "perimeter": outcome.perimeter,
                "error": outcome.error}

    def status_doc(self) -> dict:
        if not self.finished:
            status, phase = Status.ONGOING, Phase.RUNNING
        else:
            status = Status.FAILED if self.failed_stores else Status.COMPLETED
            phase = Phase.FINISHED
        doc = status_document(self.job_id, status, phase, images_total=self.total, images_done=self.recorded,
                              images_failed=self.failed, submitted_at=self.submitted_at, updated_at=utc_now())
        if status is Status.FAILED:
            doc["error"] = [{"store_id": store_id, "error": error, "image_url": url, "images_failed": count}
                            for store_id, (error, url, count) in self.failed_stores.items()]
        if self.callback_url:
            state = DeliveryState.PENDING if phase is Phase.FINISHED else DeliveryState.WAITING
            doc["callback"] = {"url": self.callback_url, "state": state.value}
        return doc


def unknown_store(index: int) -> ImageOutcome:
    return ImageOutcome.failed(index, UNKNOWN_STORE, ErrorKind.UNKNOWN_STORE)


def cancelled(index: int) -> ImageOutcome:
    return ImageOutcome.failed(index, CANCELLED, ErrorKind.CANCELLED)


@dataclass(frozen=True)
class AfterLoss:
    """What becomes of a chunk whose task was lost: sent out again as ``retry`` (chunks, first first), or, for
    an image alone whose processes kept dying, failed with ``give_up`` (the reason its result says)."""

    retry: tuple[Chunk, ...] = ()
    give_up: str | None = None


def after_loss(chunk: Chunk, suspect: bool, max_deaths: int) -> AfterLoss:
    """The death policy. A chunk lost through no fault of its images (``suspect`` false: the Dask scheduler
    went away) goes out again as it was. Otherwise the death counts against it: the first time it goes out
    again whole, isolated (it shared a process; alone, it tells whether it was the cause); an isolated chunk
    that dies again is halved, so an image that kills whatever measures it ends up alone; alone, it is failed
    once ``max_deaths`` processes have died with it. Innocent images never share a process with it again."""
    if not suspect:
        return AfterLoss(retry=(chunk,))
    deaths = chunk.deaths + 1
    if chunk.images == 1 and chunk.deaths and deaths >= max_deaths:
        return AfterLoss(give_up=f"the process measuring this image died each time ({deaths} attempts)")
    if chunk.deaths == 0:
        return AfterLoss(retry=(Chunk(chunk.job_id, chunk.first, chunk.stop, deaths),))
    middle = (chunk.first + chunk.stop) // 2
    halves = (Chunk(chunk.job_id, chunk.first, middle, deaths), Chunk(chunk.job_id, middle, chunk.stop, deaths))
    return AfterLoss(retry=tuple(half for half in halves if half.images))
