"""Fixtures: a spool per test, real images, a port-0 image server, the WSGI app in-process, real processes."""
from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import os
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from PIL import Image

from spool import Spool
from tests import openapi_check

from tests.service import REAL_STORE_MASTER, REPO, SAMPLE_STORE_MASTER, Service  # noqa: F401 (re-exported)


def visit(store_id: str, urls: list[str], visit_time: str = "2026-11-23T10:00:00") -> dict:
    """One store visit as clients submit it."""
    return {"store_id": store_id, "visit_time": visit_time, "image_url": urls}


def wait_until(predicate, timeout_s: float = 30, what: str = "condition", interval_s: float = 0.02):
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout_s``. Returns its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def image_bytes(fmt: str, width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(autouse=True)
def no_machine_config(monkeypatch):
    """Settings come from the tests only, never from a /etc/retail-pulse/retail-pulse.ini on this machine."""
    monkeypatch.setenv("RETAILPULSE_CONFIG", os.devnull)


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool").create()


# ------------------------------------------------------------------ syscalls, in the order they happen
@pytest.fixture
def syscalls(monkeypatch):
    """Record fsync (of which file or folder) and rename calls, in order, as they really happen."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


# ------------------------------------------------------------------ WSGI in-process
class WsgiResponse:
    def __init__(self, status: str, headers: list, body: bytes):
        self.status_code = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        return json.loads(self.body)


def call_wsgi(app, method: str, path: str, body: bytes | None = None, query: str = "",
              extra: dict | None = None) -> WsgiResponse:
    """One request through the app, the way a WSGI server would make it. ``extra``: more environ (headers)."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, **(extra or {})}
    if body is not None:
        environ.update({"CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
                        "wsgi.input": io.BytesIO(body)})
    setup_testing_defaults(environ)
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, headers

    chunks = app(environ, start_response)
    try:
        data = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    response = WsgiResponse(captured["status"], captured["headers"], data)
    openapi_check.check(method, path, response.status_code, response.headers.get("content-type", ""), data)
    return response


# ------------------------------------------------------------------ image server
class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; counts GETs per path; runs the server's ``hooks[path](handler)`` instead, if any."""

    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path] += 1
        hook = self.server.hooks.get(self.path)
        if hook is not None:
            return hook(self)
        return super().do_GET()

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # the engine opens hundreds of connections at once; 5 would drop most SYNs


class ImageServer:
    """Real image files over HTTP on 127.0.0.1, port 0. Unpacks as (base_url, folder) for brevity."""

    def __init__(self, folder: Path, host: str = "127.0.0.1"):
        self.folder = folder
        handler = functools.partial(_CountingHandler, directory=str(folder))
        self.httpd = _Server((host, 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.hits, self.httpd.lock, self.httpd.hooks = collections.Counter(), threading.Lock(), {}
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __iter__(self):
        return iter((self.base, self.folder))

    @property
    def hits(self) -> collections.Counter:
        """GET requests seen, by path (with query)."""
        with self.httpd.lock:
            return collections.Counter(self.httpd.hits)

    def on(self, path: str, hook) -> None:
        self.httpd.hooks[path] = hook

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    server = ImageServer(folder)
    yield server
    server.close()


@pytest.fixture
def start_service(tmp_path):
    """Start the real API and daemon; tests pass daemon options. Short simulated GPU work unless told."""
    started = []

    def start(*daemon_args: str, api_args: tuple[str, ...] = ()) -> Service:
        args = ["--gpu-sleep-min-s", "0.01", "--gpu-sleep-max-s", "0.02", "--processes", "2",
                "--allow-private-addresses", "true", *daemon_args]  # the image server is on 127.0.0.1
        service = Service(tmp_path / "spool", args, api_args)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


# ------------------------------------------------------------------ processes, as /proc shows them
def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def pool_worker_pids(daemon_pid: int) -> list[int]:
    """The daemon's pool processes: its children started by multiprocessing's spawn (not its resource tracker)."""
    pids = []
    for pid in children(daemon_pid):
        try:
            if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def pid_of_peer(local_port: int) -> int | None:
    """The pid of the process on this machine whose TCP socket has local port ``local_port`` (IPv4)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == local_port:
            inode = fields[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == target:
                    return int(entry.name)
        except OSError:
            continue
    return None
