"""Every record the spool keeps, as a type (msgspec Structs), defined once: writers build them, readers get
them back checked. Where each lives and who writes it: spool/__init__.py.

- A file that does not decode into its type is corrupt (files.py, CorruptFile), never half-trusted.
- Optional fields are UNSET unless given, and UNSET fields are left out of the file: the bytes stay those
  earlier versions wrote and read (tests/golden/ holds a spool written by 9ce1eab; tests/test_records.py
  decodes every file of it). Fields a record does not know are ignored, so a file written by a newer
  version still reads.
- The API's OpenAPI document takes its schemas of a status, a failure, a callback and a result line from
  these types (webapi/openapi.py), and the CSV download its columns (RESULT_COLUMNS).
"""
from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, Struct, UnsetType

from spool.vocabulary import JOB_ID_PATTERN, Control, DeliveryState, Executor, Phase, Status

Count = Annotated[int, msgspec.Meta(ge=0)]
JobId = Annotated[int, msgspec.Meta(ge=1)]
#: A job id as the status document carries it: a string, as clients have always read it.
WireJobId = Annotated[str, msgspec.Meta(pattern=f"^{JOB_ID_PATTERN.pattern}$")]
UnixSeconds = float
WebhookId = Annotated[str, msgspec.Meta(description="the webhook-id header: the same on every attempt")]


# ------------------------------------------------------------------ job file and meta file
class Visit(Struct, frozen=True):
    """One store visit, as the client sent it (only the fields the service uses)."""

    store_id: str
    visit_time: str
    image_url: list[str]


class JobFile(Struct, frozen=True):
    """incoming/, active/, done/, failed/ <id>.json: a submitted job. Written once by the API, then only
    renamed. Its images are numbered 0..N-1 visit by visit, URL by URL (an image's "index")."""

    job_id: JobId
    submitted_at: str
    count: int
    visits: list[Visit]
    callback_url: str | UnsetType = UNSET

    @property
    def images(self) -> int:
        return sum(len(visit.image_url) for visit in self.visits)


class JobMeta(Struct, frozen=True):
    """meta/<id>.json: a few facts about a job, written by the API just before its job file, never changed.
    Small, so the API counts queued images and checks owners without reading job files."""

    job_id: JobId
    images: Count
    owner: str | None = None  # the API token's name that submitted it; None with tokens off
    idempotency_key: str | UnsetType = UNSET  # the key's digest (keys.py), when submitted with one
    callback_url: str | UnsetType = UNSET



# ------------------------------------------------------------------ status file (and the API's answer)
class StoreFailure(Struct, frozen=True):
    """A store whose images failed: the first failure, its URL, how many failed."""

    store_id: str
    error: str
    image_url: str | UnsetType = UNSET
    images_failed: Count | UnsetType = UNSET


class Callback(Struct, frozen=True):
    """The job's completion webhook, as its status tells it. The status file holds url and state; readers
    fill in the rest from the outbox/ or sent/ record (outbox.py)."""

    url: str
    state: DeliveryState
    webhook_id: WebhookId | UnsetType = UNSET
    attempts: Count | UnsetType = UNSET
    last_error: str | None | UnsetType = UNSET
    next_attempt_at: str | None | UnsetType = UNSET
    delivered_at: str | UnsetType = UNSET


class JobStatus(Struct, frozen=True):
    """status/<id>.json, written by the daemon only, and what GET /api/status answers. A job with no status
    file yet is ongoing with phase "queued" and no counts (jobs.py, Jobs.read_status)."""

    job_id: WireJobId
    status: Status
    phase: Phase
    images_total: Count | UnsetType = UNSET
    images_done: Annotated[int, msgspec.Meta(ge=0, description="images with a recorded result")] | UnsetType = UNSET
    images_processed: Annotated[int, msgspec.Meta(ge=0, description=(
        "images with an outcome, recorded or not yet (at least images_done): moves about once a second while "
        "images finish, where images_done moves a chunk at a time. Not durable: after a daemon restart it holds "
        "still until the redone images pass it; it never goes back"))] | UnsetType = UNSET
    images_failed: Count | UnsetType = UNSET
    images_cancelled: Annotated[int, msgspec.Meta(
        ge=1, description="of the failed, those cancelled by request; only when there are any")] | UnsetType = UNSET
    submitted_at: str | UnsetType = UNSET
    updated_at: str | UnsetType = UNSET
    note: str | UnsetType = UNSET  # why a reader answered from the job's folder instead of its status file
    error: list[StoreFailure] | UnsetType = UNSET  # only when failed
    callback: Callback | UnsetType = UNSET  # only with a callback_url

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def done(self) -> int:
        return self.images_done or 0

    @property
    def processed(self) -> int:
        """Images with an outcome, recorded or not yet; a status written before images_processed: those recorded."""
        return self.images_processed or self.done

    @property
    def failed(self) -> int:
        return self.images_failed or 0


# ------------------------------------------------------------------ results
class ResultLine(Struct, frozen=True):
    """One line of results/<id>/<first>-<stop>.<crc32>.jsonl: one image's result. A failed image has width,
    height and perimeter null and "error" saying why."""

    index: Count
    store_id: str
    store_name: str | None
    area_code: str | None
    visit_time: str
    image_url: str
    width: int | None
    height: int | None
    perimeter: int | None
    error: str | None


#: The CSV download's columns: a result line's fields, in order.
RESULT_COLUMNS: tuple[str, ...] = ResultLine.__struct_fields__


# ------------------------------------------------------------------ Idempotency-Key, notification
class KeyRecord(Struct, frozen=True):
    """idempotency/<digest>.json: an Idempotency-Key and the job it made (keys.py)."""

    key: str
    owner: str | None
    job_id: JobId
    request_sha256: str  # fingerprint of the request: the same key with another one is refused
    created_at: UnixSeconds


class Notification(Struct, frozen=True):
    """outbox/<id>.json, then sent/<id>.json: a finished job's completion webhook (outbox.py). ``body`` is the
    final status document (without its "callback"), POSTed as it is."""

    webhook_id: str
    job_id: JobId
    url: str
    owner: str | None
    body: JobStatus
    created_at: UnixSeconds
    state: DeliveryState
    attempts: Count
    next_attempt_at: UnixSeconds
    last_error: str | None
    delivered_at: UnixSeconds | None


# ------------------------------------------------------------------ heartbeat
class Stall(Struct, frozen=True):
    """A pool process or Dask worker that holds tasks and finished none for stall_timeout_s."""

    worker: str
    tasks: int
    seconds: float


class Failing(Struct, frozen=True):
    """A Dask worker on which tasks fail, with the last error."""

    worker: str
    error: str


class Certificate(Struct, frozen=True, kw_only=True):
    """A TLS certificate of the cluster and when it ends (heartbeat.certificate_health warns before)."""

    role: str  # "the daemon's (client.pem)", "the CA's (ca.pem)", "the scheduler's", "worker tls://..."
    not_after: UnixSeconds


class RunnerView(Struct, frozen=True, kw_only=True):
    """What the heartbeat says of where the work runs (the runner's describe(), daemon/runners/)."""

    workers: int = 0  # pool processes connected, or Dask workers seen
    processes: int | UnsetType = UNSET  # local: pool processes configured
    scheduler: str | UnsetType = UNSET  # dask: the scheduler's address
    tasks_by_worker: dict[str, int] = {}  # "pool process 1234" | "tls://10.0.0.7:8790" -> tasks it holds
    stalled: list[Stall] = []
    failing: list[Failing] | UnsetType = UNSET  # dask
    stalled_replaced: int | UnsetType = UNSET  # local: stalled pool processes killed and replaced
    workers_expected: int | UnsetType = UNSET  # dask: min_workers, when the operator set it
    certificates: list[Certificate] | UnsetType = UNSET  # dask over TLS: each certificate of the cluster, its end


class ImageCounts(Struct, frozen=True, kw_only=True):
    """Counters since the daemon started (daemon/supervisor/metrics.py); /metrics renders them."""

    images_ok: int = 0
    images_failed: dict[str, int] = {}  # ErrorKind -> images
    download_bytes: int = 0
    seconds_buckets: list[float] = []  # upper bounds of the per-image seconds histogram
    seconds_counts: list[int] = []  # per bucket, +Inf last
    seconds_sum: float = 0.0
    jobs_finished: dict[str, int] = {}  # Status -> jobs


class WebhookCounts(Struct, frozen=True, kw_only=True):
    """The same for completion webhooks (daemon/notifications/)."""

    delivered: int = 0
    gave_up: int = 0
    attempts: dict[str, int] = {}  # "ok" | ErrorKind -> attempts
    seconds_buckets: list[float] = []
    seconds_counts: list[int] = []
    seconds_sum: float = 0.0


class Heartbeat(RunnerView, frozen=True, kw_only=True):
    """daemon.json: the daemon's heartbeat, rewritten every second while its main loop runs."""

    pid: int
    heartbeat_at: UnixSeconds
    executor: Executor
    # The machine's monotonic clock at the beat, and which boot it counts from: readers age the beat by it, so
    # a step of the wall clock (either way) neither keeps a stopped daemon "healthy" nor makes a live one old.
    monotonic_at: float | UnsetType = UNSET
    boot_id: str | UnsetType = UNSET
    jobs_active: int = 0
    tasks_in_flight: int = 0
    images_in_flight: int = 0
    images_remaining_active: int = 0  # images of active jobs without a result
    paused: bool = False  # results cannot be written (a full disk): nothing new is dispatched
    metrics: ImageCounts = ImageCounts()
    webhooks: WebhookCounts | UnsetType = UNSET  # only when webhooks are on


# ------------------------------------------------------------------ control request
class ControlRequest(Struct, frozen=True):
    """control/<id>.<verb>: a request to the daemon about a job. The file's name says which job and what;
    its one line, when it was asked."""

    job_id: JobId
    verb: Control
    requested_at: str

    @property
    def name(self) -> str:
        return f"{self.job_id}.{self.verb}"
