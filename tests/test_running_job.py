"""A running job as a client watches it, through the real API and daemon: results paged by image index while
some chunks are recorded and others are not, and progress that moves while images finish, not a chunk at a
time (the status, and `retailpulse-ctl follow`)."""
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, image_bytes, visit, wait_until


def gate(opened: threading.Event):
    """An ImageServer hook: the image is served only once ``opened`` is set (60 s at most), so its chunk stays
    in flight for as long as the test needs, without guessing how long that is."""
    def hook(handler):
        opened.wait(60)
        body = image_bytes("PNG", 30, 20)
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return hook


@pytest.fixture
def opened():
    event = threading.Event()
    yield event
    event.set()  # whatever the test did, no server thread stays waiting


def results_page(service, job_id: int, offset: int, limit: int) -> list[int]:
    r = service.http.get(f"{service.base}/api/results", params={"jobid": job_id, "offset": offset, "limit": limit},
                         timeout=30)
    assert r.status_code == 200, r.text
    assert (r.json()["offset"], r.json()["limit"]) == (offset, limit)
    return [line["index"] for line in r.json()["results"]]


def test_results_pages_are_windows_of_image_indices_while_the_first_chunk_is_still_running(
        start_service, image_server, opened):
    """64 slow images, then 100 fast ones: chunks 64..127 and 128..163 are recorded while 0..63 are in flight.
    Each page holds the recorded images of its own index window: none on two pages, none missing."""
    base, folder = image_server
    (folder / "fast.png").write_bytes(image_bytes("PNG", 30, 20))
    slow = [f"/slow-{i}.png" for i in range(64)]
    for path in slow:
        image_server.on(path, gate(opened))
    service = start_service()
    job_id = service.submit([visit("RP00001", [base + path for path in slow]),
                             visit("RP00002", [f"{base}/fast.png?{i}" for i in range(100)])])
    wait_until(lambda: service.status(job_id).get("images_done") == 100, what="the two fast chunks recorded")

    assert results_page(service, job_id, 0, 100) == list(range(64, 100))
    assert results_page(service, job_id, 100, 100) == list(range(100, 164))
    assert results_page(service, job_id, 0, 50) == []
    assert results_page(service, job_id, 50, 50) == list(range(64, 100))

    opened.set()
    assert service.wait(job_id)["status"] == "completed"
    assert results_page(service, job_id, 0, 100) == list(range(0, 100))
    assert results_page(service, job_id, 100, 100) == list(range(100, 164))
    assert results_page(service, job_id, 160, 100) == list(range(160, 164))


class Gates:
    """Images the test lets through one at a time: image i of ``paths`` is served once ``open(i)`` is called."""

    def __init__(self, image_server, count: int):
        self.events = [threading.Event() for _ in range(count)]
        self.urls = []
        for i, event in enumerate(self.events):
            image_server.on(f"/gated-{i}.png", gate(event))
            self.urls.append(f"{image_server.base}/gated-{i}.png")

    def open(self, *indices: int) -> float:
        for i in indices:
            self.events[i].set()
        return time.monotonic()

    def close(self) -> None:
        for event in self.events:
            event.set()


@pytest.fixture
def gates(image_server):
    made = []

    def make(count: int) -> Gates:
        made.append(Gates(image_server, count))
        return made[-1]

    yield make
    for made_gates in made:
        made_gates.close()


#: How soon an image that finished shows in the status: the engine reports four times a second, the
#: supervisor writes once a second; the rest is slack for a loaded machine.
SHOWN_WITHIN_S = 1.5


@pytest.mark.slow  # waits for the once-a-second writes, on purpose
def test_progress_moves_with_each_image_while_its_chunk_is_not_recorded(start_service, gates):
    """A job of 5 images is one chunk: images_done stays 0 until the last one, but images_processed follows
    each image that finishes, within a second or so; retailpulse-ctl follow shows the same, line by line."""
    gated = gates(5)
    service = start_service()
    job_id = service.submit([visit("RP00001", gated.urls)])
    follow = subprocess.Popen([sys.executable, "-m", "ctl", "--spool-dir", str(service.spool_dir), "follow",
                               str(job_id), "--interval", "0.1"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**service.env})
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(iter(follow.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        seen = []
        for released in ([0], [1, 2], [3]):
            opened_at = gated.open(*released)
            expected = sum(event.is_set() for event in gated.events)
            doc = wait_until(lambda: (d := service.status(job_id)).get("images_processed", 0) >= expected and d,
                             timeout_s=10, what=f"{expected} images processed", interval_s=0.02)
            seen.append((round(time.monotonic() - opened_at, 2), doc["images_processed"], doc["images_done"]))
            wait_until(lambda: any(f"] {expected}/5 images (0 recorded), 0 failed" in line for line in printed),
                       timeout_s=10, what=f"follow to show {expected}/5", interval_s=0.02)
        assert [(processed, done) for _, processed, done in seen] == [(1, 0), (3, 0), (4, 0)], seen
        assert all(delay < SHOWN_WITHIN_S for delay, _, _ in seen), seen
        gated.open(4)
        final = service.wait(job_id)
        assert (final["status"], final["images_done"], final["images_processed"]) == ("completed", 5, 5)
        assert follow.wait(timeout=30) == 0
    finally:
        follow.kill()
        reader.join(timeout=10)
    out = "".join(printed)
    assert "\r" not in out and "\x1b" not in out, repr(out)  # a pipe gets lines, not a terminal's redraws
    assert printed[-1].startswith(f"job {job_id} completed") and printed[-1].endswith("] 5/5 images, 0 failed\n")


def test_progress_never_goes_back_when_the_daemon_is_killed_and_its_unrecorded_images_are_redone(
        start_service, image_server, gates):
    """images_processed counts images not yet on disk; a kill -9 loses them (their chunk is redone). What a
    client polls through the kill and the restart never goes back, and images_done only counts what is on disk."""
    base, folder = image_server
    (folder / "fast.png").write_bytes(image_bytes("PNG", 30, 20))
    gated = gates(1)
    service = start_service()
    job_id = service.submit([visit("RP00001", [f"{base}/fast.png?{i}" for i in range(63)] + gated.urls)])
    before = wait_until(lambda: (d := service.status(job_id)).get("images_processed", 0) == 63 and d,
                        what="63 of the chunk's 64 images processed")
    assert before["images_done"] == 0  # its chunk is not recorded: the 63 are not on disk

    polled, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            doc = service.status(job_id)
            polled.append((doc.get("images_processed", 0), doc.get("images_done", 0)))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        service.daemon.kill()
        service.daemon.wait(timeout=30)
        service.start_daemon()
        service.wait_for_daemon()
        wait_until(lambda: image_server.hits["/fast.png?62"] == 2, what="the chunk redone by the new daemon")
        gated.open(0)
        final = service.wait(job_id)
    finally:
        stop.set()
        poller.join(timeout=30)
    assert (final["images_done"], final["images_processed"]) == (64, 64)
    processed = [p for p, _ in polled]
    assert processed == sorted(processed) and processed[0] == 63, processed[:5]
    assert all(done in (0, 64) for _, done in polled)  # images_done: the chunk on disk, or not
