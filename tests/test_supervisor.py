"""The supervisor in-process, with a real process pool and a real image server: resuming and chunking."""
import json
import multiprocessing
import os
import time

import pytest

from daemon.stores import load_store_master
from daemon.supervisor import Supervisor, SupervisorSettings, uncovered
from daemon.worker import WorkerSettings, init_process
from tests.conftest import SAMPLE_STORE_MASTER, image_bytes

STORES = load_store_master(SAMPLE_STORE_MASTER)


@pytest.mark.parametrize("total, covered, size, expected", [
    (10, [], 4, [(0, 4), (4, 8), (8, 10)]),
    (10, [(0, 4)], 4, [(4, 8), (8, 10)]),
    (10, [(4, 8)], 3, [(0, 3), (3, 4), (8, 10)]),
    (10, [(0, 4), (4, 10)], 4, []),
    (5, [(2, 3)], 10, [(0, 2), (3, 5)]),
])
def test_uncovered_images_are_cut_into_chunks(total, covered, size, expected):
    assert list(uncovered(total, covered, size)) == expected


@pytest.fixture
def pool():
    settings = WorkerSettings(threads_per_process=4, gpu_sleep_min_s=0, gpu_sleep_max_s=0)
    with multiprocessing.get_context("forkserver").Pool(1, init_process, (settings,)) as pool:
        yield pool


def run_until_finished(spool, pool, chunk_images=3):
    supervisor = Supervisor(spool, STORES, pool, SupervisorSettings(chunk_images=chunk_images, poll_interval_s=0.02))
    supervisor.run(lambda: bool(spool.job_ids("done") or spool.job_ids("failed")) and not supervisor.jobs)


def put_active_job(spool, urls):
    job_id = spool.submit(1, [{"store_id": "RP00001", "visit_time": "t", "image_url": urls}])
    spool.claim(job_id)
    return job_id


def test_restarted_daemon_keeps_recorded_results_and_does_only_the_rest(spool, pool, image_server):
    base, folder = image_server
    (folder / "a.png").write_bytes(image_bytes("PNG", 10, 20))
    job_id = put_active_job(spool, [f"{base}/a.png"] * 7)
    # What a daemon killed after its first chunk leaves behind; the marker shows whether it is redone.
    recorded = [{"index": i, "store_id": "RP00001", "image_url": f"{base}/a.png", "perimeter": -1, "error": None}
                for i in range(3)]
    spool.write_results(job_id, 0, 3, recorded)

    run_until_finished(spool, pool)

    results = [json.loads(line) for line in spool.iter_result_lines(job_id)]
    assert [r["index"] for r in results] == list(range(7))
    assert [r["perimeter"] for r in results] == [-1, -1, -1, 60, 60, 60, 60]
    assert spool.read_status(job_id)["status"] == "completed"
    assert spool.job_ids("done") == [job_id]


def test_unreadable_results_file_is_moved_aside_and_its_images_redone(spool, pool, image_server):
    base, folder = image_server
    (folder / "a.png").write_bytes(image_bytes("PNG", 10, 20))
    job_id = put_active_job(spool, [f"{base}/a.png"] * 4)
    (spool.results_dir(job_id)).mkdir()
    (spool.results_dir(job_id) / "00000000-00000003.jsonl").write_bytes(b'{"index": 0}\n{"ind')

    run_until_finished(spool, pool)

    assert [json.loads(line)["perimeter"] for line in spool.iter_result_lines(job_id)] == [60] * 4
    assert [p.name for p in (spool.root / "corrupt").iterdir() if p.suffix == ".why"]


def test_unreadable_job_file_fails_that_job_with_the_reason(spool, pool):
    (spool.root / "incoming" / "5.json").write_bytes(b"\x00not json")
    supervisor = Supervisor(spool, STORES, pool, SupervisorSettings(poll_interval_s=0.02))
    supervisor.admit_incoming()
    status = spool.read_status(5)
    assert status["status"] == "failed"
    assert status["error"][0]["error"].startswith("job file unreadable")
    assert spool.job_ids("active") == [] and len(list((spool.root / "corrupt").iterdir())) == 2


def test_start_up_removes_stale_leftovers_but_not_a_write_in_progress(spool, pool):
    stale, fresh = spool.root / "tmp" / "7.json.1.aa", spool.root / "tmp" / "8.json.2.bb"
    stale.write_text("half")
    fresh.write_text("being written by the API")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    Supervisor(spool, STORES, pool, SupervisorSettings()).run(lambda: True)
    assert [p.name for p in (spool.root / "tmp").iterdir()] == [fresh.name]
