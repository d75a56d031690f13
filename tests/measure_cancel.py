"""``python -m tests.measure_cancel [IMAGES] [--runs N]``: how long a cancel takes with the real processes.

A job of IMAGES (default 200,000, the most a job may hold) whose images sit in a 60 s GPU wait, so that the
pool holds all it can (2 x 4,096) and the rest waits; then ``POST /api/cancel``, which answers once the daemon
has recorded every image "cancelled by request". Prints the answer's time and how many results files the
cancel wrote. Then the same with ``retailpulse-ctl cancel`` on a job of 640 images, all in flight."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import ImageServer, image_bytes
from tests.service import REPO, Service


def one_run(images: int, with_ctl: bool) -> float:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        (folder / "images" / "a.jpg").write_bytes(image_bytes("JPEG", 64, 48))
        server = ImageServer(folder / "images")
        server.httpd.handle_error = lambda *_: None  # keep-alive connections the pool drops when it stops
        service = Service(folder / "spool", ["--gpu-sleep-min-s", "60", "--gpu-sleep-max-s", "60", "--processes",
                                             "2", "--allow-private-addresses", "true"], check_contract=False)
        try:
            job_id = service.submit([{"store_id": "RP00001", "visit_time": "t",
                                      "image_url": [f"{server.base}/a.jpg?n={i}" for i in range(images)]}])
            while (service.spool.heartbeat.read() or {}).get("images_in_flight", 0) < min(images, 8192):
                time.sleep(0.05)
            started = time.monotonic()
            if with_ctl:
                said = subprocess.run([sys.executable, "-m", "ctl", "--spool-dir", str(service.spool.root), "cancel",
                                       str(job_id)], cwd=REPO, capture_output=True, text=True).stdout.strip()
            else:
                said = service.http.post(f"{service.base}/api/cancel", params={"jobid": job_id}, timeout=60).text
            took = time.monotonic() - started
            print(f"  {images} images: {took:.2f} s, {len(service.spool.results.chunks(job_id))} results files; {said}")
            return took
        finally:
            service.stop()
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", type=int, nargs="?", default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"POST /api/cancel of a job of {args.images} images:")
    api = [one_run(args.images, with_ctl=False) for _ in range(args.runs)]
    print("retailpulse-ctl cancel of a job of 640 images:")
    ctl = [one_run(640, with_ctl=True) for _ in range(args.runs)]
    print(f"medians: POST /api/cancel {statistics.median(api):.2f} s; retailpulse-ctl cancel {statistics.median(ctl):.2f} s")


if __name__ == "__main__":
    main()
