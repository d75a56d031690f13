"""gunicorn customisation: its own error answers in JSON, like every answer of the app; no stop signal lost by
an API process that is starting; and status requests that wait parked in the worker's event loop, holding
no thread (webapi/waits.py says what waiting means).

gunicorn answers some requests before the app sees them (a malformed request line, raw non-ASCII bytes in
it, a request line over ``limit_request_line``, too many or too large headers) and writes those answers as
HTML from ``gunicorn.util.write_error``. ``JsonErrorThreadWorker`` keeps gunicorn's own decision (status
code, logging, access log) and changes only the bytes that go out: the worker hands gunicorn a socket
wrapper that turns the HTML error response into a small JSON one.

Parking (``ApiWorker``): gunicorn's gthread worker reads a request on one of its threads and answers it there.
A ``GET /api/status`` with ``Prefer: wait=S`` whose answer is not ready (the app's ``park``) is not answered:
the thread hands the connection back to the worker's main loop with what it waits for, and is free at once.
The loop keeps it (its socket watched, so a client that hangs up is closed) until spool/watch.py reports its
job's status file, outbox or sent record rewritten, or its time is up; then a thread answers it by the usual
route. The worker uses gunicorn's own hooks for this (a request's result, finish_request, its method queue
for calls from other threads), so gunicorn's keep-alive, limits and graceful stop apply as to any request;
a stopping worker answers its parked requests at once.

Stopping: gunicorn's master tells each API process to stop once (SIGQUIT, or SIGTERM), and a Ctrl-C reaches
them all. An API process forked a moment before (the master starts them one by one at start-up) still runs
the master's handlers until it installs its own, and those only queue the signal in its copy of the master:
lost, so the process served on until gunicorn killed it at graceful_timeout (30 s; "was sent SIGKILL!
Perhaps out of memory?"). ``Arbiter`` forks with the stop signals blocked, so they wait in the new process,
and the worker unblocks them once its own handlers are in place: then they arrive, and it stops.
"""
from __future__ import annotations

import heapq
import html
import json
import selectors
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gunicorn.arbiter import Arbiter as GunicornArbiter
from gunicorn.http import wsgi
from gunicorn.workers.gthread import ThreadWorker

from spool import Folder
from spool.watch import Watch
from webapi.waits import MAX_PARKED_SHARE, RESUMED, Park

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
        self._quitting = False
        super().init_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that came meanwhile arrives now

    def handle_quit(self, sig, frame):
        """Quit at once (SIGQUIT, SIGINT), taking no lock. gthread's handle_quit shuts its thread pool down,
        under the pool's lock: a stop signal that came while the main loop held that lock (submitting a
        request to the pool), or while a first stop signal's handler did (Ctrl-C and the master's SIGQUIT
        come together), waited for ever, until gunicorn's SIGKILL at graceful_timeout. sys.exit unwinds
        whatever held the lock; at exit, Python ends the pool's threads as shutdown() would have."""
        if self._quitting:
            return  # the first call is on its way out
        self._quitting = True
        self.alive = False
        self.cfg.worker_int(self)
        sys.exit(0)

    def handle_error(self, req, client, addr, exc):
        # handle_error writes only the error response to this socket (util.write_error -> sendall), once.
        super().handle_error(req, _JsonErrorSocket(client), addr, exc)


@dataclass
class _Parked:
    """A request read but not yet answered: what it waits for."""

    req: object
    park: Park


class ApiWorker(JsonErrorThreadWorker):
    """The JSON-error worker, which also parks status requests that wait (see the module docstring)."""

    def run(self):
        park = self.wsgi.config.get("retailpulse.park") if hasattr(self.wsgi, "config") else None
        self._app_park = park
        self._parked: dict[int, tuple[object, _Parked]] = {}  # id(conn) -> (conn, what it waits for)
        self._by_job: dict[int, set[int]] = {}  # job id -> ids of the connections waiting on it
        self._max_parked = int(self.cfg.worker_connections * MAX_PARKED_SHARE)
        self._deadlines = _Deadlines(lambda key: self.method_queue.defer(self._resume, key))
        root = Path(self.wsgi.config["retailpulse.spool_root"]) if park else None
        self._watch = Watch([root / Folder.STATUS, root / Folder.OUTBOX, root / Folder.SENT],
                            lambda changes: self.method_queue.defer(self._changed, changes)) if park else None
        try:
            super().run()
        finally:
            self._deadlines.close()
            if self._watch is not None:
                self._watch.close()

    # ---------------------------------------------------------------- on a thread of the pool
    def handle_request(self, req, conn):
        """Park a status request that is to wait (the app says so: its ``park``); answer anything else."""
        if self._app_park is not None and not RESUMED.get() and self.alive and self._watch.available:
            _resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
            park = self._app_park(environ)
            if park is not None:
                return _Parked(req, park)
        return super().handle_request(req, conn)

    def _keepalive_after(self, conn, keepalive):
        return keepalive if isinstance(keepalive, _Parked) else super()._keepalive_after(conn, keepalive)

    def _answer(self, conn, parked: _Parked):
        """A parked request, woken: park it again if it is still to wait, else answer it (as it stands)."""
        conn.sock.setblocking(True)
        if not parked.park.expired() and self.alive:
            _resp, environ = wsgi.create(parked.req, conn.sock, conn.client, conn.server, self.cfg)
            again = self._app_park(environ)
            if again is not None:
                return _Parked(parked.req, Park(again.job_id, parked.park.deadline, parked.park.etag,
                                                parked.park.until_finished))
        token = RESUMED.set(True)
        try:
            return self._keepalive_after(conn, self.handle_request(parked.req, conn))
        except Exception as exc:  # as handle() does: the error answer, then the connection is closed
            self.handle_error(parked.req, conn.sock, conn.client, exc)
            return False
        finally:
            RESUMED.reset(token)

    # ---------------------------------------------------------------- on the worker's main loop
    def finish_request(self, conn, fs):
        result = fs.result() if not fs.cancelled() else False
        if isinstance(result, _Parked):
            self._park(conn, result)
            return
        super().finish_request(conn, fs)

    def _park(self, conn, parked: _Parked) -> None:
        if not self.alive or len(self._parked) >= self._max_parked:  # stopping, or enough waiting: answer now
            self._submit_answer(conn, _Parked(parked.req, Park(parked.park.job_id, 0.0, parked.park.etag,
                                                               parked.park.until_finished)))
            return
        key = id(conn)
        self._parked[key] = (conn, parked)
        self._by_job.setdefault(parked.park.job_id, set()).add(key)
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._parked_readable, key))
        self._deadlines.add(parked.park.deadline, key)

    def _unpark(self, key: int):
        conn, parked = self._parked.pop(key)
        waiting = self._by_job.get(parked.park.job_id)
        if waiting is not None:
            waiting.discard(key)
            if not waiting:
                del self._by_job[parked.park.job_id]
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        return conn, parked

    def _resume(self, key: int) -> None:
        """Its job's status changed, or its time is up: answer it on a thread (which may park it again)."""
        if key in self._parked:
            self._submit_answer(*self._unpark(key))

    def _submit_answer(self, conn, parked: _Parked) -> None:
        fs = self.tpool.submit(self._answer, conn, parked)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _changed(self, changes: list[tuple[Path, str]]) -> None:
        for _folder, name in changes:
            stem, _, ext = name.partition(".")
            if ext == "json" and stem.isdigit():
                for key in list(self._by_job.get(int(stem), ())):
                    self._resume(key)

    def _parked_readable(self, key: int, _sock) -> None:
        """A parked client sent more or hung up: it no longer waits for this answer; close the connection."""
        if key in self._parked:
            conn, _ = self._unpark(key)
            self.nr_conns -= 1
            conn.close()

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        self.method_queue.defer(self._resume_all)

    def _resume_all(self) -> None:
        for key in list(self._parked):
            self._resume(key)


class _Deadlines:
    """When each parked request's wait is up: one thread, a heap; ``due(key)`` is called at its time."""

    def __init__(self, due):
        self._due, self._heap = due, []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="wait-deadlines", daemon=True)
        self._thread.start()

    def add(self, deadline: float, key: int) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, key))
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    self._due(heapq.heappop(self._heap)[1])
                self._cond.wait(self._heap[0][0] - now if self._heap else None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5)
