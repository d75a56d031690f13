"""The front door: gunicorn's own errors in JSON, and the shipped nginx site (systemd/nginx/retail-pulse.conf)
run for real (Debian's nginx, self-signed certificate, free ports on 127.0.0.1) in front of the real API."""
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.api_process import running_api
from tests.service import REPO, free_port, stop_processes
from webapi.auth import digest
from webapi.pages import PAGE_CSP

pytestmark = pytest.mark.nginx  # needs a real nginx: left out of `make test-fast`

SITE = REPO / "systemd" / "nginx" / "retail-pulse.conf"
TOKENS = {"acme": "token-of-acme", "globex": "token-of-globex"}


# ------------------------------------------------------------------ processes


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@pytest.fixture
def api(tmp_path):
    """The real API alone (no daemon: /healthz answers 503, which is fine for latency), with two tokens."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("".join(f"{name} {digest(token)}\n" for name, token in TOKENS.items()))
    with running_api(tmp_path / "spool", "--api-tokens-file", str(tokens_file)) as base:
        yield base


def nginx_binary() -> str:
    """nginx's path; a skip when it is not installed, a failure in CI (.ci/run installs it)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("nginx is not installed, and CI is set: .ci/run should have installed it")
    pytest.skip("nginx is not installed (apt-get install nginx)")


def render_site(api_address: str, https_port: int, http_port: int, cert: Path, key: Path) -> str:
    """The shipped site with the test's ports, certificate, API address and checkout; nothing else changes."""
    site = SITE.read_text()
    host_port = api_address.split("://", 1)[1]
    replacements = [("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
                    ("listen 80;", f"listen 127.0.0.1:{http_port};"),
                    ("listen [::]:443 ssl;", ""), ("listen [::]:80;", ""),
                    ("server 127.0.0.1:8080;", f"server {host_port};"),
                    ("/etc/ssl/retail-pulse/cert.pem", str(cert)), ("/etc/ssl/retail-pulse/key.pem", str(key)),
                    ("root /opt/retail-pulse/webapi/static;", f"root {REPO / 'webapi' / 'static'};")]
    for old, new in replacements:
        assert site.count(old) == 1, f"{SITE.name} no longer has exactly one {old!r}: update render_site"
        site = site.replace(old, new)
    return site


def main_conf(prefix: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf gives the site on a VM, with every path under the test's folder."""
    temp = "".join(f"    {name}_temp_path {prefix / name};\n" for name in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    return (f"worker_processes 1;\nevents {{ worker_connections 1024; }}\nhttp {{\n{temp}"
            f"    access_log off;\n    include {site};\n}}\n")


class Nginx:
    def __init__(self, tmp_path: Path, api_address: str):
        self.binary = nginx_binary()
        self.prefix = tmp_path / "nginx"
        self.prefix.mkdir()
        self.cert, self.key = self.prefix / "cert.pem", self.prefix / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(self.key), "-out", str(self.cert)],
                       check=True, capture_output=True, timeout=60)
        self.https_port, self.http_port = free_port(), free_port()
        site = self.prefix / "retail-pulse.conf"
        site.write_text(render_site(api_address, self.https_port, self.http_port, self.cert, self.key))
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(main_conf(self.prefix, site))
        self.error_log = self.prefix / "error.log"
        self.globals = f"daemon off; pid {self.prefix / 'nginx.pid'}; error_log {self.error_log} info;"
        self.base = f"https://127.0.0.1:{self.https_port}"
        self.proc = None

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-g", self.globals, *extra]

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.https_port, self.proc)
            wait_for_port(self.http_port, self.proc)
        except RuntimeError as exc:
            stop_processes(self.proc)
            raise RuntimeError(f"nginx did not start ({exc}): {self.error_log.read_text()[-2000:]}") from exc
        return self

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def raw(self, data: bytes, timeout_s: float = 10) -> bytes:
        """Send raw bytes over TLS; the whole answer (nginx closes after an error)."""
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=timeout_s) as sock:
            with self.tls().wrap_socket(sock, server_hostname="127.0.0.1") as conn:
                conn.sendall(data)
                return read_all(conn, timeout_s)


def read_all(conn, timeout_s: float) -> bytes:
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        chunks.append(chunk)
        if complete(b"".join(chunks)):  # nginx may keep the connection open a while (lingering close)
            break
    return b"".join(chunks)


def complete(raw: bytes) -> bool:
    """Whether raw holds a whole response: headers and Content-Length bytes of body."""
    head, found, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if found and name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def parse(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.fixture
def nginx(tmp_path, api):
    front = Nginx(tmp_path, api).start()
    yield front
    stop_processes(front.proc)


# ------------------------------------------------------------------ gunicorn alone: its own errors are JSON
def raw_http(address: str, data: bytes, timeout_s: float = 10) -> bytes:
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        return read_all(sock, timeout_s)


@pytest.mark.parametrize("request_bytes, status, error", [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line too long"),
    (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad request"),
    (b"NONSENSE\r\n\r\n", 400, "bad request"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n", 431, "request headers"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "request headers"),
])
def test_gunicorn_own_errors_are_json(api, request_bytes, status, error):
    code, headers, doc = parse(raw_http(api, request_bytes))
    assert code == status
    assert headers["content-type"] == "application/json"
    assert doc["error"].startswith(error)


# ------------------------------------------------------------------ the shipped nginx site
def test_shipped_site_passes_nginx_t(tmp_path, api):
    front = Nginx(tmp_path, api)
    result = subprocess.run(front.command("-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


class SlowUploads:
    """Clients that send their headers (Content-Length 1 MB), then a few body bytes per second."""

    def __init__(self, port: int, count: int, context: ssl.SSLContext | None):
        self.conns = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn = context.wrap_socket(sock, server_hostname="127.0.0.1") if context else sock
            conn.sendall(b"POST /api/submit/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer slow-client-%d\r\nContent-Length: 1000000\r\n\r\n[" % len(self.conns))
            self.conns.append(conn)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if the test forgets to stop it
        while not self.done.wait(0.5) and time.monotonic() < deadline:
            for conn in self.conns:
                try:
                    conn.sendall(b"[")
                except OSError:
                    pass

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        for conn in self.conns:
            conn.close()


def healthz_latencies(base: str, count: int, verify, timeout_s: float = 10, pace_s: float = 0.025) -> list[float]:
    """Seconds each of ``count`` GET /healthz took (200 or 503: no daemon runs); a timeout counts as timeout_s."""
    latencies = []
    with requests.Session() as http:
        for _ in range(count):
            start = time.monotonic()
            try:
                r = http.get(f"{base}/healthz", timeout=timeout_s, verify=verify)
                assert r.status_code in (200, 503) and "checks" in r.json(), r.text
                latencies.append(time.monotonic() - start)
            except requests.Timeout:
                latencies.append(timeout_s)
            time.sleep(pace_s)  # 40 requests/s: under the per-address limit of /healthz (50/s)
    return sorted(latencies)


def test_fifty_slow_uploads_do_not_starve_healthz(nginx):
    slow = SlowUploads(nginx.https_port, 50, nginx.tls())
    try:
        latencies = healthz_latencies(nginx.base, 200, verify=str(nginx.cert))
    finally:
        slow.close()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert p99 < 0.1, f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"


def test_one_token_over_its_rate_gets_429_json_while_another_is_served(nginx):
    statuses, limited = [], None
    with requests.Session() as http:
        for _ in range(60):  # 10/s with a burst of 20: sent at once, well over 20 are refused
            r = http.get(f"{nginx.base}/api/status?jobid=1", headers={"Authorization": f"Bearer {TOKENS['acme']}"},
                         verify=str(nginx.cert), timeout=10)
            statuses.append(r.status_code)
            if r.status_code == 429:
                limited = r
        assert statuses[0] == 400  # the API's own answer for an unknown job, passed through
        assert limited is not None, statuses
        assert limited.headers["Content-Type"] == "application/json"
        assert limited.headers["Retry-After"] == "1"
        assert "too many requests" in limited.json()["error"]
        other = http.get(f"{nginx.base}/api/status?jobid=1", headers={"Authorization": f"Bearer {TOKENS['globex']}"},
                         verify=str(nginx.cert), timeout=10)
    assert (other.status_code, other.json()) == (400, {})


def test_api_json_errors_pass_through_unchanged(nginx):
    r = requests.get(f"{nginx.base}/api/status", verify=str(nginx.cert), timeout=10)
    assert r.status_code == 401  # the API's, not nginx's
    assert "missing or unknown API token" in r.json()["error"]
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_over_long_request_line_gets_json_from_nginx(nginx):
    status, headers, doc = parse(nginx.raw(b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (status, headers["content-type"], doc) == (414, "application/json", {"error": "request line too long"})


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /api/submit/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"TRACE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"GET /_errors/internal HTTP/1.1\r\nHost: x\r\n\r\n", 404),
])
def test_what_nginx_refuses_by_itself_is_json_too(nginx, request_bytes, status):
    got, headers, doc = parse(nginx.raw(request_bytes))  # before: nginx's HTML page
    assert (got, headers["content-type"]) == (status, "application/json") and doc["error"]


def test_over_large_header_gets_431_json_from_nginx(nginx):
    status, headers, doc = parse(nginx.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"))
    assert (status, headers["content-type"], doc) == (431, "application/json", {"error": "request headers too large"})


def test_body_over_the_cap_gets_413_json_from_nginx(nginx):
    head = (b"POST /api/submit/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-of-acme\r\n"
            b"Content-Length: %d\r\n\r\n" % (64 * 1024 * 1024 + 1))
    status, headers, doc = parse(nginx.raw(head))
    assert (status, headers["content-type"]) == (413, "application/json")
    assert doc == {"error": "body larger than 67108864 bytes"}


def test_plain_http_is_refused_with_json(nginx):
    r = requests.get(f"http://127.0.0.1:{nginx.http_port}/healthz", timeout=10, allow_redirects=False)
    assert (r.status_code, r.headers["Content-Type"]) == (403, "application/json")
    assert "use https" in r.json()["error"]
    status, headers, doc = parse(raw_http(f"http://127.0.0.1:{nginx.https_port}",
                                          b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (status, headers["content-type"]) == (400, "application/json")
    assert "use https" in doc["error"]


def test_the_status_page_gets_its_own_policy_and_json_the_strictest(nginx):
    for path in ("/", "/?job=1", "/ui/index.html", "/ui/app.js", "/ui/style.css"):
        r = requests.get(f"{nginx.base}{path}", verify=str(nginx.cert), timeout=10)
        # one policy, the page's: a second one would be intersected with it (default-src 'none': a blank page)
        assert (r.status_code, r.headers["Content-Security-Policy"]) == (200, PAGE_CSP), path
    r = requests.get(f"{nginx.base}/api/status?jobid=1", verify=str(nginx.cert), timeout=10)
    assert r.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_the_api_down_behind_nginx_is_503_json_with_retry_after_and_the_page_still_loads(tmp_path):
    """The page's own files come from nginx itself, so the page loads and can say the API is down
    (tests/test_status_page_browser.py watches it do so); every API route answers nginx's JSON 503."""
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the API is down
    front = Nginx(tmp_path, nobody).start()
    try:
        for method, path in (("GET", "/api/status?jobid=1"), ("POST", "/api/submit/"), ("GET", "/healthz"),
                             ("GET", "/ui/other.js")):
            r = requests.request(method, f"{front.base}{path}", verify=str(front.cert), timeout=10)
            assert (r.status_code, r.headers["Content-Type"], r.headers["Retry-After"]) == \
                (503, "application/json", "10"), (method, path, r.status_code)
            assert r.json() == {"error": "API unavailable; try again later"}
        for path, name in (("/", "index.html"), ("/?job=3", "index.html"), ("/ui/app.js", "app.js")):
            r = requests.get(f"{front.base}{path}", verify=str(front.cert), timeout=10)
            assert (r.status_code, r.content) == (200, (REPO / "webapi" / "static" / name).read_bytes()), path
    finally:
        stop_processes(front.proc)


def test_each_header_once_and_the_page_files_as_the_api_serves_them(nginx, api):
    """Through nginx every security header is sent once (the page's files carried X-Content-Type-Options
    twice, the API's and nginx's), and the files nginx serves itself have the API's types and headers."""
    from webapi.pages import STATIC_FILES
    once = ("strict-transport-security", "x-content-type-options", "x-frame-options", "content-security-policy",
            "referrer-policy")
    for path in ("/", "/ui/index.html", "/ui/app.js", "/ui/style.css", "/api/status?jobid=1", "/healthz",
                 "/ui/nothing.js", "/" + "a" * 10000):
        request_bytes = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        head = nginx.raw(request_bytes).split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        names = [line.split(b":", 1)[0].strip().lower().decode() for line in head[1:]]
        assert all(names.count(name) == 1 for name in once), (path[:40], head[0], names)
    for name in STATIC_FILES:
        direct = requests.get(f"{api}/ui/{name}", timeout=10)
        through = requests.get(f"{nginx.base}/ui/{name}", verify=str(nginx.cert), timeout=10)
        assert through.content == direct.content
        for header in ("Content-Type", "Cache-Control", "Content-Security-Policy", "X-Content-Type-Options"):
            assert through.headers[header] == direct.headers[header], (name, header)


def _contrast() -> None:
    """``python -m tests.test_front_door``: /healthz latency under 50 slow uploads, through nginx and direct."""
    import contextlib
    import tempfile

    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        tmp = Path(folder)
        address = stack.enter_context(contextlib.contextmanager(api.__wrapped__)(tmp))
        front = Nginx(tmp, address).start()
        stack.callback(stop_processes, front.proc)
        port = int(address.rsplit(":", 1)[1])
        for name, base, slow_port, context, verify in [
                ("through nginx", front.base, front.https_port, front.tls(), str(front.cert)),
                ("direct to gunicorn", address, port, None, True)]:
            slow = SlowUploads(slow_port, 50, context)
            try:
                # direct: every request may wait its full timeout, so fewer of them and a shorter timeout
                count, timeout_s = (200, 10) if context else (20, 2)
                latencies = healthz_latencies(base, count, verify, timeout_s=timeout_s)
            finally:
                slow.close()
            print(f"{name}: {count} x GET /healthz, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
                  f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms, "
                  f"{sum(t >= timeout_s for t in latencies)} timed out after {timeout_s} s")


if __name__ == "__main__":
    _contrast()
