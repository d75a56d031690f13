"""Fixtures: a spool per test, real images, a port-0 image server, the WSGI app in-process, real processes."""
from __future__ import annotations

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

REPO = Path(__file__).resolve().parent.parent
SAMPLE_STORE_MASTER = REPO / "data" / "stores.csv"
REAL_STORE_MASTER = REPO.parent / "shared" / "data" / "StoreMasterAssignment.csv"


def image_bytes(fmt: str, width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool").create()


# ------------------------------------------------------------------ WSGI in-process
class WsgiResponse:
    def __init__(self, status: str, headers: list, body: bytes):
        self.status_code = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        return json.loads(self.body)


def call_wsgi(app, method: str, path: str, body: bytes | None = None, query: str = "") -> WsgiResponse:
    """One request through the app, the way a WSGI server would make it."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}
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
    return WsgiResponse(captured["status"], captured["headers"], data)


# ------------------------------------------------------------------ image server
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def image_server(tmp_path):
    """Real image files served over HTTP on 127.0.0.1, port 0. Yields (base_url, folder)."""
    folder = tmp_path / "images"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------ real processes
class Service:
    """The API and the daemon as two real processes on one spool."""

    def __init__(self, spool_dir: Path, daemon_args: list[str]):
        self.spool = Spool(spool_dir)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.daemon_log = spool_dir.parent / "daemon.log"  # a file, not a pipe: a full pipe would block it
        with self.daemon_log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--spool-dir", str(spool_dir),
                 "--store-master", str(SAMPLE_STORE_MASTER), *daemon_args],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.api = subprocess.Popen(
            [sys.executable, "-m", "webapi", "--spool-dir", str(spool_dir), "--port", "0", "--workers", "2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.base = self._read_address(self.api, timeout_s=30)
        self.http = requests.Session()
        self._wait_for_daemon(timeout_s=30)

    def _wait_for_daemon(self, timeout_s: float) -> None:
        """Wait for the daemon's "daemon ready" log line: it holds the spool lock and its pool is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "daemon ready" in self.daemon_log.read_text(errors="replace"):
                return
            if self.daemon.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start (exit code {self.daemon.poll()}): "
                           f"{self.daemon_log.read_text(errors='replace')[-2000:]}")

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
        args = ["--gpu-sleep-min-s", "0.01", "--gpu-sleep-max-s", "0.02", "--processes", "2", *daemon_args]
        service = Service(tmp_path / "spool", args)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()
