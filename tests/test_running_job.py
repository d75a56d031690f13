"""A running job as a client watches it, through the real API and daemon: results paged by image index while
some chunks are recorded and others are not, and progress that moves while images finish, not a chunk at a
time (the status, and `retailpulse-ctl follow`)."""
import shutil
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
