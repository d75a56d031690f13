"""The benchmark's Dask workloads. They need nothing beside this repository (no ../shared): an image corpus
of their own (made with Pillow, served by Debian's nginx on 127.0.0.1:18080), and a cluster started from the
shipped units' ExecStart lines (tests/units.py, DaskCluster) with TLS certificates made by systemd/dask-cert,
as production runs it. A worker that exits is started again 2 s later, as systemd does (Restart=always,
RestartSec=2).

    DASK-SCALING   a job of small images on 1, 2, 4, 8 workers, each holding 64 images (chunks of 16)
    DASK-W2        W2's shape (10,000 mixed images) on two workers shaped like the local pool
    DASK-FAULTS    a job of 3,000 small images, undisturbed, then with each fault: a worker killed, the
                   scheduler killed and back 10 s later, the daemon killed, the daemon killed 5 times in a
                   row; its time, what /healthz answered meanwhile, the results, how long after the cluster
                   was whole again the job ran at full speed, what was left (worker threads waiting in a
                   task, tasks on the scheduler, isolated processes), and the time of the same job right after

``--dask-vms 25`` runs DASK-W2 and DASK-FAULTS across VMs (tests/netns.py: network namespaces for the service
VM, the scheduler, two worker hosts and the image host), each worker host's link delayed 25 ms each way
(``--dask-vms 0``: veth, no delay); without it, on one machine's loopback.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import requests
from PIL import Image

from bench.bench import OUT, Sampler, TERMINAL
from daemon.supervisor.stores import load_store_master
from spool.heartbeat import HEARTBEAT_STALE_S
from tests.service import Service
from tests.units import DaskCluster

CORPUS = OUT / "dask-images"
NGINX = OUT / "dask-nginx"
IMAGE_PORT = 18080
#: How long a chunk of 16 holds its room: until its slowest image's wait is over, the expected maximum of 16
#: uniform 0.1-0.4 s waits. 64 images per worker / this = the most a worker can do when only the wait bounds it.
CHUNK16_HOLD_S = 0.1 + 0.3 * 16 / 17
#: The DASK-SCALING shape: each worker holds 64 images, so the GPU wait, not this machine's cores, bounds it.
GPU_BOUND = ["--images-per-process", "64", "--chunk-images", "16"]
NGINX_CONF = """daemon on;
worker_processes 2;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 9000; }}
http {{
  access_log off; sendfile on; tcp_nodelay on; keepalive_requests 1000000;
  client_body_temp_path {state}/tmp; proxy_temp_path {state}/tmp; fastcgi_temp_path {state}/tmp;
  uwsgi_temp_path {state}/tmp; scgi_temp_path {state}/tmp;
  types {{ image/jpeg jpg; }}
  server {{
    listen {host}:{port} backlog=4096;
    root {root};
    location /u/ {{ rewrite ^/u/[^/]+/(.*)$ /$1 last; }}  # /u/<tag>/<name>: distinct URLs, one file
    location / {{ try_files $uri =404; }}
  }}
}}
"""


# ------------------------------------------------------------------ the corpus
class Corpus:
    """JPEG files in three size tiers, as the shared kit's: small (<= 200 KB), medium (to 1 MB), large
    (1-3 MB), with their true perimeters; made once, served by nginx."""

    TIERS = {"small": (60, (320, 900), 85, False), "medium": (20, (500, 700), 90, True),
             "large": (4, (1000, 1300), 92, True)}  # count, side range, JPEG quality, noise

    def __init__(self):
        self.host, self.base, self.prefix = "127.0.0.1", f"http://127.0.0.1:{IMAGE_PORT}", []
        manifest = CORPUS / "manifest.json"
        if not manifest.is_file():
            self._make()
        self.manifest: dict[str, dict] = json.loads(manifest.read_text())
        self.tiers = {tier: sorted(n for n, v in self.manifest.items() if v["tier"] == tier) for tier in self.TIERS}

    def _make(self) -> None:
        rng = random.Random(7)
        CORPUS.mkdir(parents=True, exist_ok=True)
        manifest = {}
        for tier, (count, (low, high), quality, noise) in self.TIERS.items():
            for i in range(count):
                width, height = rng.randint(low, high), rng.randint(low, high)
                if noise:  # random pixels compress badly: the big tiers get their size
                    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
                else:
                    image = Image.new("RGB", (width, height), (rng.randint(0, 255), 90, 40))
                out = io.BytesIO()
                image.save(out, "JPEG", quality=quality)
                name = f"{tier}-{i:03d}.jpg"
                (CORPUS / name).write_bytes(out.getvalue())
                manifest[name] = {"tier": tier, "perimeter": 2 * (width + height), "bytes": len(out.getvalue())}
        (CORPUS / "manifest.json").write_text(json.dumps(manifest))

    def serve(self, host: str = "127.0.0.1", prefix: list[str] = ()) -> None:
        """nginx on ``host`` (in the VM ``prefix`` enters, with --dask-delay-ms)."""
        self.host, self.base, self.prefix = host, f"http://{host}:{IMAGE_PORT}", list(prefix)
        (NGINX / "tmp").mkdir(parents=True, exist_ok=True)
        conf = NGINX / "nginx.conf"
        conf.write_text(NGINX_CONF.format(state=NGINX, host=host, port=IMAGE_PORT, root=CORPUS))
        self.stop()
        wait_for(lambda: not (NGINX / "nginx.pid").exists(), "the last nginx to stop", 30)
        subprocess.run([*self.prefix, shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(NGINX)],
                       check=True)
        wait_for(lambda: (NGINX / "nginx.pid").exists() and (self.prefix or port_open(IMAGE_PORT)), "nginx")

    def stop(self) -> None:
        try:
            os.kill(int((NGINX / "nginx.pid").read_text()), signal.SIGQUIT)
        except ProcessLookupError:  # a stale pid file
            (NGINX / "nginx.pid").unlink(missing_ok=True)
        except (OSError, ValueError):
            pass

    def payload(self, rng: random.Random, store_ids: list[str], images: int, tier: str, tag: str) -> dict:
        if tier == "mixed":  # as the shared kit mixes W2: 70 % small, 25 % medium, 5 % large
            names = [rng.choice(self.tiers[rng.choices(("small", "medium", "large"), (70, 25, 5))[0]])
                     for _ in range(images)]
        else:
            names = [rng.choice(self.tiers[tier]) for _ in range(images)]
        visits = []
        for first in range(0, images, 20):
            visits.append({"store_id": rng.choice(store_ids), "visit_time": "2026-11-24T10:00:00Z",
                           "image_url": [f"{self.base}/u/{tag}-{first + j}/{name}"
                                         for j, name in enumerate(names[first:first + 20])]})
        return {"count": len(visits), "visits": visits}

    def correct(self, results: list[dict]) -> str:
        right = sum(1 for r in results if r["perimeter"] == self.manifest[r["image_url"].rsplit("/", 1)[1]]["perimeter"])
        return f"{right}/{len(results)}"


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_for(predicate, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: {what} did not start")
        time.sleep(0.1)


class Run:
    """One service (API and daemon) on a fresh spool against a cluster, and what the workloads ask of it."""

    def __init__(self, args, corpus: Corpus, workers: int, daemon_args: list[str], name: str, lan=None):
        """``lan``: the cluster on its VMs (``faults_lan``), the caller's thread inside the service VM."""
        self.corpus, self.rng = corpus, random.Random(1)
        self.store_ids = sorted(load_store_master(args.store_master))
        folder = OUT / "dask" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if lan is None:
            self.cluster = DaskCluster(folder, workers=workers, restart_workers=True)
        else:
            self.cluster = DaskCluster(folder, lan=lan, restart_workers=True)
            for i in range(workers):
                self.cluster.start_worker(vm=f"w{i % 2 + 1}")
        spool = OUT / "dask" / name / "spool"
        self.service_args = (spool, ["--allow-private-addresses", "true", *self.cluster.daemon_args(*daemon_args)])
        self.store_master = args.store_master
        try:
            self.service = self.start_service()
        except BaseException:
            self.cluster.stop()
            raise
        self.sampler = Sampler({"daemon": [self.service.daemon.pid], "dask": self.cluster.pids()})
        self.http = requests.Session()
        wait_for(lambda: self.workers() == workers, f"{workers} Dask workers seen by the daemon")

    def start_service(self) -> Service:
        """The API and the daemon on this run's spool (again, for a standby taking over the same disk)."""
        spool, daemon_args = self.service_args
        return Service(spool, daemon_args, store_master=self.store_master, check_contract=False)

    def workers(self) -> int:
        """The Dask workers the daemon sees, by its heartbeat."""
        beat = self.service.spool.heartbeat.read()
        return beat.workers if beat is not None else 0

    def submit(self, images: int, tier: str, tag: str) -> tuple[int, float]:
        started = time.monotonic()
        r = self.http.post(self.service.base + "/api/submit/", timeout=120,
                           json=self.corpus.payload(self.rng, self.store_ids, images, tier, f"{tag}-{time.time_ns()}"))
        r.raise_for_status()
        return r.json()["job_id"], started

    def wait(self, job_id: int, timeout_s: float = 1800) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                doc = self.http.get(self.service.base + "/api/status", params={"jobid": job_id}, timeout=30).json()
            except requests.RequestException:
                doc = {}
            if doc.get("status") in TERMINAL:
                return time.monotonic(), doc
            time.sleep(0.05)
        raise RuntimeError(f"job {job_id} not finished after {timeout_s} s")

    def results(self, job_id: int) -> list[dict]:
        return self.http.get(self.service.base + "/api/results", params={"jobid": job_id}, timeout=120).json()["results"]

    def close(self) -> None:
        self.sampler.stop()
        self.service.stop()
        self.cluster.stop()


# ------------------------------------------------------------------ workloads
def dask_scaling(args, corpus: Corpus, workers: int, images: int) -> dict:
    """DASK-SCALING: images/s against the number of worker processes while the GPU wait bounds each."""
    run = Run(args, corpus, workers, GPU_BOUND, f"dask{workers}")
    try:
        cpu0 = run.sampler.cpu_s("daemon", "dask")
        job_id, t0 = run.submit(images, "small", f"DASK{workers}")
        t1, doc = run.wait(job_id)
        cpu_s = run.sampler.cpu_s("daemon", "dask") - cpu0
        return dict(workload="DASK-SCALING", workers=workers, images=images, status=doc["status"], tls=True,
                    wall_s=t1 - t0, images_per_s=images / (t1 - t0), cpu_ms_per_image=cpu_s * 1000 / images,
                    gpu_bound_images_per_s=workers * 64 / CHUNK16_HOLD_S, correct=corpus.correct(run.results(job_id)))
    finally:
        run.close()


def dask_w2(args, corpus: Corpus) -> dict:
    """DASK-W2: W2's job on two workers shaped like the local pool (64 threads, 4,096 images each)."""
    with on_vms(args, corpus) as lan:
        row = _dask_w2(args, corpus, lan)
    return {**row, "vms_delay_ms": args.dask_vms} if lan is not None else row


def _dask_w2(args, corpus: Corpus, lan) -> dict:
    run = Run(args, corpus, 2, [], "daskW2", lan=lan)
    try:
        cpu0 = run.sampler.cpu_s("daemon", "dask")
        job_id, t0 = run.submit(10_000, "mixed", "DASKW2")
        t1, doc = run.wait(job_id)
        cpu_s = run.sampler.cpu_s("daemon", "dask") - cpu0
        tasks = -(-10_000 // 64)
        return dict(workload="DASK-W2", images=10_000, status=doc["status"], tls=True, wall_s=t1 - t0,
                    images_per_s=10_000 / (t1 - t0), cpu_ms_per_image=cpu_s * 1000 / 10_000,
                    cpu_ms_per_task=cpu_s * 1000 / tasks, tasks=tasks, correct=corpus.correct(run.results(job_id)))
    finally:
        run.close()


class HealthWatch:
    """/healthz and the job's images done, every 0.2 s in the background: how long it answered 503, what it
    said, and how fast the job went when."""

    def __init__(self, base: str):
        self.base, self.seen = base, []  # (monotonic time, status code, checks that were not ok)
        self.done: list[tuple[float, int]] = []  # (monotonic time, the job's images done)
        self.job_id: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with requests.Session() as http:
            while not self._stop.wait(0.2):
                try:
                    r = http.get(self.base + "/healthz", timeout=5)
                    bad = {k: v for k, v in r.json().get("checks", {}).items() if v != "ok"}
                    self.seen.append((time.monotonic(), r.status_code, bad))
                except (requests.RequestException, ValueError):
                    self.seen.append((time.monotonic(), 0, {"api": "no answer"}))
                if self.job_id is not None:
                    try:
                        doc = http.get(self.base + "/api/status", params={"jobid": self.job_id}, timeout=5).json()
                        self.done.append((time.monotonic(), int(doc.get("images_done", 0))))
                    except (requests.RequestException, ValueError, TypeError):
                        pass

    def rate(self, start: float, end: float) -> float:
        """Images a second between two moments, from the samples."""
        inside = [(t, n) for t, n in self.done if start <= t <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def full_speed_after(self, whole_at: float, full_rate: float, window_s: float = 1.0) -> float | None:
        """Seconds from ``whole_at`` to the first window at 80 % of ``full_rate``; None if the job ended first."""
        for t, _ in self.done:
            if t >= whole_at and self.rate(t, t + window_s) >= 0.8 * full_rate:
                return round(max(0.0, t - whole_at), 1)
        return None

    def finish(self) -> dict:
        self._stop.set()
        self._thread.join()
        unhealthy = [(t, checks) for t, code, checks in self.seen if code != 200]
        said = sorted({f"{key}: {value[:90]}" for _, checks in unhealthy for key, value in checks.items()})
        return {"unhealthy_s": round(len(unhealthy) * 0.2, 1), "healthz_said": said}


@contextlib.contextmanager
def on_vms(args, corpus: Corpus):
    """With --dask-vms: the VMs (each worker host's link delayed as it says), nginx in the image host's, and
    the caller's thread in the service VM (the API, the daemon, every request of ours); None without."""
    if args.dask_vms is None:
        yield None
        return
    from tests import netns
    why = netns.available()
    if why:
        raise SystemExit(f"bench: --dask-vms needs network namespaces: {why}")
    lan = netns.Lan()
    try:
        for name in ("svc", "sched", "w1", "w2", "inet"):
            lan.add(name, delay_ms=args.dask_vms if name in ("w1", "w2") else 0)
        corpus.serve(lan.vms["inet"].address, ["ip", "netns", "exec", lan.vms["inet"].ns])
        with lan.inside("svc"):
            yield lan
    finally:
        corpus.stop()
        lan.close()
        corpus.serve()  # back on loopback for whatever runs next


def scheduler_tasks(cluster: DaskCluster) -> int:
    """Tasks the scheduler still knows of (none once every job is done and its futures released)."""
    def count(dask_scheduler=None):  # defined here, so it travels by value
        return len(dask_scheduler.tasks)
    with cluster.client() as client:
        return client.run_on_scheduler(count)


def isolated_processes() -> int:
    """``python -m daemon.runners.sandbox`` processes alive now (isolated tasks)."""
    return sum(1 for e in os.scandir("/proc") if e.name.isdigit() and _cmdline(int(e.name)).endswith(
        "-m\0daemon.runners.sandbox"))


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").rstrip("\0")
    except OSError:
        return ""


def dask_faults(args, corpus: Corpus, images: int = 3000) -> list[dict]:
    """DASK-FAULTS: each fault 2 s into a job of ``images`` small images on two workers (the GPU-bound
    shape, so that the job lasts long enough to be hit); one row per fault. With --dask-delay-ms, on VMs."""
    with on_vms(args, corpus) as lan:
        return _faults(args, corpus, images, lan, args.dask_vms if lan is not None else None)


def _faults(args, corpus: Corpus, images: int, lan, delay: float) -> list[dict]:
    rows, full_rate = [], None
    for fault in ("none", "worker killed", "scheduler killed, back 10 s later", "daemon killed",
                  "daemon killed 5 times in a row", "service VM lost, a standby takes over"):
        run = Run(args, corpus, 2, GPU_BOUND, "faults", lan=lan)
        try:
            workers = run.workers
            watch = HealthWatch(run.service.base)
            job_id, t0 = run.submit(images, "small", "FAULTS")
            watch.job_id = job_id
            time.sleep(2)
            extra, whole_at = {}, time.monotonic()
            if fault == "worker killed":
                gone = time.monotonic()
                os.killpg(run.cluster.workers[0].pid, signal.SIGKILL)
                wait_for(lambda: workers() == 1, "the daemon to see one worker", 60)
                wait_for(lambda: workers() == 2, "the worker back", 60)
                whole_at = time.monotonic()
                extra["whole_after_s"] = round(whole_at - gone, 1)
            elif fault.startswith("scheduler"):
                gone = time.monotonic()
                run.cluster.scheduler.kill()
                run.cluster.scheduler.wait()
                wait_for(lambda: len([1 for _, t in run.cluster.exits if t >= gone]) >= 2, "the workers to stop", 60)
                extra["workers_stopped_after_s"] = round(max(t for _, t in run.cluster.exits if t >= gone) - gone, 2)
                time.sleep(max(0.0, gone + 10 - time.monotonic()))
                run.cluster.start_scheduler()
                wait_for(lambda: workers() == 2, "both workers back", 60)
                whole_at = time.monotonic()
                extra["whole_after_s"] = round(whole_at - gone, 1)
            elif fault.startswith("service VM"):  # docs/standby.md: the same spool, a second VM's daemon and API
                gone = time.monotonic()
                extra["images_in_flight_lost"] = getattr(run.service.spool.heartbeat.read(), "images_in_flight", 0)
                for proc in (run.service.daemon, run.service.api):
                    proc.kill()
                    proc.wait()
                wait_for(lambda: time.time() - run.service.spool.heartbeat.read().heartbeat_at > HEARTBEAT_STALE_S,
                         "the standby to see the heartbeat stale", 60)
                extra["detected_after_s"] = round(time.monotonic() - gone, 1)
                run.service = run.start_service()
                watch.base = run.service.base
                wait_for(lambda: run.workers() == 2, "the standby's daemon to see both workers", 60)
                whole_at = time.monotonic()
                extra["whole_after_s"] = round(whole_at - gone, 1)
            elif fault.startswith("daemon"):
                gone = time.monotonic()
                for _ in range(5 if "5 times" in fault else 1):
                    run.service.daemon.kill()
                    run.service.daemon.wait()
                    time.sleep(DaskCluster.RESTART_S)  # systemd's RestartSec
                    run.service.start_daemon()
                    run.service.wait_for_daemon(timeout_s=60)
                    time.sleep(1)
                whole_at = time.monotonic()
                extra["whole_after_s"] = round(whole_at - gone, 1)
            t1, doc = run.wait(job_id)
            health = watch.finish()
            if fault == "none":
                full_rate = watch.rate(t0 + 2, t1 - 1)
                to_full = 0.0
            else:
                to_full = watch.full_speed_after(whole_at, full_rate or 0)
            results = run.results(job_id)
            one_each = [r["index"] for r in results] == list(range(images))
            time.sleep(1)
            leftovers = {"threads_waiting_after": run.cluster.threads_waiting(),
                         "scheduler_tasks_after": scheduler_tasks(run.cluster),
                         "isolated_processes_after": isolated_processes()}
            next_id, n0 = run.submit(images, "small", "FAULTSnext")  # the same job again: back at full speed?
            n1, _ = run.wait(next_id)
            rows.append(dict(workload="DASK-FAULTS", fault=fault, vms_delay_ms=delay, images=images,
                             status=doc["status"], wall_s=round(t1 - t0, 2), one_result_each=one_each,
                             correct=corpus.correct(results), to_full_speed_s=to_full,
                             full_rate=round(full_rate or 0), next_job_s=round(n1 - n0, 2), **leftovers, **extra,
                             **health))
        finally:
            run.close()
    return rows
