"""A webhook receiver on 127.0.0.1 (port 0) for the tests and bench/webhook_latency.py: it verifies every
request it gets with the Standard Webhooks reference library (``standardwebhooks``), as a client would, and
answers from a script: ``[500, 500]`` answers 500 twice, then 200; ``HANG`` holds the request without an
answer until the receiver closes; ``TRICKLE`` answers 200 and its headers at once, then a body of a byte
every 1.5 s that never ends."""
from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field

from standardwebhooks import Webhook, WebhookVerificationError

HANG = "hang"
TRICKLE = "trickle"


@dataclass
class Received:
    at: float  # time.time() when the request was read
    headers: dict[str, str]
    body: bytes
    verified: object  # the JSON document if the signature checked out, else the verification error
    answered: int | None = None  # the status sent back; None while held
    answered_at: float | None = None


@dataclass
class _State:
    webhook: Webhook
    script: list = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        state: _State = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            verified = state.webhook.verify(body, headers)
        except WebhookVerificationError as exc:
            verified = exc
        request = Received(time.time(), headers, body, verified)
        with state.lock:
            answer = state.script.pop(0) if state.script else 200
            state.received.append(request)
        if answer == HANG:
            state.closing.wait()
            return
        if answer == TRICKLE:
            self.send_response(200)
            self.send_header("Content-Length", "1000")  # under the 64 KiB read of an answer
            self.end_headers()
            self.wfile.flush()
            request.answered, request.answered_at = 200, time.time()
            while not state.closing.wait(1.5):  # under a byte a second: a download would be timed out
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:  # the client has gone
                    return
            return
        self.send_response(answer)
        self.send_header("Content-Length", "0")
        self.end_headers()
        request.answered, request.answered_at = answer, time.time()

    def log_message(self, *args):
        pass


class Receiver:
    def __init__(self, secret: str, script: list = (), host: str = "127.0.0.1"):
        self.httpd = http.server.ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = _State(Webhook(secret), list(script))
        self.url = f"http://{host}:{self.httpd.server_address[1]}/hooks/retail-pulse"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def received(self) -> list[Received]:
        with self.httpd.state.lock:
            return list(self.httpd.state.received)

    def close(self) -> None:
        self.httpd.state.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
