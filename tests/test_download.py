"""Downloading and processing one image: requests mocked by `responses`, one real trickling server."""
import io
import socket
import threading
import time

import pytest
import requests
import responses

from daemon.download import MAX_BACKOFF_S, DownloadLimits, fetch, fetch_with_retries, make_session
from daemon.engine import EngineSettings, measure
from daemon.measure import HEAD_BYTES, TAIL_BYTES, image_size
from daemon.netguard import AddressPolicy
from tests.conftest import image_bytes

URL = "http://images.example/shelf.jpg"
def measured(session, url, settings):
    """(width, height, perimeter, error, seconds, bytes) of one image processed as a pool process does."""
    o = measure([(0, url)], settings)[0]
    return o.width, o.height, o.perimeter, o.error, o.seconds, o.bytes


NO_SLEEP = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, limits=DownloadLimits(backoff_s=0))


@pytest.fixture
def session():
    with make_session(pool_size=4, policy=AddressPolicy(allow_private=True)) as s:  # the servers are local
        yield s


@responses.activate
def test_image_is_measured(session):
    responses.get(URL, body=image_bytes("JPEG", 640, 480), content_type="image/jpeg")
    assert measured(session, URL, NO_SLEEP)[:4] == (640, 480, 2240, None)


@responses.activate
def test_simulated_gpu_work_happens_for_every_measured_image(session):
    responses.get(URL, body=image_bytes("PNG", 8, 8))
    settings = EngineSettings(gpu_sleep_min_s=0.2, gpu_sleep_max_s=0.2)
    started = time.monotonic()
    assert measured(session, URL, settings)[3] is None
    assert time.monotonic() - started >= 0.2


@responses.activate
@pytest.mark.parametrize("status", [404, 403, 410])
def test_permanent_http_error_fails_at_once_with_its_status(session, status):
    responses.get(URL, status=status, body=image_bytes("JPEG", 8, 8))
    assert measured(session, URL, NO_SLEEP)[:4] == (None, None, None, f"HTTP {status} (permanent, 1 attempt)")
    assert len(responses.calls) == 1


@responses.activate
@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_http_error_is_tried_three_times_then_fails_saying_so(session, status):
    responses.get(URL, status=status)
    error = measured(session, URL, NO_SLEEP)[3]
    assert error == f"HTTP {status} (transient, gave up after 3 attempts)"
    assert len(responses.calls) == 3


@responses.activate
def test_transient_failure_then_success_measures_the_image(session):
    responses.get(URL, body=requests.exceptions.ConnectionError(ConnectionResetError(104, "reset")))
    responses.get(URL, status=503)
    responses.get(URL, body=image_bytes("PNG", 30, 20))
    assert measured(session, URL, NO_SLEEP)[:4] == (30, 20, 100, None)
    assert len(responses.calls) == 3


@responses.activate
def test_permanent_failure_after_a_transient_one_counts_both_attempts(session):
    responses.get(URL, status=502)
    responses.get(URL, status=404)
    assert measured(session, URL, NO_SLEEP)[3] == "HTTP 404 (permanent, after 2 attempts)"


@responses.activate
def test_backoff_doubles_with_jitter_and_honours_retry_after(session):
    responses.get(URL, status=503)
    responses.get(URL, status=429, headers={"Retry-After": "3"})
    responses.get(URL, status=503, headers={"Retry-After": "3600"})
    waits = []
    with pytest.raises(Exception, match="gave up after 4 attempts"):
        fetch_with_retries(session, URL, DownloadLimits(attempts=4, backoff_s=0.5), sleep=waits.append)
    assert 0.25 <= waits[0] <= 0.75  # 0.5 s x jitter 0.5..1.5
    assert waits[1] == 3  # Retry-After is longer than the 1 s backoff
    assert waits[2] == MAX_BACKOFF_S  # an hour's Retry-After is capped


@responses.activate
@pytest.mark.parametrize("exc, reason", [
    (requests.exceptions.ConnectTimeout(), "timed out: no connection within 5 s (transient, gave up after 3 attempts)"),
    (requests.exceptions.ReadTimeout(), "timed out: no data for 10 s (transient, gave up after 3 attempts)"),
    (requests.exceptions.ConnectionError(ConnectionRefusedError(111, "Connection refused")),
     "connection failed: ConnectionRefusedError: [Errno 111] Connection refused (transient, gave up after 3 attempts)"),
    (requests.exceptions.TooManyRedirects(), "too many redirects (more than 3) (permanent, 1 attempt)"),
])
def test_transport_failure_says_what_happened(session, exc, reason):
    responses.get(URL, body=exc)
    assert measured(session, URL, NO_SLEEP)[:4] == (None, None, None, reason)


@responses.activate
def test_html_served_as_jpeg_is_not_an_image(session):
    responses.get(URL, body="<html>login</html>", content_type="image/jpeg")
    width, height, perim, error, *_ = measured(session, URL, NO_SLEEP)
    assert perim is None and error.startswith("not an image")


@responses.activate
def test_declared_size_over_the_cap_is_refused_before_reading(session):
    responses.get(URL, body=b"x" * 1000, headers={"Content-Length": "1000"}, auto_calculate_content_length=False)
    with pytest.raises(Exception, match="too large: 1000 bytes"):
        fetch(session, URL, DownloadLimits(max_image_bytes=999))


def test_body_over_the_cap_without_length_is_cut_off_while_streaming(session):
    with _raw_server(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100_000) as url:
        with pytest.raises(Exception, match="too large: over 1000 bytes"):
            fetch(session, url, DownloadLimits(max_image_bytes=1000))


def test_server_that_trickles_is_cut_off_at_the_total_deadline(session):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
    with _raw_server(head, trickle_s=0.05) as url:
        started = time.monotonic()
        with pytest.raises(Exception, match="timed out: body not complete after 0.5 s"):
            fetch(session, url, DownloadLimits(total_timeout_s=0.5, read_timeout_s=1))
        assert time.monotonic() - started < 5


class _raw_server:
    """A one-connection TCP server on 127.0.0.1 port 0 that sends `payload`, then trickles a byte at a time."""

    def __init__(self, payload: bytes, trickle_s: float | None = None):
        self.payload, self.trickle_s = payload, trickle_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.done = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/img.jpg"

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(self.payload)
                while self.trickle_s and not self.done.wait(self.trickle_s):
                    conn.sendall(b"x")
            except OSError:
                pass

    def __exit__(self, *exc):
        self.done.set()
        self.sock.close()


@responses.activate
def test_big_image_is_measured_from_its_head_and_tail_with_memory_bounded(session):
    from PIL import Image
    noise = io.BytesIO()
    Image.effect_noise((1600, 1200), 80).convert("RGB").save(noise, format="JPEG", quality=95)
    big = noise.getvalue()
    assert len(big) > 4 * HEAD_BYTES
    responses.get(URL, body=big)
    body = fetch(session, URL, DownloadLimits())
    assert (body.size, len(body.head), len(body.tail)) == (len(big), HEAD_BYTES, TAIL_BYTES)
    assert image_size(body) == (1600, 1200)
