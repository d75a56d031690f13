"""The spool under damage: whatever is found in it, nothing half-made stays, nothing is fatal, and a status
never goes back."""
import os
import subprocess
import sys
import time

import pytest

from daemon.supervisor.housekeeping import Housekeeping
from spool import Folder, Phase, Status
from spool.records import JobStatus
from webapi.app import make_app
from tests.conftest import REPO, SAMPLE_STORE_MASTER, call_wsgi, mount_tmpfs, unmount, visit, records, result_line


def test_tmp_leftovers_of_any_shape_are_never_fatal(spool):
    tmp = spool.root / "tmp"
    (tmp / "a-folder").mkdir()
    (tmp / "a-folder" / "inside").write_text("x")
    (tmp / f"7.json.{'9' * 40}.aa").write_text("a pid too large for a C int")
    (tmp / "8.json.²³.bb").write_text("digits that are not ASCII")
    (tmp / "9.json.-5.cc").write_text("a negative pid")
    os.symlink("/etc/passwd", tmp / "a-link")
    for name in os.listdir(tmp):
        os.utime(tmp / name, (time.time() - 7200,) * 2, follow_symlinks=False)

    Housekeeping(spool, retention_s=0).clean_tmp()

    assert os.listdir(tmp) == []
    moved = sorted(os.listdir(spool.root / "corrupt"))  # (the .why notes of the badly named too)
    assert [name.split(".")[0] for name in moved] == [*["tmp-8"] * 2, *["tmp-9"] * 2, "tmp-a-folder",
                                                      "tmp-a-folder", "tmp-a-link", "tmp-a-link"]
    assert os.path.exists("/etc/passwd")


def test_meta_file_of_a_submission_that_never_got_its_job_file_is_removed(spool):
    kept = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]))
    orphan = kept + 1  # what a kill -9 between the two writes of a submit leaves
    spool.files.write_atomic(spool.jobs.meta_path(orphan), b'{"job_id": 2, "images": 1, "owner": null}')
    recent = kept + 2
    spool.files.write_atomic(spool.jobs.meta_path(recent), b'{"job_id": 3, "images": 1, "owner": null}')
    os.utime(spool.jobs.meta_path(orphan), (time.time() - 120,) * 2)
    os.utime(spool.jobs.meta_path(kept), (time.time() - 120,) * 2)

    Housekeeping(spool, retention_s=0).clean_tmp()

    assert not spool.jobs.meta_path(orphan).exists()
    assert spool.jobs.meta_path(kept).exists() and spool.jobs.meta_path(recent).exists()  # a submit may be writing it


def test_failed_submit_leaves_no_meta_file(spool, monkeypatch):
    real = spool.files.write_atomic

    def no_space_for_jobs(dest, data, durable=True):
        if dest.parent.name == "incoming":
            raise OSError(28, "No space left on device")
        return real(dest, data, durable)

    def no_space_to_publish(dest, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool.files, "write_atomic", no_space_for_jobs)
    monkeypatch.setattr(spool.files, "publish", no_space_to_publish)
    with pytest.raises(OSError):
        spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]))
    assert os.listdir(spool.root / "meta") == [] and os.listdir(spool.root / "incoming") == []


@pytest.mark.parametrize("folder, status", [("done", Status.COMPLETED), ("failed", Status.FAILED)])
def test_finished_job_with_unreadable_status_still_reads_as_finished(spool, folder, status):
    job_id = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]))
    spool.jobs.claim(job_id)
    spool.jobs.write_status(JobStatus(str(job_id), status, Phase.RUNNING))
    spool.jobs.finish(job_id, status)
    spool.jobs.status_path(job_id).write_bytes(b'{"job_id": "1", "sta')  # a disk that lied, a hand edit
    doc = spool.status(job_id)
    assert doc.status is status and "unreadable" in doc.note


@pytest.fixture
def read_only_spool(tmp_path):
    """A spool on a file system mounted read-only (root may write anything else); skipped where mount is
    not allowed."""
    mount_point = tmp_path / "ro"
    mount_tmpfs(mount_point)
    try:
        for name in tuple(Folder):  # a whole spool, so that only the read-only mount stops start-up
            (mount_point / "spool" / name).mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield mount_point / "spool"
    finally:
        unmount(mount_point)


@pytest.mark.parametrize("program", ["daemon", "webapi"])
def test_read_only_spool_stops_start_up_with_one_line_and_exit_2(read_only_spool, program):
    result = subprocess.run([sys.executable, "-m", program, "--spool-dir", str(read_only_spool),
                             "--store-master", str(SAMPLE_STORE_MASTER)] if program == "daemon" else
                            [sys.executable, "-m", program, "--spool-dir", str(read_only_spool)],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "RETAILPULSE_CONFIG": os.devnull})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"spool_dir (--spool-dir): {read_only_spool}" in result.stderr
    assert "read-only file system" in result.stderr


def results_file(spool, job_id, first, stop):
    """The results file of images first..stop-1 (its name ends with its checksum)."""
    [path] = spool.results.folder(job_id).glob(f"{first:08d}-{stop:08d}.*.jsonl")
    return path


def finished_with_results(spool, n=6, per_file=3):
    job_id = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"] * n)]))
    spool.jobs.claim(job_id)
    for first in range(0, n, per_file):
        spool.results.write(job_id, first, first + per_file,
                            [result_line(i, perimeter=4) for i in range(first, first + per_file)])
    spool.jobs.finish(job_id, Status.COMPLETED)
    return job_id


@pytest.mark.parametrize("damage, why", [
    (lambda data: data[:-5], "cut short"),
    (lambda data: data[:data.index(b"\n") + 1], "1 lines for the 3 images"),
    (lambda data: b"", "cut short"),
    (lambda data: data.replace(b'"index":5', b'"index":9'), "holds images 3..9, not 3..5"),
])
def test_a_damaged_results_file_is_named(spool, damage, why):
    job_id = finished_with_results(spool)
    assert spool.results.damage(job_id, total=6) is None
    path = results_file(spool, job_id, 3, 6)
    path.write_bytes(damage(path.read_bytes()))
    found, message = spool.results.damage(job_id, total=6)
    assert found == path and message.startswith(f"results/{job_id}/{path.name}: ") and why in message


def test_a_missing_results_file_of_a_finished_job_is_named(spool):
    job_id = finished_with_results(spool)
    results_file(spool, job_id, 0, 3).unlink()
    assert spool.results.damage(job_id, total=6) == (None, f"results/{job_id}: images 0..2 have no results file")
    assert spool.results.damage(job_id) is None  # a running job has gaps


def test_the_daemon_moves_a_damaged_results_file_of_a_finished_job_aside(spool):
    job_id = finished_with_results(spool)
    spool.jobs.write_status(JobStatus(str(job_id), Status.COMPLETED, Phase.FINISHED, images_total=6))
    path = results_file(spool, job_id, 3, 6)
    path.write_bytes(path.read_bytes()[:-7])
    Housekeeping(spool, retention_s=0).check_finished_results()
    assert not path.exists()
    [why] = [p for p in (spool.root / "corrupt").iterdir() if p.suffix == ".why"]
    assert "cut short" in why.read_text()
    assert spool.status(job_id).status is Status.COMPLETED  # a status never goes back
    assert spool.results.damage(job_id, total=6) == (None, f"results/{job_id}: images 3..5 have no results file")


def test_many_finished_jobs_are_checked_a_slice_per_turn_not_all_at_once(spool):
    jobs = [finished_with_results(spool) for _ in range(3)]
    for job_id in jobs:
        spool.jobs.write_status(JobStatus(str(job_id), Status.COMPLETED, Phase.FINISHED, images_total=6))
        path = results_file(spool, job_id, 3, 6)
        path.write_bytes(path.read_bytes()[:-7])
    housekeeping = Housekeeping(spool, retention_s=0)
    set_aside = []
    for _ in jobs:  # a budget of 0 s: one job per turn of the main loop
        housekeeping.check_finished_results(budget_s=0)
        set_aside.append(sum(1 for p in (spool.root / "corrupt").iterdir() if p.suffix == ".why"))
    assert set_aside == [1, 2, 3]


def test_the_api_names_damaged_results_instead_of_serving_fewer(spool):
    job_id = finished_with_results(spool)
    spool.jobs.write_status(JobStatus(str(job_id), Status.COMPLETED, Phase.FINISHED, images_total=6,
                                               images_done=6, images_failed=0))
    app = make_app(spool)
    query = f"jobid={job_id}"
    assert len(call_wsgi(app, "GET", "/api/results", query=query).json()["results"]) == 6
    path = results_file(spool, job_id, 3, 6)
    path.write_bytes(path.read_bytes()[:-5])  # a disk that lied about the last write

    for route, extra in (("/api/results", ""), ("/api/results", "&offset=4&limit=2"), ("/api/results.csv", "")):
        r = call_wsgi(app, "GET", route, query=query + extra)
        assert r.status_code == 503, (route, extra, r.status_code)
        assert r.json()["error"].startswith(f"results damaged: results/{job_id}/{path.name}: cut short")
    # the page before the damage is whole, and is served
    assert [line["index"] for line in call_wsgi(app, "GET", "/api/results", query=query + "&limit=3").json()[
        "results"]] == [0, 1, 2]
    # once the daemon has set the file aside, the gap is named; the status stays completed
    Housekeeping(spool, retention_s=0).check_finished_results()
    r = call_wsgi(app, "GET", "/api/results", query=query)
    assert (r.status_code, r.json()["error"].split(";")[0]) == (
        503, f"results damaged: results/{job_id}: images 3..5 have no results file")
    assert call_wsgi(app, "GET", "/api/status", query=query).json()["status"] == Status.COMPLETED


def test_a_folder_where_a_status_should_be_is_not_read_as_one(spool):
    job_id = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]))
    spool.jobs.status_path(job_id).mkdir()  # odd, not unreadable: the daemon moves it aside at its next start
    r = call_wsgi(make_app(spool), "GET", "/api/status", query=f"jobid={job_id}")
    assert (r.status_code, r.json()["status"], r.json()["phase"]) == (200, "ongoing", "queued")
