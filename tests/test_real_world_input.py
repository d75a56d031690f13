"""Inputs of the real world against the real processes: URLs as clients write them, hostile bodies, odd and
unreadable spool files, damaged results, and the words the service uses about them (issue 20)."""
import csv
import io
import multiprocessing
import os
import secrets
import subprocess
import sys
from multiprocessing.connection import Listener
from pathlib import Path
from typing import NamedTuple

import pytest
import requests

from daemon.engine.loop import measure
from daemon.engine.settings import DownloadLimits, EngineSettings
from daemon.engine.outcome import ErrorKind
from daemon.runners import Message
from daemon.runners.pool_process import EXIT_ENGINE_DIED, serve
from spool import Status
from tests.conftest import REPO, pool_worker_pids, visit, wait_until
from tests.service import WITHOUT_FILE_PERMISSION_OVERRIDE
from tests.test_engine import JPEG, LOCAL, NO_WAIT, ok, server  # noqa: F401 (server: a fixture)
from tests.test_supervisor import fill, small_disk  # noqa: F401 (a fixture)

JSON = {"Content-Type": "application/json"}



@pytest.fixture(scope="module")
def api_only(tmp_path_factory):
    """One API process for the module's refusals: each test asks it something it refuses, changing nothing."""
    from tests.api_process import running_api
    spool_dir = tmp_path_factory.mktemp("api") / "spool"
    with running_api(spool_dir) as base:
        yield ApiOnly(base, spool_dir)


class ApiOnly(NamedTuple):
    base: str
    spool_dir: Path

    def stored(self) -> list[str]:
        """The job files in incoming/ (no daemon runs here to claim them)."""
        return sorted(os.listdir(self.spool_dir / "incoming"))


def post(base: str, body: bytes, headers=JSON) -> requests.Response:
    return requests.post(f"{base}/api/submit/", data=body, headers=headers, timeout=60)


def one_visit_body(store_id: str = '"RP00001"', visit_time: str = '"2026-11-23T10:00:00"', extra: str = "") -> bytes:
    """A submission written by hand, so the test controls every byte (escapes included)."""
    return (f'{{"count": 1, "visits": [{{"store_id": {store_id}, "visit_time": {visit_time}, '
            f'"image_url": ["http://img.example/a.jpg"]{extra}}}]}}').encode()


# ---------------------------------------------------------------- URLs as clients write them
def test_accented_paths_and_idn_hosts_are_measured_and_the_pool_keeps_serving(start_service, image_server):
    service = start_service()
    base, folder = image_server
    (folder / "café.jpg").write_bytes(JPEG)
    (folder / "shelf.jpg").write_bytes(JPEG)
    accented = f"{base}/café.jpg"
    idn = f"http://bücher.localhost:{base.rsplit(':', 1)[1]}/shelf.jpg"  # libcurl sends *.localhost to loopback
    wait_until(lambda: service.daemon_output().count("connected") == 2, what="the pool processes to connect")
    pool = pool_worker_pids(service.daemon.pid)

    first = service.submit([visit("RP00001", [accented, idn])])
    later = [service.submit([visit("RP00001", [f"{base}/shelf.jpg?job={j}&n={i}" for i in range(5)])])
             for j in range(4)]

    for job_id in (first, *later):
        assert service.wait(job_id, timeout_s=30)["status"] == Status.COMPLETED
    results = service.results(first)["results"]
    assert [(r["image_url"], r["perimeter"]) for r in results] == [(accented, 224), (idn, 224)]  # as written
    assert image_server.hits["/caf%C3%A9.jpg"] == 1  # the form a browser sends
    assert pool_worker_pids(service.daemon.pid) == pool and "died" not in service.daemon_output()


def test_an_image_whose_url_libcurl_cannot_take_fails_alone(server):
    server.routes["/a.jpg"] = ok(JPEG)
    outcomes = measure([(0, "http://img.example/\ud800.jpg"), (1, f"{server.base}/a.jpg"), (2, 42)], NO_WAIT)
    assert [o.kind for o in outcomes] == [ErrorKind.INVALID_URL, None, ErrorKind.INVALID_URL]
    assert outcomes[0].error == "invalid URL: not valid Unicode text (a lone surrogate) (permanent, 1 attempt)"
    assert outcomes[1].perimeter == 224


def test_a_pool_process_whose_engine_dies_exits_instead_of_idling_connected(tmp_path):
    """The test is the supervisor: it hands a real pool process a task its engine's loop cannot take."""
    authkey = secrets.token_bytes(32)
    with Listener(str(tmp_path / "pool.sock"), family="AF_UNIX", authkey=authkey) as listener:
        process = multiprocessing.get_context("spawn").Process(target=serve,
                                                               args=(listener.address, authkey, NO_WAIT))
        process.start()
        try:
            conn = listener.accept()
            assert conn.recv()[0] == Message.HELLO
            conn.send((Message.TASK, 1, [(0, "http://img.example/\ud800.jpg")], False))  # an image's fault
            assert conn.poll(10), "a URL that raised in libcurl silenced the process"
            kind, task_id, outcomes = conn.recv()
            assert (kind, task_id, outcomes[0].kind) == (Message.DONE, 1, ErrorKind.INVALID_URL)
            conn.send((Message.TASK, 2, [("not an (index, url) pair",)], False))  # the loop's own failure
            process.join(timeout=10)
            assert process.exitcode == EXIT_ENGINE_DIED
            with pytest.raises(EOFError):  # its connection closed: the supervisor redoes its tasks isolated
                conn.recv()
        finally:
            if process.is_alive():
                process.kill()


# ---------------------------------------------------------------- strict strings, named failures
@pytest.mark.parametrize("store_id, visit_time, named", [
    ('"\\ud800"', '"t"', "visits[0].store_id: not valid JSON: a lone UTF-16 surrogate"),
    ('"RP\\u00001"', '"t"', "visits[0].store_id: must not contain control characters (found U+0000)"),
    ('"RP00001"', '"2026\\u0007"', "visits[0].visit_time: must not contain control characters (found U+0007)"),
    ('"RP00001"', '"\\udfff\\ud800"', "visits[0].visit_time: not valid JSON: a lone UTF-16 surrogate"),
])
def test_lone_surrogates_and_control_characters_are_refused_naming_the_field(api_only, store_id, visit_time, named):
    before = api_only.stored()
    r = post(api_only.base, one_visit_body(store_id, visit_time))
    assert (r.status_code, r.headers["content-type"]) == (400, "application/json")
    assert r.json()["error"].startswith(named)
    assert api_only.stored() == before


@pytest.mark.parametrize("extra, named", [
    (', "x": NaN', "visits[0].x: not valid JSON: NaN is not allowed"),
    (', "x": -Infinity', "visits[0].x: not valid JSON: Infinity is not allowed"),
    (', "x": [1, ' + "9" * 6000 + "]", "visits[0].x[1]: an integer of more than 4300 digits"),
    (', "store_id": "RP00002"', "visits[0].store_id: duplicate key 'store_id'"),
    (', "x": 1,}', "visits[0].x: not valid JSON"),
])
def test_every_parser_failure_names_the_field(api_only, extra, named):
    r = post(api_only.base, one_visit_body(extra=extra))
    assert (r.status_code, r.headers["content-type"]) == (400, "application/json")
    assert r.json()["error"].startswith(named), r.json()


# ---------------------------------------------------------------- memory per request
def peak_rss_mib(spool_dir: Path) -> int:
    """The largest peak resident size (VmHWM) among the API's processes (gunicorn's master and workers)."""
    peaks = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if str(spool_dir).encode() not in Path(entry.path, "cmdline").read_bytes():
                    continue
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            peaks.append(int(status.split("VmHWM:")[1].split()[0]) // 1024)
    assert peaks, "no API process found"
    return max(peaks)


def body_of_size(prefix: bytes, repeat: bytes, suffix: bytes, size: int) -> bytes:
    return prefix + repeat * ((size - len(prefix) - len(suffix)) // len(repeat)) + suffix


MAX_BODY = 64 * 1024 * 1024
VISIT_JSON = b'{"store_id": "RP00001", "visit_time": "t", "image_url": ["http://img.example/a.jpg"]}'


@pytest.mark.parametrize("shape, body, answer", [
    ("[{},{},...] in a field nobody reads", body_of_size(b'{"count": 1, "visits": [' + VISIT_JSON + b'], "x": [',
                                                         b"{},", b"{}]}", MAX_BODY), "body: more than 810000 JSON"),
    ("a list of short URLs", body_of_size(b'{"count": 1, "visits": [{"store_id": "RP00001", "visit_time": "t", '
                                          b'"image_url": [', b'"ab",', b'"ab"]}]}', MAX_BODY),
     "body: more than 1610000 strings"),
    ("one string with an emoji in store_id", body_of_size('{"count": 1, "visits": [{"store_id": "😀'.encode(),
                                                          b"a", b'", "visit_time": "t", "image_url": ["http://x/"]}]}',
                                                          MAX_BODY), "visits[0].store_id: longer than 256"),
    ("one string with an emoji in a field nobody reads",
     body_of_size('{"count": 1, "visits": ['.encode() + VISIT_JSON + '], "x": "😀'.encode(), b"a", b'"}', MAX_BODY),
     None),
])
@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_a_64_mib_body_of_any_shape_costs_a_small_multiple_of_itself(tmp_path, shape, body, answer):
    from tests.api_process import running_api
    with running_api(tmp_path / "spool", "--api-workers", "1") as base:
        r = post(base, body)
        assert r.status_code == (201 if answer is None else 400), r.text[:300]
        assert answer is None or r.json()["error"].startswith(answer)
        peak = peak_rss_mib(tmp_path / "spool")
    print(f"\n{shape}: {len(body) / 2**20:.0f} MiB body, API process peak {peak} MiB")
    assert peak < 6 * 64, f"{shape}: {peak} MiB"


# ---------------------------------------------------------------- the content type
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_submit_takes_application_json_only(api_only, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    before = api_only.stored()
    r = requests.post(f"{api_only.base}/api/submit/", data=one_visit_body(), headers=headers, timeout=30)
    assert (r.status_code, r.headers["content-type"]) == (415, "application/json")
    assert r.json()["error"].startswith("Content-Type must be application/json")
    assert api_only.stored() == before
    assert post(api_only.base, one_visit_body(), {"Content-Type": "Application/JSON; charset=utf-8"}).status_code == 201


# ---------------------------------------------------------------- CSV cells
def test_csv_cells_a_spreadsheet_would_run_are_neutralised(start_service):
    service = start_service()
    formulas = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(1,2)"]
    job_id = service.submit([visit(f, ["http://img.example/a.jpg"], visit_time=f) for f in formulas])
    service.wait(job_id)  # unknown stores: nothing is downloaded, the job fails
    r = service.http.get(f"{service.base}/api/results.csv", params={"jobid": job_id}, timeout=30)
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(row["store_id"], row["visit_time"]) for row in rows] == [("'" + f, "'" + f) for f in formulas]
    assert rows[0]["image_url"] == "http://img.example/a.jpg" and rows[0]["index"] == "0"


# ---------------------------------------------------------------- odd and unreadable spool files
def test_a_folder_in_place_of_a_job_file_is_moved_aside_and_the_daemon_runs_on(start_service, image_server):
    service = start_service()
    spool = service.spool
    job_id = spool.jobs.next_id()
    spool.jobs.path("incoming", job_id).mkdir()
    wait_until(lambda: service.status(job_id).get("status") == Status.FAILED, timeout_s=15, what="the job to fail")
    [failure] = service.status(job_id)["error"]
    assert "not a file" in failure["error"]
    moved = sorted(os.listdir(spool.root / "corrupt"))
    assert [name.split(".")[0] for name in moved] == [f"active-{job_id}", f"active-{job_id}"]  # and its .why
    assert service.daemon.poll() is None
    service.daemon.terminate()
    service.daemon.wait(timeout=30)
    service.start_daemon()
    service.wait_for_daemon()
    (image_server.folder / "a.jpg").write_bytes(JPEG)
    assert service.wait(service.submit([visit("RP00001", [f"{image_server.base}/a.jpg"])]))["status"] == "completed"


def test_an_unreadable_status_file_is_a_log_line_and_a_503_never_a_crash_loop(start_service, image_server):
    service = start_service(prefix=WITHOUT_FILE_PERMISSION_OVERRIDE)
    (image_server.folder / "a.jpg").write_bytes(JPEG)
    job_id = service.submit([visit("RP00001", [f"{image_server.base}/a.jpg"])])
    service.wait(job_id)
    os.chmod(service.spool.jobs.status_path(job_id), 0)
    service.daemon.terminate()
    service.daemon.wait(timeout=30)
    service.start_daemon()
    service.wait_for_daemon()  # before: exit 1 and a traceback, at every start
    assert f"status/{job_id}.json: cannot read it (Permission denied)" in service.daemon_output()
    r = service.http.get(f"{service.base}/api/status", params={"jobid": job_id}, timeout=30)
    assert r.status_code == 503 and f"status/{job_id}.json: Permission denied" in r.json()["error"]
    assert service.daemon.poll() is None


def test_unreadable_results_status_and_spool_root_are_503_naming_them(start_service, image_server):
    service = start_service(prefix=WITHOUT_FILE_PERMISSION_OVERRIDE)
    (image_server.folder / "a.jpg").write_bytes(JPEG)
    job_id = service.submit([visit("RP00001", [f"{image_server.base}/a.jpg"])])
    service.wait(job_id)
    root, get = service.spool.root, lambda path, **params: service.http.get(f"{service.base}{path}", params=params,
                                                                           timeout=30)
    [results_file] = service.spool.results.folder(job_id).iterdir()
    os.chmod(results_file, 0)
    for route in ("/api/results", "/api/results.csv"):
        r = get(route, jobid=job_id)
        assert r.status_code == 503, route
        assert r.json()["error"].startswith(f"cannot read results/{job_id}/{results_file.name}: Permission denied")
    os.chmod(results_file, 0o600)
    os.chmod(root / "status", 0)
    try:
        r = get("/api/jobs")
        assert r.status_code == 503 and "Permission denied" in r.json()["error"]
    finally:
        os.chmod(root / "status", 0o700)
    os.chmod(root, 0)
    try:
        r = get("/healthz")
        assert r.status_code == 503 and r.json()["checks"]["daemon"] == "cannot read daemon.json: Permission denied"
    finally:
        os.chmod(root, 0o700)


# ---------------------------------------------------------------- damaged results
def ctl(service, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctl", "--spool-dir", str(service.spool.root), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_damaged_line_anywhere_is_a_503_naming_it_and_requeue_redoes_the_job_once(start_service, image_server):
    service = start_service("--chunk-images", "4")
    (image_server.folder / "a.jpg").write_bytes(JPEG)
    job_id = service.submit([visit("RP00001", [f"{image_server.base}/a.jpg?n={i}" for i in range(8)])])
    assert service.wait(job_id)["status"] == Status.COMPLETED
    first, second = sorted(service.spool.results.folder(job_id).iterdir())
    lines = first.read_bytes().split(b"\n")
    lines[1] = lines[1][:30] + b"#garbled#" + lines[1][39:]  # the first and last lines stay intact
    first.write_bytes(b"\n".join(lines))
    lines = second.read_bytes().split(b"\n")
    lines[2] = lines[1]  # a line written over its neighbour
    second.write_bytes(b"\n".join(lines))

    get = lambda route: service.http.get(f"{service.base}{route}", params={"jobid": job_id}, timeout=30)  # noqa: E731
    for route in ("/api/results", "/api/results.csv"):
        r = get(route)
        assert r.status_code == 503, route
        assert r.json()["error"].startswith(f"results damaged: results/{job_id}/{first.name}: line 2 is garbled")
    first.unlink()  # what the daemon's check does with it; then the duplicate is found too
    r = service.http.get(f"{service.base}/api/results", params={"jobid": job_id, "offset": 4}, timeout=30)
    assert r.status_code == 503
    assert f"results/{job_id}/{second.name}: line 3 holds image 5, not 6" in r.json()["error"]

    shown = ctl(service, "show", str(job_id), "--results", "-1")  # the operator's view: one line, no traceback
    assert shown.returncode == 1 and shown.stderr.count("\n") == 1 and "line 3 holds image 5" in shown.stderr

    assert ctl(service, "requeue", str(job_id)).returncode == 0
    wait_until(lambda: "requeued" in service.daemon_output(), what="the daemon to take the request")
    final = service.wait(job_id)
    assert (final["status"], final["images_done"]) == (Status.COMPLETED, 8)
    assert [r["index"] for r in service.results(job_id)["results"]] == list(range(8))
    log = service.daemon_output()
    assert log.count("requeued") == 1 and "will try again" not in log


# ---------------------------------------------------------------- true words
@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_a_trickle_is_failed_naming_the_rule_it_broke(server):
    def trickle(conn, srv):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not srv.stop.wait(1.3):  # under one byte a second, yet never silent for long
            srv.send(conn, "/x.jpg", b"x")

    server.routes["/x.jpg"] = trickle
    limits = DownloadLimits(read_timeout_s=2, total_timeout_s=30, attempts=1)
    settings = EngineSettings(gpu_sleep_min_s=0, gpu_sleep_max_s=0, limits=limits, addresses=LOCAL)
    [outcome] = measure([(0, f"{server.base}/x.jpg")], settings)
    assert outcome.error == "timed out: under 1 byte/s for 2 s (transient, gave up after 1 attempts)"
    assert server.sent["/x.jpg"] >= 1  # not "no data": data came, too slowly


def test_healthz_says_the_daemon_is_paused_when_the_disk_is_full(start_service, small_disk):  # noqa: F811
    service = start_service(spool_dir=small_disk / "spool")
    healthz = lambda: service.http.get(f"{service.base}/healthz", timeout=30)  # noqa: E731
    wait_until(lambda: healthz().status_code == 200, what="a healthy service")
    filler = fill(small_disk)
    try:
        r = healthz()
        assert r.status_code == 503
        assert r.json()["checks"]["daemon"].startswith("paused: the disk holding the spool is full")
        assert r.json()["checks"]["spool_writable"].startswith("the disk holding the spool is full")
    finally:
        filler.unlink()
    wait_until(lambda: healthz().status_code == 200, what="health once space is back")
