"""A slow path makes a job slower, never failed: the engine's downloads against a real HTTP server on 127.0.0.1
whose every connection shares one fixed rate (a link of that speed: each of N transfers gets 1/N of it), so
that too many at once each run past the whole-attempt deadline, as 256 large images did at 25 ms. And a
server that trickles is still cut off: the bound on one image's time is kept."""
import io
import random
import socket
import threading
import time

import pytest
from PIL import Image

from daemon.engine.loop import FORGIVEN_SLOW, measure
from daemon.engine.netguard import AddressPolicy
from daemon.engine.outcome import ErrorKind
from daemon.engine.settings import DownloadLimits, EngineSettings

pytestmark = pytest.mark.slow  # seconds of real transfer on purpose

LOCAL = AddressPolicy(allow_private=True)


def noisy_jpeg(side: int) -> bytes:
    rng = random.Random(side)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(out, "JPEG", quality=95)
    return out.getvalue()


class SharedLink:
    """HTTP/1.0 on 127.0.0.1, port 0: GET /<anything> answers ``body``, written 4 KiB at a time, each piece
    waiting its turn in one token bucket of ``rate`` bytes/s shared by every connection."""

    def __init__(self, body: bytes, rate: float):
        self.body, self.rate = body, rate
        self.lock, self.next_free = threading.Lock(), time.monotonic()
        self.server = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.base = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(self.body))
                for at in range(0, len(self.body), 4096):
                    piece = self.body[at:at + 4096]
                    with self.lock:  # this piece's slot on the link
                        start = max(self.next_free, time.monotonic())
                        self.next_free = start + len(piece) / self.rate
                    time.sleep(max(0.0, start - time.monotonic()))
                    conn.sendall(piece)
            except OSError:
                pass

    def close(self) -> None:
        self.closed.set()
        self.server.close()


def test_downloads_that_share_a_slow_link_too_thinly_are_slowed_not_failed():
    body = noisy_jpeg(300)  # ~110 KB
    link = SharedLink(body, rate=2e6)
    try:
        images = 48
        # 48 at once: each gets 42 KB/s and needs 2.6 s, past the 1.5 s bound on a whole attempt.
        settings = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL, max_transfers=images,
                                  limits=DownloadLimits(total_timeout_s=1.5, read_timeout_s=5, backoff_s=0.01))
        started = time.monotonic()
        outcomes = measure([(i, f"{link.base}/{i}.jpg") for i in range(images)], settings)
        took = time.monotonic() - started
    finally:
        link.close()
    failed = [o.error for o in outcomes if o.error]
    assert not failed, f"{len(failed)} failed: {failed[:2]}"
    assert all(o.perimeter == 1200 for o in outcomes)
    assert took < 20, took  # the link's 2.6 s, and the attempts that taught the engine


def test_a_server_that_trickles_is_still_cut_off():
    body = noisy_jpeg(300)
    link = SharedLink(body, rate=20e3)  # alone on the link, one image needs 5 s
    try:
        settings = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, addresses=LOCAL, max_transfers=8,
                                  limits=DownloadLimits(total_timeout_s=0.5, read_timeout_s=5, backoff_s=0.01,
                                                        attempts=2))
        started = time.monotonic()
        outcomes = measure([(i, f"{link.base}/{i}.jpg") for i in range(8)], settings)
        took = time.monotonic() - started
    finally:
        link.close()
    assert all(o.kind is ErrorKind.TIMEOUT and "not complete within 0.5 s" in o.error for o in outcomes), outcomes[0]
    assert took < (FORGIVEN_SLOW + 2) * 0.5 * 8 + 5, took  # bounded, however many share the path
