"""The benchmark: the real service (API and daemon processes, production defaults, the real 0.1-0.4 s wait
per image) on real images served by nginx on 127.0.0.1, loaded the way clients load it.

Run it with ``bench/run`` (which sets up what it needs); ``bench/run --help`` lists the workloads. Images,
payloads and ground truth come from the shared kit (``../shared/bench``; the Dask workloads, bench/dask_bench.py,
need no kit: they make and serve their own corpus); this adds what the kit does not
measure: CPU and RSS of every process of the service (from /proc), status latency at a fixed request rate,
a small job behind big ones, a soak, and the Dask executor. One JSON row per run goes to
``bench/out/bench.jsonl``; the table at the end gives medians over runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.service import REAL_STORE_MASTER, REPO, SAMPLE_STORE_MASTER, SHARED_BENCH_KIT, Service

OUT = REPO / "bench" / "out"
IMAGE_BASE = "http://127.0.0.1:18080"  # where the kit's imgserver.py serves the corpus
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
TERMINAL = ("completed", "failed")


# ------------------------------------------------------------------ the shared kit
def load_kit():
    """drive.py of the shared kit (corpus, payload builder, ground truth), or exit naming what is missing."""
    drive = SHARED_BENCH_KIT / "drive.py"
    if not drive.is_file():
        sys.exit(f"bench: the shared benchmark kit is missing: expected {drive} "
                 "(the ../shared folder beside this repository)")
    spec = importlib.util.spec_from_file_location("drive", drive)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_corpus() -> Path:
    """Generate the corpus once into bench/out/images, and serve it with the kit's nginx on 127.0.0.1:18080.

    The kit's images, plus our photo corpus at photo size (tests/photo_corpus.py: motion photos, HEIC grids,
    AVIF, big metadata...) in images/photos/, added to the kit's manifest with their true sizes."""
    images = OUT / "images"
    if not (images / "manifest.json").is_file():
        subprocess.run([sys.executable, str(SHARED_BENCH_KIT / "gen_images.py"), "--out", str(images)], check=True)
    manifest = json.loads((images / "manifest.json").read_text())
    if not any(name.startswith("photos/") for name in manifest):
        from tests import photo_corpus
        manifest.update(photo_corpus.write(images / "photos", photo_corpus.corpus("bench"), prefix="photos/"))
        (images / "manifest.json").write_text(json.dumps(manifest, indent=0, sort_keys=True))
    subprocess.run([sys.executable, str(SHARED_BENCH_KIT / "imgserver.py"), "start", "--root", str(images)],
                   check=True, stdout=subprocess.DEVNULL)
    return images


def stop_corpus_server() -> None:
    subprocess.run([sys.executable, str(SHARED_BENCH_KIT / "imgserver.py"), "stop"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


# ------------------------------------------------------------------ /proc
def proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, RSS bytes) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S, rss_pages * PAGE_BYTES


class Sampler:
    """Every interval: RSS and CPU of each process tree (a program and all its children), by name.

    CPU of a process that has exited is kept at its last sample, so a tree's CPU only grows."""

    def __init__(self, roots: dict[str, list[int]], interval_s: float = 0.25):
        self.roots, self.interval_s = roots, interval_s
        self.rss_peak = dict.fromkeys(roots, 0)
        self.rss_now = dict.fromkeys(roots, 0)
        self._cpu: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _snapshot(self) -> None:
        stats = {int(e.name): s for e in os.scandir("/proc") if e.name.isdigit() and (s := proc_stat(int(e.name)))}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        with self._lock:
            for name, roots in self.roots.items():
                members, frontier = set(), [r for r in roots if r in stats]
                while frontier:
                    pid = frontier.pop()
                    members.add(pid)
                    frontier.extend(c for c in children.get(pid, ()) if c not in members)
                rss = sum(stats[pid][2] for pid in members)
                self.rss_now[name] = rss
                self.rss_peak[name] = max(self.rss_peak[name], rss)
                for pid in members:
                    self._cpu[(name, pid)] = stats[pid][1]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._snapshot()

    def cpu_s(self, *names: str) -> float:
        self._snapshot()
        with self._lock:
            return sum(cpu for (name, _), cpu in self._cpu.items() if name in names)

    def cpu_of(self, name: str, pid: int) -> float:
        """CPU seconds of one process of a tree (e.g. the daemon's supervisor, without its pool processes)."""
        self._snapshot()
        with self._lock:
            return self._cpu.get((name, pid), 0.0)

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.roots.setdefault(name, []).append(pid)
            self.rss_peak.setdefault(name, 0)
            self.rss_now.setdefault(name, 0)

    def reset_peaks(self) -> None:
        with self._lock:
            self.rss_peak = dict(self.rss_now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ clients
def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] if values else float("nan")


class StatusLoad:
    """GET /api/status for one job at a fixed total rate; keeps every latency. One libcurl multi handle on one
    thread (``connections`` keep-alive connections), so the client costs tens of microseconds a request
    and 1,000 requests/s measure the service, not the client."""

    def __init__(self, base: str, job_id: int, rate_per_s: float, connections: int = 8):
        import pycurl
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._url, self._period = f"{base}/api/status?jobid={job_id}", 1 / rate_per_s
        self._curls = [pycurl.Curl() for _ in range(connections)]
        for curl in self._curls:
            curl.setopt(pycurl.URL, self._url)
            curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
            curl.setopt(pycurl.TIMEOUT, 10)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import pycurl
        multi, idle, started = pycurl.CurlMulti(), list(self._curls), {}
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            while next_at <= now and idle:  # requests due; with every connection busy, they wait
                curl = idle.pop()
                started[id(curl)] = time.perf_counter()
                multi.add_handle(curl)
                next_at += self._period
            multi.select(min(0.01, max(0.0, next_at - now)))
            while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            _, ok, failed = multi.info_read()
            for curl in ok + [c for c, _, _ in failed]:
                multi.remove_handle(curl)
                self.latencies.append(time.perf_counter() - started.pop(id(curl)))
                self.errors += curl not in ok or curl.getinfo(pycurl.RESPONSE_CODE) != 200
                idle.append(curl)
        for curl in self._curls:
            try:
                multi.remove_handle(curl)
            except pycurl.error:
                pass
        multi.close()

    def finish(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.latencies


class Bench:
    """One service on a fresh spool, the kit, and the helpers every workload uses."""

    def __init__(self, args, kit, daemon_args: list[str], name: str):
        self.args, self.kit = args, kit
        self.corpus = kit.Corpus(str(OUT / "images"), IMAGE_BASE)
        self.store_ids = kit.load_store_ids(str(args.store_master))
        self.rng = random.Random(1)
        spool = OUT / "spool" / name
        shutil.rmtree(spool.parent, ignore_errors=True)
        spool.parent.mkdir(parents=True)
        self.receiver, hook = None, []
        if getattr(args, "callback", False):  # every job carries a callback_url to a receiver on 127.0.0.1
            from config.webhook_secrets import new_secret
            from tests.webhook_receiver import Receiver
            secret = new_secret()
            (spool.parent / "webhook-secrets").write_text(f"* {secret}\n")
            self.receiver, hook = Receiver(secret), ["--webhook-secrets-file", str(spool.parent / "webhook-secrets")]
        self.service = Service(spool, ["--allow-private-addresses", "true", *hook, *daemon_args], hook,
                               store_master=args.store_master, check_contract=False)
        self.base = self.service.base
        self.http = requests.Session()
        self.sampler = Sampler({"daemon": [self.service.daemon.pid], "api": [self.service.api.pid]})

    def payload(self, images: int, tier: str, tag: str, visits: int | None = None) -> dict:
        visits = visits or max(1, images // 20)
        payload = self.kit.make_payload(self.corpus, self.rng, self.store_ids, images, visits, tier, self.args.formats,
                                        f"{tag}-{time.time_ns()}")[0]
        return {**payload, "callback_url": self.receiver.url} if self.receiver else payload

    def submit(self, payload: dict) -> tuple[int, float]:
        """(job id, monotonic time the request started)."""
        started = time.monotonic()
        r = requests.post(self.base + "/api/submit/", json=payload, timeout=120)
        if r.status_code != 201:
            raise RuntimeError(f"submit: {r.status_code} {r.text[:300]}")
        return r.json()["job_id"], started

    def status(self, job_id: int, session: requests.Session | None = None) -> dict:
        return (session or self.http).get(self.base + "/api/status", params={"jobid": job_id}, timeout=30).json()

    def wait(self, job_id: int, timeout_s: float, poll_s: float = 0.05) -> tuple[float, dict]:
        """(monotonic time the job was seen finished, its final status)."""
        session = requests.Session()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = self.status(job_id, session)
            if doc["status"] in TERMINAL:
                return time.monotonic(), doc
            time.sleep(poll_s)
        raise RuntimeError(f"job {job_id} not finished after {timeout_s} s")

    def correct(self, job_id: int) -> str:
        """"right/total": perimeters in the results that match the corpus's ground truth."""
        check = self.kit.check_results(self.corpus, self.http.get(
            self.base + "/api/results", params={"jobid": job_id}, timeout=120).json())
        return f"{check['correct']}/{check['exposed']}" if check else "0/0"

    def webhooks_delivered(self) -> int:
        """Webhooks the receiver answered 200 to, each verified (--callback)."""
        return sum(r.answered == 200 and isinstance(r.verified, dict) for r in self.receiver.received)

    def close(self) -> None:
        self.sampler.stop()
        self.service.stop()
        if self.receiver:
            self.receiver.close()


# ------------------------------------------------------------------ workloads
def one_job(bench: Bench, workload: str, images: int, tier: str, status_rate: float = 0.0) -> dict:
    """W1 / W2: one job, submit to completed; with status_rate, GET /api/status at that rate meanwhile."""
    payload = bench.payload(images, tier, workload)
    bench.sampler.reset_peaks()
    cpu0 = bench.sampler.cpu_s("daemon")
    job_id, t0 = bench.submit(payload)
    submit_ms = (time.monotonic() - t0) * 1000
    load = StatusLoad(bench.base, job_id, status_rate) if status_rate else None
    t1, doc = bench.wait(job_id, 1800)
    latencies = load.finish() if load else []
    cpu_s = bench.sampler.cpu_s("daemon") - cpu0
    row = dict(workload=workload, images=images, status=doc["status"], wall_s=t1 - t0, images_per_s=images / (t1 - t0),
               submit_ms=submit_ms, daemon_cpu_ms_per_image=cpu_s * 1000 / images,
               daemon_rss_peak_mb=bench.sampler.rss_peak["daemon"] / 2**20, correct=bench.correct(job_id))
    if latencies:
        row.update(status_rate_per_s=len(latencies) / (t1 - t0), status_p50_ms=pct(latencies, 50) * 1000,
                   status_p99_ms=pct(latencies, 99) * 1000, status_errors=load.errors)
    if bench.receiver:
        row["webhooks_delivered"] = bench.webhooks_delivered()
    return row


def killed_process(bench: Bench, images: int = 10_000, after_s: float = 1.0) -> dict:
    """KILL: W2's job with one pool process SIGKILLed ``after_s`` into it: what the redo costs."""
    bench.sampler.reset_peaks()
    job_id, t0 = bench.submit(bench.payload(images, "mixed", "KILL"))
    time.sleep(after_s)
    pool = sorted(pid for pid in _children(bench.service.daemon.pid)
                  if "multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
    os.kill(pool[0], signal.SIGKILL)
    t1, doc = bench.wait(job_id, 1800)
    return dict(workload="KILL", images=images, status=doc["status"], wall_s=t1 - t0,
                images_per_s=images / (t1 - t0), killed_after_s=after_s,
                daemon_rss_peak_mb=bench.sampler.rss_peak["daemon"] / 2**20, correct=bench.correct(job_id))


def _children(pid: int) -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and (s := proc_stat(int(e.name)))
            and s[0] == pid]


def many_jobs(bench: Bench, jobs: int = 20, images: int = 200) -> dict:
    """W3: jobs submitted at once; total images/s and the slowest job over the fastest."""
    payloads = [bench.payload(images, "mixed", f"W3j{j}", visits=10) for j in range(jobs)]
    cpu0 = bench.sampler.cpu_s("daemon")
    started = time.monotonic()

    def run(payload):
        job_id, t0 = bench.submit(payload)
        t1, doc = bench.wait(job_id, 1800, poll_s=0.2)
        return t0, t1, doc["status"]

    with ThreadPoolExecutor(jobs) as pool:
        finished = list(pool.map(run, payloads))
    wall = max(t1 for _, t1, _ in finished) - started
    durations = [t1 - t0 for t0, t1, _ in finished]
    total = jobs * images
    return dict(workload="W3", images=total, wall_s=wall, images_per_s=total / wall,
                job_min_s=min(durations), job_max_s=max(durations),
                slowest_over_fastest=max(durations) / min(durations), statuses=sorted({s for *_, s in finished}),
                daemon_cpu_ms_per_image=(bench.sampler.cpu_s("daemon") - cpu0) * 1000 / total)


def small_behind_big(bench: Bench, big_images: int) -> dict:
    """BIG: a job of big_images small images; 5 s later a job of 10 images (its time); RSS of the daemon
    through the whole big job, sampled every 5 s; one status request on the big job and on the small one."""
    big_id, big_t0 = bench.submit(bench.payload(big_images, "small", "BIG"))
    submit_s = time.monotonic() - big_t0
    bench.sampler.reset_peaks()
    time.sleep(5)
    small_id, small_t0 = bench.submit(bench.payload(10, "small", "BIGsmall", visits=2))
    small_t1, small_doc = bench.wait(small_id, 300)

    def status_ms(job_id: int, n: int = 200) -> float:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            bench.status(job_id)
            times.append(time.perf_counter() - started)
        return pct(times, 50) * 1000

    status_big_ms, status_small_ms = status_ms(big_id), status_ms(small_id)
    trace, next_sample = [], 0.0
    while True:
        doc = bench.status(big_id)
        if time.monotonic() >= next_sample or doc["status"] in TERMINAL:
            trace.append((round(time.monotonic() - big_t0), doc.get("images_done", 0),
                          round(bench.sampler.rss_now["daemon"] / 2**20)))
            next_sample = time.monotonic() + 5
        if doc["status"] in TERMINAL:
            break
        time.sleep(0.5)
    wall = time.monotonic() - big_t0
    return dict(workload="BIG", images=big_images, big_submit_s=submit_s, big_wall_s=wall,
                big_images_per_s=big_images / wall, small_job_s=small_t1 - small_t0, small_status=small_doc["status"],
                status_p50_ms_big_job=status_big_ms, status_p50_ms_small_job=status_small_ms,
                daemon_rss_peak_mb=bench.sampler.rss_peak["daemon"] / 2**20,
                api_rss_peak_mb=bench.sampler.rss_peak["api"] / 2**20,
                rss_trace_s_done_mb=trace)


def crowd(bench: Bench, jobs: int, images: int) -> dict:
    """CROWD: ``jobs`` jobs of ``images`` submitted at once, then a job of 5 images: its time, and how
    evenly the crowd progressed meanwhile. The crowd is cancelled at the end."""
    payloads = [bench.payload(images, "small", f"CROWD{j}") for j in range(jobs)]
    with ThreadPoolExecutor(8) as pool:
        ids = [job_id for job_id, _ in pool.map(bench.submit, payloads)]
    time.sleep(5)
    small_id, small_t0 = bench.submit(bench.payload(5, "small", "CROWDsmall", visits=1))
    small_t1, small_doc = bench.wait(small_id, 600)
    done = [bench.status(job_id).get("images_done", 0) for job_id in ids]
    running = [d for d in done if d]
    cancel_t0 = time.monotonic()  # POST /api/cancel waits for the daemon to carry each out: count that too
    for job_id in ids:
        bench.http.post(bench.base + "/api/cancel", params={"jobid": job_id}, timeout=30)
    for job_id in ids:
        bench.wait(job_id, 1800, poll_s=0.2)
    return dict(workload="CROWD", jobs=jobs, images_per_job=images, small_job_s=small_t1 - small_t0,
                small_status=small_doc["status"], crowd_jobs_started=len(running),
                crowd_done_min=min(running, default=0), crowd_done_max=max(running, default=0),
                crowd_all_finished_after_cancel_s=time.monotonic() - cancel_t0)


def soak(bench: Bench, minutes: float) -> dict:
    """SOAK: W3-like rounds (20 jobs of 200) back to back for ``minutes``; the daemon's RSS after each."""
    trace, started, rounds = [], time.monotonic(), 0
    while time.monotonic() - started < minutes * 60:
        many_jobs(bench)
        rounds += 1
        trace.append((round((time.monotonic() - started) / 60, 1), round(bench.sampler.rss_now["daemon"] / 2**20)))
        print(f"  soak: round {rounds}, {trace[-1][0]} min, daemon RSS {trace[-1][1]} MB", flush=True)
    return dict(workload="SOAK", minutes=minutes, rounds=rounds, jobs=rounds * 20,
                rss_first_mb=trace[0][1], rss_last_mb=trace[-1][1], rss_max_mb=max(mb for _, mb in trace),
                rss_trace_min_mb=trace)


# ------------------------------------------------------------------ main
WORKLOADS = ("W1", "W2", "W3", "KILL", "BIG", "CROWD", "VISITS", "DASK-SCALING", "DASK-W2", "DASK-FAULTS", "SOAK")
DEFAULT = ("W1", "W2", "W3", "KILL", "BIG", "CROWD", "VISITS", "DASK-SCALING", "DASK-W2", "DASK-FAULTS")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=list(DEFAULT), metavar="WORKLOAD",
                    help=f"any of {', '.join(WORKLOADS)} (default: all but SOAK). W1: 1,000 small images; "
                         "W2: 10,000 mixed with status at 200 req/s; W3: 20 x 200 mixed at once; KILL: W2's job "
                         "with a pool process SIGKILLed 1 s in; BIG: a huge job "
                         "and a small one behind it; CROWD: 50 x 10,000 at once and a small one behind them; VISITS: jobs of "
                         "one visit of 5 photos from 1, 64 and 256 clients, polling and waiting (bench/visits.py); "
                         "DASK-SCALING: 1, 2, 4, 8 Dask workers; DASK-W2: W2 on Dask; DASK-FAULTS: a worker, the "
                         "scheduler, the daemon killed mid-job; SOAK: rounds of W3. The DASK ones need no ../shared")
    ap.add_argument("--repeat", type=int, default=3, help="runs of W1, W2, W3, DASK-W2 (medians are reported)")
    ap.add_argument("--big-images", type=int, default=100_000)
    ap.add_argument("--status-rate", type=float, default=200, help="W2: GET /api/status per second meanwhile [200]")
    ap.add_argument("--visits-clients", default="1,64,256", type=lambda text: [int(n) for n in text.split(",")],
                    help="VISITS: the numbers of clients at once")
    ap.add_argument("--visits-modes", default="poll,wait", type=lambda text: text.split(","),
                    help="VISITS: poll (every 50 ms), wait (Prefer: wait=30)")
    ap.add_argument("--visits-seconds", type=float, default=10.0, help="VISITS: the measured window of each run")
    ap.add_argument("--crowd-jobs", type=int, default=50)
    ap.add_argument("--crowd-images", type=int, default=10_000)
    ap.add_argument("--dask-workers", default="1,2,4,8")
    ap.add_argument("--dask-images", type=int, default=8_000)
    ap.add_argument("--dask-vms", type=float, default=None, metavar="DELAY_MS",
                    help="DASK-W2 and DASK-FAULTS across VMs (network namespaces: the service VM, the scheduler, two "
                         "worker hosts, the image host), each worker host's link delayed DELAY_MS each way (0: none); "
                         "without it, on loopback")
    ap.add_argument("--soak-minutes", type=float, default=30)
    ap.add_argument("--formats", default="jpeg,png,webp,heif,avif", type=lambda text: text.split(","),
                    help="formats the jobs' images are drawn from (the kit's manifest names: jpeg, png, webp, heif, "
                         "avif); the photo corpus's variants are among them")
    ap.add_argument("--daemon-args", default="", help="extra daemon options for the local runs")
    ap.add_argument("--callback", action="store_true", help="every job of the local runs carries a callback_url "
                    "to a webhook receiver on 127.0.0.1 (completion webhooks on)")
    ap.add_argument("--store-master", type=Path,
                    default=REAL_STORE_MASTER if REAL_STORE_MASTER.is_file() else SAMPLE_STORE_MASTER)
    args = ap.parse_args(argv)
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    OUT.mkdir(exist_ok=True)
    local = [w for w in args.workloads if not w.startswith("DASK")]
    rows: list[dict] = []

    def keep(row: dict) -> None:
        row = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with (OUT / "bench.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    if local:
        kit = load_kit()
        serve_corpus()
        try:
            bench = Bench(args, kit, args.daemon_args.split(), "local")
            try:
                for run in range(args.repeat):
                    if "W1" in local:
                        keep({"run": run, **one_job(bench, "W1", 1_000, "small")})
                    if "W2" in local:
                        keep({"run": run, **one_job(bench, "W2", 10_000, "mixed", status_rate=args.status_rate)})
                    if "W3" in local:
                        keep({"run": run, **many_jobs(bench)})
                    if "KILL" in local:
                        keep({"run": run, **killed_process(bench)})
                    if "VISITS" in local:
                        from bench.visits import visits
                        for clients in args.visits_clients:
                            for mode in args.visits_modes:
                                keep({"run": run, **visits(bench, clients, mode, args.visits_seconds)})
                if "BIG" in local:
                    keep(small_behind_big(bench, args.big_images))
                if "CROWD" in local:
                    keep(crowd(bench, args.crowd_jobs, args.crowd_images))
                if "SOAK" in local:
                    keep(soak(bench, args.soak_minutes))
            finally:
                bench.close()
        finally:
            stop_corpus_server()
    if len(local) < len(args.workloads):
        run_dask(args, keep)
    print_table([row for row in rows if row["workload"] != "DASK-FAULTS"])
    print_faults([row for row in rows if row["workload"] == "DASK-FAULTS"])
    return 0


def run_dask(args, keep) -> None:
    """The DASK workloads (bench/dask_bench.py): their own corpus and nginx, clusters from the units."""
    from bench import dask_bench
    corpus = dask_bench.Corpus()
    corpus.serve()
    try:
        if "DASK-SCALING" in args.workloads:
            for workers in map(int, args.dask_workers.split(",")):
                keep(dask_bench.dask_scaling(args, corpus, workers, args.dask_images))
        if "DASK-W2" in args.workloads:
            for run in range(args.repeat):
                keep({"run": run, **dask_bench.dask_w2(args, corpus)})
        if "DASK-FAULTS" in args.workloads:
            for row in dask_bench.dask_faults(args, corpus):
                keep(row)
    finally:
        corpus.stop()


def print_faults(rows: list[dict]) -> None:
    if not rows:
        return
    print("\n| fault | job | results | /healthz not 200 | it said | to full speed | left over | the next job |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        stopped = f"; workers stopped {row['workers_stopped_after_s']} s after it" if "workers_stopped_after_s" in row else ""
        whole = f"; whole again {row['whole_after_s']} s after it" if "whole_after_s" in row else ""
        full = "ended first" if row.get("to_full_speed_s") is None else f"{row['to_full_speed_s']} s"
        left = (f"{row['threads_waiting_after']} threads waiting, {row.get('scheduler_tasks_after', '?')} tasks on "
                f"the scheduler, {row.get('isolated_processes_after', '?')} isolated processes")
        print(f"| {row['fault']}{stopped}{whole} | {row['wall_s']} s, {row['status']} | "
              f"{'one each' if row['one_result_each'] else 'NOT one each'}, {row['correct']} right | "
              f"{row['unhealthy_s']} s | {'; '.join(row['healthz_said']) or '-'} | {full} | {left} | "
              f"{row['next_job_s']} s |")


def number(value: float) -> str:
    """Three significant digits, without exponents: 2,633 / 0.35 / 12.4."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def print_table(rows: list[dict]) -> None:
    """Medians over runs, with every run's value, per workload and figure."""
    skip = {"at", "run", "workload", "images", "status", "statuses", "correct", "small_status", "tls"}
    print("\n| workload | figure | median | runs |\n| --- | --- | --- | --- |")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row.get("workers")), []).append(row)
    for (workload, workers), group in groups.items():
        label = f"{workload} ({workers} workers)" if workers else workload
        for key, value in group[0].items():
            if key in skip or not isinstance(value, (int, float)) or key == "workers":
                continue
            values = [row[key] for row in group]
            runs = " / ".join(number(v) for v in values) if len(values) > 1 else ""
            print(f"| {label} | {key} | {number(statistics.median(values))} | {runs} |")
        print(f"| {label} | correct perimeters | {', '.join(str(r.get('correct', '')) for r in group)} | |")


if __name__ == "__main__":
    sys.exit(main())
