"""Completion notifications: the outbox/ and sent/ records (records.py, Notification) of jobs with a
``callback_url``; where they live: spool/__init__.py.

The daemon writes a job's notification into outbox/ before the status that makes the job terminal, so a
crash can never leave a finished job whose notification is lost; its delivery thread
(daemon/notifications/) rewrites the record after each attempt and moves it to sent/ once delivered or given
up. Readers of a status (Spool.status) fill in the delivery's progress from these records.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from msgspec import UNSET
from msgspec.structs import replace

from spool.files import CorruptFile, SpoolFiles, ids_in, read_checked
from spool.records import Callback, JobStatus, Notification
from spool.vocabulary import DeliveryState, Folder, iso_time


def webhook_id(job_id: int, status: str, images_done: int, images_failed: int) -> str:
    """The notification's id (the webhook-id header), the same on every attempt and after any crash: it comes
    from what the notification says, not from when it was made. A requeued job that ends differently is a
    new notification; one that ends the same way is the same news, and receivers may drop it as a repeat."""
    text = f"retail-pulse/job/{job_id}/{status}/{images_done}/{images_failed}"
    return "msg_" + hashlib.sha256(text.encode()).hexdigest()[:24]


def new_notification(url: str, owner: str | None, final: JobStatus, now: float) -> Notification:
    """A finished job's notification, due at once: its body is the final status without its "callback"."""
    job_id = int(final.job_id)
    return Notification(webhook_id(job_id, final.status, final.done, final.failed), job_id, url, owner,
                        replace(final, callback=UNSET), round(now, 3), DeliveryState.PENDING, 0, round(now, 3),
                        None, None)


class Outbox:
    def __init__(self, files: SpoolFiles):
        self.files, self.root = files, files.root

    def path(self, job_id: int, folder: str = Folder.OUTBOX) -> Path:
        return self.root / folder / f"{job_id}.json"

    def write(self, record: Notification) -> None:
        """Write (or rewrite) a job's record in outbox/. Durable when this returns."""
        self.files.write(self.path(record.job_id), record)

    def read(self, job_id: int, folder: str = Folder.OUTBOX) -> Notification | None:
        try:
            return read_checked(self.path(job_id, folder), Notification)
        except (FileNotFoundError, CorruptFile):
            return None

    def ids(self) -> list[int]:
        """Jobs with a notification still to deliver, oldest first."""
        return ids_in(self.root / Folder.OUTBOX)

    def retire(self, record: Notification) -> None:
        """A record whose delivery is over (delivered or given up): outbox/ -> sent/, final state inside.
        Rewritten in outbox/ first, so a crash between the two steps leaves a record that says it is over."""
        self.write(record)
        self.files.rename(self.path(record.job_id), self.path(record.job_id, Folder.SENT))

    def forget(self, job_id: int) -> None:
        """Purge: a deleted job has nothing left to deliver."""
        for folder in (Folder.OUTBOX, Folder.SENT):
            self.path(job_id, folder).unlink(missing_ok=True)

    def with_delivery(self, status: JobStatus) -> JobStatus:
        """A status with its "callback" filled in from the job's outbox/ or sent/ record."""
        callback = status.callback
        if callback is UNSET or callback.state is DeliveryState.WAITING:
            return status
        job_id = int(status.job_id)
        record = self.read(job_id) or self.read(job_id, Folder.SENT)
        if record is None:
            return status
        view = Callback(record.url, record.state, webhook_id=record.webhook_id, attempts=record.attempts,
                        last_error=record.last_error)
        if record.state is DeliveryState.PENDING and record.attempts:
            view = replace(view, next_attempt_at=iso_time(record.next_attempt_at))
        if record.delivered_at is not None:
            view = replace(view, delivered_at=iso_time(record.delivered_at))
        return replace(status, callback=view)
