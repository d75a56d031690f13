"""Completion notifications: the outbox/ and sent/ records of jobs with a ``callback_url`` (the format is
documented in spool/__init__.py). Mixed into Spool.

The daemon writes a job's notification into outbox/ before the status that makes the job terminal, so a
crash can never leave a finished job whose notification is lost; its delivery thread
(daemon/supervisor/webhooks.py) rewrites the record after each attempt and moves it to sent/ once delivered
or given up. Readers of a status (Spool.read_status) fill in the delivery's progress from these records.
"""
from __future__ import annotations

import hashlib
import json
import time
from enum import StrEnum
from pathlib import Path

from spool import CorruptFile, Folder


class DeliveryState(StrEnum):
    """Where a job's completion notification is; the values are the wire strings (status "callback.state")."""

    WAITING = "waiting"  # the job has not finished yet
    PENDING = "pending"  # finished: being delivered, or waiting for its next attempt
    DELIVERED = "delivered"  # the receiver answered 2xx
    GAVE_UP = "gave_up"  # a permanent refusal, or retries ran out of time


def webhook_id(job_id: int, status: str, images_done: int, images_failed: int) -> str:
    """The notification's id (the webhook-id header), the same on every attempt and after any crash: it comes
    from what the notification says, not from when it was made. A requeued job that ends differently is a
    new notification; one that ends the same way is the same news, and receivers may drop it as a repeat."""
    text = f"retail-pulse/job/{job_id}/{status}/{images_done}/{images_failed}"
    return "msg_" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _iso(unix_s: object) -> str | None:
    if not isinstance(unix_s, (int, float)):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


class Notifications:
    """Needs Spool's layout and primitives (root, write_atomic, _read_json, _rename)."""

    def notification_path(self, job_id: int, folder: str = Folder.OUTBOX) -> Path:
        return self.root / folder / f"{job_id}.json"

    def write_notification(self, record: dict) -> None:
        """Write (or rewrite) a job's record in outbox/. Durable when this returns."""
        self.write_atomic(self.notification_path(record["job_id"]), json.dumps(record, separators=(",", ":")).encode())

    def read_notification(self, job_id: int, folder: str = Folder.OUTBOX) -> dict | None:
        try:
            return self._read_json(self.notification_path(job_id, folder))
        except (FileNotFoundError, CorruptFile):
            return None

    def outbox_ids(self) -> list[int]:
        return self.job_ids(Folder.OUTBOX)

    def retire_notification(self, record: dict) -> None:
        """A record whose delivery is over (delivered or given up): outbox/ -> sent/, final state inside.
        Rewritten in outbox/ first, so a crash between the two steps leaves a record that says it is over."""
        self.write_notification(record)
        self._rename(self.notification_path(record["job_id"]), self.notification_path(record["job_id"], Folder.SENT))

    def forget_notifications(self, job_id: int) -> None:
        """Purge: a deleted job has nothing left to deliver."""
        for folder in (Folder.OUTBOX, Folder.SENT):
            self.notification_path(job_id, folder).unlink(missing_ok=True)

    def with_delivery(self, job_id: int, doc: dict) -> dict:
        """A status document with its "callback" filled in from the job's outbox/ or sent/ record."""
        callback = doc.get("callback")
        if callback is None and doc.get("phase") == "queued":  # no status file yet: the meta file knows the URL
            url = (self.read_meta(job_id) or {}).get("callback_url")
            return {**doc, "callback": {"url": url, "state": DeliveryState.WAITING.value}} if url else doc
        if not isinstance(callback, dict) or callback.get("state") == DeliveryState.WAITING:
            return doc
        record = self.read_notification(job_id) or self.read_notification(job_id, Folder.SENT)
        if record is None:
            return doc
        view = {"url": record.get("url"), "state": record.get("state"), "webhook_id": record.get("webhook_id"),
                "attempts": record.get("attempts", 0), "last_error": record.get("last_error")}
        if record.get("state") == DeliveryState.PENDING and record.get("attempts"):
            view["next_attempt_at"] = _iso(record.get("next_attempt_at"))
        if record.get("delivered_at") is not None:
            view["delivered_at"] = _iso(record.get("delivered_at"))
        return {**doc, "callback": view}
