"""Nothing lost, nothing counted twice: real API and daemon processes, really killed.

Each test runs a job of real images from a local server that counts requests, so "downloaded again"
is measured, not assumed.
"""
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from spool import Status, pid_exists
from tests.conftest import (REPO, SAMPLE_STORE_MASTER, children, holds_socket, listener_of,
                            pid_of_peer, pid_serving, pool_worker_pids, visits_of, wait_until)

CHUNK, PROCESSES, PER_PROCESS = 16, 2, 32
IN_FLIGHT = PROCESSES * PER_PROCESS  # the bound on images in flight, so on images downloaded twice after a crash
#: Settings that make a job of a few hundred images last a few seconds, with at most 64 images in flight.
SLOW = ["--gpu-sleep-min-s", "0.05", "--gpu-sleep-max-s", "0.15", "--chunk-images", str(CHUNK),
        "--images-per-process", str(PER_PROCESS), "--processes", str(PROCESSES)]


class StatusWatcher:
    """Polls a job's status in the background and keeps every answer, to check it never goes backwards."""

    def __init__(self, service, job_id):
        self.service, self.job_id, self.seen = service, job_id, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        with requests.Session() as http:
            while not self.stop.is_set():
                r = http.get(f"{self.service.base}/api/status", params={"jobid": self.job_id}, timeout=10)
                self.seen.append(r.json())
                time.sleep(0.01)

    def latest_done(self) -> int:
        return self.seen[-1].get("images_done", 0) if self.seen else 0

    def finish(self) -> list[dict]:
        self.stop.set()
        self.thread.join()
        return self.seen

    def assert_never_went_backwards(self):
        done = [doc.get("images_done", 0) for doc in self.seen]
        assert done == sorted(done), "images_done went down"
        terminal = [i for i, doc in enumerate(self.seen) if doc["status"] != Status.ONGOING]
        if terminal:
            assert all(doc["status"] == self.seen[terminal[0]]["status"] for doc in self.seen[terminal[0]:])


def assert_one_result_per_image(service, job_id, total):
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(total))
    return results


def test_daemon_killed_mid_job_resumes_and_redoes_at_most_the_images_in_flight(start_service, image_server):
    service = start_service(*SLOW)
    total = 400
    job_id = service.submit(visits_of(image_server, total))
    watcher = StatusWatcher(service, job_id)
    wait_until(lambda: watcher.latest_done() >= 120, what="a third of the job")

    pool = pool_worker_pids(service.daemon.pid)
    service.daemon.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    service.daemon.wait()
    done_at_kill = watcher.latest_done()
    # The pool processes see their socket to the daemon close and exit: none outlives it for long.
    wait_until(lambda: not any(running(pid) for pid in pool), timeout_s=2, interval_s=0.005,
               what="the orphaned pool processes to exit")
    orphans_exit_s = time.monotonic() - killed_at
    service.start_daemon()
    service.wait_for_daemon()
    final = service.wait(job_id)
    watcher.finish()

    assert final["status"] == Status.COMPLETED
    assert final["images_done"] == total
    assert "resumed" in service.daemon_output()  # not started over
    assert_one_result_per_image(service, job_id, total)
    watcher.assert_never_went_backwards()
    hits = image_server.hits
    downloaded_twice = sum(count - 1 for count in hits.values())
    assert len(hits) == total
    assert downloaded_twice <= IN_FLIGHT
    print(f"\nkill -9 at {done_at_kill}/{total} images recorded: {downloaded_twice} images downloaded twice "
          f"(bound {IN_FLIGHT}); its {len(pool)} pool processes exited within {orphans_exit_s:.3f} s")


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's zombie waits for whoever adopts it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_killed_pool_process_is_detected_and_its_images_redone(start_service, image_server):
    service = start_service(*SLOW)
    total = 300
    victim = pool_worker_pids(service.daemon.pid)[0]
    # Every download waits at the server until the victim holds some of them: it dies holding tasks.
    victim_downloading, release = threading.Event(), threading.Event()

    def held(handler):
        if not victim_downloading.is_set() and pid_of_peer(handler.client_address[1]) == victim:
            victim_downloading.set()
        release.wait(30)
        http.server.SimpleHTTPRequestHandler.do_GET(handler)

    for i in range(total):
        image_server.on(f"/shelf.jpg?n={i}", held)
    job_id = service.submit(visits_of(image_server, total))
    try:
        assert victim_downloading.wait(30), "the victim never downloaded"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: f"pool process {victim} died" in service.daemon_output(), timeout_s=10,
                   what="the daemon to notice the dead process", interval_s=0.005)
        detection_s = time.monotonic() - killed_at
    finally:
        release.set()

    final = service.wait(job_id)
    assert final["status"] == Status.COMPLETED, final
    assert_one_result_per_image(service, job_id, total)
    assert service.daemon.poll() is None
    assert detection_s < 1.0  # its socket closes with it: no polling interval to wait for
    print(f"\npool process killed: detected after {detection_s:.3f} s")


def kill_the_downloader(handler):
    """A "poison" image: whoever downloads it is killed with SIGKILL, as a crashing decoder would be."""
    # /proc can lag behind a new connection for a moment: look until the socket's owner shows.
    pid = wait_until(lambda: pid_of_peer(handler.client_address[1]), timeout_s=2, interval_s=0.005,
                     what="the downloader's pid")
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    handler.close_connection = True


def test_poison_image_fails_alone_after_bounded_attempts(start_service, image_server):
    service = start_service(*SLOW, "--max-worker-deaths", "2")
    image_server.on("/poison.jpg", kill_the_downloader)
    poison = f"{image_server.base}/poison.jpg"
    total = 48  # the poison is the last image of a full chunk of 16
    job_id = service.submit(visits_of(image_server, total - 1, extra=[poison]))
    final = service.wait(job_id, timeout_s=90)

    assert final["status"] == Status.FAILED
    [error] = final["error"]
    assert error["image_url"] == poison and error["images_failed"] == 1
    # One pool process dies; the chunk of 16 runs isolated and dies; halving it down to the image takes 4
    # more deaths, the last one alone: 1 + 1 + log2(16), and only the first of them a pool process.
    assert error["error"] == "the process measuring this image died each time (6 attempts)"
    # Each death is one download. The test server's kill can race the connection, so up to two more are
    # allowed; never a retry loop.
    assert 6 <= image_server.hits["/poison.jpg"] <= 8
    results = assert_one_result_per_image(service, job_id, total)
    assert all(r["perimeter"] == 224 for r in results if r["image_url"] != poison)
    assert service.daemon_output().count("pool: process") - service.daemon_output().count("connected") == 1
    assert service.daemon.poll() is None


def test_daemon_sigterm_drains_exits_in_bounded_time_and_restart_continues(start_service, image_server):
    service = start_service(*SLOW, "--drain-timeout-s", "5")
    total = 300
    job_id = service.submit(visits_of(image_server, total))
    wait_until(lambda: service.status(job_id).get("images_done", 0) >= 64, what="work under way")
    service.daemon.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert service.daemon.wait(timeout=15) == 0
    assert time.monotonic() - started < 5 + 3
    output = service.daemon_output()
    assert "stopping: waiting for" in output and "daemon stopped" in output
    recorded = service.status(job_id)["images_done"]
    assert 64 <= recorded < total
    assert not pool_worker_pids(service.daemon.pid)

    service.start_daemon()
    service.wait_for_daemon()
    assert service.wait(job_id)["status"] == Status.COMPLETED
    assert_one_result_per_image(service, job_id, total)
    assert sum(count - 1 for count in image_server.hits.values()) <= IN_FLIGHT


def test_api_sigterm_finishes_the_request_in_flight(start_service, image_server):
    service = start_service()
    body = json.dumps({"count": 1, "visits": visits_of(image_server, 3)}).encode()
    host, port = service.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /api/submit/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:20])
        client_port = conn.getsockname()[1]
        worker = wait_until(lambda: pid_serving(client_port), what="an API worker to accept the request")
        assert worker in children(service.api.pid)
        listener = listener_of(int(port))
        service.api.send_signal(signal.SIGTERM)
        # Gunicorn's arbiter closes its listening socket as it handles SIGTERM, then passes the signal on to
        # the workers; only then does the rest of the half-sent body go out.
        wait_until(lambda: not holds_socket(service.api.pid, listener), what="the API to handle SIGTERM")
        conn.sendall(body[20:])
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
    job_id = json.loads(reply.split(b"\r\n\r\n", 1)[1])["job_id"]
    assert service.spool.jobs.path("incoming", job_id).exists() or service.spool.status(job_id)
    assert service.api.wait(timeout=30) == 0


def test_api_killed_while_writing_a_job_leaves_no_job_or_a_whole_one(start_service, image_server):
    service = start_service()
    big = json.dumps({"count": 1, "visits": visits_of(image_server, 150_000)}).encode()
    tmp = service.spool.root / "tmp"
    caught = None
    for _attempt in range(5):
        writer = threading.Thread(target=lambda: _post_ignoring_errors(service.base, big), daemon=True)
        writer.start()
        deadline = time.monotonic() + 30
        while caught is None and time.monotonic() < deadline and writer.is_alive():
            for name in os.listdir(tmp):
                stem, _, rest = name.partition(".json.")
                if rest and stem.isdigit():  # <id>.json.<pid>.<random>: a job file being written
                    os.kill(int(rest.split(".")[0]), signal.SIGKILL)
                    caught = (int(stem), name)
                    break
        writer.join(30)
        if caught:
            break
    assert caught, "never saw a job file being written"
    job_id, tmp_name = caught
    killed = int(tmp_name.partition(".json.")[2].split(".")[0])
    wait_until(lambda: not pid_exists(killed), what="the killed API worker to be gone")
    # Either the rename had happened (a whole job) or there is no job at all; never a partial one.
    for folder in ("incoming", "active", "done", "failed"):
        path = service.spool.jobs.path(folder, job_id)
        if path.exists():
            assert json.loads(path.read_bytes())["count"] == 1
    assert not list((service.spool.root / "corrupt").iterdir())
    # The daemon, restarted, removes the dead writer's leftover at once.
    service.daemon.terminate()
    service.daemon.wait()
    service.start_daemon()
    service.wait_for_daemon()
    assert tmp_name not in os.listdir(tmp)
    # And the API (gunicorn replaced its killed worker) still takes jobs.
    assert service.wait(service.submit(visits_of(image_server, 2)))["status"] == Status.COMPLETED


def _post_ignoring_errors(base, body):
    try:
        requests.post(f"{base}/api/submit/", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    except requests.RequestException:
        pass  # the worker was killed under us: that is the point


def test_daemon_stops_in_bounded_time_after_its_whole_process_group_got_sigterm(tmp_path):
    """What `timeout make run` or a SIGTERM to the process group does: the pool processes get it too. They
    ignore it; the daemon drains, closes their sockets, and exits within its stop timeout."""
    log = tmp_path / "daemon.log"
    with log.open("wb") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--spool-dir", str(tmp_path / "spool"), "--processes", "2",
             "--store-master", str(SAMPLE_STORE_MASTER)],
            cwd=REPO, stderr=err, start_new_session=True, env={**os.environ, "RETAILPULSE_CONFIG": os.devnull})
    try:
        wait_until(lambda: "daemon ready" in log.read_text(), what="the daemon to start")
        wait_until(lambda: log.read_text().count("connected") == 2, what="the pool processes to connect")
        os.killpg(daemon.pid, signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert "daemon stopped" in log.read_text()
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)


def test_killed_idle_pool_processes_are_replaced_and_take_work(start_service, image_server):
    """The Pool replaces a dead process; the new one connects and takes tasks like the old."""
    service = start_service()
    wait_until(lambda: service.daemon_output().count("connected") == 2, what="the pool processes to connect")
    old = pool_worker_pids(service.daemon.pid)
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: service.daemon_output().count("connected") >= 4, what="replacements to connect")
    job_id = service.submit(visits_of(image_server, 20))
    final = service.wait(job_id, timeout_s=30)
    assert final["status"] == Status.COMPLETED
    assert_one_result_per_image(service, job_id, 20)
    assert not set(old) & set(pool_worker_pids(service.daemon.pid))
