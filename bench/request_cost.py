"""What one request costs the API, and how much of it is the app: ``python -m bench.request_cost``.

Two measures of the same routes, medians of ``--repeat`` rounds of ``--requests`` each:
- the app alone: the Bottle app called in this process as a WSGI server would call it, on a spool in
  bench/out (a real disk: the submit's fsyncs are in it); CPU of this process per request;
- through the real API: the API's processes (gunicorn and its workers, as tests/service.py starts them, with
  the daemon beside them) asked over one keep-alive libcurl handle, one request after the other; CPU of the
  API's process tree from /proc per request.
The difference is what serving costs around the app (parsing, gunicorn's worker, its threads' hand-offs).
The submit names an address that refuses at once, so the daemon's work is a failed job and stays small.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pycurl

from spool import Spool
from bench.bench import proc_stat
from tests.service import Service
from webapi.app import make_app

OUT = Path(__file__).resolve().parent / "out"
BODY = json.dumps({"count": 1, "visits": [{"store_id": "RP00001", "visit_time": "2026-12-04T10:00:00",
                                            "image_url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(5)]}]}).encode()


def process_tree_cpu_s(root: int) -> float:
    """CPU seconds of a process and all its descendants (each process's /proc stat counts all its threads)."""
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        stat = proc_stat(pid)
        total += stat[1] if stat else 0.0
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in task.read_text().split())
            except OSError:
                pass
    return total


def in_process_ms(app, method: str, path: str, query: str, body: bytes | None, n: int) -> float:
    """CPU milliseconds of this process per call of the app."""
    started = time.process_time()
    for _ in range(n):
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}
        if body is not None:
            environ.update({"CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
                            "wsgi.input": io.BytesIO(body)})
        setup_testing_defaults(environ)
        b"".join(app(environ, lambda status, headers, exc_info=None: None))
    return (time.process_time() - started) * 1000 / n


def over_http_ms(service: Service, curl: pycurl.Curl, url: str, body: bytes | None, n: int) -> float:
    """CPU milliseconds of the API's process tree per request, one keep-alive connection."""
    curl.setopt(pycurl.URL, url)
    if body is not None:
        curl.setopt(pycurl.POSTFIELDS, body)
        curl.setopt(pycurl.HTTPHEADER, ["Content-Type: application/json"])
    else:
        curl.setopt(pycurl.HTTPGET, 1)
        curl.setopt(pycurl.HTTPHEADER, [])
    started = process_tree_cpu_s(service.api.pid)
    for _ in range(n):
        curl.perform()
        if curl.getinfo(pycurl.RESPONSE_CODE) not in (200, 201):
            raise RuntimeError(f"{url}: HTTP {curl.getinfo(pycurl.RESPONSE_CODE)}")
    return (process_tree_cpu_s(service.api.pid) - started) * 1000 / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per round and route [2000]")
    ap.add_argument("--repeat", type=int, default=3, help="rounds [3]")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="request-cost-", dir=OUT))
    rows: dict[str, list[float]] = {}
    try:
        app = make_app(Spool(folder / "in-process").create())
        service = Service(folder / "spool", ["--allow-private-addresses", "true"])
        try:
            curl = pycurl.Curl()
            curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
            job_id = service.submit(json.loads(BODY)["visits"])
            in_process_ms(app, "POST", "/api/submit/", "", BODY, 1)
            for _ in range(args.repeat):
                rows.setdefault("submit, the app alone", []).append(
                    in_process_ms(app, "POST", "/api/submit/", "", BODY, args.requests // 4))
                rows.setdefault("status, the app alone", []).append(
                    in_process_ms(app, "GET", "/api/status", "jobid=1", None, args.requests))
                rows.setdefault("submit, through the API", []).append(
                    over_http_ms(service, curl, f"{service.base}/api/submit/", BODY, args.requests // 4))
                rows.setdefault("status, through the API", []).append(
                    over_http_ms(service, curl, f"{service.base}/api/status?jobid={job_id}", None, args.requests))
            curl.close()
        finally:
            service.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nCPU per request, medians of {args.repeat} (load average {os.getloadavg()[0]:.2f})\n")
    print("| request | CPU per request | runs |\n| --- | --- | --- |")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3f} ms | {' / '.join(f'{v:.3f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
