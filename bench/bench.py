"""The throughput benchmark of issue 5: starts the service as a user would, runs targets 1-5, prints one table.

Run through bench/run (which sets up the venv, nginx and the image corpus). Reuses the shared kit's corpus,
payload builder and client (../shared/bench/drive.py) and adds what it does not measure: a status load at a
fixed rate, RSS and CPU of every process of the service (sampled from /proc), a small job behind a huge one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KIT = REPO.parent / "shared" / "bench"
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def load_kit():
    spec = importlib.util.spec_from_file_location("drive", KIT / "drive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


# ----------------------------------------------------------------- /proc sampling
def _stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, cpu seconds, rss bytes)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S, rss_pages * os.sysconf("SC_PAGE_SIZE")


class Sampler:
    """Every interval: RSS and CPU of each process under the given roots (a program and its children)."""

    def __init__(self, roots: dict[str, int], interval_s: float = 0.25):
        self.roots, self.interval_s = roots, interval_s
        self.peak_total = {name: 0 for name in roots}  # peak of the sum over a program's processes
        self.peak_process: dict[tuple[str, int], int] = {}
        self.cpu: dict[tuple[str, int], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def snapshot(self):
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = _stat(int(entry.name))
                if st:
                    stats[int(entry.name)] = st
        for name, root in self.roots.items():
            members, frontier = {root}, [root]
            while frontier:
                parent = frontier.pop()
                for pid, (ppid, _, _) in stats.items():
                    if ppid == parent and pid not in members:
                        members.add(pid)
                        frontier.append(pid)
            total = 0
            for pid in members:
                if pid in stats:
                    _, cpu, rss = stats[pid]
                    total += rss
                    self.peak_process[(name, pid)] = max(self.peak_process.get((name, pid), 0), rss)
                    self.cpu[(name, pid)] = cpu
            self.peak_total[name] = max(self.peak_total[name], total)

    def run(self):
        while not self.stop.wait(self.interval_s):
            self.snapshot()

    def cpu_s(self, name: str) -> float:
        self.snapshot()
        return sum(cpu for (n, _), cpu in self.cpu.items() if n == name)

    def reset_peaks(self):
        self.peak_total = {name: 0 for name in self.roots}
        self.peak_process = {}


# ----------------------------------------------------------------- the service
class Service:
    def __init__(self, spool: Path, stores: Path, port: int, daemon_args: list[str], log_dir: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        py = sys.executable
        self.daemon_log = log_dir / "daemon.log"
        self.daemon = subprocess.Popen(
            [py, "-m", "daemon", "--spool-dir", str(spool), "--store-master", str(stores),
             "--allow-private-addresses", "true", *daemon_args],
            cwd=REPO, env=env, stderr=self.daemon_log.open("wb"))
        self.api = subprocess.Popen([py, "-m", "webapi", "--spool-dir", str(spool), "--port", str(port)],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                    stderr=(log_dir / "api.log").open("wb"))
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("service did not become healthy; see " + str(log_dir))

    def stop(self):
        for proc in (self.api, self.daemon):
            proc.terminate()
        for proc in (self.api, self.daemon):
            proc.wait(timeout=120)


# ----------------------------------------------------------------- workloads
class StatusLoad:
    """GET /api/status for one job at a fixed rate from a few threads; keeps every latency."""

    def __init__(self, base: str, job_id: int, rate_per_s: float, threads: int = 4):
        self.latencies, self.errors = [], 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        period = threads / rate_per_s
        self.threads = [threading.Thread(target=self.run, args=(base, job_id, period, i * period / threads),
                                         daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, base, job_id, period, offset):
        session = requests.Session()
        next_at = time.monotonic() + offset
        while not self.stop.is_set():
            next_at += period
            t = time.perf_counter()
            try:
                ok = session.get(base + "/api/status", params={"jobid": job_id}, timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            dt = time.perf_counter() - t
            with self.lock:
                self.latencies.append(dt)
                self.errors += not ok
            time.sleep(max(0.0, next_at - time.monotonic()))

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        return self.latencies


def wait_done(base: str, job_id: int, timeout_s: float, poll_s: float = 0.05) -> tuple[float, str]:
    session = requests.Session()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        doc = session.get(base + "/api/status", params={"jobid": job_id}, timeout=10).json()
        if doc["status"] in ("completed", "failed"):
            return time.monotonic(), doc["status"]
        time.sleep(poll_s)
    raise RuntimeError(f"job {job_id} not done after {timeout_s} s")


def submit(base: str, payload: dict) -> tuple[int, float, float]:
    """(job id, monotonic time of the request, seconds it took)."""
    started = time.monotonic()
    r = requests.post(base + "/api/submit/", json=payload, timeout=60)
    r.raise_for_status()
    return r.json()["job_id"], started, time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images-root", default=str(HERE / "out" / "images"))
    ap.add_argument("--stores", default=str(REPO.parent / "shared" / "data" / "StoreMasterAssignment.csv"))
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--targets", default="1,2,3", help="1: 10k mixed + status load + submit latency; "
                    "2: 20 x 200; 3: 10 images behind a huge job (also target 4's memory)")
    ap.add_argument("--big-images", type=int, default=100_000, help="size of target 3's huge job")
    ap.add_argument("--daemon-args", default="", help="extra daemon options, e.g. '--processes 4'")
    args = ap.parse_args()
    kit = load_kit()
    corpus = kit.Corpus(args.images_root, "http://127.0.0.1:18080")
    store_ids = kit.load_store_ids(args.stores)
    rng = random.Random(1)
    out = Path(args.out)
    spool = out / "spool"
    subprocess.run(["rm", "-rf", str(spool)], check=True)
    service = Service(spool, Path(args.stores), args.port, shlex.split(args.daemon_args), out)
    sampler = Sampler({"daemon": service.daemon.pid, "api": service.api.pid})
    rows = []
    try:
        targets = set(args.targets.split(","))
        if "1" in targets:
            for run in range(args.repeat):
                payload, _ = kit.make_payload(corpus, rng, store_ids, 10_000, 500, "mixed", ["jpeg"], f"t1r{run}x")
                sampler.reset_peaks()
                cpu0, api_cpu0 = sampler.cpu_s("daemon"), sampler.cpu_s("api")
                job_id, t0, submit_s = submit(service.base, payload)
                load = StatusLoad(service.base, job_id, rate_per_s=200)
                t1, status = wait_done(service.base, job_id, 900)
                latencies = load.finish()
                cpu = sampler.cpu_s("daemon") - cpu0
                rows.append(dict(target=1, run=run, images=10_000, status=status, wall_s=t1 - t0,
                                 images_per_s=10_000 / (t1 - t0), submit_ms=submit_s * 1000,
                                 status_rate=len(latencies) / (t1 - t0),
                                 status_p50_ms=pct(latencies, 50) * 1000, status_p99_ms=pct(latencies, 99) * 1000,
                                 status_errors=load.errors, cpu_ms_per_image=cpu * 1000 / 10_000,
                                 api_cpu_s=sampler.cpu_s("api") - api_cpu0,
                                 daemon_rss_peak_mb=sampler.peak_total["daemon"] / 2**20,
                                 api_rss_peak_mb=sampler.peak_total["api"] / 2**20))
                print(json.dumps(rows[-1]), flush=True)
        if "2" in targets:
            for run in range(args.repeat):
                payloads = [kit.make_payload(corpus, rng, store_ids, 200, 10, "mixed", ["jpeg"], f"t2r{run}j{j}x")[0]
                            for j in range(20)]
                sampler.reset_peaks()
                cpu0 = sampler.cpu_s("daemon")
                results, lock = [], threading.Lock()

                def one(payload, results=results, lock=lock):
                    job_id, t0, _ = submit(service.base, payload)
                    t1, status = wait_done(service.base, job_id, 900, poll_s=0.2)
                    with lock:
                        results.append((t0, t1, status))

                started = time.monotonic()
                workers = [threading.Thread(target=one, args=(p,)) for p in payloads]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                wall = max(t1 for _, t1, _ in results) - started
                durations = [t1 - t0 for t0, t1, _ in results]
                rows.append(dict(target=2, run=run, images=4000, wall_s=wall, images_per_s=4000 / wall,
                                 job_p50_s=statistics.median(durations), job_min_s=min(durations),
                                 job_max_s=max(durations), slowest_over_fastest=max(durations) / min(durations),
                                 statuses=sorted({s for *_, s in results}),
                                 cpu_ms_per_image=(sampler.cpu_s("daemon") - cpu0) * 1000 / 4000,
                                 daemon_rss_peak_mb=sampler.peak_total["daemon"] / 2**20))
                print(json.dumps(rows[-1]), flush=True)
        if "3" in targets:
            sampler.reset_peaks()
            big, _ = kit.make_payload(corpus, rng, store_ids, args.big_images, max(1, args.big_images // 20),
                                      "small", ["jpeg"], "t3big")
            big_id, big_t0, big_submit_s = submit(service.base, big)
            time.sleep(5)
            small, _ = kit.make_payload(corpus, rng, store_ids, 10, 2, "small", ["jpeg"], "t3small")
            small_id, small_t0, _ = submit(service.base, small)
            small_t1, small_status = wait_done(service.base, small_id, 300)
            # the cost of one status request on the huge job vs on the small one
            session = requests.Session()
            def status_ms(job_id, n=200):
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    session.get(service.base + "/api/status", params={"jobid": job_id}, timeout=10)
                    times.append(time.perf_counter() - t)
                return pct(times, 50) * 1000
            big_status_ms, small_status_ms = status_ms(big_id), status_ms(small_id)
            rss_trace = []
            done_at = None
            while done_at is None:
                doc = session.get(service.base + "/api/status", params={"jobid": big_id}, timeout=10).json()
                rss_trace.append((doc.get("images_done", 0), sampler.peak_total["daemon"] / 2**20))
                if doc["status"] in ("completed", "failed"):
                    done_at = time.monotonic()
                time.sleep(1)
            rows.append(dict(target=3, small_job_s=small_t1 - small_t0, small_status=small_status,
                             big_images=args.big_images, big_wall_s=done_at - big_t0,
                             big_images_per_s=args.big_images / (done_at - big_t0), big_submit_ms=big_submit_s * 1000,
                             status_ms_big_job=big_status_ms, status_ms_small_job=small_status_ms,
                             daemon_rss_peak_mb=sampler.peak_total["daemon"] / 2**20,
                             api_rss_peak_mb=sampler.peak_total["api"] / 2**20,
                             rss_peak_by_process_mb={f"{name}:{pid}": round(rss / 2**20, 1)
                                                     for (name, pid), rss in sampler.peak_process.items()},
                             rss_trace=rss_trace[:: max(1, len(rss_trace) // 10)]))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        sampler.stop.set()
        service.stop()
    with (out / "bench.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "daemon_args": args.daemon_args, **row}) + "\n")
    print_table(rows)
    return 0


def print_table(rows):
    def median(target, key):
        values = [r[key] for r in rows if r["target"] == target]
        return statistics.median(values) if values else float("nan")
    print("\n| target | measure | median |")
    print("| --- | --- | --- |")
    if any(r["target"] == 1 for r in rows):
        for key in ("images_per_s", "wall_s", "cpu_ms_per_image", "status_p50_ms", "status_p99_ms", "status_rate",
                    "submit_ms", "daemon_rss_peak_mb", "api_rss_peak_mb"):
            print(f"| 1: 10,000 mixed | {key} | {median(1, key):.1f} |")
    if any(r["target"] == 2 for r in rows):
        for key in ("images_per_s", "job_min_s", "job_max_s", "slowest_over_fastest", "cpu_ms_per_image",
                    "daemon_rss_peak_mb"):
            print(f"| 2: 20 x 200 mixed | {key} | {median(2, key):.2f} |")
    for r in rows:
        if r["target"] == 3:
            for key in ("small_job_s", "big_images_per_s", "big_submit_ms", "status_ms_big_job",
                        "status_ms_small_job", "daemon_rss_peak_mb", "api_rss_peak_mb"):
                print(f"| 3/4: 10 behind {r['big_images']:,} | {key} | {r[key]:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
