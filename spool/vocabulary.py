"""The spool's words, defined once: the wire values of a job's status, the folders and what they mean, the
requests a daemon carries out, and the one job-id check. Imports nothing of ours: every other module of
the project may use it (daemon/__init__.py: the rooms import downward)."""
from __future__ import annotations

import re
import time
import unicodedata
from enum import StrEnum

#: The one job-id check. Applied to every id before it becomes part of a path.
JOB_ID_PATTERN = re.compile(r"[1-9][0-9]{0,15}")


class Status(StrEnum):
    """The job status as clients see it; the values are the wire strings."""

    ONGOING = "ongoing"
    COMPLETED = "completed"
    FAILED = "failed"


class Phase(StrEnum):
    """Finer progress inside a status, for people watching a job."""

    QUEUED = "queued"  # no status file yet: the job file waits in incoming/ (or was just claimed)
    RUNNING = "running"
    FINISHED = "finished"


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


#: The folders a job file can be in, in the order of a job's life.
JOB_FOLDERS = (Folder.INCOMING, Folder.ACTIVE, Folder.DONE, Folder.FAILED)
UNFINISHED_FOLDERS = (Folder.INCOMING, Folder.ACTIVE)
FINISHED_FOLDERS = (Folder.DONE, Folder.FAILED)


class Control(StrEnum):
    """What control/<id>.<verb> asks the daemon to do with a job."""

    CANCEL = "cancel"
    REQUEUE = "requeue"  # a finished job, all its images again
    REQUEUE_FAILED = "requeue-failed"  # a finished job, only its failed images again


class Executor(StrEnum):
    """Where the daemon runs the image work (the ``executor`` setting; the heartbeat's "executor")."""

    LOCAL = "local"  # a process pool on the daemon's machine
    DASK = "dask"  # a Dask cluster


class DeliveryState(StrEnum):
    """Where a job's completion notification is; the values are the wire strings (status "callback.state")."""

    WAITING = "waiting"  # the job has not finished yet
    PENDING = "pending"  # finished: being delivered, or waiting for its next attempt
    DELIVERED = "delivered"  # the receiver answered 2xx
    GAVE_UP = "gave_up"  # a permanent refusal, or retries ran out of time


def parse_job_id(text: object) -> int | None:
    """The job id ``text`` names, or None if it is not a well-formed one."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not JOB_ID_PATTERN.fullmatch(text):
        return None
    return int(text)


def utc_now() -> str:
    return iso_time(time.time())


def iso_time(unix_s: float) -> str:
    """Unix seconds as the spool's times are written: ``2026-11-23T11:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


#: Characters that hide or change the text around them when shown: controls (C0, DEL, C1: a terminal's
#: escapes), format characters (bidi overrides, zero-width spaces and joiners, ...) and line or paragraph
#: separators. The API refuses them in a new job's store_id and visit_time (webapi/validate.py).
INVISIBLE_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp"))


def plural(count: int, word: str, words: str | None = None) -> str:
    """"1 image", "2 images": the count with its noun, agreeing; for whatever a person reads (ctl, the page's
    webhook line, a webhook's reason for giving up)."""
    return f"{count} {word if count == 1 else words or word + 's'}"


def visible(text: str) -> str:
    """``text`` as it can be shown safely: every invisible character (INVISIBLE_CATEGORIES) written as its
    escape, ``\\x1b``, ``\\u202e``, ``\\U000e0041``, so it can neither hide nor reorder nor colour what is
    around it. The status page (webapi/static/app.js), the CSV and retailpulse-ctl show text from outside so."""
    if text.isprintable():  # C speed; what is not printable may still be fine (a non-ASCII space)
        return text
    return "".join(_escape(ch) if unicodedata.category(ch) in INVISIBLE_CATEGORIES else ch for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
