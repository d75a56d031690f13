"""Scale-out on a real Dask cluster: a scheduler and worker processes on loopback started from the shipped
units' ExecStart lines (tests/units.py, DaskCluster), TLS with one certificate per role made by systemd/dask-cert, the
real API and daemon (executor = dask), real images.

Every fault an operator meets: a worker killed, the scheduler killed (workers gone within 5 s, busy or not),
the daemon killed five times mid-job (no worker thread left waiting), a worker with another version of the
package (bounded attempts, the worker named), a worker that holds tasks and runs none (503 naming it), a
worker that sends pickles (never run by the daemon), and a new CA rolled in. Each ends with one result per
image and /healthz telling the truth.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from spool import Status
from tests.conftest import REPO, held_open, image_bytes, wait_until
from tests.units import DaskCluster, Installation

pytestmark = pytest.mark.dask  # needs a real Dask scheduler and workers: left out of `make test-fast`

pytest.importorskip("distributed", reason="the dask extra is not installed (pip install '.[dask]')")
PER_WORKER = 32
HOST = "127.0.0.2"


@pytest.fixture
def cluster(tmp_path):
    """A scheduler (and, as each test starts them, workers) from the units. They and the scheduler listen on
    the address dask.env names: 127.0.0.2 (loopback too, but not the default one, so the setting shows)."""
    cluster = DaskCluster(tmp_path, host=HOST)
    yield cluster
    cluster.stop()


def daemon_args(cluster, *extra: str) -> list[str]:
    """At most PER_WORKER images per worker, chunks of 16, short GPU waits: a job of hundreds lasts seconds."""
    return cluster.daemon_args("--images-per-process", str(PER_WORKER), "--chunk-images", "16",
                               "--gpu-sleep-min-s", "0.05", "--gpu-sleep-max-s", "0.15", *extra)


def heartbeat(service) -> dict:
    path = service.spool.root / "daemon.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def health(service) -> tuple[int, dict]:
    r = service.http.get(f"{service.base}/healthz", timeout=30)
    return r.status_code, r.json()


def job_of(image_server, n, path="shelf.jpg"):
    shelf = image_server.folder / "shelf.jpg"
    if not shelf.exists():  # rewritten while another job downloads it, it would be served empty
        shelf.write_bytes(image_bytes("JPEG", 64, 48))
    urls = [f"{image_server.base}/{path}?n={i}" for i in range(n)]
    return [{"store_id": "RP00001", "visit_time": "2026-11-23T10:00:00", "image_url": urls}]


def slow_images(image_server, seconds):
    """/slow.jpg?n=...: the shelf image after ``seconds``, so that workers are busy holding tasks."""
    def serve(handler):
        time.sleep(seconds)
        handler.path = "/shelf.jpg"
        return type(handler).__mro__[1].do_GET(handler)
    for i in range(2000):
        image_server.on(f"/slow.jpg?n={i}", serve)


def assert_every_image_recorded_once(service, job_id, total):
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(total))
    assert all(r["perimeter"] == 224 for r in results), [r["error"] for r in results if r["error"]][:3]


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of each TCP socket the process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                host = ".".join(str(b) for b in raw[::-1]) if width == 8 else raw.hex()
                found.append((host, int(port, 16)))
    return found


def address(worker: subprocess.Popen) -> str:
    """The worker's Dask address: its TLS port on the address dask.env names."""
    (port,) = [port for host, port in listening(worker.pid) if host == HOST]
    return f"tls://{HOST}:{port}"


# ---------------------------------------------------------------- a worker dies
def test_a_job_runs_on_the_cluster_and_survives_a_killed_worker(start_service, cluster, image_server):
    cluster.start_worker()
    cluster.start_worker()
    service = start_service(*daemon_args(cluster))
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    # Workers listen on the address and ports dask.env names (the firewall step), and on a loopback port for
    # the health check: nowhere else, not on every address.
    for worker in cluster.workers:
        [(host, port)] = [(host, port) for host, port in listening(worker.pid) if host != "127.0.0.1"]
        assert host == HOST and port in cluster.worker_ports
        assert len(listening(worker.pid)) == 2
    assert sorted(heartbeat(service)["tasks_by_worker"]) == sorted(address(worker) for worker in cluster.workers)
    scheduler = listening(cluster.scheduler.pid)  # its port on that address, its health check on loopback
    assert (HOST, cluster.port) in scheduler and len(scheduler) == 2 and {h for h, _ in scheduler} == {HOST, "127.0.0.1"}
    total = 400
    slow_images(image_server, 1.0)  # the job lasts long enough for the kill to find a worker holding tasks
    job_id = service.submit(job_of(image_server, total, "slow.jpg"))
    busy = wait_until(lambda: [w for w in cluster.workers if heartbeat(service)["tasks_by_worker"].get(address(w))],
                      what="a worker to hold tasks")
    killed = busy[0]
    killed.send_signal(signal.SIGKILL)
    final = service.wait(job_id, timeout_s=90)

    assert final["status"] == Status.COMPLETED, final
    assert_every_image_recorded_once(service, job_id, total)
    assert "Dask worker" in service.daemon_output() and "died" in service.daemon_output()
    downloaded_twice = sum(count - 1 for count in image_server.hits.values())
    assert len(image_server.hits) == total and downloaded_twice <= 2 * PER_WORKER
    wait_until(lambda: heartbeat(service).get("workers") == 1, what="the heartbeat to count one worker")
    code, doc = health(service)
    assert (code, doc["ok"], doc["executor"], doc["workers"]) == (200, True, "dask", 1), doc
    # The ready line and the metrics name the executor and its workers.
    (survivor,) = [address(w) for w in cluster.workers if w is not killed]
    assert re.search(rf"executor dask: Dask scheduler {cluster.address}, [12] workers: tls://{HOST}:\d+",
                     service.daemon_output())
    # (the heartbeat may predate the job's last record by a second: wait for the one after it)
    metrics = wait_until(lambda: (text := service.http.get(f"{service.base}/metrics", timeout=30).text) and
                         f'retailpulse_worker_tasks{{worker="{survivor}"}} 0.0' in text and text,
                         what="the metrics to show the surviving worker idle")
    assert f'retailpulse_executor_info{{executor="dask",scheduler="{cluster.address}"}} 1.0' in metrics
    assert "\nretailpulse_workers 1.0\n" in metrics and "retailpulse_pool_processes" not in metrics


# ---------------------------------------------------------------- the scheduler goes away
def test_a_scheduler_that_goes_away_stops_busy_workers_at_once_and_costs_a_redo_not_a_stuck_job(
        start_service, cluster, image_server):
    cluster.start_worker()
    cluster.start_worker()
    service = start_service(*daemon_args(cluster))
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    slow_images(image_server, 1.0)
    total = 300
    job_id = service.submit(job_of(image_server, total, "slow.jpg"))
    wait_until(lambda: sum(image_server.hits.values()) >= 2 * PER_WORKER, what="both workers busy")
    cluster.scheduler.send_signal(signal.SIGKILL)
    cluster.scheduler.wait()
    gone = time.monotonic()
    # Workers holding tasks stop within 5 s (their engine answers every task it holds), so systemd's restart
    # finds the scheduler sooner: not the 30 s a busy worker took.
    wait_until(lambda: all(worker.poll() is not None for worker in cluster.workers), timeout_s=15,
               what="the workers to stop")
    assert time.monotonic() - gone < 5
    code, doc = wait_until(lambda: (answer := health(service))[0] == 503 and answer, what="/healthz to say 503")
    assert doc["workers"] == 0 and "the daemon sees no Dask worker" in doc["checks"]["workers"], doc
    cluster.start_scheduler()
    cluster.workers = []
    cluster.start_worker()
    cluster.start_worker()
    final = service.wait(job_id, timeout_s=120)

    assert final["status"] == Status.COMPLETED, final
    assert_every_image_recorded_once(service, job_id, total)
    log = service.daemon_output()
    assert "the Dask scheduler went away" in log
    assert f"dask: lost the scheduler {cluster.address}" in log and "again (a new one: it restarted)" in log
    wait_until(lambda: health(service)[0] == 200, what="/healthz to be 200 again")


# ---------------------------------------------------------------- the daemon restarts
def test_five_daemon_restarts_mid_job_leave_no_worker_thread_waiting_and_the_next_job_at_full_speed(
        start_service, cluster, image_server):
    cluster.start_worker()
    cluster.start_worker()
    # Images that take 3 s, so that the tasks a killed daemon left on the workers are still running when the
    # next daemon gives the workers a new engine (as with production's 4,096 images per worker).
    slow_images(image_server, 3.0)
    # (a busy machine may starve the test's image server of CPU: give it longer than 10 s of silence)
    service = start_service(*daemon_args(cluster, "--images-per-process", "128", "--download-read-timeout-s", "30"))
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    started = time.monotonic()
    first = service.submit(job_of(image_server, 256, "slow.jpg"))
    assert service.wait(first, timeout_s=60)["status"] == Status.COMPLETED
    undisturbed_s = time.monotonic() - started

    job_id = service.submit(job_of(image_server, 600, "slow.jpg"))
    for _ in range(5):
        daemon = service.daemon
        wait_until(lambda: heartbeat(service).get("pid") == daemon.pid and heartbeat(service).get("tasks_in_flight"),
                   what="the daemon to have tasks in flight")
        daemon.kill()
        daemon.wait()
        service.start_daemon()
        service.wait_for_daemon()
    final = service.wait(job_id, timeout_s=120)
    assert final["status"] == Status.COMPLETED, final
    assert [r["index"] for r in service.results(job_id)["results"]] == list(range(600))

    wait_until(lambda: cluster.threads_waiting() == 0, timeout_s=10, what="no worker thread to wait for a task")
    started = time.monotonic()
    last = service.submit(job_of(image_server, 256, "slow.jpg"))
    assert service.wait(last, timeout_s=60)["status"] == Status.COMPLETED
    assert time.monotonic() - started < 2 * undisturbed_s + 2, (time.monotonic() - started, undisturbed_s)
    assert health(service)[0] == 200


# ---------------------------------------------------------------- a worker that cannot run the task
def test_a_worker_with_another_version_of_the_package_fails_its_tasks_bounded_and_is_named(
        start_service, cluster, image_server, tmp_path):
    # Another version of the package on that host: its task takes other arguments.
    other = tmp_path / "other-version"
    shutil.copytree(REPO / "daemon", other / "daemon", ignore=shutil.ignore_patterns("__pycache__"))
    with (other / "daemon/runners/dask_worker.py").open("a") as f:
        f.write("\n\ndef measure_task(images):  # another version: the task takes other arguments\n"
                "    raise AssertionError('not reached: the call itself fails')\n")
    bad = cluster.start_worker(env={"PYTHONPATH": str(other)})
    service = start_service(*daemon_args(cluster))
    wait_until(lambda: heartbeat(service).get("workers") == 1, what="the daemon to see the worker")
    (bad_address,) = heartbeat(service)["tasks_by_worker"]

    started = time.monotonic()
    job_id = service.submit(job_of(image_server, 32))
    final = service.wait(job_id, timeout_s=60)
    assert final["status"] == Status.FAILED and time.monotonic() - started < 30
    errors = {r["error"] for r in service.results(job_id)["results"]}
    assert len(errors) == 1 and not image_server.hits, errors
    (error,) = errors
    assert error.startswith(f"the task could not run on the cluster (3 attempts): the task failed on Dask worker "
                            f"{bad_address}: TypeError"), error
    log = service.daemon_output()
    assert f"dask: tasks fail on worker {bad_address}" in log and "(failure 2)" in log
    code, doc = health(service)
    assert code == 503 and bad_address in doc["checks"]["failing"], doc

    # A worker that can run them joins: tasks go to it, not to the one where they fail.
    cluster.start_worker()
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    job_id = service.submit(job_of(image_server, 64))
    assert service.wait(job_id, timeout_s=60)["status"] == Status.COMPLETED
    bad.kill()
    bad.wait()
    wait_until(lambda: health(service)[0] == 200, what="/healthz to be 200 once the failing worker left")


# ---------------------------------------------------------------- a worker that holds tasks and runs none
def test_a_worker_that_holds_tasks_and_finishes_none_is_named_by_healthz_and_the_log(
        start_service, cluster, image_server):
    cluster.start_worker()
    stuck = cluster.start_worker()
    service = start_service(*daemon_args(cluster, "--stall-timeout-s", "2"))
    wait_until(lambda: heartbeat(service).get("workers") == 2, what="the daemon to see both workers")
    stuck_address = address(stuck)
    slow_images(image_server, 0.5)
    job_id = service.submit(job_of(image_server, 400, "slow.jpg"))
    wait_until(lambda: heartbeat(service).get("tasks_by_worker", {}).get(stuck_address), what="it to hold tasks")
    stuck.send_signal(signal.SIGSTOP)
    try:
        code, doc = wait_until(lambda: (answer := health(service))[0] == 503 and "stalled" in answer[1]["checks"]
                               and answer, timeout_s=20, what="/healthz to name the stalled worker")
        assert f"Dask worker {stuck_address} holds" in doc["checks"]["stalled"], doc
        assert f"dask: Dask worker {stuck_address} holds" in service.daemon_output()
        metrics = service.http.get(f"{service.base}/metrics", timeout=30).text
        assert "\nretailpulse_workers_stalled 1.0\n" in metrics
    finally:
        stuck.send_signal(signal.SIGCONT)
    assert service.wait(job_id, timeout_s=120)["status"] == Status.COMPLETED
    assert_every_image_recorded_once(service, job_id, 400)
    wait_until(lambda: health(service)[0] == 200, what="/healthz to be 200 again")


# ---------------------------------------------------------------- a worker that sends pickles
ROGUE = '''"""A compromised worker: its task answers with pickles that run code wherever they are unpickled."""
import os

import daemon.runners.dask_worker as tasks

RUN = "import os; open(os.path.join({markers!r}, str(os.getpid())), 'w').close()"


class Payload:
    def __reduce__(self):
        return exec, (RUN,)


class Rogue(Exception):
    pass


def measure_task(images, isolated, cancel_key=None):
    if images[0][0] % 32 == 0:
        return Payload()  # a result
    raise Rogue(Payload())  # an error


tasks.measure_task = measure_task
'''


def test_a_worker_that_answers_with_pickles_cannot_make_the_daemon_run_them(
        start_service, cluster, image_server, tmp_path):
    markers = tmp_path / "ran-here"
    markers.mkdir()
    rogue = tmp_path / "rogue.py"
    rogue.write_text(ROGUE.format(markers=str(markers)))
    worker = cluster.start_worker(args=["--preload", str(rogue)])
    service = start_service(*daemon_args(cluster, "--max-worker-deaths", "2"))
    wait_until(lambda: heartbeat(service).get("workers") == 1, what="the daemon to see the worker")
    job_id = service.submit(job_of(image_server, 32))  # two tasks: one answers a pickle, one raises one
    final = service.wait(job_id, timeout_s=60)

    assert final["status"] == Status.FAILED
    errors = {r["error"].split(":")[0] for r in service.results(job_id)["results"]}
    assert errors == {"the task could not run on the cluster (2 attempts)"}, errors
    ran = {int(p.name) for p in markers.iterdir()}
    assert worker.pid in ran  # the payloads were live: the worker's own check ran one
    assert service.daemon.pid not in ran, "the daemon ran code a worker sent"
    assert "sent a result that is not what the task makes" in service.daemon_output()
    code, doc = health(service)
    assert code == 503 and f"tasks fail on {address(worker)}" in doc["checks"]["failing"], doc


# ---------------------------------------------------------------- identity
def test_certificates_are_v3_one_key_per_role_and_a_new_ca_rolls_in_through_the_bundle(cluster, tmp_path):
    folder = cluster.certs
    texts = {name: subprocess.run(["openssl", "x509", "-in", str(folder / f"{name}.pem"), "-noout", "-text"],
                                  capture_output=True, text=True, check=True).stdout
             for name in ("scheduler", "worker", "client")}
    for name, text in texts.items():
        assert "Version: 3 (0x2)" in text and "IP Address:127.0.0.1" in text, name
    assert "TLS Web Server Authentication" not in texts["client"]  # the daemon's key cannot pose as a server
    keys = {(folder / f"{name}.key").read_bytes() for name in texts}
    assert len(keys) == 3

    # Rotation (docs/scale-out.md): a new CA; every host trusts both (ca.pem holds both), new certificates, then the
    # old CA goes. Here: a worker certified by the new CA is refused while ca.pem holds the old CA only, and
    # joins once ca.pem holds both, while the daemon's certificate (the old CA's) is still good.
    new = Installation(tmp_path / "new")
    new.make_certificates(("worker", "worker"))
    shutil.copy(new.etc / "dask/worker.pem", folder / "worker.pem")
    shutil.copy(new.etc / "dask/worker.key", folder / "worker.key")
    refused = cluster.start_worker()
    wait_until(lambda: "TLS handshake failed" in cluster.log("scheduler") and
               "certificate verify failed" in cluster.log("scheduler"), what="the new certificate refused")
    refused.kill()
    refused.wait()
    cluster.scheduler.kill()
    cluster.scheduler.wait()
    (folder / "ca.pem").write_text((new.etc / "dask/ca.pem").read_text() + (folder / "ca.pem").read_text())
    cluster.start_scheduler()
    cluster.start_worker()  # the new CA's certificate
    with cluster.client() as client:  # the daemon's certificate, still from the old CA
        client.wait_for_workers(1, timeout=30)
        assert len(client.scheduler_info()["workers"]) == 1


# ---------------------------------------------------------------- cancel
def test_cancel_on_the_cluster_stops_the_images_in_flight_and_frees_the_workers(start_service, cluster, image_server):
    cluster.start_worker()
    cluster.start_worker()
    service = start_service(*daemon_args(cluster))
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


# ---------------------------------------------------------------- names in certificates
def test_dask_checks_no_names_in_certificates_but_the_daemon_checks_the_schedulers(start_service, cluster, tmp_path):
    # Dask: a worker whose certificate names another host (here 10.9.9.9) is let in: only the CA's signature
    # counts. (docs/scale-out.md says so, and why the firewall rules name the sources.)
    folder = cluster.certs
    subprocess.run([str(REPO / "systemd/dask-cert"), str(folder), "worker", "worker", "IP:10.9.9.9"], check=True,
                   capture_output=True, timeout=60)
    cluster.start_worker()
    with cluster.client() as client:
        client.wait_for_workers(1, timeout=30)
    # The daemon: a scheduler whose certificate does not name the address it dials is refused (any worker
    # host's key serves too, and could otherwise pose as the scheduler).
    cluster.scheduler.kill()
    cluster.scheduler.wait()
    subprocess.run([str(REPO / "systemd/dask-cert"), str(folder), "scheduler", "scheduler", "IP:10.9.9.9"],
                   check=True, capture_output=True, timeout=60)
    cluster.start_scheduler()
    with pytest.raises(RuntimeError, match="daemon did not start") as refused:
        start_service(*daemon_args(cluster))
    said = str(refused.value)
    assert "cannot reach the Dask scheduler" in said and "certificate does not match" in said, said


# ---------------------------------------------------------------- certificates that end
def test_certificates_that_end_within_a_month_are_said_by_healthz_and_metrics(start_service, tmp_path):
    cluster = DaskCluster(tmp_path / "short", host=HOST, certificate_days=20)
    try:
        cluster.start_worker()
        service = start_service(*daemon_args(cluster))
        wait_until(lambda: heartbeat(service).get("workers") == 1, what="the daemon to see the worker")
        code, doc = wait_until(lambda: (answer := health(service))[0] == 503 and "certificates" in answer[1]["checks"]
                               and "worker" in answer[1]["checks"]["certificates"] and answer,
                               what="/healthz to say the certificates end")
        text = doc["checks"]["certificates"]
        for whose in ("the CA's (dask_tls_ca_file)", "the daemon's (dask_tls_cert_file)",
                      f"the scheduler's ({cluster.address})", "worker tls://"):
            assert f"{whose}" in text, text
        assert text.count("(in 20 days)") == 4, text
        metrics = service.http.get(f"{service.base}/metrics", timeout=30).text
        assert 'retailpulse_certificate_expiry_timestamp_seconds{certificate="the CA\'s (dask_tls_ca_file)"}' in metrics
    finally:
        cluster.stop()


# ---------------------------------------------------------------- what the scheduler logs
def test_the_schedulers_log_names_no_dashboard_it_does_not_serve(cluster):
    import requests
    (line,) = [line for line in cluster.log("scheduler").splitlines() if "dashboard at" in line]
    url = line.split("dashboard at:")[1].strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/health"), line
    assert requests.get(url, timeout=10).text == "ok"


# ---------------------------------------------------------------- progress from the workers
def test_progress_comes_from_the_workers_image_by_image_before_their_chunk_is_recorded(
        start_service, cluster, image_server):
    """A chunk of 16 on a worker: the daemon hears of each image that finishes (the worker engine's progress,
    a Dask event through the scheduler), so images_processed moves while images_done waits for the chunk."""
    from tests.test_running_job import SHOWN_WITHIN_S, Gates
    cluster.start_worker()
    gated = Gates(image_server, 16)
    try:
        service = start_service(*daemon_args(cluster))
        wait_until(lambda: heartbeat(service).get("workers") == 1, what="the daemon to see the worker")
        job_id = service.submit([{"store_id": "RP00001", "visit_time": "2026-11-23T10:00:00",
                                  "image_url": gated.urls}])
        for released in ([0, 1, 2], [3, 4]):
            opened_at = gated.open(*released)
            expected = sum(event.is_set() for event in gated.events)
            doc = wait_until(lambda: (d := service.status(job_id)).get("images_processed", 0) >= expected and d,
                             timeout_s=10, what=f"{expected} images processed", interval_s=0.02)
            assert (doc["images_processed"], doc["images_done"]) == (expected, 0), doc
            assert time.monotonic() - opened_at < SHOWN_WITHIN_S
        gated.close()
        final = service.wait(job_id, timeout_s=60)
        assert (final["status"], final["images_done"], final["images_processed"]) == (Status.COMPLETED, 16, 16)
    finally:
        gated.close()
