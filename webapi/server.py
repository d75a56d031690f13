"""gunicorn customisation: its own error answers in JSON, like every answer of the app.

gunicorn answers some requests before the app sees them (a malformed request line, raw non-ASCII bytes in
it, a request line over ``limit_request_line``, too many or too large headers) and writes those answers as
HTML from ``gunicorn.util.write_error``. ``JsonErrorThreadWorker`` keeps gunicorn's own decision (status
code, logging, access log) and changes only the bytes that go out: the worker hands gunicorn a socket
wrapper that turns the HTML error response into a small JSON one.
"""
from __future__ import annotations

import html
import json

from gunicorn.workers.gthread import ThreadWorker

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


class JsonErrorThreadWorker(ThreadWorker):
    """gunicorn's gthread worker whose own error answers (400, 414, 431, 500, ...) are JSON."""

    def handle_error(self, req, client, addr, exc):
        # handle_error writes only the error response to this socket (util.write_error -> sendall), once.
        super().handle_error(req, _JsonErrorSocket(client), addr, exc)
