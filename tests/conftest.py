"""Fixtures: a spool per test, real images, a port-0 image server, the WSGI app in-process, real processes."""
from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import msgspec
import pytest
from PIL import Image

from spool import Spool
from spool.records import ResultLine, Visit
from tests import openapi_check

from tests.service import REAL_STORE_MASTER, REPO, SAMPLE_STORE_MASTER, Service, free_port  # noqa: F401 (re-exported)


def visit(store_id: str, urls: list[str], visit_time: str = "2026-11-23T10:00:00") -> dict:
    """One store visit as clients submit it."""
    return {"store_id": store_id, "visit_time": visit_time, "image_url": urls}


def records(visits: list[dict]) -> list[Visit]:
    """Visits as the spool stores them (spool.records.Visit), from the dicts clients send."""
    return msgspec.convert(visits, list[Visit])


def result_line(index: int, perimeter: int | None = 60, error: str | None = None, url: str = "http://x/a.jpg",
                store_id: str = "RP00001") -> ResultLine:
    """One image's result as the daemon records it (a 10 x 20 image unless told otherwise)."""
    size = (10, 20) if error is None else (None, None)
    return ResultLine(index, store_id, "CORNER MART", "7100015", "t", url, *size, perimeter if error is None else None,
                      error)


def wait_until(predicate, timeout_s: float = 30, what: str = "condition", interval_s: float = 0.02):
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout_s``. Returns its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def visits_of(image_server, n: int, extra: list[str] = ()) -> list[dict]:
    """One visit of n distinct URLs of one real JPEG (64 x 48, perimeter 224); a query string each, so the
    server counts each image apart. ``extra`` URLs go last."""
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    urls = [f"{image_server.base}/shelf.jpg?n={i}" for i in range(n)] + list(extra)
    return [visit("RP00001", urls)]


def mount_tmpfs(mount_point: Path, size: str = "1m") -> None:
    """A real small file system at ``mount_point`` (made here), for full and read-only disks; the test is
    skipped where this process may not mount (not root, no CAP_SYS_ADMIN). Undo with ``unmount``."""
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")


def unmount(mount_point: Path) -> None:
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


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
    """Record fsync (of which file or folder), rename and link calls, in order, as they really happen."""
    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    def link(src, dst, **kwargs):
        events.append(("link", str(src), str(dst)))
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
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


def kill_at_write_step(step: int) -> list[int]:
    """For a process of its own: SIGKILL it just before its ``step``-th fsync, rename or counter write
    (os.fsync, os.replace, os.pwrite: every write in the spool is made of those), as a kill -9 or a power cut
    at that instant would. Returns the count so far, one item (how many steps the work took, if it lived)."""
    done = [0]

    def dying(real):
        def call(*args):
            done[0] += 1
            if done[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        return call

    os.fsync, os.replace, os.pwrite = dying(os.fsync), dying(os.replace), dying(os.pwrite)
    return done


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
        # A short poll interval: shutdown() waits for one, after every test that used the server.
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

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


def held_open(closed: list, head: bytes = b"\xff\xd8\xff"):
    """An ImageServer hook: starts a 100 kB image, sends ``head`` of it and nothing more, until the client
    hangs up; then appends the moment (monotonic) it did to ``closed``. Gives up after 60 s."""
    def hook(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        handler.wfile.write(head)
        handler.wfile.flush()
        handler.connection.settimeout(60)
        try:
            while handler.connection.recv(4096):
                pass
        except OSError:
            pass
        closed.append(time.monotonic())
    return hook


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

    def start(*daemon_args: str, api_args: tuple[str, ...] = (), **service_options) -> Service:
        args = ["--gpu-sleep-min-s", "0.01", "--gpu-sleep-max-s", "0.02", "--processes", "2",
                "--allow-private-addresses", "true", *daemon_args]  # the image server is on 127.0.0.1
        service = Service(service_options.pop("spool_dir", tmp_path / "spool"), args, list(api_args), **service_options)
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


def _tcp_sockets() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket on this machine (/proc/net/tcp)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        found.append((int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), fields[3], fields[9]))
    return found


def _pid_holding(inode: str) -> int | None:
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


def pid_of_peer(local_port: int) -> int | None:
    """The pid of the process on this machine whose TCP socket has local port ``local_port`` (IPv4)."""
    inode = next((inode for local, _, _, inode in _tcp_sockets() if local == local_port), None)
    return None if inode is None else _pid_holding(inode)


def pid_serving(client_port: int) -> int | None:
    """The pid holding the server side of our connection from ``client_port`` (it accepted it), if any."""
    inode = next((inode for _, remote, _, inode in _tcp_sockets() if remote == client_port), None)
    return None if inode is None or inode == "0" else _pid_holding(inode)


def listener_of(port: int) -> str | None:
    """The inode of the socket listening on TCP ``port`` (state 0A), shared by every process that inherited it."""
    return next((inode for local, _, state, inode in _tcp_sockets() if local == port and state == "0A"), None)


def holds_socket(pid: int, inode: str) -> bool:
    """Whether process ``pid`` has socket ``inode`` among its open files."""
    try:
        return any(os.readlink(fd.path) == f"socket:[{inode}]" for fd in os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return False
