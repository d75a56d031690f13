"""What goes into the engine and what comes out: a task's images (TaskImages), and what measuring one image
gives (ImageOutcome: a small, picklable value, never an exception).

Both cross process boundaries (pool processes, Dask workers). An outcome feeds the results files and the
metrics, so the error's kind travels beside its wording: metrics count kinds and never parse messages.
Light: no libcurl, no Pillow.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

#: One task's images: (index in the job, url) pairs.
TaskImages = Sequence[tuple[int, str]]

#: The result of an image whose job was cancelled before it was measured (the engine drops it in flight,
#: the supervisor records it for images not yet dispatched): one wording wherever it is written.
CANCELLED_BY_REQUEST = "cancelled by request"


class ErrorKind(StrEnum):
    """Why an image failed. The values are the ``reason`` label of retailpulse_images_failed_total."""

    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    HTTP_OTHER = "http_other"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    TLS = "tls"
    TOO_LARGE = "too_large"
    REDIRECTS = "redirects"
    INVALID_URL = "invalid_url"
    ADDRESS = "address"
    FORMAT = "format"
    TRUNCATED = "truncated"
    NOT_AN_IMAGE = "not_an_image"
    UNKNOWN_STORE = "unknown_store"
    WORKER_DIED = "worker_died"
    TASK_FAILED = "task_failed"  # the task could not run on the cluster, every time it was sent
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    """One image's result. Exactly one of ``perimeter`` and ``error`` is None.

    ``seconds``: download + measure + GPU wait; ``bytes``: body bytes downloaded (0 when nothing came)."""

    index: int
    width: int | None
    height: int | None
    perimeter: int | None
    error: str | None
    kind: ErrorKind | None
    seconds: float
    bytes: int

    @classmethod
    def failed(cls, index: int, error: str, kind: ErrorKind, seconds: float = 0.0, nbytes: int = 0) -> ImageOutcome:
        return cls(index, None, None, None, error, kind, seconds, nbytes)
