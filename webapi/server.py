"""gunicorn customisation: its own error answers in JSON, like every answer of the app; and no stop signal
lost by an API process that is starting.

gunicorn answers some requests before the app sees them (a malformed request line, raw non-ASCII bytes in
it, a request line over ``limit_request_line``, too many or too large headers) and writes those answers as
HTML from ``gunicorn.util.write_error``. ``JsonErrorThreadWorker`` keeps gunicorn's own decision (status
code, logging, access log) and changes only the bytes that go out: the worker hands gunicorn a socket
wrapper that turns the HTML error response into a small JSON one.

Stopping: gunicorn's master tells each API process to stop once (SIGQUIT, or SIGTERM), and a Ctrl-C reaches
them all. An API process forked a moment before (the master starts them one by one at start-up) still runs
the master's handlers until it installs its own, and those only queue the signal in its copy of the master:
lost, so the process served on until gunicorn killed it at graceful_timeout (30 s; "was sent SIGKILL!
Perhaps out of memory?"). ``Arbiter`` forks with the stop signals blocked, so they wait in the new process,
and the worker unblocks them once its own handlers are in place: then they arrive, and it stops.
"""
from __future__ import annotations

import html
import json
import signal

from gunicorn.arbiter import Arbiter as GunicornArbiter
from gunicorn.workers.gthread import ThreadWorker

#: What stops an API process (gunicorn's worker: QUIT and INT at once, TERM gracefully).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGTERM})

#: What a client reads for each status gunicorn answers by itself (gunicorn's detail is appended for 400).
_ERRORS = {400: "bad request", 403: "forbidden", 414: "request line too long",
           417: "expectation failed", 431: "request headers too large or too many",
           500: "internal error", 501: "not implemented"}
#: gunicorn's detail can quote the client's bytes back; keep only a bounded piece of it.
_DETAIL_CHARS = 200


def json_error_response(raw: bytes) -> bytes:
    """The HTTP response gunicorn wrote (``HTTP/1.1 414 URI Too Long ... <html>...``), as JSON."""
    head, _, html_body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 500
    reason = parts[2] if len(parts) > 2 else "Error"
    message = _ERRORS.get(status, reason.lower())
    if status == 400:
        # the text between </p></h1> and </body>: gunicorn's explanation, e.g. "Invalid HTTP Version ..."
        detail = html.unescape(html_body.decode("latin-1").split("</h1>", 1)[-1].split("</body>", 1)[0]).strip()
        if detail:
            message = f"{message}: {detail[:_DETAIL_CHARS]}"
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


class _JsonErrorSocket:
    """The client socket, except that what gunicorn's error path sends is rewritten as JSON."""

    def __init__(self, sock):
        self._sock = sock

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(json_error_response(data))

    def __getattr__(self, name):
        return getattr(self._sock, name)


class Arbiter(GunicornArbiter):
    """gunicorn's master, whose API processes are born with the stop signals blocked (the module's docstring)."""

    def spawn_worker(self):
        before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().spawn_worker()  # in the new process, it never returns (it exits)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class JsonErrorThreadWorker(ThreadWorker):
    """gunicorn's gthread worker whose own error answers (400, 414, 431, 500, ...) are JSON, and which takes
    the stop signals only once its own handlers are in place (Arbiter)."""

    def init_signals(self):
        super().init_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that came meanwhile arrives now

    def handle_error(self, req, client, addr, exc):
        # handle_error writes only the error response to this socket (util.write_error -> sendall), once.
        super().handle_error(req, _JsonErrorSocket(client), addr, exc)
