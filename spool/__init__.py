"""The spool: the on-disk contract between the API and the daemon, and the only state either keeps.

Everything below lives under one root folder (the ``spool_dir`` setting; folder names: the Folder enum).
The folder a job file is in *is* the job's state; every change is a write under ``tmp/`` + fsync +
``os.replace`` + fsync of the folder, so a reader never sees half a file and after a crash the state is
whatever the last rename said (as in Maildir).

    daemon.lock            held (filelock) by the one daemon working on this spool; a second one refuses to start.
    next_job_id            text, one integer: the id the next submission gets. Written by the API under
                           next_job_id.lock (filelock), so ids only increase, across processes and restarts.
                           Both lock files are empty, mode 0600 like every other file here.
    tmp/                   files being written, named <final name>.<writer pid>.<random>. Never read.
                           Leftovers of a crash (writer pid gone, or older than an hour) are removed by
                           the daemon at start-up and every ten minutes.
    meta/<id>.json         a few facts about a job, written by the API just before its job file, never
                           changed: {"job_id": 7, "images": 2000, "owner": "acme" | null}. "owner" names
                           the API token that submitted it (see webapi/auth.py). Small, so the API can
                           count queued images and check owners without reading job files. A job
                           submitted with an Idempotency-Key adds "idempotency_key": <its digest>; one
                           with a callback adds "callback_url".
    idempotency/<digest>.json
                           an Idempotency-Key and the job it made (spool/keys.py), written by the API
                           before the job's meta and job file: {"key": "...", "owner": "acme" | null,
                           "job_id": 7, "request_sha256": "<fingerprint of the request>", "created_at": Unix s}.
                           <digest> is the SHA-256 hex of owner and key (keys are per token). It counts
                           only while job 7 exists, so a crash between the writes leaves no key; purge
                           (retention) removes it with its job, the daemon removes orphans.
    idempotency/<xx>.lock  flock held while a submit with a key whose digest starts with xx runs.
    outbox/<id>.json       a completion notification to deliver (spool/outbox.py): the job has a callback_url
                           and reached completed or failed. Written by the daemon before the job's final
                           status, rewritten after each attempt: {"webhook_id": "msg_...", "job_id": 7,
                           "url": "https://...", "owner": "acme" | null, "body": {the final status document},
                           "created_at": Unix s, "state": "pending" (DeliveryState), "attempts": 2,
                           "next_attempt_at": Unix s, "last_error": "HTTP 500" | null, "delivered_at": null}.
                           Delivered only once the job file is in done/ or failed/.
    sent/<id>.json         the same record once its delivery is over ("state": "delivered" | "gave_up");
                           kept until its job is purged.
    daemon.json            the daemon's heartbeat, rewritten every second while its main loop runs (not
                           fsynced: after a crash it is stale anyway, and says so by its age). The API's
                           /healthz, /metrics and backpressure read it:
                           {"pid": 123, "heartbeat_at": 1795000000.5 (Unix seconds),
                            "executor": "local" | "dask" (Executor), "workers": 2 (pool processes connected, or Dask
                            workers seen), "processes": 2 (local) | "scheduler": "tls://..." (dask),
                            "tasks_by_worker": {"pool process 1234" | "tls://10.0.0.7:8790": tasks it holds},
                            "stalled": [{"worker": name, "tasks": n, "seconds": s}] (holding tasks, none finished
                                        for stall_timeout_s; daemon/runners/__init__.py, Progress),
                            "failing": [{"worker": "tls://...", "error": "..."}] (dask: workers tasks fail on),
                            "stalled_replaced": 0 (local: stalled pool processes killed and replaced),
                            "jobs_active": 3, "tasks_in_flight": 2, "images_in_flight": 512,
                            "images_remaining_active": 9000 (images of active jobs without a result),
                            "paused": false (true while results cannot be written: disk full),
                            "metrics": {"images_ok", "images_failed": {kind: n} (ErrorKind, daemon/engine/outcome.py),
                                        "download_bytes", "seconds_buckets", "seconds_counts", "seconds_sum",
                                        "jobs_finished": {status: n}}  (counters since the daemon started),
                            "webhooks": {"delivered", "gave_up", "attempts": {"ok" | ErrorKind: n},
                                         "seconds_buckets", "seconds_counts", "seconds_sum"} (the same, for
                                         completion webhooks; {} when webhooks are off)}
    control/<id>.<verb>    a request to the daemon about a job (verbs: the Control enum): cancel, requeue (all
                           its images) or requeue-failed (only its failed images). Written by the API
                           (cancel) or the operator CLI; the daemon carries it out and removes it (a
                           request still there after a crash is carried out again at restart). Only the
                           daemon moves job files, so requests never race with the work. Whoever asked
                           waits for the file to go, then reads the job's status to say what was done.
    incoming/<id>.json     a submitted job, complete, not yet claimed. Written by the API.
    active/<id>.json       the same file, claimed (renamed) by the daemon, which is working on it.
    done/<id>.json         the job file once every image has a result and none failed.
    failed/<id>.json       the job file once every image has a result and at least one failed.
    corrupt/<name>         any file that could not be parsed, moved aside for a human with a .why note.
    status/<id>.json       the job's status as the API serves it. Written by the daemon only.
    results/<id>/<first>-<stop>.<crc32>.jsonl
                           results of images first .. stop-1 (zero-padded, half-open), one JSON object a
                           line, in submission order; <crc32>: 8 hex digits, zlib's CRC-32 of the file's
                           bytes. Written by the daemon once per finished chunk, and by a
                           cancel for the images it cancels, in files of up to 4,096 images. Checked by every reader:
                           the checksum, exactly stop-first whole lines, the first and last of images first
                           and stop-1; a finished job's files cover 0..N-1 with no gap (spool/results.py).
                           Files named <first>-<stop>.jsonl (written before checksums) are checked line by
                           line. Any file named by a spool folder must be a regular file: a folder, link or
                           FIFO in its place is read as corrupt and moved to corrupt/, never followed.

Job file (incoming/, active/, done/, failed/):
    {"job_id": 7, "submitted_at": "2026-11-23T11:00:00Z", "count": 1,
     "visits": [{"store_id": "RP00001", "visit_time": "...", "image_url": ["http://...", ...]}],
     "callback_url": "https://..."}                                  # "callback_url" only when given
Images are numbered 0..N-1 in submission order (visit by visit, URL by URL); that number is "index".

Status file:
    {"job_id": "7", "status": "ongoing" | "completed" | "failed", "phase": "running" | "finished",
     "images_total": N, "images_done": d, "images_failed": f,
     "images_cancelled": c (of the failed, those "cancelled by request"; only when there are any),
     "submitted_at": "..." (from the job file), "updated_at": "..." (when the daemon wrote this),
     "error": [{"store_id": "...", "error": "first failure", "image_url": "its URL", "images_failed": k}],
     "callback": {"url": "https://...", "state": "waiting" | "pending"}
    }                                             # "error" only when failed; "callback" only with a callback_url
Readers (read_status) fill in "callback" from outbox/ or sent/: state, webhook_id, attempts, last_error,
next_attempt_at, delivered_at.
A job with no status file yet but a job file in incoming/ or active/ is "ongoing" with phase "queued".

Result line:
    {"index": 0, "store_id": "RP00001", "store_name": "...", "area_code": "...", "visit_time": "...",
     "image_url": "http://...", "width": 640, "height": 480, "perimeter": 2240, "error": null}
A failed image has width, height and perimeter null and "error" saying why.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
from enum import StrEnum
from pathlib import Path

import filelock

from spool.results import DamagedResults, ResultFiles, UnreadableResults, read_regular

__all__ = ["JOB_ID_PATTERN", "Spool", "Status", "Phase", "Folder", "Control", "Executor", "CorruptFile", "DamagedResults",
           "UnreadableResults", "parse_job_id", "pid_exists", "status_document", "utc_now", "DeliveryState", "KeyBusy",
           "KeyReused"]

#: The one job-id check. Applied to every id before it becomes part of a path.
JOB_ID_PATTERN = re.compile(r"[1-9][0-9]{0,15}")
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class Status(StrEnum):
    """The job status as clients see it; the values are the wire strings."""

    ONGOING = "ongoing"
    COMPLETED = "completed"
    FAILED = "failed"


class Folder(StrEnum):
    """The spool's folders. For a job file, the folder it is in is its state."""

    TMP = "tmp"
    META = "meta"
    CONTROL = "control"
    INCOMING = "incoming"
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    CORRUPT = "corrupt"
    STATUS = "status"
    RESULTS = "results"
    IDEMPOTENCY = "idempotency"
    OUTBOX = "outbox"
    SENT = "sent"


class Control(StrEnum):
    """What control/<id>.<verb> asks the daemon to do with a job."""

    CANCEL = "cancel"
    REQUEUE = "requeue"  # a finished job, all its images again
    REQUEUE_FAILED = "requeue-failed"  # a finished job, only its failed images again


class Executor(StrEnum):
    """Where the daemon runs the image work (the ``executor`` setting; daemon.json's "executor")."""

    LOCAL = "local"  # a process pool on the daemon's machine
    DASK = "dask"  # a Dask cluster


class Phase(StrEnum):
    """Finer progress inside a status, for people watching a job."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"


class CorruptFile(Exception):
    """A spool file exists but cannot be parsed."""


def parse_job_id(text: object) -> int | None:
    """Return the job id ``text`` names, or None if it is not a well-formed one."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not JOB_ID_PATTERN.fullmatch(text):
        return None
    return int(text)


def status_document(job_id: int, status: Status, phase: Phase, **fields) -> dict:
    """A status file's contents: the wire fields first (job_id as a string, as clients expect), then ``fields``."""
    return {"job_id": str(job_id), "status": status.value, "phase": phase.value, **fields}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without sending)."""
    if not 0 < pid <= 2**22:  # the kernel's largest pid (pid_max); 0 and negatives mean process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: the pid exists
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


from spool.upkeep import Upkeep  # noqa: E402  (it uses the vocabulary above)
from spool.keys import IdempotencyKeys, KeyBusy, KeyReused  # noqa: E402
from spool.outbox import DeliveryState, Notifications  # noqa: E402


class Spool(ResultFiles, Upkeep, IdempotencyKeys, Notifications):
    """Paths and atomic operations on one spool folder. Holds no state but its root."""

    FOLDERS = tuple(Folder)
    JOB_FOLDERS = (Folder.INCOMING, Folder.ACTIVE, Folder.DONE, Folder.FAILED)
    UNFINISHED_FOLDERS = (Folder.INCOMING, Folder.ACTIVE)
    FINISHED_FOLDERS = (Folder.DONE, Folder.FAILED)

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ layout
    def create(self) -> Spool:
        """Make the folders (idempotent), readable by the owner only."""
        old_umask = os.umask(0o077)
        try:
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            for name in self.FOLDERS:
                (self.root / name).mkdir(mode=_DIR_MODE, exist_ok=True)
        finally:
            os.umask(old_umask)
        return self

    def job_path(self, folder: str, job_id: int) -> Path:
        return self.root / folder / f"{job_id}.json"

    def meta_path(self, job_id: int) -> Path:
        return self.root / Folder.META / f"{job_id}.json"

    def status_path(self, job_id: int) -> Path:
        return self.root / Folder.STATUS / f"{job_id}.json"

    def results_dir(self, job_id: int) -> Path:
        return self.root / Folder.RESULTS / str(job_id)

    # ------------------------------------------------------------ primitives
    def write_atomic(self, dest: Path, data: bytes, durable: bool = True) -> None:
        """Write ``data`` to ``dest`` so that readers see the old file or the whole new one, never a part.

        ``durable``: also fsync the file and the folder, so the write survives a power loss once this returns.
        """
        tmp = self.root / Folder.TMP / f"{dest.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if durable:
            _fsync_dir(dest.parent)

    def check_writable(self) -> None:
        """Create and remove a file under tmp/ (named as every tmp/ file is); raises OSError when that fails."""
        probe = self.root / Folder.TMP / f"write-probe.{os.getpid()}.{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
        probe.unlink()

    def _rename(self, src: Path, dest: Path) -> None:
        os.replace(src, dest)
        _fsync_dir(dest.parent)
        if src.parent != dest.parent:
            _fsync_dir(src.parent)

    @staticmethod
    def _read_json(path: Path) -> dict:
        """A spool file's JSON object. CorruptFile when it does not parse, or when a folder, a link or a FIFO
        stands where the file should be (never followed, never blocking); other OSErrors (permissions) pass."""
        try:
            doc = json.loads(read_regular(path))
        except IsADirectoryError as exc:
            raise CorruptFile(f"{path.name}: {exc.strerror}, not a file") from exc
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise CorruptFile(f"{path.name}: a symbolic link, not a file") from exc
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CorruptFile(f"{path.name}: {exc}") from exc
        if not isinstance(doc, dict):
            raise CorruptFile(f"{path.name}: not a JSON object")
        return doc

    def move_aside(self, path: Path, why: str) -> Path:
        """Move an unreadable file into corrupt/ with a note, so a human can look at it."""
        dest = self.root / Folder.CORRUPT / f"{path.parent.name}-{path.name}.{int(time.time())}"
        self._rename(path, dest)
        self.write_atomic(dest.with_name(dest.name + ".why"), (why + "\n").encode())
        return dest

    def daemon_lock(self) -> filelock.FileLock:
        """The lock a daemon holds for its whole life: two daemons would both resume the jobs in active/."""
        return filelock.FileLock(str(self.root / "daemon.lock"), timeout=0, mode=_FILE_MODE)

    # ------------------------------------------------------------- API side
    def next_job_id(self) -> int:
        """Take the next job id. Ids only increase, even with several API processes and across restarts."""
        counter = self.root / "next_job_id"
        with filelock.FileLock(str(counter) + ".lock", timeout=30, mode=_FILE_MODE):
            try:
                job_id = int(counter.read_text().strip() or "1")
            except FileNotFoundError:
                job_id = 1
            self.write_atomic(counter, f"{job_id + 1}\n".encode())
        return job_id

    def submit(self, count: int, visits: list, owner: str | None = None, callback_url: str | None = None) -> int:
        """Store a validated job in incoming/ and return its id. When this returns, the job is on disk."""
        job_id = self.next_job_id()
        self.store_job(job_id, count, visits, owner, callback_url=callback_url)
        return job_id

    def store_job(self, job_id: int, count: int, visits: list, owner: str | None,
                  callback_url: str | None = None, idempotency_key: str | None = None) -> None:
        """submit() with the id taken: its meta file, then its job file (submit_once writes its key before)."""
        images = sum(len(visit["image_url"]) for visit in visits)
        extra = {name: value for name, value in (("idempotency_key", idempotency_key), ("callback_url", callback_url))
                 if value is not None}
        self.write_atomic(self.meta_path(job_id), json.dumps(
            {"job_id": job_id, "images": images, "owner": owner, **extra}, separators=(",", ":")).encode())
        doc = {"job_id": job_id, "submitted_at": utc_now(), "count": count, "visits": visits}
        if callback_url is not None:
            doc["callback_url"] = callback_url
        try:
            self.write_atomic(self.job_path(Folder.INCOMING, job_id), json.dumps(doc, separators=(",", ":")).encode())
        except BaseException:
            self.meta_path(job_id).unlink(missing_ok=True)  # no half-made job (a kill here: orphan_meta_ids)
            raise

    def read_status(self, job_id: int) -> dict | None:
        """The status the daemon last wrote, the queued status if it has not started, or None if unknown.

        Raises OSError when the spool cannot be read (permissions): that is the operator's to fix, and no
        answer may be guessed from it."""
        doc = self._status_file(job_id)
        if doc is not None:
            return doc
        folder = self.job_folder(job_id)
        if folder is None:
            return None
        doc = self._status_file(job_id)  # the daemon may have written it between the two looks
        if doc is not None:
            return doc
        if folder in self.FINISHED_FOLDERS:
            # The status file is unreadable (the daemon moves it aside and rebuilds it); the folder alone
            # says the job is finished, and a status never goes back to ongoing.
            status = Status.COMPLETED if folder is Folder.DONE else Status.FAILED
            return status_document(job_id, status, Phase.FINISHED,
                                   note="status file unreadable; the daemon rebuilds it from the results")
        return self.with_delivery(job_id, status_document(job_id, Status.ONGOING, Phase.QUEUED))

    def _status_file(self, job_id: int) -> dict | None:
        try:
            return self.with_delivery(job_id, self._read_json(self.status_path(job_id)))
        except FileNotFoundError:
            return None
        except CorruptFile:
            return None

    def read_meta(self, job_id: int) -> dict | None:
        """The job's meta file, or None when it has none (or an unreadable one)."""
        try:
            return self._read_json(self.meta_path(job_id))
        except (FileNotFoundError, CorruptFile):
            return None

    def queued_images(self) -> int:
        """Images not yet done: those of jobs in incoming/ plus what the daemon last said remains in active/."""
        waiting = sum((self.read_meta(job_id) or {}).get("images", 0) for job_id in self.job_ids(Folder.INCOMING))
        return waiting + (self.read_heartbeat() or {}).get("images_remaining_active", 0)

    def read_heartbeat(self) -> dict | None:
        try:
            return self._read_json(self.root / "daemon.json")
        except (FileNotFoundError, CorruptFile):
            return None

    def write_heartbeat(self, doc: dict) -> None:
        """Rewritten every second; not fsynced (after a crash it is stale anyway, and says so by its age)."""
        self.write_atomic(self.root / "daemon.json", json.dumps(doc, separators=(",", ":")).encode(), durable=False)

    def job_folder(self, job_id: int) -> str | None:
        """The folder (= state) a job file is in: incoming, active, done, failed; None if there is none."""
        for folder in self.JOB_FOLDERS:
            if self.job_path(folder, job_id).exists():
                return folder
        return None

    def request(self, job_id: int, verb: Control) -> None:
        """Ask the daemon to cancel or requeue a job (see control/ above)."""
        verb = Control(verb)
        self.write_atomic(self.root / Folder.CONTROL / f"{job_id}.{verb}", (utc_now() + "\n").encode())

    def request_pending(self, job_id: int, verb: Control) -> bool:
        """Whether a request is still waiting for the daemon (it removes the file once carried out)."""
        return (self.root / Folder.CONTROL / f"{job_id}.{Control(verb)}").exists()

    def requests(self) -> list[tuple[int, Control, Path]]:
        """(job id, verb, path) of the pending control requests, oldest job first."""
        found = []
        for entry in os.scandir(self.root / Folder.CONTROL):
            stem, _, verb = entry.name.partition(".")
            job_id = parse_job_id(stem)
            if job_id is not None and verb in tuple(Control):
                if not entry.is_file(follow_symlinks=False):  # the daemon removes requests it carried out
                    self.move_aside(Path(entry.path), "not a file: control/ holds only request files")
                    continue
                found.append((job_id, Control(verb), Path(entry.path)))
        return sorted(found)

    # ---------------------------------------------------------- daemon side
    def job_ids(self, folder: str) -> list[int]:
        """Ids of the well-named job files in ``folder``, oldest (smallest) first."""
        ids = []
        for entry in os.scandir(self.root / folder):
            stem, dot, ext = entry.name.partition(".")
            job_id = parse_job_id(stem)
            if job_id is not None and dot and ext == "json":
                ids.append(job_id)
        return sorted(ids)

    def claim(self, job_id: int) -> Path:
        """Move a job from incoming/ to active/; the daemon owns it from now on."""
        dest = self.job_path(Folder.ACTIVE, job_id)
        self._rename(self.job_path(Folder.INCOMING, job_id), dest)
        return dest

    def read_job(self, path: Path) -> dict:
        doc = self._read_json(path)
        if parse_job_id(doc.get("job_id")) is None or not isinstance(doc.get("visits"), list):
            raise CorruptFile(f"{path.name}: not a job file")
        return doc

    def write_status(self, job_id: int, doc: dict) -> None:
        self.write_atomic(self.status_path(job_id), json.dumps(doc, separators=(",", ":")).encode())

    def finish(self, job_id: int, status: Status) -> None:
        """Move a job out of active/ once its final status and every result are on disk."""
        folder = Folder.DONE if status is Status.COMPLETED else Folder.FAILED
        self._rename(self.job_path(Folder.ACTIVE, job_id), self.job_path(folder, job_id))

    def reopen(self, job_id: int, folder: str) -> None:
        """Move a finished job back to active/, for the daemon to redo the images that lost their results."""
        self._rename(self.job_path(folder, job_id), self.job_path(Folder.ACTIVE, job_id))

