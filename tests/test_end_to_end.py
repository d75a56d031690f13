"""The whole path with real processes: API and daemon on a tmp spool, images from a port-0 HTTP server."""
import json
import subprocess
import sys
import threading

import pytest

from daemon.supervisor.stores import load_store_master
from tests.conftest import REPO, SAMPLE_STORE_MASTER, image_bytes, visit

STORES = load_store_master(SAMPLE_STORE_MASTER)
SIZES = [("JPEG", "jpg", 640, 480), ("PNG", "png", 100, 50), ("WEBP", "webp", 33, 77), ("JPEG", "jpg", 1, 1999)]


@pytest.fixture
def images(image_server):
    """URLs of real image files of known sizes: {url: (width, height)}."""
    base, folder = image_server
    known = {}
    for i, (fmt, ext, width, height) in enumerate(SIZES):
        (folder / f"img{i}.{ext}").write_bytes(image_bytes(fmt, width, height))
        known[f"{base}/img{i}.{ext}"] = (width, height)
    return known


def test_job_completes_with_the_right_perimeter_for_every_image(start_service, images):
    service = start_service()
    urls = list(images)
    job_id = service.submit([visit("RP00001", urls[:2]), visit("RP00002", urls[2:])])
    status = service.wait(job_id)
    assert status["status"] == "completed" and "error" not in status
    assert (status["images_total"], status["images_done"], status["images_failed"]) == (4, 4, 0)
    results = service.results(job_id)["results"]
    assert [r["image_url"] for r in results] == urls
    for r in results:
        width, height = images[r["image_url"]]
        assert (r["width"], r["height"], r["perimeter"], r["error"]) == (width, height, 2 * (width + height), None)
    assert results[2]["store_name"] == "SHARMA & SONS, GENERAL STORE"
    assert results[2]["area_code"] == STORES["RP00002"].area_code


def test_unknown_store_fails_the_job_naming_exactly_that_store(start_service, images):
    service = start_service()
    urls = list(images)
    job_id = service.submit([visit("RP00001", urls[:1]), visit("RP99999", urls[1:2]), visit("RP00003", urls[2:])])
    status = service.wait(job_id)
    assert status["status"] == "failed"
    assert [(e["store_id"], e["error"]) for e in status["error"]] == [("RP99999", "store_id not in the store master")]
    results = service.results(job_id)["results"]
    assert [r["perimeter"] is not None for r in results] == [True, False, True, True]


def test_image_that_cannot_be_downloaded_fails_the_job_naming_its_store(start_service, images, image_server):
    service = start_service()
    missing = f"{image_server.base}/no-such-image.jpg"
    urls = list(images)
    job_id = service.submit([visit("RP00004", urls), visit("RP00005", [urls[0], missing])])
    status = service.wait(job_id)
    assert status["status"] == "failed"
    assert status["error"] == [{"store_id": "RP00005", "error": "HTTP 404 (permanent, 1 attempt)",
                                "image_url": missing, "images_failed": 1}]
    assert status["images_failed"] == 1 and status["images_done"] == 6


def test_results_keep_submission_order_across_many_chunks(start_service, images):
    service = start_service("--chunk-images", "7", "--images-per-process", "14")
    urls = list(images)
    visits = [visit(f"RP0000{1 + v % 9}", [urls[(v + i) % len(urls)] for i in range(v % 5 + 1)]) for v in range(60)]
    expected = [url for v in visits for url in v["image_url"]]
    job_id = service.submit(visits)
    assert service.wait(job_id)["status"] == "completed"
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(len(expected)))
    assert [r["image_url"] for r in results] == expected
    assert [r["store_id"] for r in results] == [v["store_id"] for v in visits for _ in v["image_url"]]
    # and on disk, as an operator would find it: one results file per chunk of 7
    assert len(list((service.spool.root / "results" / str(job_id)).iterdir())) == -(-len(expected) // 7)


def test_concurrent_jobs_all_finish(start_service, images):
    service = start_service("--chunk-images", "4")
    urls = list(images)
    job_ids, lock = [], threading.Lock()

    def submit(store):
        job_id = service.submit([visit(store, urls * 5)])
        with lock:
            job_ids.append(job_id)

    threads = [threading.Thread(target=submit, args=(f"RP0000{n}",)) for n in range(1, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(job_ids)) == 5
    for job_id in job_ids:
        assert service.wait(job_id)["status"] == "completed"
        assert len(service.results(job_id)["results"]) == 20


def test_finished_job_is_filed_by_state_with_readable_files(start_service, images):
    service = start_service()
    ok = service.submit([visit("RP00001", list(images)[:1])])
    bad = service.submit([visit("RP77777", list(images)[:1])])
    service.wait(ok)
    service.wait(bad)
    root = service.spool.root
    assert service.spool.jobs.ids("done") == [ok] and service.spool.jobs.ids("failed") == [bad]
    assert service.spool.jobs.ids("incoming") == service.spool.jobs.ids("active") == []
    assert json.loads((root / "status" / f"{bad}.json").read_text())["status"] == "failed"
    assert list((root / "tmp").iterdir()) == []


def test_second_daemon_on_the_same_spool_refuses_to_start(start_service):
    service = start_service()
    second = subprocess.run([sys.executable, "-m", "daemon", "--spool-dir", str(service.spool.root),
                             "--store-master", str(SAMPLE_STORE_MASTER)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert "another daemon is working on" in second.stderr
    assert service.daemon.poll() is None


def test_daemon_refuses_to_download_from_loopback_unless_allowed(start_service, images, image_server):
    service = start_service("--allow-private-addresses", "false")  # the production default
    url = list(images)[0]
    status = service.wait(service.submit([visit("RP00001", [url])]))
    assert status["status"] == "failed"
    assert status["error"][0]["error"] == "address not allowed: 127.0.0.1 is loopback (permanent, 1 attempt)"
    assert image_server.hits == {}
