"""One image's download on libcurl: the options that carry every download rule, what is kept of the body,
and the translation of libcurl's outcome into our wording and kinds. No event loop here (loop.py).

Each rule and the libcurl option that enforces it:
    connect within connect_timeout_s             CONNECTTIMEOUT_MS
    no silence (under 1 byte/s, averaged by      LOW_SPEED_LIMIT 1 byte/s over LOW_SPEED_TIME
      libcurl) longer than read_timeout_s
    the whole attempt (connect, headers, body)   TIMEOUT_MS  (a server sending its headers a byte at a time
      within total_timeout_s                                  is cut off too)
    at most max_image_bytes                      MAXFILESIZE (a declared length) and the write callback (the
                                                 bytes that really come)
    http and https only, redirects too           PROTOCOLS, REDIR_PROTOCOLS
    at most max_redirects redirects              FOLLOWLOCATION, MAXREDIRS
    no proxy, no .netrc, no decompression        PROXY "", NOPROXY "*", NETRC_IGNORED, HTTP_CONTENT_DECODING 0
    public addresses only, on the address        OPENSOCKETFUNCTION: called for every new connection, each
      actually connected to                      redirect hop included, with the resolved address

Post is the same handle for the daemon's other outbound calls (completion webhooks): every rule above, plus
no redirects at all (a 3xx is an answer, not a hop) and a small cap on the answer, of which only the status
code matters.
"""
from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pycurl

from daemon.engine.measure import BodyReader
from daemon.engine.netguard import AddressPolicy
from daemon.engine.outcome import ErrorKind
from daemon.engine.settings import DownloadLimits
from daemon.engine.urls import ascii_url

try:
    import certifi
    CA_BUNDLE: str | None = certifi.where()
except ImportError:  # libcurl's own default then
    CA_BUNDLE = None

#: libcurl error codes we word ourselves (curl/curl.h).
_UNSUPPORTED_PROTOCOL, _URL_MALFORMAT, _COULDNT_RESOLVE_HOST, _COULDNT_CONNECT = 1, 3, 6, 7
_PARTIAL_FILE, _WRITE_ERROR, _OPERATION_TIMEDOUT, _TOO_MANY_REDIRECTS = 18, 23, 28, 47
_FILESIZE_EXCEEDED = 63
#: TLS: handshake, certificate, key and CA problems. Permanent: trying again gives the same answer.
_TLS_ERRORS = {35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98}


@dataclass(frozen=True)
class Failure:
    """Why one attempt gave no image body. ``transient``: the same request may work in a moment."""

    reason: str
    kind: ErrorKind
    transient: bool
    retry_after_s: float | None = None
    #: The whole attempt ran out of time while bytes were arriving: the path is slow or shared by too many
    #: transfers (the engine's concurrency adapts to it), or the server trickles.
    slow: bool = False


@dataclass
class Attempt:
    """What one attempt collects while it runs, fed by libcurl's callbacks."""

    limits: DownloadLimits
    body: BodyReader = field(init=False)  # the body as it arrives: keeps only what says its size and where it ends
    too_large: bool = False
    refused: list[str] = field(default_factory=list)  # addresses the policy refused, with why
    retry_after: str | None = None
    declared_bytes: int | None = None  # the last response's Content-Length

    def __post_init__(self):
        self.body = BodyReader(self.limits.image_formats, self.limits.max_header_bytes)

    @property
    def size(self) -> int:
        return self.body.size


class Transfer:
    """A reusable easy handle and the attempt it is running. Callbacks are bound once, when it is made."""

    def __init__(self, limits: DownloadLimits, policy: AddressPolicy):
        self.limits, self.policy = limits, policy
        self.attempt = Attempt(limits)
        self.image = None  # the engine's bookkeeping for the image being downloaded
        curl = self.curl = pycurl.Curl()
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, int(limits.connect_timeout_s * 1000))
        curl.setopt(pycurl.TIMEOUT_MS, int(limits.total_timeout_s * 1000))
        curl.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        curl.setopt(pycurl.LOW_SPEED_TIME, max(1, round(limits.read_timeout_s)))
        curl.setopt(pycurl.MAXFILESIZE, limits.max_image_bytes)
        curl.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        curl.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        curl.setopt(pycurl.FOLLOWLOCATION, 1)
        curl.setopt(pycurl.MAXREDIRS, limits.max_redirects)
        curl.setopt(pycurl.PROXY, "")
        curl.setopt(pycurl.NOPROXY, "*")
        curl.setopt(pycurl.NETRC, pycurl.NETRC_IGNORED)
        curl.setopt(pycurl.HTTP_CONTENT_DECODING, 0)
        curl.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity"])
        curl.setopt(pycurl.USERAGENT, "retail-pulse/1")
        if CA_BUNDLE:
            curl.setopt(pycurl.CAINFO, CA_BUNDLE)
        curl.setopt(pycurl.WRITEFUNCTION, self._write)
        curl.setopt(pycurl.HEADERFUNCTION, self._header)
        curl.setopt(pycurl.OPENSOCKETFUNCTION, self._open_socket)

    def begin(self, url: str, image) -> None:
        """Point the handle at ``url`` for a new attempt; the engine then adds it to its multi handle.

        libcurl takes ASCII only: the URL goes in the form a browser sends (urls.py). Raises ValueError
        when it has none; the engine fails that image alone."""
        self.attempt, self.image = Attempt(self.limits), image
        self.curl.setopt(pycurl.URL, ascii_url(url))

    def release(self) -> None:
        """Forget the finished attempt (the engine has taken what it needs), so an idle handle holds no body."""
        self.attempt, self.image = Attempt(self.limits), None

    # ------------------------------------------------------------ callbacks
    def _write(self, data: bytes) -> int | None:
        attempt = self.attempt
        if attempt.body.size + len(data) > self.limits.max_image_bytes:
            attempt.too_large = True
            return 0  # libcurl stops the transfer: CURLE_WRITE_ERROR
        attempt.body.feed(data)
        if attempt.body.failed:  # the header said enough (no image, too many pixels): no more bytes
            return 0
        return None

    def _header(self, line: bytes) -> None:
        if line.startswith(b"HTTP/"):  # a new response (after a redirect): forget the last one's headers
            self.attempt.retry_after = self.attempt.declared_bytes = None
        elif line[:12].lower() == b"retry-after:":
            self.attempt.retry_after = line[12:].strip().decode("latin-1")
        elif line[:15].lower() == b"content-length:":
            value = line[15:].strip()
            self.attempt.declared_bytes = int(value) if value.isdigit() and len(value) < 20 else None

    def _open_socket(self, purpose, address) -> socket.socket | int:
        """Every new connection, redirect hops included, after name resolution: the address it would go to."""
        ip = address.addr[0]
        reason = self.policy.refuses(ip)
        if reason is not None:
            self.attempt.refused.append(f"{ip} is {reason}")
            return pycurl.SOCKET_BAD
        return socket.socket(address.family, address.socktype, address.protocol)

    # ------------------------------------------------------------- outcome
    def failure(self, code: int, message: str) -> Failure | None:
        """None if the attempt gave a body to measure (HTTP 200), else why not."""
        limits, attempt = self.limits, self.attempt
        if code == _WRITE_ERROR and not attempt.too_large and attempt.body.failed:
            code = 0  # we stopped it, having the verdict: the answer's status decides, then the body's verdict
        if code == 0:
            status = self.curl.getinfo(pycurl.RESPONSE_CODE)
            if status == 200:
                return None
            transient = status == 429 or 500 <= status <= 599
            kind = (ErrorKind.HTTP_4XX if 400 <= status <= 499 else
                    ErrorKind.HTTP_5XX if 500 <= status <= 599 else ErrorKind.HTTP_OTHER)
            return Failure(f"HTTP {status}", kind, transient, _retry_after_s(attempt.retry_after))
        if attempt.refused and code == _COULDNT_CONNECT:
            return Failure("address not allowed: " + "; ".join(dict.fromkeys(attempt.refused)), ErrorKind.ADDRESS,
                           False)
        if code == _FILESIZE_EXCEEDED and (attempt.declared_bytes or 0) > limits.max_image_bytes:
            return Failure(f"too large: {attempt.declared_bytes} bytes (limit {limits.max_image_bytes})",
                           ErrorKind.TOO_LARGE, False)
        if code == _FILESIZE_EXCEEDED or (code == _WRITE_ERROR and attempt.too_large):
            return Failure(f"too large: over {limits.max_image_bytes} bytes", ErrorKind.TOO_LARGE, False)
        if code == _OPERATION_TIMEDOUT:
            reason = self._timeout_reason(message)
            return Failure(reason, ErrorKind.TIMEOUT, True, slow=attempt.size > 0 and "not complete" in reason)
        if code == _TOO_MANY_REDIRECTS:
            return Failure(f"too many redirects (more than {limits.max_redirects})", ErrorKind.REDIRECTS, False)
        if code in (_UNSUPPORTED_PROTOCOL, _URL_MALFORMAT):
            return Failure(f"invalid URL: {message[:200]}", ErrorKind.INVALID_URL, False)
        if code in _TLS_ERRORS:
            return Failure(f"TLS error: {message[:200]}", ErrorKind.TLS, False)
        if code in (_COULDNT_RESOLVE_HOST, _COULDNT_CONNECT):
            return Failure(f"connection failed: {message[:200]}", ErrorKind.CONNECTION, True)
        if code == _PARTIAL_FILE:  # fewer bytes than Content-Length said, or a chunked body without its last
            # chunk: cut off (another try may get it whole), or a server that lies. Never measured.
            return Failure(f"truncated download: {message[:200]}", ErrorKind.TRUNCATED, True)
        return Failure(f"download failed: {message[:200]}", ErrorKind.CONNECTION, True)

    def _timeout_reason(self, message: str) -> str:
        limits = self.limits
        if "too slow" in message.lower():  # libcurl's low-speed rule, which a trickle breaks as surely as silence
            return f"timed out: under 1 byte/s for {max(1, round(limits.read_timeout_s)):g} s"
        connected = self.curl.getinfo(pycurl.CONNECT_TIME) > 0
        if not connected and self.curl.getinfo(pycurl.TOTAL_TIME) < limits.total_timeout_s:
            return f"timed out: no connection within {limits.connect_timeout_s:g} s"
        return f"timed out: not complete within {limits.total_timeout_s:g} s"

    def close(self) -> None:
        self.curl.close()


def finished(multi: pycurl.CurlMulti) -> Iterator[tuple[pycurl.Curl, int, str]]:
    """Every transfer the multi handle has finished since the last look: (handle, libcurl code, message),
    code 0 when it succeeded. The engine's loop and the webhook thread both read their multi handle so."""
    while True:
        queued, succeeded, failed = multi.info_read()
        for curl in succeeded:
            yield curl, 0, ""
        yield from failed
        if not queued:
            return


def _retry_after_s(value: str | None) -> float | None:
    return float(value) if value and value.isdigit() else None  # the HTTP-date form is rare; not parsed


class Post(Transfer):
    """An outbound POST under every download rule: timeouts, public addresses only on the address connected to,
    no proxy or .netrc; no redirects; at most ``max_answer_bytes`` of the answer read. Reusable, like Transfer."""

    def __init__(self, limits: DownloadLimits, policy: AddressPolicy, max_answer_bytes: int):
        super().__init__(replace(limits, max_image_bytes=max_answer_bytes, max_redirects=0), policy)
        self.curl.setopt(pycurl.FOLLOWLOCATION, 0)
        self.status: int | None = None  # of the answer's status line, once read
        self.delivered = False  # a 2xx status line and its headers came: the receiver took it

    def _write(self, data: bytes) -> int | None:
        """The answer's body is only counted (at most max_answer_bytes), never parsed: its status said it all."""
        attempt = self.attempt
        if attempt.body.size + len(data) > self.limits.max_image_bytes:
            attempt.too_large = True
            return 0
        attempt.body.size += len(data)
        return None

    def _header(self, line: bytes) -> int | None:
        """A 2xx status line, once its headers end, is a delivery: the attempt stops there, so a receiver that
        then trickles its body (or never sends one) is not counted a timeout and sent it again."""
        super()._header(line)
        if line.startswith(b"HTTP/"):
            code = line.split(b" ", 2)[1:2]
            self.status = int(code[0]) if code and code[0].isdigit() else None
        elif line in (b"\r\n", b"\n") and self.status is not None and 200 <= self.status <= 299:
            self.delivered = True
            return 0  # libcurl stops the transfer (CURLE_WRITE_ERROR); answer() knows why
        return None

    def begin_post(self, url: str, body: bytes, headers: list[str], context=None) -> None:
        """``headers``: "Name: value" lines. ``context`` is kept as ``image`` is, for the caller's bookkeeping."""
        self.begin(url, context)
        self.status, self.delivered = None, False
        self.curl.setopt(pycurl.POSTFIELDS, body)
        # "Expect:" off: libcurl would otherwise wait for a "100 Continue" before sending a body over 1 KiB
        self.curl.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity", "Expect:", *headers])

    def answer(self, code: int, message: str) -> Failure | None:
        """None if the receiver took it (2xx: the answer's body, cut at our cap or not, does not matter)."""
        if self.delivered:
            return None
        status = self.curl.getinfo(pycurl.RESPONSE_CODE)
        if 200 <= status <= 299 and (code == 0 or self.attempt.too_large or code == _FILESIZE_EXCEEDED):
            return None
        if code == 0 and 300 <= status <= 399:
            return Failure(f"HTTP {status}: redirects are not followed", ErrorKind.REDIRECTS, False)
        return self.failure(code, message)
