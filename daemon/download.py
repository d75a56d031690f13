"""Downloading one image: bounded in time and size, every failure turned into a short reason."""
from __future__ import annotations

import time
from dataclasses import dataclass

import requests
import requests.adapters
import urllib3.exceptions

from daemon.measure import ImageError

_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class DownloadLimits:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # longest silence between two reads
    total_timeout_s: float = 30.0  # a server trickling bytes is cut off here
    max_image_bytes: int = 50 * 1024 * 1024


def make_session(pool_size: int) -> requests.Session:
    """One keep-alive session for all of a process's download threads."""
    session = requests.Session()
    session.trust_env = False  # proxy variables and .netrc from the environment do not apply to downloads
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": "retail-pulse/1"})
    adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch(session: requests.Session, url: str, limits: DownloadLimits) -> bytes:
    """The body at ``url``. Raises ImageError with the reason: HTTP status, timeout, size, connection."""
    deadline = time.monotonic() + limits.total_timeout_s
    try:
        with session.get(url, stream=True, allow_redirects=True,
                         timeout=(limits.connect_timeout_s, limits.read_timeout_s)) as resp:
            if resp.status_code != 200:
                raise ImageError(f"HTTP {resp.status_code}")
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise ImageError(f"too large: {declared} bytes (limit {limits.max_image_bytes})")
            parts, size = [], 0
            while True:
                # read1 returns what has arrived instead of waiting for a full buffer, so the deadline
                # is checked at least once per read timeout even against a server that trickles.
                part = resp.raw.read1(_READ_SIZE, decode_content=False)
                if not part:
                    break
                size += len(part)
                if size > limits.max_image_bytes:
                    raise ImageError(f"too large: over {limits.max_image_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageError(f"timed out: body not complete after {limits.total_timeout_s:g} s")
                parts.append(part)
            return b"".join(parts)
    except requests.exceptions.ConnectTimeout:
        raise ImageError(f"timed out: no connection within {limits.connect_timeout_s:g} s") from None
    except (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError):
        raise ImageError(f"timed out: no data for {limits.read_timeout_s:g} s") from None
    except requests.exceptions.TooManyRedirects:
        raise ImageError("too many redirects") from None
    except requests.exceptions.InvalidURL as exc:
        raise ImageError(f"invalid URL: {exc}") from None
    except requests.exceptions.ConnectionError as exc:
        raise ImageError(f"connection failed: {_root_cause(exc)}") from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ImageError(f"download failed: {_root_cause(exc)}") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost error requests and urllib3 wrapped, e.g. "ConnectionRefusedError: [Errno 111] ..."."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc.__cause__
        if inner is None or id(inner) in seen:
            return f"{type(exc).__name__}: {exc}"[:200]
        seen.add(id(inner))
        exc = inner
