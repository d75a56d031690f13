"""What a clumsy operator and a sick disk still broke (issue 31), against the real API and daemon: an entry of the
spool that is not what it should be is moved aside with a note and answered 503 naming it; one the daemon may
not read or note (permissions, a full disk) is a log line, a 503 naming it and a retry later; never a crash,
never a crash loop; every name in incoming/ is taken or moved aside saying why; purge answers in bounded time."""
import json
import logging
import os
import shutil

import pytest

from spool import Spool, Status, upkeep
from spool.records import JobMeta, JobStatus, Phase
from tests.conftest import call_wsgi, records, result_line, visit, wait_until
from tests.service import WITHOUT_FILE_PERMISSION_OVERRIDE
from tests.test_engine import JPEG
from tests.test_supervisor import fill, small_disk  # noqa: F401 (a fixture)
from webapi import app as webapi_app


@pytest.fixture
def shelf_url(image_server):
    (image_server.folder / "a.jpg").write_bytes(JPEG)
    return f"{image_server.base}/a.jpg"


def restart_daemon(service) -> None:
    service.daemon.terminate()
    assert service.daemon.wait(timeout=30) == 0
    service.start_daemon()
    service.wait_for_daemon()  # before: exit 1 in recovery, at every start


def set_aside(spool: Spool) -> dict[str, str]:
    """corrupt/'s entries (what each was called) -> its note, for those whose note is written (it follows)."""
    folder = spool.root / "corrupt"
    names = os.listdir(folder)
    return {name.rsplit(".", 1)[0]: (folder / f"{name}.why").read_text() for name in names
            if not name.endswith(".why") and f"{name}.why" in names}


def test_a_file_where_a_results_folder_should_be_is_a_503_naming_it_and_never_stops_the_daemon(start_service,
                                                                                               shelf_url):
    service = start_service()
    get = lambda route, **params: service.http.get(f"{service.base}{route}", params=params, timeout=30)  # noqa: E731
    done = service.submit([visit("RP00001", [shelf_url])])
    service.wait(done)
    shutil.rmtree(service.spool.results.folder(done))
    service.spool.results.folder(done).write_text("a hand made this")
    for route, params in (("/api/results", {}), ("/api/results", {"offset": 0}), ("/api/results.csv", {})):
        r = get(route, jobid=done, **params)
        assert r.status_code == 503, (route, params, r.status_code)  # before: 500
        assert r.json()["error"].startswith(f"results damaged: results/{done}: not a folder"), r.text

    upcoming = int((service.spool.root / "next_job_id").read_text())
    service.spool.results.folder(upcoming).write_text("in the way of the next job")
    job_id = service.submit([visit("RP00001", [shelf_url])])
    assert job_id == upcoming
    assert service.wait(job_id)["status"] == Status.COMPLETED  # before: the daemon crashed, every restart too
    assert service.daemon.poll() is None
    assert set_aside(service.spool)[f"results-{upcoming}"].startswith(f"results/{upcoming}: not a folder")

    restart_daemon(service)  # the finished job's file is found at start-up and set aside; its status stays
    wait_until(lambda: f"results-{done}" in set_aside(service.spool), what="the file to be moved aside")
    r = get("/api/results", jobid=done)
    assert (r.status_code, r.json()["error"].split(";")[0]) == (
        503, f"results damaged: results/{done}: images 0..0 have no results file")
    assert service.status(done)["status"] == Status.COMPLETED


def test_every_name_in_incoming_is_taken_or_moved_aside_saying_why_and_ids_never_collide(start_service, shelf_url):
    service = start_service()
    spool, incoming = service.spool, service.spool.root / "incoming"
    upcoming = int((spool.root / "next_job_id").read_text()) if (spool.root / "next_job_id").exists() else 1
    by_hand = upcoming + 10
    submit_body = {"count": 1, "visits": [visit("RP00001", [shelf_url])]}
    job_file = {"job_id": by_hand, "submitted_at": "2026-11-23T10:00:00Z", **submit_body}
    for name, content in ((f"{'1' * 38}.json", "{}"), ("notes.txt", "remember the milk"),
                          (f"{upcoming + 5}.json", json.dumps(submit_body)), (f"{by_hand}.json", json.dumps(job_file))):
        spool.files.write_atomic(incoming / name, content.encode())

    wait_until(lambda: not os.listdir(incoming), what="incoming/ to be empty")  # before: two names stayed, silent
    assert service.wait(by_hand)["status"] == Status.COMPLETED  # a job file dropped by hand is taken, with its id
    notes = set_aside(spool)
    assert notes[f"incoming-{'1' * 38}.json"].startswith(f"incoming/{'1' * 38}.json: {'1' * 38} is not a job id")
    assert notes["incoming-notes.txt"].startswith("incoming/notes.txt: not a job file's name")
    refused = service.status(upcoming + 5)
    assert refused["status"] == Status.FAILED
    why = refused["error"][0]["error"]
    assert "missing required field `job_id`" in why and "a job file is what the API writes" in why
    assert "POST its body to /api/submit/" in why  # what to do instead
    log = service.daemon_output()
    assert "incoming/notes.txt" in log and f"incoming/{'1' * 38}.json" in log

    assert service.submit([visit("RP00001", [shelf_url])]) > by_hand  # before: the API would give it again


def test_a_job_file_whose_id_another_job_has_is_moved_aside_not_run_twice(start_service, shelf_url):
    service = start_service()
    job_id = service.submit([visit("RP00001", [shelf_url])])
    service.wait(job_id)
    done = service.spool.jobs.path("done", job_id).read_bytes()
    service.spool.files.write_atomic(service.spool.jobs.path("incoming", job_id), done)  # a copy, dropped back
    wait_until(lambda: f"incoming-{job_id}.json" in set_aside(service.spool), what="the copy to be moved aside")
    assert set_aside(service.spool)[f"incoming-{job_id}.json"].startswith(
        f"incoming/{job_id}.json: job {job_id} exists already (done/{job_id}.json)")
    assert service.spool.jobs.folder_of(job_id) == "done" and len(service.results(job_id)["results"]) == 1


@pytest.mark.parametrize("folder", ["", "results", "incoming", "control"])
def test_chmod_000_under_the_running_daemon_is_a_log_line_and_a_503_then_the_work_goes_on(start_service, shelf_url,
                                                                                          folder):
    service = start_service(prefix=WITHOUT_FILE_PERMISSION_OVERRIDE)
    get = lambda route, **params: service.http.get(f"{service.base}{route}", params=params, timeout=30)  # noqa: E731
    done = service.submit([visit("RP00001", [shelf_url])])
    service.wait(done)
    path = service.spool.root / folder
    os.chmod(path, 0)
    try:
        waiting = service.submit([visit("RP00001", [shelf_url])]) if folder in ("results", "control") else None
        wait_until(lambda: "the daemon carries on and tries again" in service.daemon_output(),
                   what="the daemon to say what it cannot read")
        r = get("/metrics")
        if folder in ("", "incoming"):  # what /metrics reads itself
            assert r.status_code == 503, r.text  # before: 500
            assert r.json()["error"].startswith("cannot read the spool for /metrics: ") and "Permission denied" in \
                r.json()["error"]
        if folder == "results":
            r = get("/api/results", jobid=done)
            assert r.status_code == 503 and r.json()["error"].startswith(f"cannot read results/{done}/"), r.text
        assert service.daemon.poll() is None  # before: a traceback and exit 1
    finally:
        os.chmod(path, 0o700)
    if waiting is not None:
        assert service.wait(waiting, timeout_s=30)["status"] == Status.COMPLETED  # tried again, once it can
    assert service.wait(service.submit([visit("RP00001", [shelf_url])]))["status"] == Status.COMPLETED
    wait_until(lambda: "works again" in service.daemon_output(), what="the daemon to say the trouble is over")


def test_an_unreadable_results_folder_of_a_job_is_a_503_naming_it(start_service, shelf_url):
    service = start_service(prefix=WITHOUT_FILE_PERMISSION_OVERRIDE)
    job_id = service.submit([visit("RP00001", [shelf_url])])
    service.wait(job_id)
    os.chmod(service.spool.results.folder(job_id), 0)
    for route in ("/api/results", "/api/results.csv"):
        r = service.http.get(f"{service.base}{route}", params={"jobid": job_id}, timeout=30)
        assert r.status_code == 503, (route, r.status_code)  # before: 500
        assert r.json()["error"].startswith(f"cannot read results/{job_id}/: Permission denied")


def test_a_bad_job_file_on_a_full_disk_waits_for_room_instead_of_crashing_the_daemon(  # noqa: F811 (small_disk)
        start_service, small_disk):
    service = start_service(spool_dir=small_disk / "spool")
    upcoming = service.spool.jobs.next_id()
    service.spool.files.write(service.spool.jobs.meta_path(upcoming), JobMeta(upcoming, 1))  # as the API writes
    staged = small_disk / "staged.json"  # on the same file system: renamed into incoming/ once the disk is full
    staged.write_text("{not a job")
    filler = fill(small_disk)
    try:
        os.rename(staged, service.spool.jobs.path("incoming", upcoming))
        wait_until(lambda: f"job {upcoming}: cannot fail it" in service.daemon_output(),
                   what="the daemon to say it cannot fail the job yet")
        assert service.daemon.poll() is None  # before: ENOSPC writing the .why note, a traceback, exit 1
    finally:
        filler.unlink()
    doc = wait_until(lambda: (d := service.status(upcoming))["status"] == Status.FAILED and d, timeout_s=30,
                     what="the job to be failed once there is room")
    assert doc["error"][0]["error"].startswith(f"job file unreadable: {upcoming}.json: ")
    note = wait_until(lambda: set_aside(service.spool).get(f"active-{upcoming}.json"), what="the file moved aside")
    assert note.startswith("job file unreadable")  # its status first, then the file aside
    assert service.daemon.poll() is None


def test_a_note_that_a_full_disk_refuses_is_logged_and_the_file_still_moved_aside(small_disk, caplog):  # noqa: F811
    spool = Spool(small_disk / "spool").create()
    odd = spool.root / "incoming" / "odd"
    odd.write_text("x")
    filler = fill(small_disk)
    try:
        with caplog.at_level(logging.ERROR, logger="retailpulse.spool"):
            dest = spool.files.move_aside(odd, "why it went")
    finally:
        filler.unlink()
    assert dest.exists() and not odd.exists() and not dest.with_name(dest.name + ".why").exists()
    assert f"incoming/odd moved to corrupt/{dest.name}; its note could not be written" in caplog.text
    assert "why it went" in caplog.text


def test_a_badly_named_tmp_file_goes_to_corrupt_at_start_up(start_service):
    service = start_service()
    (service.spool.root / "tmp" / "weird name").write_text("left by a hand")  # fresh: no age makes it go
    restart_daemon(service)
    assert os.listdir(service.spool.root / "tmp") == []  # before: left in place
    assert set_aside(service.spool)["tmp-weird name"].startswith("tmp/weird name: not a name the spool's writers")


def finished_jobs(spool: Spool, n: int) -> list[int]:
    ids = []
    for _ in range(n):
        job_id = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]))
        spool.jobs.claim(job_id)
        spool.results.write(job_id, 0, 1, [result_line(0)])
        spool.jobs.write_status(JobStatus(str(job_id), Status.COMPLETED, Phase.FINISHED, images_total=1))
        spool.jobs.finish(job_id, Status.COMPLETED)
        ids.append(job_id)
    return ids


def test_purge_of_many_jobs_answers_within_its_budget_and_says_how_many_are_left(spool, monkeypatch):
    ids = finished_jobs(spool, 5)
    monkeypatch.setattr(webapi_app, "PURGE_BUDGET_S", 0.0)  # as if each batch took the whole budget
    monkeypatch.setattr(upkeep, "PURGE_BATCH", 2)
    app = webapi_app.make_app(spool)
    answers = []
    while not answers or answers[-1]["remaining"]:
        r = call_wsgi(app, "POST", "/api/purge", query="older_than_days=0")
        assert r.status_code == 200
        answers.append(r.json())  # before: one request for all of them, however long that took
    assert [a["purged"] for a in answers] == [ids[0:2], ids[2:4], ids[4:]]
    assert [a["remaining"] for a in answers] == [3, 1, 0]
    assert all(spool.jobs.folder_of(job_id) is None for job_id in ids)
