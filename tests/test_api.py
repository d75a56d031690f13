"""The HTTP rules, with the WSGI app called in-process on a tmp spool."""
import errno
import json

import pytest

from spool import Phase, Status
from spool.records import JobStatus, StoreFailure
from tests.conftest import call_wsgi, result_line
from webapi.app import make_app
from webapi.validate import SubmitLimits

VISIT = {"store_id": "RP00001", "image_url": ["http://img.example/a.jpg"], "visit_time": "2024-03-11T10:00:00Z"}


@pytest.fixture
def app(spool):
    return make_app(spool)


def submit(app, doc, path="/api/submit/"):
    return call_wsgi(app, "POST", path, json.dumps(doc).encode())


def test_submit_stores_job_and_answers_201_with_increasing_ids(app, spool):
    first = submit(app, {"count": 1, "visits": [VISIT]})
    second = submit(app, {"count": 1, "visits": [VISIT]}, path="/api/submit")  # no trailing slash
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.headers["content-type"] == "application/json"
    ids = [first.json()["job_id"], second.json()["job_id"]]
    assert all(isinstance(i, int) for i in ids) and ids[0] < ids[1]
    stored = json.loads(spool.jobs.path("incoming", ids[0]).read_text())
    assert stored["visits"] == [VISIT] and stored["count"] == 1


def test_invalid_submission_is_400_json_and_stores_nothing(app, spool):
    r = submit(app, {"count": 2, "visits": [VISIT]})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert "count" in r.json()["error"]
    assert spool.jobs.ids("incoming") == []


def test_body_over_the_limit_is_413_before_it_is_read(spool):
    app = make_app(spool, SubmitLimits(max_body_bytes=100))
    r = submit(app, {"count": 1, "visits": [VISIT]})
    assert r.status_code == 413
    assert "100 bytes" in r.json()["error"]


def test_spool_write_failure_is_503_json(app, spool, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(spool.jobs, "submit", disk_full)
    r = submit(app, {"count": 1, "visits": [VISIT]})
    assert r.status_code == 503
    assert r.json()["error"] == "cannot store the job now: No space left on device"
    assert r.headers["retry-after"] == "30"


def test_status_of_a_queued_job_is_ongoing(app):
    job_id = submit(app, {"count": 1, "visits": [VISIT]}).json()["job_id"]
    r = call_wsgi(app, "GET", "/api/status", query=f"jobid={job_id}")
    assert r.status_code == 200
    assert r.json() == {"job_id": str(job_id), "status": "ongoing", "phase": "queued"}


def test_status_serves_what_the_daemon_wrote(app, spool):
    job_id = submit(app, {"count": 1, "visits": [VISIT]}).json()["job_id"]
    written = JobStatus(str(job_id), Status.FAILED, Phase.FINISHED, error=[StoreFailure("RP00001", "HTTP 404")])
    spool.jobs.write_status(written)
    assert call_wsgi(app, "GET", "/api/status", query=f"jobid={job_id}").json() == {
        "job_id": str(job_id), "status": "failed", "phase": "finished",
        "error": [{"store_id": "RP00001", "error": "HTTP 404"}]}


def test_unknown_job_is_400_with_empty_object(app):
    r = call_wsgi(app, "GET", "/api/status", query="jobid=424242")
    assert (r.status_code, r.json()) == (400, {})


@pytest.mark.parametrize("query", ["", "jobid=", "jobid=abc", "jobid=0", "jobid=-1", "jobid=1e3",
                                   "jobid=..%2F..%2Fetc%2Fpasswd", "jobid=1%00", "jobid=" + "9" * 40])
def test_missing_or_malformed_job_id_is_400_with_error(app, query):
    r = call_wsgi(app, "GET", "/api/status", query=query)
    assert r.status_code == 400
    assert r.json()["error"].startswith("jobid:")


def test_unknown_route_and_method_answer_json(app):
    r = call_wsgi(app, "GET", "/nope")
    assert (r.status_code, r.json(), r.headers["content-type"]) == (404, {"error": "no such route"},
                                                                     "application/json")
    r = call_wsgi(app, "DELETE", "/api/status")
    assert (r.status_code, r.json()) == (405, {"error": "method not allowed"})


def test_results_stream_in_image_order(app, spool):
    job_id = submit(app, {"count": 1, "visits": [VISIT]}).json()["job_id"]
    spool.results.write(job_id, 2, 4, [result_line(2), result_line(3)])  # written first, listed second
    spool.results.write(job_id, 0, 2, [result_line(0), result_line(1)])
    r = call_wsgi(app, "GET", "/api/results", query=f"jobid={job_id}")
    assert r.status_code == 200
    doc = r.json()
    assert doc["job_id"] == str(job_id) and doc["status"] == "ongoing"
    assert [line["index"] for line in doc["results"]] == [0, 1, 2, 3]


def test_results_of_unknown_job_is_400_with_empty_object(app):
    r = call_wsgi(app, "GET", "/api/results", query="jobid=99")
    assert (r.status_code, r.json()) == (400, {})
