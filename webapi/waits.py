"""GET /api/status for clients that wait instead of polling, and status answers that cost nothing to repeat.

Waiting (RFC 7240): a client sends ``Prefer: wait=S`` (at most MAX_WAIT_S). Without ``If-None-Match`` it
is answered when the job is finished, or when S seconds are up; with ``If-None-Match: <the ETag it has>``,
as soon as the status differs from that one (a 304 with the same ETag when S is up first). An answer that
waited says ``Preference-Applied: wait=S``; one that did not (the status was ready, or this server does
not wait) says nothing of it, and the client polls as before. Plain requests answer exactly as they did.

Waiting costs no thread: the request is parked in the gunicorn worker's own event loop (webapi/server.py)
until spool/watch.py says the job's status file was rewritten, or its time is up, and only then answered
on one of the worker's threads, by the same route as any request. At most MAX_PARKED_SHARE of a worker's
connections wait, so waiting clients never hold the door shut for a submit or /healthz.

Repeating: what a status answer is made of (its status file, its webhook's outbox/ or sent/ record) is
looked at with a stat each time; the answer is re-read and re-encoded only when one of them changed
(StatusViews), and a job's meta file (it never changes) is read once: its owner, its size.
"""
from __future__ import annotations

import contextvars
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from spool import Folder, Spool
from spool.files import encode
from spool.records import JobMeta, JobStatus

#: The longest a client may ask to wait; nginx's proxy_read_timeout (60 s) is above it.
MAX_WAIT_S = 30
#: Of a worker's connections (gunicorn's worker_connections), at most this share are parked waiting.
MAX_PARKED_SHARE = 0.5
#: Set while a parked request is answered: the route answers what it has, it does not ask to wait again.
RESUMED: contextvars.ContextVar[bool] = contextvars.ContextVar("retailpulse_wait_resumed", default=False)
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6}(?:\.\d{1,3})?)\"?", re.IGNORECASE)


def wait_preference(prefer: str | None) -> float | None:
    """The seconds a ``Prefer`` header asks to wait (``wait=10``, among other preferences), capped at
    MAX_WAIT_S; None when it asks none (a malformed preference is ignored, as RFC 7240 says)."""
    match = _WAIT.search(prefer or "")
    return min(float(match[1]), MAX_WAIT_S) if match else None


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names this ETag (weak comparison, RFC 9110 13.1.2; ``*`` matches)."""
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


@dataclass(frozen=True)
class View:
    """A job's status as the API answers it: the record, its ETag, the bytes of the answer."""

    status: JobStatus
    etag: str
    body: bytes

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass(frozen=True)
class Park:
    """A status request that is to wait: for a change of ``etag`` (or, with ``until_finished``, for the job's
    end), until ``deadline`` (time.monotonic())."""

    job_id: int
    deadline: float
    etag: str
    until_finished: bool

    def ready(self, view: View | None) -> bool:
        """Whether the answer is ready: the job is gone or finished, or its status changed."""
        if view is None or view.finished:
            return True
        return not self.until_finished and view.etag != self.etag

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.deadline


class StatusViews:
    """Each job's last answer, kept while the files it is made of are unchanged (at most ``max_jobs``)."""

    def __init__(self, spool: Spool, max_jobs: int = 4096):
        self.spool, self.max_jobs = spool, max_jobs
        self._views: OrderedDict[int, tuple[tuple, View]] = OrderedDict()
        self._metas: OrderedDict[int, JobMeta] = OrderedDict()
        self._beat: tuple[tuple | None, int] = (None, 0)  # the heartbeat's (inode, mtime), its images remaining

    def view(self, job_id: int) -> View | None:
        """The job's status as the API answers it, None for an unknown job. Raises OSError when the spool
        cannot be read (permissions), as Spool.status does."""
        signature = self.spool.status_signature(job_id)
        cached = self._views.get(job_id)
        if cached is not None and signature is not None and cached[0] == signature:
            return cached[1]
        status = self.spool.status(job_id)
        if status is None:
            self._views.pop(job_id, None)
            return None
        view = View(status, _etag(signature, status), encode(status))
        if signature is not None:  # a queued job has no status file yet: nothing to keep it by
            self._views[job_id] = (signature, view)
            self._views.move_to_end(job_id)
            while len(self._views) > self.max_jobs:
                self._views.popitem(last=False)
        return view

    def meta(self, job_id: int) -> JobMeta | None:
        """The job's meta file (it never changes), read once per job; None while it has none."""
        meta = self._metas.get(job_id)
        if meta is None:
            meta = self.spool.jobs.read_meta(job_id)
            if meta is None:
                return None
            self._metas[job_id] = meta
            while len(self._metas) > self.max_jobs:
                self._metas.popitem(last=False)
        return meta

    def queued_images(self) -> int:
        """Spool.queued_images, as every submit asks it: each waiting job's size read once, the heartbeat read
        again only when its file changed."""
        waiting = 0
        for job_id in self.spool.jobs.ids(Folder.INCOMING):
            meta = self.meta(job_id)
            waiting += meta.images if meta is not None else 0
        return waiting + self._remaining_active()

    def _remaining_active(self) -> int:
        try:
            st = os.stat(self.spool.heartbeat.path)
            signature = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            return 0
        if self._beat[0] != signature:
            beat = self.spool.heartbeat.read()
            self._beat = (signature, beat.images_remaining_active if beat is not None else 0)
        return self._beat[1]


def _etag(signature: tuple | None, status: JobStatus) -> str:
    """A weak ETag: the identity of the files behind the answer (every rewrite is a new file), or, for a
    queued job, its phase."""
    if signature is None:
        return f'W/"{status.phase}"'
    return 'W/"' + "-".join("x" if part is None else f"{part[0]:x}.{part[1]:x}" for part in signature) + '"'
