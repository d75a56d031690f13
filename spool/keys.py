"""Idempotency keys: the record (records.py, KeyRecord) that ties a client's ``Idempotency-Key`` to the job its
submit made; where it lives: spool/__init__.py.

The promise is the job's own: a crash at any instant leaves no job and no key, or both. A submit with a key
runs under the key's lock (one of 256 lock files, by the key's digest, so unrelated keys rarely wait on each
other) and writes, in this order, each durable before the next: the job's meta file (which makes its id
taken for good, jobs.py next_id), the key record naming that id, the job file. A key record counts only while
the job it names exists, and job ids never repeat, so a record whose job never got written (a crash in
between) counts as no key: the next submit with that key makes the job. The lock is a file lock (flock), so
the kernel lets go of it when a killed API process dies.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import filelock

from spool.files import CorruptFile, SpoolFiles, read_checked
from spool.jobs import Jobs
from spool.records import KeyRecord, Visit
from spool.vocabulary import Folder

#: A submit waits this long for another request with the same key (or the same lock shard) to finish.
KEY_LOCK_TIMEOUT_S = 30.0


class KeyReused(Exception):
    """The key already made a job from a different request."""

    def __init__(self, job_id: int):
        super().__init__(job_id)
        self.job_id = job_id


class KeyBusy(Exception):
    """Another request with this key held its lock for KEY_LOCK_TIMEOUT_S."""


def key_digest(owner: str | None, key: str) -> str:
    """The key's name in the spool: keys are scoped to the token that sent them (owner None: tokens off).
    Token names and keys hold no newline, so the joined text is unambiguous."""
    return hashlib.sha256(f"{owner or ''}\n{key}".encode()).hexdigest()


class Keys:
    """The Idempotency-Key records; a keyed submit stores its job through ``jobs``."""

    def __init__(self, files: SpoolFiles, jobs: Jobs):
        self.files, self.jobs, self.root = files, jobs, files.root

    def path(self, digest: str) -> Path:
        return self.root / Folder.IDEMPOTENCY / f"{digest}.json"

    def lock(self, digest: str, timeout_s: float = KEY_LOCK_TIMEOUT_S) -> filelock.FileLock:
        return filelock.FileLock(str(self.root / Folder.IDEMPOTENCY / f"{digest[:2]}.lock"), timeout=timeout_s)

    def record(self, digest: str) -> KeyRecord | None:
        """The record of a key whose job exists; None when there is none, or its job never got written."""
        try:
            record = read_checked(self.path(digest), KeyRecord)
        except (FileNotFoundError, CorruptFile):
            return None
        return record if self.jobs.exists(record.job_id) else None

    def submit_once(self, owner: str | None, key: str, request_sha256: str, count: int, visits: list[Visit],
                    callback_url: str | None = None, admit: Callable[[], None] = lambda: None) -> tuple[int, bool]:
        """(job id, replayed): the job this key made before, or a new one stored as submit() stores it.

        ``request_sha256`` fingerprints the request; the same key with another fingerprint raises KeyReused.
        ``admit()`` runs only before a new job is made, and may raise to refuse it (a full queue)."""
        digest = key_digest(owner, key)
        try:
            with self.lock(digest):
                record = self.record(digest)
                if record is not None:
                    if record.request_sha256 != request_sha256:
                        raise KeyReused(record.job_id)
                    return record.job_id, True
                admit()
                job_id = self.jobs.next_id()
                record = KeyRecord(key, owner, job_id, request_sha256, round(time.time(), 3))
                self.jobs.store(job_id, count, visits, owner, callback_url=callback_url, idempotency_key=digest,
                                between=lambda: self.files.write(self.path(digest), record))
                return job_id, False
        except filelock.Timeout:
            raise KeyBusy from None

    def forget(self, job_id: int, digest: object) -> None:
        """Purge: remove the key record of a job being deleted, if it still names that job."""
        if not isinstance(digest, str) or len(digest) != 64:
            return
        try:
            with self.lock(digest, timeout_s=5):
                if read_checked(self.path(digest), KeyRecord).job_id == job_id:
                    self.path(digest).unlink(missing_ok=True)
        except (FileNotFoundError, CorruptFile, filelock.Timeout):
            return  # nothing to remove, or busy: the orphan sweep removes it once its job is gone

    def remove_orphans(self, older_than_s: float) -> int:
        """Remove key records older than ``older_than_s`` whose job does not exist (a submit killed between
        its writes, a purge interrupted): they already count as no key; this only tidies. How many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self.root / Folder.IDEMPOTENCY):
            if not entry.name.endswith(".json"):
                continue
            digest = entry.name[:-5]
            try:
                if entry.stat().st_mtime >= cutoff or self.record(digest) is not None:
                    continue
                with self.lock(digest, timeout_s=0):  # a submit holding it is writing this very record
                    if self.record(digest) is None:
                        os.unlink(entry.path)
                        removed += 1
            except (FileNotFoundError, filelock.Timeout):
                continue
        return removed
