"""Scale-out on a real Dask cluster: a scheduler and two worker processes on 127.0.0.1, TLS between them and
the daemon with certificates made here, the real API and daemon (executor = dask), real images.

Kill -9 of a worker mid-job and of the scheduler mid-job: every image still ends with exactly one result.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spool import Status
from tests.conftest import held_open, image_bytes, wait_until

pytestmark = pytest.mark.dask  # needs a real Dask scheduler and workers: left out of `make test-fast`

pytest.importorskip("distributed", reason="the dask extra is not installed (pip install '.[dask]')")
BIN = Path(sys.executable).parent
PER_WORKER = 32


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA of our own and one certificate it signed, as the README's scale-out steps make them."""
    folder = tmp_path_factory.mktemp("certs")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=retail-pulse dask CA",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=retail-pulse dask node",
            "-keyout", "node.key", "-out", "node.csr")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "node.pem")
    return {"ca": folder / "ca.pem", "cert": folder / "node.pem", "key": folder / "node.key"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """`dask scheduler` and `dask worker` processes, started as the shipped units start them."""

    def __init__(self, folder: Path, certs: dict):
        self.folder, self.certs, self.port = folder, certs, free_port()
        self.address = f"tls://127.0.0.1:{self.port}"
        self.tls = ["--tls-ca-file", str(certs["ca"]), "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"])]
        # As in the scheduler's unit: a dead worker's tasks end in KilledWorker at once.
        self.env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        self.scheduler = None
        self.workers: list[subprocess.Popen] = []
        self.start_scheduler()

    def start_scheduler(self):
        log_path = self.folder / "scheduler.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            self.scheduler = subprocess.Popen(
                [str(BIN / "dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", str(self.port),
                 "--dashboard-address", "127.0.0.1:0", *self.tls],
                env=self.env, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=log)
        wait_until(lambda: b"Scheduler at:" in log_path.read_bytes()[offset:], what="the scheduler to listen")

    def start_worker(self):
        with (self.folder / f"worker{len(self.workers)}.log").open("ab") as log:
            self.workers.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", self.address, "--no-nanny", "--nthreads", "2",
                 "--dashboard-address", "127.0.0.1:0", "--death-timeout", "60", *self.tls],
                env=self.env, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=log))

    def daemon_args(self):
        return ["--executor", "dask", "--dask-scheduler", self.address, "--dask-tls-ca-file", str(self.certs["ca"]),
                "--dask-tls-cert-file", str(self.certs["cert"]), "--dask-tls-key-file", str(self.certs["key"]),
                "--images-per-process", str(PER_WORKER), "--chunk-images", "16",
                "--gpu-sleep-min-s", "0.05", "--gpu-sleep-max-s", "0.15"]

    def stop(self):
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def cluster(tmp_path, certs):
    cluster = Cluster(tmp_path, certs)
    yield cluster
    cluster.stop()


def heartbeat(service) -> dict:
    path = service.spool.root / "daemon.json"
    return json.loads(path.read_text()) if path.exists() else {}


def job_of(image_server, n):
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    urls = [f"{image_server.base}/shelf.jpg?n={i}" for i in range(n)]
    return [{"store_id": "RP00001", "visit_time": "2026-11-23T10:00:00", "image_url": urls}]


def assert_every_image_recorded_once(service, job_id, total):
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(total))
    assert all(r["perimeter"] == 224 for r in results), [r["error"] for r in results if r["error"]][:3]


def test_a_job_runs_on_the_cluster_and_survives_a_killed_worker(start_service, cluster, image_server):
    cluster.start_worker()
    cluster.start_worker()
    service = start_service(*cluster.daemon_args())
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    assert heartbeat(service)["executor"] == "dask"
    total = 400
    job_id = service.submit(job_of(image_server, total))
    wait_until(lambda: service.status(job_id).get("images_done", 0) >= 64, what="work under way")
    cluster.workers[0].send_signal(signal.SIGKILL)
    final = service.wait(job_id, timeout_s=90)

    assert final["status"] == Status.COMPLETED, final
    assert_every_image_recorded_once(service, job_id, total)
    assert "Dask worker" in service.daemon_output() and "died" in service.daemon_output()
    downloaded_twice = sum(count - 1 for count in image_server.hits.values())
    assert len(image_server.hits) == total and downloaded_twice <= 2 * PER_WORKER
    wait_until(lambda: heartbeat(service).get("workers") == 1, what="the heartbeat to count one worker")
    health = service.http.get(f"{service.base}/healthz", timeout=30).json()
    assert (health["ok"], health["executor"], health["workers"]) == (True, "dask", 1), health
    assert "\nretailpulse_workers 1.0\n" in service.http.get(f"{service.base}/metrics", timeout=30).text


def test_a_scheduler_that_goes_away_and_comes_back_costs_a_redo_not_a_stuck_job(start_service, cluster,
                                                                                image_server):
    cluster.start_worker()
    cluster.start_worker()
    service = start_service(*cluster.daemon_args())
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    total = 400
    job_id = service.submit(job_of(image_server, total))
    wait_until(lambda: service.status(job_id).get("images_done", 0) >= 64, what="work under way")
    cluster.scheduler.send_signal(signal.SIGKILL)
    cluster.scheduler.wait()
    wait_until(lambda: heartbeat(service).get("workers") == 0, what="the daemon to notice")
    health = wait_until(lambda: (r := service.http.get(f"{service.base}/healthz", timeout=30)).status_code == 503
                        and r.json(), what="/healthz to say no worker is seen")
    assert health["workers"] == 0 and "the daemon sees no Dask worker" in health["checks"]["workers"], health
    # A worker whose scheduler goes away stops; systemd starts it again (Restart=always) and it joins the
    # scheduler that systemd started again meanwhile.
    wait_until(lambda: all(worker.poll() is not None for worker in cluster.workers), what="the workers to stop")
    cluster.start_scheduler()
    cluster.workers = []
    cluster.start_worker()
    cluster.start_worker()
    final = service.wait(job_id, timeout_s=120)

    assert final["status"] == Status.COMPLETED, final
    assert_every_image_recorded_once(service, job_id, total)
    assert "the Dask scheduler went away" in service.daemon_output()


def test_cancel_on_the_cluster_stops_the_images_in_flight_and_frees_the_workers(start_service, cluster, image_server):
    cluster.start_worker()
    cluster.start_worker()
    service = start_service(*cluster.daemon_args())
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    closed = []
    held = [f"/held.jpg?n={i}" for i in range(2 * PER_WORKER)]  # every worker's room, taken
    for path in held:
        image_server.on(path, held_open(closed))
    stuck = service.submit([{"store_id": "RP00001", "visit_time": "2026-11-23T10:00:00",
                             "image_url": [image_server.base + path for path in held]}])
    wait_until(lambda: sum(image_server.hits[path] for path in held) == len(held), what="the downloads under way")
    waiting = service.submit(job_of(image_server, 16))  # no room for it yet
    started = time.monotonic()
    r = service.http.post(f"{service.base}/api/cancel", params={"jobid": stuck}, timeout=30)
    assert (r.status_code, r.json()["images_cancelled"], r.json()["status"]) == (200, len(held), Status.FAILED), r.text
    assert time.monotonic() - started < 2
    # The workers' engines drop the downloads: the server sees every connection closed, long before a timeout.
    wait_until(lambda: len(closed) == len(held), timeout_s=5, what="the stalled connections to close")
    assert max(closed) - started < 2
    # Their room is free at once: the job behind them runs now, not after the 10 s silence limit.
    assert service.wait(waiting, timeout_s=10)["status"] == Status.COMPLETED
    assert time.monotonic() - started < 5
    assert_every_image_recorded_once(service, waiting, 16)
