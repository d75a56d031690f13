"""Fixtures: a spool per test, real images, a port-0 image server, the WSGI app in-process, real processes."""
from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
import requests
from PIL import Image

from spool import Spool, Status
from tests import openapi_check

REPO = Path(__file__).resolve().parent.parent
SAMPLE_STORE_MASTER = REPO / "data" / "stores.csv"
REAL_STORE_MASTER = REPO.parent / "shared" / "data" / "StoreMasterAssignment.csv"


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


class ImageServer:
    """Real image files over HTTP on 127.0.0.1, port 0. Unpacks as (base_url, folder) for brevity."""

    def __init__(self, folder: Path, host: str = "127.0.0.1"):
        self.folder = folder
        handler = functools.partial(_CountingHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer((host, 0), handler)
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


# ------------------------------------------------------------------ real processes
class Service:
    """The API and the daemon as two real processes on one spool."""

    def __init__(self, spool_dir: Path, daemon_args: list[str], api_args: list[str] = ()):
        self.spool = Spool(spool_dir)
        self.spool_dir, self.daemon_args = spool_dir, daemon_args
        # The tests' settings only: never a configuration file of the machine they run on.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "RETAILPULSE_CONFIG": os.devnull}
        self.daemon_log = spool_dir.parent / "daemon.log"  # a file, not a pipe: a full pipe would block it
        self.start_daemon()
        self.api = subprocess.Popen(
            [sys.executable, "-m", "webapi", "--spool-dir", str(spool_dir), "--port", "0", "--api-workers", "2",
             *api_args],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.base = self._read_address(self.api, timeout_s=30)
        self.http = requests.Session()
        self.http.hooks["response"].append(openapi_check.check_requests_response)
        self.wait_for_daemon(timeout_s=30)

    def start_daemon(self) -> None:
        self._daemon_log_offset = self.daemon_log.stat().st_size if self.daemon_log.exists() else 0
        with self.daemon_log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--spool-dir", str(self.spool_dir),
                 "--store-master", str(SAMPLE_STORE_MASTER), *self.daemon_args],
                cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=log)

    def daemon_output(self) -> str:
        """What the current daemon process has logged so far."""
        with self.daemon_log.open("rb") as f:
            f.seek(self._daemon_log_offset)
            return f.read().decode(errors="replace")

    def wait_for_daemon(self, timeout_s: float = 30) -> None:
        """Wait for the daemon's "daemon ready" log line: it holds the spool lock and its pool is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "daemon ready" in self.daemon_output():
                return
            if self.daemon.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start (exit code {self.daemon.poll()}): {self.daemon_output()[-2000:]}")

    @staticmethod
    def _read_address(proc: subprocess.Popen, timeout_s: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if selector.select(timeout=deadline - time.monotonic()):
                line = proc.stdout.readline()
                if not line:
                    break
                if "listening on " in line:
                    return line.strip().rsplit(" ", 1)[-1]
        raise RuntimeError(f"API did not start (exit code {proc.poll()})")

    def submit(self, visits: list[dict]) -> int:
        r = self.http.post(f"{self.base}/api/submit/", json={"count": len(visits), "visits": visits}, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["job_id"]

    def status(self, job_id) -> dict:
        return self.http.get(f"{self.base}/api/status", params={"jobid": job_id}, timeout=30).json()

    def wait(self, job_id: int, timeout_s: float = 60) -> dict:
        """Poll until the job is completed or failed; the job's final status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = self.status(job_id)
            if doc["status"] in (Status.COMPLETED.value, Status.FAILED.value):
                return doc
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not finished after {timeout_s} s: {doc}")

    def results(self, job_id: int) -> dict:
        r = self.http.get(f"{self.base}/api/results", params={"jobid": job_id}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        self.http.close()  # an idle keep-alive connection would hold the API's graceful stop for 2 s
        for proc in (self.api, self.daemon):
            if proc.poll() is None:
                proc.terminate()
        for proc in (self.api, self.daemon):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.http.close()
        self.api.stdout.close()


@pytest.fixture
def start_service(tmp_path):
    """Start the real API and daemon; tests pass daemon options. Short simulated GPU work unless told."""
    started = []

    def start(*daemon_args: str) -> Service:
        args = ["--gpu-sleep-min-s", "0.01", "--gpu-sleep-max-s", "0.02", "--processes", "2",
                "--allow-private-addresses", "true", *daemon_args]  # the image server is on 127.0.0.1
        service = Service(tmp_path / "spool", args)
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
    """The daemon's pool processes: the children of its forkserver (grandchildren of the daemon)."""
    return sorted(grandchild for child in children(daemon_pid) for grandchild in children(child))


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
