"""The delivery thread of completion notifications: POSTs each finished job's final status document to its
``callback_url``, signed per Standard Webhooks:

    webhook-id: msg_...            the same on every attempt and after any restart (spool.outbox.webhook_id)
    webhook-timestamp: 1795000000  Unix seconds of this attempt
    webhook-signature: v1,<base64 of HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>

with the secret of the token that submitted the job (config/webhook_secrets.py). A 2xx answer delivers it;
a timeout, a failed connection, 429 or 5xx is tried again with backoff until ``retry_for_s`` after the job
finished; anything else (4xx, a redirect, an address not allowed, a TLS error) gives up at once. Delivery is
at least once: a crash after the receiver's 200 and before the record says so sends it again, same id.

The calls are libcurl handles with every download rule (daemon/engine/transfer.py, Post), on a multi handle
of this thread's own: a receiver that hangs holds one of ``deliveries_at_once`` slots until the download
timeouts end it, and never the supervisor's loop or the image work. A 2xx status line is the delivery: the
attempt ends there, however slowly the answer's body would come.

Receivers (a callback URL's scheme, host and port) are served apart, so one dead receiver never delays
another's webhooks: each has at most ``per_receiver_at_once`` attempts in flight, and once an attempt to it
fails for a passing reason it is *failing*: one attempt at a time goes to it, after a backoff that doubles
(as a notification's does), until one gets through; its other notifications wait, unwritten, and are given
up when their ``retry_for_s`` is over. So a receiver's retries are bounded in rate (about one a backoff),
whatever number of notifications it has, and so is their cost in disk writes and CPU beside the image work.
"""
from __future__ import annotations

import base64
import bisect
import hashlib
import heapq
import hmac
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import pycurl
from msgspec.structs import replace

from daemon.engine.backoff import JITTER, backoff_s
from daemon.engine.netguard import AddressPolicy
from daemon.engine.settings import DownloadLimits
from daemon.engine.transfer import Failure, Post, finished
from daemon.notifications.outbox import Outbox
from daemon.notifications.settings import WebhookSettings
from spool import FINISHED_FOLDERS, DeliveryState, Spool
from spool.files import encode
from spool.records import Notification, WebhookCounts
from spool.vocabulary import plural

log = logging.getLogger("retailpulse.webhooks")

#: Upper bounds (seconds) of the histogram of delivery latency: job finished -> receiver's 2xx.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0)
#: While no attempt is in flight, how often records waiting for their job's final rename are looked at again.
IDLE_LOOK_S = 1.0

def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header's value (Standard Webhooks, "v1": HMAC-SHA256, base64)."""
    digest = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()

def next_attempt_delay_s(attempts: int, settings: WebhookSettings, retry_after_s: float | None,
                         jitter: float) -> float:
    """Wait after ``attempts`` failed attempts: doubling from backoff_s (x jitter, 0.5..1.5), at least the
    receiver's Retry-After, at most max_backoff_s. Pure, so the schedule is tested without waiting."""
    return backoff_s(attempts, settings.backoff_s, settings.max_backoff_s, jitter, retry_after_s)

class Receiver:
    """One receiver's notifications waiting for an attempt, its attempts in flight, and whether it is failing."""

    __slots__ = ("key", "waiting", "due", "in_flight", "failures", "next_at", "last_error")

    def __init__(self, key: str):
        self.key = key
        self.waiting: dict[int, Notification] = {}  # job id -> its record, as this thread last wrote or read it
        self.due: list[tuple[float, int]] = []  # heap of (next_attempt_at, job id); stale entries are skipped
        self.in_flight = 0
        self.failures = 0  # passing failures in a row; 0: healthy
        self.next_at = 0.0  # failing: no attempt before this (the delivery clock)
        self.last_error = ""

    def may_start(self, now: float, at_once: int) -> bool:
        if self.failures:  # failing: one attempt at a time, once its backoff is over
            return self.in_flight == 0 and now >= self.next_at
        return self.in_flight < at_once

    def wake_at(self) -> float | None:
        """When this receiver may have an attempt to start (None: nothing waits)."""
        if not self.due:
            return None
        return max(self.due[0][0], self.next_at) if self.failures else self.due[0][0]


def receiver_of(url: str) -> str:
    """``https://hooks.example:443``: whom a callback URL goes to (one server: its scheme, host and port)."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"
    except ValueError:
        return url


class Deliveries(Outbox):
    """The outbox with its delivery thread. ``secrets``: token name (None: tokens off) -> secret bytes."""

    def __init__(self, spool: Spool, secrets: Mapping[str | None, bytes], limits: DownloadLimits,
                 policy: AddressPolicy, settings: WebhookSettings, clock: Callable[[], float] = time.time):
        super().__init__(spool, clock)
        self.secrets, self.limits, self.policy, self.settings = secrets, limits, policy, settings
        self._ready: set[int] = set()  # job ids whose record to (re)read, put by the supervisor's thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._receivers: dict[str, Receiver] = {}  # receiver_of(url) -> its notifications and state
        self._held: dict[int, str] = {}  # job id -> the receiver whose waiting notifications hold its record
        self._running: dict[int, tuple[Post, Notification]] = {}  # id(curl) -> (handle, record being attempted)
        self._idle: list[Post] = []
        self._multi = pycurl.CurlMulti()
        self._counts_lock = threading.Lock()
        self._delivered = self._gave_up = 0
        self._attempts: dict[str, int] = {}  # outcome ("ok" or an ErrorKind) -> attempts
        self._seconds = [0] * (len(SECONDS_BUCKETS) + 1)
        self._seconds_sum = 0.0

    # ------------------------------------------------------------ supervisor's side
    def ready(self, job_id: int) -> None:
        with self.lock:
            self._ready.add(job_id)
        self._wake.set()

    def snapshot(self) -> WebhookCounts:
        """For the heartbeat (daemon.json "webhooks") and so /metrics."""
        with self._counts_lock:
            return WebhookCounts(delivered=self._delivered, gave_up=self._gave_up, attempts=dict(self._attempts),
                                 seconds_buckets=list(SECONDS_BUCKETS), seconds_counts=list(self._seconds),
                                 seconds_sum=round(self._seconds_sum, 6))

    # ------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="webhooks", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5) -> None:
        """Stop: attempts in flight are abandoned; their records say pending, and the next daemon sends them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        left = self.spool.outbox.ids()  # what a crash or a stop left undelivered
        with self.lock:
            self._ready.update(left)
        while not self._stop.is_set():
            try:
                self.turn()
            except OSError as exc:  # the spool (a full disk): what is on disk stays pending; try again soon
                log.error("webhooks: %s; trying again in %g s", exc, IDLE_LOOK_S)
                self._stop.wait(IDLE_LOOK_S)
        for handle, _record in self._running.values():
            self._multi.remove_handle(handle.curl)
            handle.close()
        for handle in self._idle:
            handle.close()
        self._multi.close()

    def turn(self) -> None:
        self._wake.clear()  # before looking: a ready() from now on makes the wait below return at once
        self._load_ready()
        now = self.clock()
        self._start_due(now)
        wakes = [at for receiver in self._receivers.values() if (at := receiver.wake_at()) is not None]
        if self._running:
            self._multi.select(0.05)  # short: a newly finished job waits at most this for its turn
            self._perform()
            return
        self._wake.wait(min([IDLE_LOOK_S, *(max(0.0, at - now) for at in wakes)]))

    # ------------------------------------------------------------ notifications held, by receiver
    def _hold(self, record: Notification) -> None:
        """Keep ``record`` waiting for its next attempt (replacing any older one of its job)."""
        self._drop(record.job_id)
        receiver = self._receivers.get(key := receiver_of(record.url))
        if receiver is None:
            receiver = self._receivers[key] = Receiver(key)
        receiver.waiting[record.job_id] = record
        heapq.heappush(receiver.due, (record.next_attempt_at, record.job_id))
        self._held[record.job_id] = key

    def _drop(self, job_id: int) -> None:
        key = self._held.pop(job_id, None)
        if key is not None:
            self._receivers[key].waiting.pop(job_id, None)  # its heap entry goes stale, skipped when met

    def _load_ready(self) -> None:
        with self.lock:
            ready, self._ready = self._ready, set()
        for job_id in ready:
            record = self.spool.outbox.read(job_id)
            if record is None:
                self._drop(job_id)
            elif record.state is not DeliveryState.PENDING:  # a crash between its rewrite and its move
                self.spool.outbox.retire(record)
                self._drop(job_id)
            elif not any(r.job_id == job_id for _h, r in self._running.values()):
                self._hold(record)

    def _start_due(self, now: float) -> None:
        """Start the attempts that are due, receiver by receiver, each within its own slots."""
        for receiver in list(self._receivers.values()):
            while receiver.due and receiver.due[0][0] <= now:
                if len(self._running) >= self.settings.deliveries_at_once:
                    return
                if not receiver.may_start(now, self.settings.per_receiver_at_once):
                    break
                due_at, job_id = heapq.heappop(receiver.due)
                record = receiver.waiting.get(job_id)
                if record is None or record.next_attempt_at != due_at:
                    continue  # delivered, given up, or rescheduled since: a stale entry
                self._start_if_finished(record, now)
            if not receiver.waiting and not receiver.in_flight and not receiver.failures:
                del self._receivers[receiver.key]

    def _start_if_finished(self, record: Notification, now: float) -> None:
        job_id = record.job_id
        folder = self.spool.jobs.folder_of(job_id)
        if folder not in FINISHED_FOLDERS:
            if folder is None and not self.spool.jobs.status_path(job_id).exists():  # purged meanwhile
                self.spool.outbox.path(job_id).unlink(missing_ok=True)
                self._drop(job_id)
            else:  # its final rename has not happened yet (a crash did that): look again later
                self._hold(replace(record, next_attempt_at=now + IDLE_LOOK_S))
            return
        self._drop(job_id)
        self._attempt(record)

    def _attempt(self, record: Notification) -> None:
        secret = self.secrets.get(record.owner)
        if secret is None:
            self._give_up(record, f"no webhook secret for {record.owner or 'jobs without a token'} "
                                  "(webhook_secrets_file)")
            return
        body = encode(record.body)
        timestamp = int(self.clock())
        headers = ["Content-Type: application/json", f"webhook-id: {record.webhook_id}",
                   f"webhook-timestamp: {timestamp}",
                   f"webhook-signature: {sign(secret, record.webhook_id, timestamp, body)}"]
        handle = self._idle.pop() if self._idle else Post(self.limits, self.policy, self.settings.max_answer_bytes)
        handle.begin_post(record.url, body, headers, context=record)
        self._running[id(handle.curl)] = (handle, record)
        self._receiver(record).in_flight += 1
        self._multi.add_handle(handle.curl)
        self._perform()

    def _perform(self) -> None:
        while self._multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        for curl, code, message in finished(self._multi):
            self._ended(curl, code, message)

    def _receiver(self, record: Notification) -> Receiver:
        receiver = self._receivers.get(key := receiver_of(record.url))
        if receiver is None:
            receiver = self._receivers[key] = Receiver(key)
        return receiver

    def _ended(self, curl, code: int, message: str) -> None:
        handle, record = self._running.pop(id(curl))
        self._multi.remove_handle(curl)
        failure = handle.answer(code, message)
        handle.release()
        self._idle.append(handle)
        record = replace(record, attempts=record.attempts + 1)
        self._count_attempt("ok" if failure is None else str(failure.kind))
        receiver = self._receiver(record)
        receiver.in_flight -= 1
        if failure is None:
            if receiver.failures:
                log.info("webhooks to %s: delivered again after %d failed attempt(s)", receiver.key, receiver.failures)
            receiver.failures, receiver.next_at = 0, 0.0
            self._delivered_now(record)
            return
        if failure.transient:
            self._receiver_failed(receiver, failure)
        self._failed(record, failure, receiver)

    def _receiver_failed(self, receiver: Receiver, failure: Failure) -> None:
        """A passing failure: the receiver is failing; its next attempt waits a backoff, and only one goes."""
        receiver.failures += 1
        delay = next_attempt_delay_s(receiver.failures, self.settings, failure.retry_after_s, random.uniform(*JITTER))
        receiver.next_at = max(receiver.next_at, self.clock() + delay)
        receiver.last_error = failure.reason
        if receiver.failures == 1:
            log.warning("webhooks to %s: %s; one attempt at a time until one gets through (%d waiting)",
                        receiver.key, failure.reason, len(receiver.waiting))
        for job_id, waiting in list(receiver.waiting.items()):  # those whose time will be over before it
            if receiver.next_at > waiting.created_at + self.settings.retry_for_s:
                self._drop(job_id)
                self._give_up(waiting, f"{failure.reason} (its receiver failing, still after "
                                       f"{self.settings.retry_for_s:g} s, {plural(waiting.attempts, 'attempt')})")

    def _delivered_now(self, record: Notification) -> None:
        now = self.clock()
        record = replace(record, state=DeliveryState.DELIVERED, delivered_at=round(now, 3), last_error=None)
        if self._rewrite(record, retire=True):
            log.info("job %d: webhook %s delivered to %s (attempt %d)", record.job_id, record.webhook_id,
                     record.url, record.attempts)
            with self._counts_lock:
                self._delivered += 1
                seconds = max(0.0, now - record.created_at)
                self._seconds[bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1
                self._seconds_sum += seconds

    def _failed(self, record: Notification, failure: Failure, receiver: Receiver) -> None:
        delay = next_attempt_delay_s(record.attempts, self.settings, failure.retry_after_s, random.uniform(*JITTER))
        next_at = max(self.clock() + delay, receiver.next_at)
        record = replace(record, last_error=failure.reason)
        if not failure.transient or next_at > record.created_at + self.settings.retry_for_s:
            why = "permanent" if not failure.transient else f"still failing after {self.settings.retry_for_s:g} s"
            self._give_up(record, f"{failure.reason} ({why}, {plural(record.attempts, 'attempt')})")
            return
        record = replace(record, next_attempt_at=round(next_at, 3))
        if self._rewrite(record, retire=False):
            self._hold(record)
            log.warning("job %d: webhook to %s: %s; attempt %d in %.1f s", record.job_id, record.url,
                        failure.reason, record.attempts + 1, next_at - self.clock())

    def _give_up(self, record: Notification, why: str) -> None:
        record = replace(record, state=DeliveryState.GAVE_UP, last_error=why)
        if self._rewrite(record, retire=True):
            log.error("job %d: webhook to %s given up: %s", record.job_id, record.url, why)
            with self._counts_lock:
                self._gave_up += 1

    def _rewrite(self, record: Notification, retire: bool) -> bool:
        """Write the record after an attempt, unless the supervisor wrote a new one for the job meanwhile (the
        job was requeued and finished again), which then wins. False when it did, or when the disk refused."""
        with self.lock:
            current = self.spool.outbox.read(record.job_id)
            if current is None:
                return False  # purged
            if (current.webhook_id, current.created_at) != (record.webhook_id, record.created_at):
                self._ready.add(record.job_id)  # the new one is read on the next turn
                return False
            try:
                if retire:
                    self.spool.outbox.retire(record)
                else:
                    self.spool.outbox.write(record)
            except OSError as exc:  # disk full: the record on disk still says pending; it is sent again
                log.error("job %d: cannot record the webhook's attempt: %s", record.job_id, exc)
                self._hold(replace(current, next_attempt_at=self.clock() + IDLE_LOOK_S))
                return False
        return True

    def _count_attempt(self, outcome: str) -> None:
        with self._counts_lock:
            self._attempts[outcome] = self._attempts.get(outcome, 0) + 1

