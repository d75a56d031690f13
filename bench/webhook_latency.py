"""Webhook latency: from a job's final status to its receiver's 2xx, over many small jobs.

    .venv/bin/python -m bench.webhook_latency [--jobs 100] [--rate 10] [--daemon-args '...']

Starts the real service (API and daemon processes, the daemon's defaults but for loopback addresses and a
webhook secret), an image server and a webhook receiver on 127.0.0.1 (tests/webhook_receiver.py, which
verifies every signature with the reference library), submits ``--jobs`` jobs of one image at ``--rate``
jobs/s, each with a callback_url, and waits for every webhook. A job's final status is the moment its status
file was written (its mtime: the daemon writes it once, when the job turns completed or failed); the receiver
notes when it sent its 200. Prints the latencies' median, p90, p99 and max, and appends a JSON row to
bench/out/bench.jsonl. The target: a median under 1 s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from config.webhook_secrets import new_secret
from tests.conftest import ImageServer, image_bytes, wait_until
from tests.service import REPO, Service
from tests.webhook_receiver import Receiver

OUT = REPO / "bench" / "out"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


@contextlib.contextmanager
def webhook_service(prefix: str, daemon_args: list[str] = (), receiver: bool = True):
    """The service with a webhook secret for every receiver, one JPEG served on 127.0.0.1 (private addresses
    allowed), and a receiver that checks the signatures if asked: (service, images, receiver or None), all
    stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tmp = Path(tmp)
        secret = new_secret()
        (tmp / "secrets").write_text(f"* {secret}\n")
        (tmp / "images").mkdir()
        (tmp / "images" / "shelf.jpg").write_bytes(image_bytes("JPEG", 640, 480))
        hook = ["--webhook-secrets-file", str(tmp / "secrets")]
        with contextlib.ExitStack() as stack:
            images = ImageServer(tmp / "images")
            stack.callback(images.close)
            hearer = Receiver(secret) if receiver else None
            if hearer:
                stack.callback(hearer.close)
            service = Service(tmp / "spool", ["--allow-private-addresses", "true", *hook, *daemon_args], hook,
                              check_contract=False)
            stack.callback(service.stop)  # first out: the service, then the receiver, then the images
            yield service, images, hearer


def measure(jobs: int, rate_per_s: float, daemon_args: list[str]) -> dict:
    with webhook_service("webhook-latency-", daemon_args, receiver=True) as (service, images, receiver):
        ids = []
        for n in range(jobs):
            body = {"count": 1, "callback_url": receiver.url, "visits": [
                {"store_id": "RP00001", "visit_time": "t", "image_url": [f"{images.base}/shelf.jpg?n={n}"]}]}
            r = service.http.post(f"{service.base}/api/submit/", json=body, timeout=30)
            r.raise_for_status()
            ids.append(r.json()["job_id"])
            time.sleep(1 / rate_per_s)
        wait_until(lambda: sum(x.answered == 200 for x in receiver.received) >= jobs, timeout_s=120,
                   what="every webhook")
        answered = {x.verified["job_id"]: x.answered_at for x in receiver.received
                    if x.answered == 200 and isinstance(x.verified, dict)}
        latencies = [answered[str(job_id)] - service.spool.jobs.status_path(job_id).stat().st_mtime for job_id in ids]
        attempts = len(receiver.received)
        statuses = {service.status(job_id)["callback"]["state"] for job_id in ids}
    return {"workload": "WEBHOOK-LATENCY", "jobs": jobs, "rate_per_s": rate_per_s, "attempts": attempts,
            "states": sorted(statuses), "latency_p50_ms": statistics.median(latencies) * 1000,
            "latency_p90_ms": pct(latencies, 90) * 1000, "latency_p99_ms": pct(latencies, 99) * 1000,
            "latency_max_ms": max(latencies) * 1000}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.webhook_latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--rate", type=float, default=10.0, help="jobs submitted per second [10]")
    ap.add_argument("--daemon-args", default="", help="extra daemon options")
    args = ap.parse_args(argv)
    row = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **measure(args.jobs, args.rate, args.daemon_args.split())}
    print(json.dumps(row))
    OUT.mkdir(exist_ok=True)
    with (OUT / "bench.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"webhook latency over {row['jobs']} jobs (final status -> receiver's 200): median "
          f"{row['latency_p50_ms']:.0f} ms, p90 {row['latency_p90_ms']:.0f} ms, p99 {row['latency_p99_ms']:.0f} ms, "
          f"max {row['latency_max_ms']:.0f} ms; {row['attempts']} attempts; states {row['states']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
