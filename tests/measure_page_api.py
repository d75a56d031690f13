"""Time and bytes of the status page's API calls on a big spool: 1,000 jobs and one job of 100,000 images.

Run: .venv/bin/python -m tests.measure_page_api   (not a test: it prints figures for people, takes ~30 s)"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import requests

from spool import Phase, Spool, Status
from spool.records import JobStatus
from tests.conftest import records
from tests.api_process import running_api

BIG_IMAGES, SMALL_JOBS, CHUNK = 100_000, 1000, 64


def build(root: Path) -> int:
    spool = Spool(root).create()
    visit = {"store_id": "RP00001", "visit_time": "2026-11-24T09:00:00Z"}
    big = spool.jobs.submit(1, records([{**visit, "image_url": [f"http://img.example/{i}.jpg" for i in range(BIG_IMAGES)]}]))
    for first in range(0, BIG_IMAGES, CHUNK):
        stop = min(first + CHUNK, BIG_IMAGES)
        spool.results.write(big, first, stop, ({"index": i, **visit, "store_name": "CORNER MART",
                                                "area_code": "7100015", "image_url": f"http://img.example/{i}.jpg",
                                                "width": 640, "height": 480, "perimeter": 2240, "error": None}
                                               for i in range(first, stop)))
    spool.jobs.write_status(JobStatus(str(big), Status.COMPLETED, Phase.FINISHED, images_total=BIG_IMAGES,
                                            images_done=BIG_IMAGES, images_failed=0))
    for _ in range(SMALL_JOBS - 1):
        job = spool.jobs.submit(1, records([{**visit, "image_url": ["http://img.example/a.jpg"]}]))
        spool.jobs.write_status(JobStatus(str(job), Status.ONGOING, Phase.RUNNING, images_total=1,
                                                images_done=0, images_failed=0))
    return big


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        big = build(Path(tmp) / "spool")
        with running_api(Path(tmp) / "spool") as base, requests.Session() as http:
            for label, path in (("jobs list, first page of 20", "/api/jobs?offset=0&limit=20"),
                                ("jobs list, last page of 20", "/api/jobs?offset=980&limit=20"),
                                ("status of the big job", f"/api/status?jobid={big}"),
                                ("results page 1 (100)", f"/api/results?jobid={big}&offset=0&limit=100"),
                                ("results last page (100)", f"/api/results?jobid={big}&offset=99900&limit=100"),
                                ("CSV, all 100,000 images", f"/api/results.csv?jobid={big}"),
                                ("unpaged results (not used by the page)", f"/api/results?jobid={big}")):
                http.get(base + path, timeout=120)  # warm: the first call of a process pays its imports
                started = time.perf_counter()
                r = http.get(base + path, timeout=120)
                elapsed_ms = (time.perf_counter() - started) * 1000
                print(f"{label:42s} {r.status_code}  {elapsed_ms:8.1f} ms  {len(r.content):>12,d} bytes")


if __name__ == "__main__":
    main()
