"""Hostile and broken input to the API: clear JSON errors, bounded reading, nobody gets in or out."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import webhook_secrets
from spool import Executor
from spool.records import Heartbeat
from tests.conftest import call_wsgi
from webapi.app import make_app
from webapi.auth import TokenFileError, Tokens, digest
from webapi.validate import SubmitLimits

VISIT = {"store_id": "RP00001", "visit_time": "2026-11-23T10:00:00", "image_url": ["https://img.example/a.jpg"]}


def body_of(doc) -> bytes:
    return json.dumps(doc).encode()


def test_job_of_100000_urls_fits(spool):
    urls = [f"https://cdn.example.com/stores/RP00001/2026/11/23/{i:06d}.jpg" for i in range(100_000)]
    body = body_of({"count": 1, "visits": [{**VISIT, "image_url": urls}]})
    assert len(body) > 5_000_000  # far above Bottle's MEMFILE_MAX, which nothing here relies on
    r = call_wsgi(make_app(spool), "POST", "/api/submit/", body)
    assert r.status_code == 201


class Endless(io.RawIOBase):
    """A request body that never ends (a 1 GB upload, say); counts what was read."""

    def __init__(self):
        self.read_bytes = 0

    def read(self, size=-1):
        if size is None or size < 0:
            raise AssertionError("the whole body was asked for")
        self.read_bytes += size
        return b"[" * size


def raw_post(app, body_stream, content_length):
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/submit/", "QUERY_STRING": "",
               "CONTENT_TYPE": "application/json", "wsgi.input": body_stream}
    if content_length is not None:
        environ["CONTENT_LENGTH"] = str(content_length)
    from wsgiref.util import setup_testing_defaults
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
    return int(status[0].split()[0]), json.loads(body)


def test_declared_gigabyte_is_refused_without_reading_a_byte(spool):
    stream = Endless()
    status, doc = raw_post(make_app(spool, SubmitLimits(max_body_bytes=1024)), stream, 10**9)
    assert (status, stream.read_bytes) == (413, 0)
    assert "body larger than 1024 bytes" in doc["error"]


def test_undeclared_endless_body_is_cut_one_byte_past_the_limit(spool):
    stream = Endless()
    status, _ = raw_post(make_app(spool, SubmitLimits(max_body_bytes=1024)), stream, None)
    assert (status, stream.read_bytes) == (413, 1025)


@pytest.mark.parametrize("query", ["jobid=../../etc/passwd", "jobid=%2e%2e%2f%2e%2e%2fetc%2fpasswd", "jobid=1%00",
                                   "jobid=" + "9" * 40, "jobid=1/../2", "jobid=%EF%BC%91", "jobid=+1", "jobid=1 "])
def test_hostile_job_id_is_400_and_touches_no_file(spool, monkeypatch, query):
    def no_file(*args, **kwargs):
        raise AssertionError("a file was looked at for a malformed job id")
    for part, name in ((spool.jobs, "read_status"), (spool.jobs, "read_meta"), (spool.results, "lines")):
        monkeypatch.setattr(part, name, no_file)
    app = make_app(spool)
    for path in ("/api/status", "/api/results"):
        r = call_wsgi(app, "GET", path, query=query)
        assert r.status_code == 400 and "jobid" in r.json()["error"]


# ---------------------------------------------------------------- tokens
@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# clients\nacme {digest('acme-secret')}\nzeta {digest('zeta-secret')}\n")
    return Tokens.load(path)


def call_as(app, token, method, path, body=None, query=""):
    environ_extra = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return call_wsgi(app, method, path, body, query=query, extra=environ_extra)


def test_the_token_maker_prints_a_token_and_a_line_holding_only_its_digest(tmp_path):
    command = Path(sys.executable).parent / "retailpulse-token"  # a command of the installed package
    made = subprocess.run([str(command), "acme"], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    token = made.split("(shown once): ", 1)[1].split()[0]
    line = made.split("line for the tokens file:", 1)[1].strip()
    assert token not in line and line == f"acme {digest(token)}"
    (tmp_path / "tokens").write_text(line + "\n")
    tokens = Tokens.load(tmp_path / "tokens")
    assert tokens.identify(f"Bearer {token}") == "acme" and tokens.identify(f"Bearer {token}x") is None


def test_a_tokens_file_everyone_may_write_is_refused(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"acme {digest('acme-secret')}\n")
    path.chmod(0o666)
    with pytest.raises(TokenFileError, match="writable by every user"):
        Tokens.load(path)


@pytest.mark.parametrize("token", [None, "wrong", "acme-secre", "acme-secret2"])
def test_without_a_valid_token_every_route_is_401(spool, tokens, token):
    app = make_app(spool, tokens=tokens)
    for method, path, body in (("POST", "/api/submit/", body_of({"count": 1, "visits": [VISIT]})),
                               ("GET", "/api/status", None), ("GET", "/api/results", None)):
        r = call_as(app, token, method, path, body, query="jobid=1")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "token" in r.json()["error"]
    assert spool.jobs.ids("incoming") == []


def test_a_job_is_visible_only_to_the_token_that_submitted_it(spool, tokens):
    app = make_app(spool, tokens=tokens)
    job_id = call_as(app, "acme-secret", "POST", "/api/submit/", body_of({"count": 1, "visits": [VISIT]})).json()[
        "job_id"]
    assert call_as(app, "acme-secret", "GET", "/api/status", query=f"jobid={job_id}").status_code == 200
    theirs = call_as(app, "zeta-secret", "GET", "/api/status", query=f"jobid={job_id}")
    unknown = call_as(app, "zeta-secret", "GET", "/api/status", query="jobid=999")
    assert (theirs.status_code, theirs.body) == (unknown.status_code, unknown.body) == (400, b"{}")
    assert call_as(app, "zeta-secret", "GET", "/api/results", query=f"jobid={job_id}").status_code == 400
    assert spool.jobs.read_meta(job_id).owner == "acme"


@pytest.mark.parametrize("content, message", [("", "no tokens"), ("acme secret\n", "expected '<name> <64 hex"),
                                               ("a b c\n", "tokens:1")])
def test_bad_tokens_file_is_refused(tmp_path, content, message):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(TokenFileError, match=message):
        Tokens.load(path)


@pytest.mark.parametrize("load, line", [(Tokens.load, f"acme {digest('acme-secret')}\n"),
                                        (webhook_secrets.load, f"acme {webhook_secrets.new_secret()}\n")])
def test_a_tokens_or_secrets_file_every_user_may_write_is_refused(tmp_path, load, line):
    """Whoever can write the tokens file can let themselves in; the secrets file, sign as anyone."""
    path = tmp_path / "file"
    path.write_text(line)
    load(path)
    path.chmod(0o646)
    with pytest.raises(ValueError, match="writable by every user"):
        load(path)


# ---------------------------------------------------------------- backpressure
def test_submit_beyond_the_queue_limit_is_503_with_retry_after(spool):
    app = make_app(spool, max_queued_images=10)
    six = body_of({"count": 1, "visits": [{**VISIT, "image_url": ["https://img.example/a.jpg"] * 6}]})
    assert call_wsgi(app, "POST", "/api/submit/", six).status_code == 201
    r = call_wsgi(app, "POST", "/api/submit/", six)
    assert r.status_code == 503 and r.headers["retry-after"] == "60"
    assert "6 images waiting, limit 10" in r.json()["error"]
    assert len(spool.jobs.ids("incoming")) == 1
    # the daemon took the first job and says 2 of its images remain: there is room again
    spool.jobs.claim(spool.jobs.ids("incoming")[0])
    spool.heartbeat.write(Heartbeat(pid=os.getpid(), heartbeat_at=time.time(), executor=Executor.LOCAL,
                                    images_remaining_active=2))
    assert call_wsgi(app, "POST", "/api/submit/", six).status_code == 201
    spool.heartbeat.write(Heartbeat(pid=os.getpid(), heartbeat_at=time.time(), executor=Executor.LOCAL,
                                    images_remaining_active=5))  # 6 + 5 more would pass the limit
    assert call_wsgi(app, "POST", "/api/submit/", six).status_code == 503


# ---------------------------------------------------------------- fuzz
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
visits = st.lists(st.fixed_dictionaries({}, optional={
    "store_id": json_values | st.sampled_from(["RP00001", "", "x" * 300]),
    "visit_time": json_values | st.just("2026-11-23T10:00:00"),
    "image_url": json_values | st.lists(st.sampled_from(
        ["https://img.example/a.jpg", "ftp://x/a.jpg", "http://u:p@x/a.jpg", "http://x:99999/", "http://x/a b",
         "http://" + "a" * 3000, "javascript:alert(1)", "", "http://[::1]/a.jpg"]), max_size=3),
}), max_size=3)
submissions = st.fixed_dictionaries({}, optional={"count": json_values | st.integers(-1, 5),
                                                  "visits": visits | json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=submissions | json_values)
def test_fuzzed_json_submission_never_500(spool, doc):
    check_answer(call_wsgi(make_app(spool), "POST", "/api/submit/", body_of(doc)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.sampled_from([b"[" * 50000, b'{"a":' * 5000, b'{"count": NaN}',
                                                       b'{"count": 1, "count": 1}', b"\xff\xfe", b"1e999999"]))
def test_fuzzed_bytes_never_500(spool, raw):
    check_answer(call_wsgi(make_app(spool), "POST", "/api/submit/", raw))


def check_answer(r):
    assert r.status_code in (201, 400, 413), r.body[:200]
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert ("job_id" in doc) if r.status_code == 201 else isinstance(doc.get("error"), str) and doc["error"]


def test_api_refuses_a_world_writable_spool(tmp_path, capsys):
    from webapi.__main__ import main
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    os.chmod(spool_dir, 0o777)
    assert main(["--spool-dir", str(spool_dir)]) == 2
    assert "writable by every user" in capsys.readouterr().err


HUGE_INT_BODIES = [b'{"count": 1' + b"0" * 5000 + b', "visits": []}',
                   b'{"count": 1, "visits": [{"store_id": "RP00001", "x": -' + b"9" * 4301 + b"}]}",
                   b"[" + b"7" * 100_000 + b"]"]


@pytest.mark.parametrize("body", HUGE_INT_BODIES)
def test_integer_too_long_to_convert_is_400_naming_why(spool, body):
    r = call_wsgi(make_app(spool), "POST", "/api/submit/", body)
    assert (r.status_code, r.headers["content-type"]) == (400, "application/json")
    assert "more than 4300 digits" in r.json()["error"]
    assert spool.jobs.ids("incoming") == []


def test_integer_at_the_limit_still_parses_to_the_usual_field_error(spool):
    body = b'{"count": ' + b"1" * 4300 + b', "n": ' + b"2" * 4300 + b', "visits": [' + body_of(VISIT) + b"]}"
    r = call_wsgi(make_app(spool), "POST", "/api/submit/", body)
    assert r.status_code == 400 and r.json()["error"].startswith("count: is 1111")


def test_integer_too_long_over_real_http_is_400_json(api_only):
    import requests
    for body in HUGE_INT_BODIES:
        r = requests.post(f"{api_only}/api/submit/", data=body, headers={"Content-Type": "application/json"},
                          timeout=30)
        assert (r.status_code, r.headers["content-type"]) == (400, "application/json"), r.text[:200]
        assert "more than 4300 digits" in r.json()["error"]


@pytest.fixture
def api_only(tmp_path):
    from tests.api_process import running_api
    with running_api(tmp_path / "spool") as base:
        yield base
