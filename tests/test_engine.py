"""The libcurl engine against real servers on 127.0.0.1: every download rule, the GPU wait, batches that do
not hold each other up. Hostile servers are raw sockets that misbehave on purpose; nothing is mocked."""
import gzip
import io
import select
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
import zlib

import pytest
from PIL import Image

from daemon.engine.backoff import backoff_s
from daemon.engine.loop import Engine, measure
from daemon.engine.settings import DownloadLimits, EngineSettings
from daemon.engine.netguard import AddressPolicy
from daemon.engine.outcome import ErrorKind
from tests.conftest import image_bytes, wait_until

JPEG = image_bytes("JPEG", 64, 48)
LOCAL = AddressPolicy(allow_private=True)  # the servers are on 127.0.0.1
FAST = DownloadLimits(connect_timeout_s=2, read_timeout_s=1, total_timeout_s=3, backoff_s=0.01)
NO_WAIT = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, limits=FAST, addresses=LOCAL)


class HostileServer:
    """HTTP on 127.0.0.1, port 0: ``routes[path](conn)`` writes whatever it likes on the raw socket.

    Counts requests per path and bytes sent, so a test can tell what the client really did."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.routes, self.hits, self.sent = {}, {}, {}
        self.lock, self.stop = threading.Lock(), threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                conn = self.request
                if tls is not None:
                    try:
                        conn = tls.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError):
                        return
                request = b""
                while b"\r\n\r\n" not in request:
                    part = conn.recv(65536)
                    if not part:
                        return
                    request += part
                path = request.split(b" ", 2)[1].decode()
                with outer.lock:
                    outer.hits[path] = outer.hits.get(path, 0) + 1
                route = outer.routes.get(path.split("?")[0])
                try:
                    route(conn, outer) if route else conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads, allow_reuse_address, request_queue_size = True, True, 1024

        self.server = Server(("127.0.0.1", 0), Handler)
        scheme = "https" if tls else "http"
        self.base = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()  # quick shutdown()

    def send(self, conn, path, data: bytes):
        conn.sendall(data)
        with self.lock:
            self.sent[path] = self.sent.get(path, 0) + len(data)

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def ok(body: bytes, headers: str = "") -> callable:
    return lambda conn, srv: conn.sendall(
        f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body)


def status(code: int, headers: str = "") -> callable:
    return lambda conn, srv: conn.sendall(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n{headers}\r\n".encode())


@pytest.fixture
def server():
    srv = HostileServer()
    yield srv
    srv.close()


def one(url, settings=NO_WAIT):
    return measure([(0, url)], settings)[0]


# ---------------------------------------------------------------- measuring and the GPU wait
def test_images_are_measured_and_the_gpu_wait_is_real_for_each_but_they_overlap(server):
    server.routes["/a.jpg"] = ok(JPEG)
    settings = EngineSettings(gpu_sleep_min_s=0.2, gpu_sleep_max_s=0.2, limits=FAST, addresses=LOCAL)
    started = time.monotonic()
    outcomes = measure([(i, f"{server.base}/a.jpg?n={i}") for i in range(200)], settings)
    elapsed = time.monotonic() - started
    assert [(o.index, o.width, o.height, o.perimeter, o.error) for o in outcomes] == \
        [(i, 64, 48, 224, None) for i in range(200)]
    assert all(o.seconds >= 0.2 for o in outcomes)  # no outcome before its wait was over
    assert elapsed < 200 * 0.2 / 10  # the waits overlapped
    assert all(o.bytes == len(JPEG) for o in outcomes)


def test_a_slow_image_holds_only_its_own_batch(server):
    server.routes["/a.jpg"] = ok(JPEG)
    release = threading.Event()
    server.routes["/slow.jpg"] = lambda conn, srv: release.wait(10) and ok(JPEG)(conn, srv)
    engine = Engine(NO_WAIT)
    engine.start()
    finished = {}
    try:
        engine.submit([(0, f"{server.base}/slow.jpg"), (1, f"{server.base}/a.jpg")],
                      lambda outs: finished.setdefault("first", outs))
        engine.submit([(2, f"{server.base}/a.jpg?x")], lambda outs: finished.setdefault("second", outs))
        wait_until(lambda: "second" in finished, timeout_s=5, what="the second batch")
        assert "first" not in finished
        release.set()
        wait_until(lambda: "first" in finished, timeout_s=5, what="the first batch")
        assert [o.perimeter for o in finished["first"]] == [224, 224]
    finally:
        release.set()
        engine.close()


def test_big_image_is_measured_as_it_streams(server):
    noise = io.BytesIO()
    Image.effect_noise((1600, 1200), 80).convert("RGB").save(noise, format="JPEG", quality=95)
    big = noise.getvalue()
    assert len(big) > 1024 * 1024
    server.routes["/big.jpg"] = ok(big)
    outcome = one(f"{server.base}/big.jpg")
    assert (outcome.width, outcome.height, outcome.bytes) == (1600, 1200, len(big))


# ---------------------------------------------------------------- HTTP status and retries
@pytest.mark.parametrize("code", [404, 403, 410])
def test_permanent_http_error_fails_at_once(server, code):
    server.routes["/x.jpg"] = status(code)
    outcome = one(f"{server.base}/x.jpg")
    assert (outcome.error, outcome.kind) == (f"HTTP {code} (permanent, 1 attempt)", ErrorKind.HTTP_4XX)
    assert server.hits["/x.jpg"] == 1


@pytest.mark.parametrize("code, kind", [(429, ErrorKind.HTTP_4XX), (500, ErrorKind.HTTP_5XX),
                                        (503, ErrorKind.HTTP_5XX)])
def test_transient_http_error_is_tried_three_times(server, code, kind):
    server.routes["/x.jpg"] = status(code)
    outcome = one(f"{server.base}/x.jpg")
    assert (outcome.error, outcome.kind) == (f"HTTP {code} (transient, gave up after 3 attempts)", kind)
    assert server.hits["/x.jpg"] == 3


def test_transient_failures_then_success_measure_the_image(server):
    answers = iter([lambda conn, srv: conn.close(), status(503), ok(JPEG)])
    server.routes["/x.jpg"] = lambda conn, srv: next(answers)(conn, srv)
    assert one(f"{server.base}/x.jpg").perimeter == 224
    assert server.hits["/x.jpg"] == 3


def test_permanent_failure_after_a_transient_one_counts_both_attempts(server):
    answers = iter([status(502), status(404)])
    server.routes["/x.jpg"] = lambda conn, srv: next(answers)(conn, srv)
    assert one(f"{server.base}/x.jpg").error == "HTTP 404 (permanent, after 2 attempts)"


@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_retry_after_is_honoured_and_capped(server):
    seen = []
    answers = iter([status(429, "Retry-After: 1\r\n"), status(503, "Retry-After: 3600\r\n"), ok(JPEG)])

    def route(conn, srv):
        seen.append(time.monotonic())
        next(answers)(conn, srv)

    server.routes["/x.jpg"] = route
    settings = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                              limits=DownloadLimits(backoff_s=0.01, attempts=3, total_timeout_s=30, max_backoff_s=2))
    outcome = one(f"{server.base}/x.jpg", settings)
    assert outcome.perimeter == 224
    assert seen[1] - seen[0] >= 1.0  # Retry-After: 1, not the 0.01 s backoff
    assert 2 - 0.1 <= seen[2] - seen[1] < 2 + 1.5  # an hour's Retry-After is capped at max_backoff_s



def test_the_wait_before_a_retry_doubles_with_its_jitter_honours_retry_after_and_is_capped():
    assert [backoff_s(n, 0.5, 10.0) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert backoff_s(2, 0.5, 10.0, jitter=1.5) == 1.5 and backoff_s(2, 0.5, 10.0, jitter=0.5) == 0.5
    assert backoff_s(1, 0.5, 10.0, retry_after_s=3.0) == 3.0  # the server's word, when longer
    assert backoff_s(1, 0.5, 10.0, retry_after_s=3600.0) == 10.0  # but never past the cap
    assert backoff_s(5000, 1.0, 600.0) == 600.0  # thousands of attempts (a webhook retried for weeks): no overflow


# ---------------------------------------------------------------- time limits
def test_a_server_that_never_answers_is_cut_off_after_the_silence_limit(server):
    server.routes["/x.jpg"] = lambda conn, srv: srv.stop.wait(30)
    started = time.monotonic()
    outcome = one(f"{server.base}/x.jpg", EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                                                          limits=DownloadLimits(read_timeout_s=1, attempts=1)))
    assert (outcome.error, outcome.kind) == ("timed out: under 1 byte/s for 1 s (transient, gave up after 1 attempts)",
                                             ErrorKind.TIMEOUT)
    assert time.monotonic() - started < 4


def trickle(head: bytes, every_s: float):
    def route(conn, srv):
        for byte in head:
            if srv.stop.wait(every_s):
                return
            conn.sendall(bytes([byte]))
        while not srv.stop.wait(every_s):
            conn.sendall(b"x")
    return route


def test_headers_sent_a_byte_at_a_time_are_cut_off_by_the_whole_attempt_deadline(server):
    server.routes["/x.jpg"] = trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 10_000, every_s=0.05)
    started = time.monotonic()
    outcome = one(f"{server.base}/x.jpg", EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                                                          limits=DownloadLimits(total_timeout_s=1.5, attempts=1)))
    assert outcome.error == "timed out: not complete within 1.5 s (transient, gave up after 1 attempts)"
    assert time.monotonic() - started < 4


def test_a_trickled_body_is_cut_off_at_the_deadline(server):
    # a JPEG whose first metadata segment (64 KiB long) trickles: nothing in it says no, only the clock
    server.routes["/x.jpg"] = trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n\xff\xd8\xff\xe1\xff\xff",
                                      every_s=0.01)
    outcome = one(f"{server.base}/x.jpg", EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                                                          limits=DownloadLimits(total_timeout_s=1.5, attempts=1)))
    assert outcome.error.startswith("timed out: not complete within 1.5 s")


def test_connect_timeout_is_its_own_reason():
    # A listening socket whose accept queue is full never completes another handshake: Linux drops the SYN
    # (listen(0) queues one connection; the first filler takes it, and the rest wait behind it).
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(0)
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(blocker.getsockname())
            fillers.append(filler)
        _, writable, _ = select.select([], fillers[:1], [], 5)
        assert writable, "the first filler never connected: the queue is not full"
        try:
            url = f"http://127.0.0.1:{blocker.getsockname()[1]}/x.jpg"
            outcome = one(url, EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                                              limits=DownloadLimits(connect_timeout_s=0.5, attempts=1)))
        finally:
            for filler in fillers:
                filler.close()
    assert outcome.error.startswith("timed out: no connection within 0.5 s"), outcome.error
    assert outcome.kind is ErrorKind.TIMEOUT


# ---------------------------------------------------------------- sizes and bodies
def test_declared_size_over_the_cap_is_refused_before_reading(server):
    server.routes["/x.jpg"] = lambda conn, srv: srv.send(conn, "/x.jpg", b"HTTP/1.1 200 OK\r\nContent-Length: "
                                                         b"100000000\r\n\r\n" + b"x" * 65536)
    outcome = one(f"{server.base}/x.jpg", EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                                                          limits=DownloadLimits(max_image_bytes=1000)))
    assert (outcome.error, outcome.kind) == ("too large: 100000000 bytes (limit 1000) (permanent, 1 attempt)",
                                             ErrorKind.TOO_LARGE)


def test_undeclared_body_over_the_cap_is_cut_off_while_streaming(server):
    def endless(conn, srv):
        srv.send(conn, "/x.jpg", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n\xff\xd8\xff\xe1\xff\xff")  # a JPEG
        for _ in range(2000):  # 128 MB if nobody stops reading (no marker in it: nothing but the cap says no)
            srv.send(conn, "/x.jpg", b"x" * 65536)

    server.routes["/x.jpg"] = endless
    outcome = one(f"{server.base}/x.jpg", EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                                                          limits=DownloadLimits(max_image_bytes=1_000_000)))
    assert outcome.error == "too large: over 1000000 bytes (permanent, 1 attempt)"
    assert server.sent["/x.jpg"] < 20_000_000  # the client hung up, it did not read on


def _bomb_header(fmt: str) -> bytes:
    """The first bytes of a 40 MB image whose header claims far more pixels than the bomb limit."""
    if fmt == "PNG":
        ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
        crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + crc
    frame = struct.pack(">BHHB", 8, 65535, 65535, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame


@pytest.mark.parametrize("fmt, size", [("PNG", "100000x100000"), ("JPEG", "65535x65535")])
def test_a_header_claiming_too_many_pixels_is_refused_when_read_and_the_download_stops_there(server, fmt, size):
    hung_up = threading.Event()

    def bomb(conn, srv):
        try:
            srv.send(conn, "/x", f"HTTP/1.1 200 OK\r\nContent-Length: {40 * 2**20}\r\n\r\n".encode()
                     + _bomb_header(fmt))
            for _ in range(640):  # the rest of the 40 MB, 64 KiB every 20 ms: 13 s if the client reads it all
                if srv.stop.wait(0.02):
                    return
                srv.send(conn, "/x", b"\0" * 65536)
        except OSError:  # the client hung up
            hung_up.set()

    server.routes["/x"] = bomb
    started = time.monotonic()
    outcome = one(f"{server.base}/x", EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                                                     limits=DownloadLimits(max_image_bytes=50 * 2**20)))
    assert outcome.error.startswith(f"image too large in pixels: {size} is ") and outcome.kind is ErrorKind.TOO_LARGE
    assert time.monotonic() - started < 2  # before: 13 s, the whole body
    assert hung_up.wait(5) and server.sent["/x"] < 4 * 2**20  # the transfer stopped at the header


def test_a_body_shorter_than_its_content_length_is_not_measured(server):
    server.routes["/x.jpg"] = lambda conn, srv: conn.sendall(
        f"HTTP/1.1 200 OK\r\nContent-Length: {len(JPEG) + 500}\r\n\r\n".encode() + JPEG)
    outcome = one(f"{server.base}/x.jpg")
    assert outcome.perimeter is None and outcome.error.startswith("truncated download: ")
    assert outcome.error.endswith("(transient, gave up after 3 attempts)")


def test_gzip_content_encoding_is_not_decompressed(server):
    server.routes["/x.jpg"] = ok(gzip.compress(JPEG), "Content-Encoding: gzip\r\n")
    outcome = one(f"{server.base}/x.jpg")
    assert outcome.error == "not an image: unknown bytes"  # the download worked; the bytes are no image
    assert outcome.kind == ErrorKind.NOT_AN_IMAGE


def test_html_served_as_jpeg_is_not_an_image(server):
    server.routes["/x.jpg"] = ok(b"<html>login</html>", "Content-Type: image/jpeg\r\n")
    assert one(f"{server.base}/x.jpg").error.startswith("not an image: looks like HTML")


# ---------------------------------------------------------------- redirects and addresses
def test_redirects_are_followed_up_to_the_cap(server):
    server.routes["/a.jpg"] = ok(JPEG)
    server.routes["/r1"] = status(302, "Location: /a.jpg\r\n")
    server.routes["/loop"] = status(302, "Location: /loop\r\n")
    assert one(f"{server.base}/r1").perimeter == 224
    outcome = one(f"{server.base}/loop")
    assert (outcome.error, outcome.kind) == ("too many redirects (more than 3) (permanent, 1 attempt)",
                                             ErrorKind.REDIRECTS)
    assert server.hits["/loop"] == 4


def test_a_redirect_to_another_scheme_is_refused(server):
    server.routes["/r"] = status(302, "Location: file:///etc/passwd\r\n")
    outcome = one(f"{server.base}/r")
    assert outcome.kind == ErrorKind.INVALID_URL and outcome.error.startswith("invalid URL")


@pytest.fixture
def watched_listener():
    """A socket on 127.0.0.1 that records every connection made to it."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                accepted.append(conn)
            except (TimeoutError, OSError):
                continue

    threading.Thread(target=run, daemon=True).start()
    yield sock.getsockname()[1], accepted
    stop.set()
    sock.close()


PUBLIC_ONLY = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, limits=FAST)


def test_loopback_is_refused_without_a_connection(watched_listener):
    port, accepted = watched_listener
    for host in ("127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"):
        outcome = one(f"http://{host}:{port}/x.jpg", PUBLIC_ONLY)
        assert outcome.kind in (ErrorKind.ADDRESS, ErrorKind.CONNECTION, ErrorKind.INVALID_URL), outcome
        if outcome.kind == ErrorKind.ADDRESS:
            assert outcome.error.startswith("address not allowed: ") and "loopback" in outcome.error
    assert one(f"http://127.0.0.1:{port}/x.jpg", PUBLIC_ONLY).error == \
        "address not allowed: 127.0.0.1 is loopback (permanent, 1 attempt)"
    assert accepted == []


def test_every_redirect_hop_is_checked(server, watched_listener):
    """The first hop is allowed (a named exception), the second goes to loopback or cloud metadata."""
    port, accepted = watched_listener
    server.routes["/to-loopback"] = status(302, f"Location: http://127.0.0.2:{port}/x.jpg\r\n")
    server.routes["/to-metadata"] = status(302, "Location: http://169.254.169.254/latest/meta-data/\r\n")
    from daemon.engine.netguard import parse_networks
    settings = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, limits=FAST,
                              addresses=AddressPolicy(allowed_networks=parse_networks("127.0.0.1/32")))
    outcome = one(f"{server.base}/to-loopback", settings)
    assert outcome.error == "address not allowed: 127.0.0.2 is loopback (permanent, 1 attempt)"
    outcome = one(f"{server.base}/to-metadata", settings)
    assert outcome.error == "address not allowed: 169.254.169.254 is link-local (permanent, 1 attempt)"
    assert accepted == []


# ---------------------------------------------------------------- TLS
@pytest.fixture
def tls_server(tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    srv = HostileServer(tls=context)
    srv.routes["/a.jpg"] = ok(JPEG)
    yield srv
    srv.close()


def test_a_certificate_nobody_vouches_for_fails_permanently_at_once(tls_server):
    outcome = one(f"{tls_server.base}/a.jpg")
    assert outcome.kind == ErrorKind.TLS and outcome.error.startswith("TLS error: ")
    assert outcome.error.endswith("(permanent, 1 attempt)")
    assert tls_server.hits.get("/a.jpg", 0) == 0


# ---------------------------------------------------------------- cancel
def held_open(closed: list):
    """A route that starts an image and then sends nothing more, until the client hangs up; the moment it
    did is appended to ``closed``."""
    def route(conn, srv):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + JPEG[:100])
        conn.settimeout(30)
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        closed.append(time.monotonic())
    return route


PATIENT = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL,
                         limits=DownloadLimits(connect_timeout_s=2, read_timeout_s=30, total_timeout_s=30))


def test_cancel_takes_downloads_off_the_loop_at_once_and_leaves_other_tasks_alone(server):
    closed = []
    server.routes["/held.jpg"] = held_open(closed)
    server.routes["/a.jpg"] = ok(JPEG)
    engine = Engine(PATIENT)
    engine.start()
    answers = {}
    try:
        engine.submit([(i, f"{server.base}/held.jpg?n={i}") for i in range(5)], lambda o: answers.setdefault(7, o),
                      key=7)
        wait_until(lambda: sum(server.hits.values()) == 5, timeout_s=10, what="five downloads under way")
        cancelled_at = time.monotonic()
        engine.cancel([7, 99])  # 99: no such task, ignored
        engine.submit([(i, f"{server.base}/a.jpg?n={i}") for i in range(3)], lambda o: answers.setdefault(8, o),
                      key=8)
        wait_until(lambda: 7 in answers and 8 in answers, timeout_s=5, what="both tasks to answer")
        assert [(o.index, o.error, o.kind) for o in answers[7]] == \
            [(i, "cancelled by request", ErrorKind.CANCELLED) for i in range(5)]
        assert [o.perimeter for o in answers[8]] == [224] * 3
        # The server sees each cancelled download's connection closed, well before any time limit.
        wait_until(lambda: len(closed) == 5, timeout_s=5, what="the five connections to close")
        assert max(closed) - cancelled_at < 2
        assert engine.images_in_flight == 0
    finally:
        engine.close()


def test_cancel_drops_gpu_waits_and_their_ends_change_nothing(server):
    server.routes["/a.jpg"] = ok(JPEG)
    now = [0.0]
    engine = Engine(EngineSettings(gpu_sleep_min_s=100, gpu_sleep_max_s=100, limits=FAST, addresses=LOCAL),
                    clock=lambda: now[0])
    engine.start()
    answers = []
    try:
        engine.submit([(i, f"{server.base}/a.jpg?n={i}") for i in range(3)], answers.append, key="t")
        wait_until(lambda: sum(server.hits.values()) == 3, timeout_s=10, what="three downloads")
        engine.cancel(["t"])
        wait_until(lambda: answers, timeout_s=5, what="the cancelled task to answer")
        assert [o.error for o in answers[0]] == ["cancelled by request"] * 3
        now[0] = 1000.0  # every GPU wait is over now: nothing more is answered
        engine.submit([], answers.append)  # wakes the loop, which fires the old deadlines
        wait_until(lambda: len(answers) == 2, timeout_s=5, what="the empty task to answer")
        assert answers[1] == [] and engine.images_in_flight == 0
    finally:
        engine.close()


# ---------------------------------------------------------------- closing
def test_closing_the_engine_answers_every_task_it_holds_and_every_later_one_as_lost(server):
    release = threading.Event()
    server.routes["/slow.jpg"] = lambda conn, srv: release.wait(10) and ok(JPEG)(conn, srv)
    server.routes["/a.jpg"] = ok(JPEG)
    engine = Engine(EngineSettings(gpu_sleep_min_s=5, gpu_sleep_max_s=5, limits=FAST, addresses=LOCAL))
    engine.start()
    answers = {}
    try:
        engine.submit([(0, f"{server.base}/slow.jpg")], lambda outs: answers.setdefault("downloading", outs))
        engine.submit([(1, f"{server.base}/a.jpg")], lambda outs: answers.setdefault("in its GPU wait", outs))
        wait_until(lambda: server.hits.get("/slow.jpg") and server.hits.get("/a.jpg"), timeout_s=5,
                   what="both downloads to start")
        started = time.monotonic()
        engine.close(timeout_s=5)
        assert time.monotonic() - started < 2
        assert answers == {"downloading": None, "in its GPU wait": None}  # lost: nothing of them recorded
        engine.submit([(2, f"{server.base}/a.jpg")], lambda outs: answers.setdefault("after close", outs))
        assert answers["after close"] is None
    finally:
        release.set()


def test_progress_is_reported_while_images_finish_a_few_times_a_second(image_server):
    """on_progress follows a task's images as they finish, before it answers: counts that only grow,
    reports at least PROGRESS_INTERVAL_S apart, none once the task has answered."""
    from daemon.engine.loop import PROGRESS_INTERVAL_S
    base, folder = image_server
    (folder / "a.png").write_bytes(image_bytes("PNG", 10, 20))
    reports, answered = [], threading.Event()
    settings = EngineSettings(gpu_sleep_min_s=0.05, gpu_sleep_max_s=0.9, limits=FAST, addresses=LOCAL)
    engine = Engine(settings, on_progress=lambda measured: reports.append((time.monotonic(), dict(measured))))
    engine.start()
    try:
        engine.submit([(i, f"{base}/a.png?{i}") for i in range(40)], lambda outcomes: answered.set(), key="t")
        assert answered.wait(30)
        answered_at = time.monotonic()
        time.sleep(2 * PROGRESS_INTERVAL_S)  # what would have come after the answer: nothing may
    finally:
        engine.close()
    counts = [measured["t"] for _, measured in reports]
    assert len(counts) >= 2 and counts == sorted(set(counts)) and counts[-1] < 40, counts
    gaps = [b - a for (a, _), (b, _) in zip(reports, reports[1:])]
    assert all(gap >= PROGRESS_INTERVAL_S * 0.95 for gap in gaps), gaps
    assert all(at <= answered_at for at, _ in reports)
