"""The status page's API: paged jobs and results, the CSV download, the page's own files (WSGI in-process)."""
import csv
import io
import json

import pytest

from tests.conftest import call_wsgi, visit
from webapi.app import make_app
from webapi.auth import Tokens, digest

SCRIPT_URL = "http://127.0.0.1:9/<script>alert(1)</script>.jpg"


def submit(app, visits, extra=None):
    body = json.dumps({"count": len(visits), "visits": visits}).encode()
    r = call_wsgi(app, "POST", "/api/submit/", body, extra=extra)
    assert r.status_code == 201, r.body
    return r.json()["job_id"]


def result(index, url, error=None):
    return {"index": index, "store_id": "RP00001", "store_name": "CORNER, MART", "area_code": "7100015",
            "visit_time": "2026-11-23T10:00:00Z", "image_url": url, "width": None if error else 4,
            "height": None if error else 3, "perimeter": None if error else 14, "error": error}


@pytest.fixture
def app(spool):
    return make_app(spool)


def test_jobs_are_listed_newest_first_a_page_at_a_time(app):
    ids = [submit(app, [visit("RP00001", ["http://img.example/a.jpg"])]) for _ in range(5)]
    first = call_wsgi(app, "GET", "/api/jobs", query="limit=2").json()
    second = call_wsgi(app, "GET", "/api/jobs", query="offset=2&limit=2").json()
    assert (first["total"], first["offset"], first["limit"]) == (5, 0, 2)
    assert [doc["job_id"] for doc in first["jobs"] + second["jobs"]] == [str(i) for i in ids[::-1][:4]]
    assert first["jobs"][0] == {"job_id": str(ids[-1]), "status": "ongoing", "phase": "queued"}


@pytest.mark.parametrize("query", ["offset=-1", "limit=0", "limit=1001", "offset=x", "limit=1e3", "offset=%EF%BC%91"])
def test_bad_page_window_is_400_naming_the_parameter(app, query):
    submit(app, [visit("RP00001", ["http://img.example/a.jpg"])])
    for path, extra in (("/api/jobs", ""), ("/api/results", "jobid=1&")):
        r = call_wsgi(app, "GET", path, query=extra + query)
        assert r.status_code == 400 and r.json()["error"].startswith(query.split("=")[0] + ":"), r.body


def test_with_tokens_the_list_shows_only_the_callers_jobs(spool, tmp_path):
    (tmp_path / "tokens").write_text(f"acme {digest('acme-secret')}\nzeta {digest('zeta-secret')}\n")
    app = make_app(spool, tokens=Tokens.load(tmp_path / "tokens"))
    as_acme, as_zeta = ({"HTTP_AUTHORIZATION": f"Bearer {who}-secret"} for who in ("acme", "zeta"))
    mine = submit(app, [visit("RP00001", ["http://img.example/a.jpg"])], extra=as_acme)
    submit(app, [visit("RP00001", ["http://img.example/a.jpg"])], extra=as_zeta)
    listed = call_wsgi(app, "GET", "/api/jobs", extra=as_acme).json()
    assert (listed["total"], [doc["job_id"] for doc in listed["jobs"]]) == (1, [str(mine)])
    assert call_wsgi(app, "GET", "/api/jobs").status_code == 401


def test_results_page_holds_the_asked_images_and_unpaged_stays_whole(app, spool):
    job_id = submit(app, [visit("RP00001", [f"http://img.example/{i}.jpg" for i in range(6)])])
    spool.results.write(job_id, 0, 3, [result(i, f"u{i}") for i in range(3)])
    spool.results.write(job_id, 3, 6, [result(i, f"u{i}") for i in range(3, 6)])
    page = call_wsgi(app, "GET", "/api/results", query=f"jobid={job_id}&offset=2&limit=3").json()
    assert (page["offset"], page["limit"], [r["index"] for r in page["results"]]) == (2, 3, [2, 3, 4])
    whole = call_wsgi(app, "GET", "/api/results", query=f"jobid={job_id}").json()
    assert set(whole) == {"job_id", "status", "results"} and len(whole["results"]) == 6


def test_csv_has_a_header_and_one_line_per_image_quoted(app, spool):
    job_id = submit(app, [visit("RP00001", ["http://img.example/a.jpg", SCRIPT_URL])])
    spool.results.write(job_id, 0, 2, [result(0, "http://img.example/a.jpg"), result(1, SCRIPT_URL, "HTTP 404")])
    r = call_wsgi(app, "GET", "/api/results.csv", query=f"jobid={job_id}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.body.decode())))
    assert [row["index"] for row in rows] == ["0", "1"]
    assert rows[0]["store_name"] == "CORNER, MART" and rows[0]["perimeter"] == "14"
    assert (rows[1]["image_url"], rows[1]["error"], rows[1]["width"]) == (SCRIPT_URL, "HTTP 404", "")


def test_csv_of_unknown_job_is_400_json(app):
    r = call_wsgi(app, "GET", "/api/results.csv", query="jobid=77")
    assert (r.status_code, r.json(), r.headers["content-type"]) == (400, {}, "application/json")


@pytest.mark.parametrize("path, content_type", [("/", "text/html"), ("/ui/index.html", "text/html"),
                                                ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")])
def test_page_files_are_served_with_their_types(app, path, content_type):
    r = call_wsgi(app, "GET", path)
    assert r.status_code == 200 and r.headers["content-type"].startswith(content_type)
    assert r.headers["x-content-type-options"] == "nosniff"


def test_page_script_never_puts_data_into_html():
    from webapi.pages import STATIC_DIR
    assert "innerHTML" not in (STATIC_DIR / "app.js").read_text()


@pytest.mark.parametrize("path", ["/ui/../app.py", "/ui/nope.js", "/ui/%2e%2e%2fapp.py"])
def test_other_page_paths_are_json_404(app, path):
    r = call_wsgi(app, "GET", path)
    assert (r.status_code, r.headers["content-type"]) == (404, "application/json")
