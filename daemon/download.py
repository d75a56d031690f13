"""Downloading one image: bounded in time and size, every failure turned into a short reason."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import requests
import requests.adapters
import urllib3.exceptions

from daemon.measure import HEAD_BYTES, TAIL_BYTES, ImageBytes, ImageError
from daemon.netguard import AddressPolicy, ForbiddenAddress, GuardedAdapter

_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class DownloadLimits:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # longest silence between two reads
    total_timeout_s: float = 30.0  # a server trickling bytes is cut off here
    max_image_bytes: int = 50 * 1024 * 1024
    max_redirects: int = 3
    attempts: int = 3  # tries for transient failures; permanent ones are tried once
    backoff_s: float = 0.5  # wait before the 2nd try, doubled before each later one, with jitter


#: Longest wait between two tries, whatever Retry-After or the doubling say.
MAX_BACKOFF_S = 10.0


class DownloadError(ImageError):
    """A download that did not give a body. ``transient``: the same request may well work in a moment."""

    def __init__(self, reason: str, transient: bool, retry_after_s: float | None = None):
        super().__init__(reason)
        self.reason, self.transient, self.retry_after_s = reason, transient, retry_after_s


def _is_transient_status(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


def _retry_after_s(value: str | None) -> float | None:
    return float(value) if value and value.isdigit() else None  # the HTTP-date form is rare; not parsed


def fetch_with_retries(session: requests.Session, url: str, limits: DownloadLimits,
                       sleep=time.sleep) -> ImageBytes:
    """fetch(), tried again after a transient failure, up to limits.attempts times in all.

    The error says whether the last failure was transient or permanent and how many attempts were made,
    e.g. "HTTP 503 (transient, gave up after 3 attempts)" or "HTTP 404 (permanent, 1 attempt)".
    """
    for attempt in range(1, limits.attempts + 1):
        try:
            return fetch(session, url, limits)
        except DownloadError as exc:
            if not exc.transient:
                tries = "1 attempt" if attempt == 1 else f"after {attempt} attempts"
                raise ImageError(f"{exc.reason} (permanent, {tries})") from None
            if attempt == limits.attempts:
                raise ImageError(f"{exc.reason} (transient, gave up after {attempt} attempts)") from None
            wait = limits.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            sleep(min(max(wait, exc.retry_after_s or 0), MAX_BACKOFF_S))
    raise AssertionError("unreachable: attempts >= 1")


def make_session(pool_size: int, policy: AddressPolicy, max_redirects: int = 3) -> requests.Session:
    """One keep-alive session for all of a process's download threads; connections only where policy allows."""
    session = requests.Session()
    session.trust_env = False  # proxy variables and .netrc from the environment do not apply to downloads
    session.max_redirects = max_redirects
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": "retail-pulse/1"})
    adapter = GuardedAdapter(policy, pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch(session: requests.Session, url: str, limits: DownloadLimits) -> ImageBytes:
    """The body at ``url`` (its head and tail; see ImageBytes), one attempt. Raises DownloadError: HTTP
    status, timeout, size, connection. The whole body is read, whatever is kept of it."""
    deadline = time.monotonic() + limits.total_timeout_s
    try:
        with session.get(url, stream=True, allow_redirects=True,
                         timeout=(limits.connect_timeout_s, limits.read_timeout_s)) as resp:
            if resp.status_code != 200:
                raise DownloadError(f"HTTP {resp.status_code}", _is_transient_status(resp.status_code),
                                    _retry_after_s(resp.headers.get("Retry-After")))
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise DownloadError(f"too large: {declared} bytes (limit {limits.max_image_bytes})", False)
            head, tail, size = bytearray(), b"", 0
            while True:
                # read1 returns what has arrived instead of waiting for a full buffer, so the deadline
                # is checked at least once per read timeout even against a server that trickles.
                part = resp.raw.read1(_READ_SIZE, decode_content=False)
                if not part:
                    break
                size += len(part)
                if size > limits.max_image_bytes:
                    raise DownloadError(f"too large: over {limits.max_image_bytes} bytes", False)
                if time.monotonic() > deadline:
                    raise DownloadError(f"timed out: body not complete after {limits.total_timeout_s:g} s", True)
                if len(head) < HEAD_BYTES:
                    head += part[:HEAD_BYTES - len(head)]
                tail = (tail + part)[-TAIL_BYTES:]
            return ImageBytes(bytes(head), tail, size)
    except requests.exceptions.ConnectTimeout:
        raise DownloadError(f"timed out: no connection within {limits.connect_timeout_s:g} s", True) from None
    except (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError):
        raise DownloadError(f"timed out: no data for {limits.read_timeout_s:g} s", True) from None
    except requests.exceptions.TooManyRedirects:
        raise DownloadError(f"too many redirects (more than {limits.max_redirects})", False) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema) as exc:  # a redirect to file:// or garbage
        raise DownloadError(f"invalid URL: {str(exc)[:200]}", False) from None
    except requests.exceptions.ConnectionError as exc:  # refused, reset, DNS: the network may come back
        forbidden = _find_cause(exc, ForbiddenAddress)
        if forbidden is not None:
            raise DownloadError(str(forbidden).split(": ", 1)[-1], False) from None
        raise DownloadError(f"connection failed: {_root_cause(exc)}", True) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise DownloadError(f"download failed: {_root_cause(exc)}", True) from None


def _causes(exc: BaseException):
    """exc and the errors it wraps, outermost first (requests and urllib3 nest them in .reason, args, __cause__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc.__cause__
        exc = inner


def _find_cause(exc: BaseException, kind: type) -> BaseException | None:
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)


def _root_cause(exc: BaseException) -> str:
    """The innermost error requests and urllib3 wrapped, e.g. "ConnectionRefusedError: [Errno 111] ..."."""
    *_, innermost = _causes(exc)
    return f"{type(innermost).__name__}: {innermost}"[:200]
