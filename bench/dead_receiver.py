"""A dead webhook receiver behind the image work: does a normal job still run as if it were not there?

    .venv/bin/python -m bench.dead_receiver [--jobs 2000] [--callback dead|live|none]

Starts the real service (API and daemon processes, the daemon's defaults but for loopback addresses and a
webhook secret) and an image server on 127.0.0.1. Submits ``--jobs`` jobs of one image each (8 clients at
once), whose callback_url is a port nothing listens on (``dead``: every attempt refused at once), a receiver
that answers 200 (``live``), or none (``none``), and waits until all are done: their webhooks are then being
tried again behind the work. Then times three normal jobs of 20 images without a callback, one after the
other, from submit to final status, and counts the webhook attempts per second meanwhile (the heartbeat's
counters). Prints one JSON row and appends it to bench/out/bench.jsonl. Issue 31 measured, before: a
normal 20-image job took 72.4 s instead of 1.6 s, with 10,614 attempts in 165 s.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time

import requests

from bench.webhook_latency import webhook_service
from tests.conftest import wait_until
from tests.service import REPO, Service, free_port

OUT = REPO / "bench" / "out"
SUBMITTERS = 8


def attempts(service: Service) -> int:
    beat = service.spool.heartbeat.read()
    return sum(beat.webhooks.attempts.values()) if beat is not None and beat.webhooks else 0


def done_count(service: Service) -> int:
    return sum(1 for _ in (service.spool.root / "done").iterdir())


def measure(jobs: int, callback: str, normal_jobs: int = 3) -> dict:
    with webhook_service("dead-receiver-", receiver=callback == "live") as (service, images, receiver):
        url = receiver.url if receiver else f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
        extra = {"callback_url": url} if callback != "none" else {}

        def submit(n: int) -> None:
            with requests.Session() as http:
                http.post(f"{service.base}/api/submit/", timeout=60, json={"count": 1, **extra, "visits": [
                    {"store_id": "RP00001", "visit_time": "t", "image_url": [f"{images.base}/shelf.jpg?n={n}"]}]}
                ).raise_for_status()

        # 1. the one-image jobs, submitted faster than they are done, until every one is done
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(SUBMITTERS) as pool:
            list(pool.map(submit, range(jobs)))
        wait_until(lambda: done_count(service) >= jobs, timeout_s=900, what="every job", interval_s=0.2)
        first_s, first_attempts = time.monotonic() - started, attempts(service)
        # 2. normal jobs, one after the other, while their webhooks are (re)tried behind them
        normal_s = []
        for k in range(normal_jobs):
            before = time.monotonic()
            service.wait(service.submit([{"store_id": "RP00001", "visit_time": "t", "image_url": [
                f"{images.base}/shelf.jpg?normal={k}.{i}" for i in range(20)]}]), timeout_s=600)
            normal_s.append(time.monotonic() - before)
        second_s, second_attempts = time.monotonic() - started - first_s, attempts(service) - first_attempts
    return {"workload": "DEAD-RECEIVER", "callback": callback, "jobs": jobs, "jobs_s": round(first_s, 1),
            "one_image_jobs_per_s": round(jobs / first_s, 1), "attempts_meanwhile": first_attempts,
            "normal_job_s": [round(x, 2) for x in normal_s], "normal_job_median_s": round(sorted(normal_s)[len(
                normal_s) // 2], 2), "attempts_per_s_behind_normal_jobs": round(second_attempts / second_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dead_receiver", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--callback", choices=("dead", "live", "none"), default="dead")
    args = ap.parse_args(argv)
    row = measure(args.jobs, args.callback)
    print(json.dumps(row))
    OUT.mkdir(exist_ok=True)
    with (OUT / "bench.jsonl").open("a") as f:
        f.write(json.dumps({**row, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
