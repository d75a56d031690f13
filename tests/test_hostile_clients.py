"""What a hostile client and a hostile server still broke (issue 31), against the real processes: headers that
are not text, invisible characters in store ids (refused now; shown escaped where old jobs hold them: the
CSV, retailpulse-ctl, the page), terminal escapes from a remote server's certificate, /metrics for every
token, and eight 64 MiB bodies at once into one API process."""
import concurrent.futures
import csv
import io
import socket
import ssl
import subprocess
import sys
import threading

import pytest
import requests

from spool import Spool, Status
from tests.api_process import running_api
from tests.conftest import REPO, call_wsgi, records, visit, wait_until
from tests.test_status_page_browser import browser, read  # noqa: F401 (a fixture)
from tests.test_real_world_input import MAX_BODY, body_of_size, one_visit_body, peak_rss_mib, post
from webapi.app import make_app
from webapi.auth import Tokens, digest
from webapi.openapi import document

TOKENS = {"acme": "token-of-acme", "ops": "token-of-ops"}


@pytest.fixture(scope="module")
def api_with_tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    (folder / "tokens").write_text("".join(f"{name} {digest(token)}\n" for name, token in TOKENS.items()))
    with running_api(folder / "spool", "--api-tokens-file", str(folder / "tokens")) as base:
        yield base


def raw_request(base: str, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """(status, headers, body) of one request sent byte for byte as given (requests would refuse the bytes)."""
    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"Connection: close\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    headers, _, answer = data.partition(b"\r\n\r\n")
    return int(headers.split(b" ", 2)[1]), headers, answer


def every_route() -> list[tuple[str, str, bool]]:
    """(method, path with its query, whether it needs a token) of every route the OpenAPI document lists."""
    found = []
    for path, operations in document()["paths"].items():
        for method, operation in operations.items():
            query = "?jobid=1&older_than_days=1" if any(p["name"] in ("jobid", "older_than_days") for p in
                                                         operation.get("parameters", ()) if p["in"] == "query") else ""
            found.append((method.upper(), path.replace("{name}", "app.js") + query, operation.get("security") != []))
    return found


@pytest.mark.parametrize("method, path, needs_token", every_route())
def test_a_header_that_is_not_text_is_a_400_naming_it_on_every_route(api_with_tokens, method, path, needs_token):
    body = one_visit_body() if method == "POST" else b""
    request_line = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    status, _, answer = raw_request(api_with_tokens, request_line + b"Authorization: Bearer cl\xe9\r\n", body)
    if needs_token:
        assert status == 400, (status, answer)  # before: 500
        assert answer.decode().startswith('{"error":"Authorization: header is not UTF-8 text (byte 0xe9')
    else:  # /healthz and the page's files read no header (503 from /healthz: no daemon runs here)
        assert status != 500 and answer, (status, answer)
    good = f"Authorization: Bearer {TOKENS['acme']}\r\n".encode()
    status, _, answer = raw_request(api_with_tokens, request_line + good + b"X-Client-Note: caf\xe9\r\n", body)
    assert status != 500, (status, answer)  # a header nobody reads is nobody's business


def test_an_idempotency_key_of_raw_bytes_is_a_400_naming_it(api_with_tokens):
    head = (b"POST /api/submit/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKENS['acme']}\r\n".encode() + b"Idempotency-Key: cl\xe9\r\n")
    status, _, answer = raw_request(api_with_tokens, head, one_visit_body())
    assert (status, answer) == (400, b'{"error":"Idempotency-Key: header is not UTF-8 text (byte 0xe9 at 2); '
                                     b'send ASCII"}')  # before: 500


@pytest.mark.parametrize("char, name", [("\u202e", "RIGHT-TO-LEFT OVERRIDE"), ("\u200b", "ZERO WIDTH SPACE"),
                                        ("\u2066", "LEFT-TO-RIGHT ISOLATE"), ("\ufeff", "ZERO WIDTH NO-BREAK SPACE"),
                                        ("\u00ad", "SOFT HYPHEN"), ("\U000e0041", "TAG LATIN CAPITAL LETTER A"),
                                        ("\u2028", "LINE SEPARATOR")])
@pytest.mark.parametrize("field", ["store_id", "visit_time"])
def test_invisible_format_characters_are_refused_naming_the_field_and_the_code_point(api_with_tokens, char, name,
                                                                                    field):
    values = {"store_id": "RP00001", "visit_time": "2026-11-23T10:00:00"}
    values[field] = "RP00001"[:2] + char + "00001" if field == "store_id" else char + values[field]
    r = requests.post(f"{api_with_tokens}/api/submit/", json={"count": 1, "visits": [
        visit(values["store_id"], ["http://img.example/a.jpg"], values["visit_time"])]},
        headers={"Authorization": f"Bearer {TOKENS['acme']}"}, timeout=30)
    assert r.status_code == 400, r.text  # before: 201, a store id that looks like RP00001 and is not
    assert r.json()["error"] == (f"visits[0].{field}: must not contain invisible format characters, which hide or "
                                 f"reorder the text around them (found U+{ord(char):04X} {name})")


def test_metrics_is_for_the_tokens_named_to_read_it(spool, tmp_path):
    (tmp_path / "tokens").write_text("".join(f"{name} {digest(token)}\n" for name, token in TOKENS.items()))
    app = make_app(spool, tokens=Tokens.load(tmp_path / "tokens"), metrics_readers=("ops",))
    as_ = lambda name: {"HTTP_AUTHORIZATION": f"Bearer {TOKENS[name]}"}  # noqa: E731
    r = call_wsgi(app, "GET", "/metrics", extra=as_("acme"))
    assert r.status_code == 403  # before: 200, every client's figures to any client
    assert r.json()["error"].startswith("token 'acme' may not read /metrics, whose figures are every client's")
    r = call_wsgi(app, "GET", "/metrics", extra=as_("ops"))
    assert r.status_code == 200 and b"retailpulse_jobs" in r.body
    assert call_wsgi(make_app(spool), "GET", "/metrics").status_code == 200  # tokens off: local use, anyone


# ---------------------------------------------------------------- what old jobs and remote servers hold, shown
def ctl(spool: Spool, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctl", "--spool-dir", str(spool.root), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def hostile_certificate_server(tmp_path):
    """HTTPS on 127.0.0.1 whose certificate's CN holds terminal escapes: red text, and a window title."""
    cn = "evil\x1b[31mred\x1b]0;pwned\x07"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={cn}",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                context.wrap_socket(conn, server_side=True).recv(1024)
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_terminal_escapes_from_a_remote_certificate_and_an_old_jobs_store_id_are_shown_escaped(
        start_service, hostile_certificate_server):
    service = start_service()
    url = f"{hostile_certificate_server}/a.jpg"
    job_id = service.submit([visit("RP00001", [url])])
    doc = service.wait(job_id)
    assert doc["status"] == Status.FAILED and "\x1b[31m" in doc["error"][0]["error"]  # JSON escapes it itself
    old = service.spool.jobs.submit(1, records([visit("\u202eRP00001", [url], "\u200b2026-11-23")]))  # from before

    service.wait(old)
    listed, shown = ctl(service.spool, "list"), ctl(service.spool, "show", str(job_id))
    shown_old = ctl(service.spool, "show", str(old))
    for out in (listed.stdout, shown.stdout, shown_old.stdout):
        assert not any(ch in out for ch in "\x1b\x07\u202e\u200b"), out  # before: raw, a red terminal
    assert "\\x1b[31mred\\x1b]0;pwned\\x07" in listed.stdout and "\\x1b[31mred" in shown.stdout
    assert "\\u202eRP00001" in listed.stdout and "visit \\u202eRP00001 at \\u200b2026-11-23" in shown_old.stdout

    r = service.http.get(f"{service.base}/api/results.csv", params={"jobid": old}, timeout=30)
    [row] = list(csv.DictReader(io.StringIO(r.text)))
    assert (row["store_id"], row["visit_time"]) == ("\\u202eRP00001", "\\u200b2026-11-23")  # before: raw


@pytest.mark.browser
def test_the_page_shows_an_old_jobs_invisible_characters_escaped(start_service, browser):
    service = start_service()
    job_id = service.spool.jobs.submit(1, records([visit("\u202eRP00001", ["http://img.example/a.jpg"])]))
    service.wait(job_id)
    browser.get(service.base + "/")
    failures = wait_until(lambda: read(browser, f'li.job[data-job-id="{job_id}"] .failure'), what="the failure",
                          interval_s=0.1)
    assert failures[0].startswith("\\u202eRP00001: store_id not in the store master"), failures  # not reversed


# ---------------------------------------------------------------- memory per API process
@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_eight_64_mib_bodies_at_once_into_one_api_process_stay_within_its_bound(tmp_path):
    emoji_store_id = body_of_size('{"count": 1, "visits": [{"store_id": "😀'.encode(), b"a",
                                  b'", "visit_time": "t", "image_url": ["http://x/"]}]}', MAX_BODY)
    with running_api(tmp_path / "spool", "--api-workers", "1") as base:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(base, emoji_store_id), range(8)))
        peak = peak_rss_mib(tmp_path / "spool")
    print(f"\neight 64 MiB bodies at once: API process peak {peak} MiB; answers {[r.status_code for r in answers]}")
    assert all(r.status_code in (400, 503) for r in answers)  # refused for the store id, or asked to come back
    assert all(r.json()["error"].startswith("visits[0].store_id: longer than 256") for r in answers
               if r.status_code == 400)
    assert peak < 6 * 64, f"{peak} MiB"  # before: 2,035 MiB
