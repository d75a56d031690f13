"""What operators use: retailpulse-ctl against a real spool and daemon, cancel and purge over HTTP,
retention, /healthz and /metrics."""
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from daemon.supervisor.housekeeping import Housekeeping
from spool import Control, Executor, Phase, Spool, Status
from spool.records import Heartbeat, JobStatus
from tests.conftest import REPO, call_wsgi, held_open, image_bytes, visit, wait_until, records
from webapi.app import make_app

SLOW = ["--gpu-sleep-min-s", "0.2", "--gpu-sleep-max-s", "0.3", "--chunk-images", "4",
        "--images-per-process", "8", "--processes", "1"]


def ctl(service, *args):
    """retailpulse-ctl on the service's spool (or on a Spool): (exit code, stdout, stderr)."""
    spool = service if isinstance(service, Spool) else service.spool
    result = subprocess.run([sys.executable, "-m", "ctl", "--spool-dir", str(spool.root), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "RETAILPULSE_CONFIG": os.devnull})
    return result.returncode, result.stdout, result.stderr


NO_BEAT = Heartbeat(pid=0, heartbeat_at=0, executor=Executor.LOCAL)


def heartbeat(service) -> Heartbeat | None:
    return service.spool.heartbeat.read()


@pytest.fixture
def shelf(image_server):
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    return f"{image_server.base}/shelf.jpg"


def test_ctl_list_show_follow_on_running_failed_and_completed_jobs(start_service, shelf):
    service = start_service(*SLOW)
    completed = service.submit([visit("RP00001", [shelf] * 2)])
    failed = service.submit([visit("RP99999", [shelf])])
    service.wait(completed), service.wait(failed)
    running = service.submit([visit("RP00002", [f"{shelf}?n={i}" for i in range(200)])])
    wait_until(lambda: service.status(running).get("images_done", 0) > 0)

    code, out, _ = ctl(service, "list")
    print("\n" + out)
    assert code == 0
    lines = {int(line.split()[0]): line for line in out.splitlines()[1:-1]}
    assert lines[completed].split()[1:5] == ["done", "completed", "2/2", "0"]
    assert lines[failed].split()[1:5] == ["failed", "failed", "1/1", "1"]
    assert "RP99999: store_id not in the store master" in lines[failed]
    assert lines[running].split()[1:3] == ["active", "ongoing"] and "/200" in lines[running]
    assert out.splitlines()[-1] == "-- 3 jobs"

    code, out, _ = ctl(service, "show", str(completed))
    assert code == 0 and "images: 2" in out and '"status": "completed"' in out
    assert "#0      RP00001    64x48 perimeter 224" in out

    code, out, _ = ctl(service, "follow", str(failed))
    assert code == 1 and "failed" in out and "1/1" in out
    code, out, _ = ctl(service, "cancel", str(running))
    assert code == 0
    final = service.wait(running)
    assert final["status"] == Status.FAILED and final["error"][0]["error"] == "cancelled by request"
    assert len(service.results(running)["results"]) == 200  # every image still has exactly one result
    code, out, _ = ctl(service, "follow", str(completed))
    assert code == 0 and "[##############################] 2/2" in out


def test_requeue_failed_only_redoes_just_the_failed_images(start_service, image_server, shelf):
    service = start_service()
    late = f"{image_server.base}/late.jpg"
    job_id = service.submit([visit("RP00001", [f"{shelf}?n={i}" for i in range(6)] + [late])])
    assert service.wait(job_id)["status"] == Status.FAILED
    (image_server.folder / "late.jpg").write_bytes(image_bytes("JPEG", 10, 10))
    code, out, err = ctl(service, "requeue", str(job_id), "--failed-only")
    assert code == 0 and out.startswith(f"job {job_id}: requeued: 1 failed image goes round again;"), (out, err)
    wait_until(lambda: service.status(job_id)["status"] == Status.COMPLETED)
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(7)) and results[6]["perimeter"] == 40
    hits = image_server.hits
    assert all(hits[f"/shelf.jpg?n={i}"] == 1 for i in range(6)) and hits["/late.jpg"] == 2


def test_ctl_list_state_names_the_folders_it_takes(spool):
    code, out, err = ctl(spool, "list", "--state", "bogus")
    assert code == 2 and not out
    assert "invalid choice: 'bogus' (choose from 'incoming', 'active', 'done', 'failed')" in err, err
    code, out, _ = ctl(spool, "list", "--state", "failed")
    assert (code, out.splitlines()[-1]) == (0, "-- 0 jobs")


def test_ctl_follow_redraws_its_line_on_a_terminal_and_prints_lines_elsewhere(spool):
    """On a terminal, follow redraws one line (carriage return, clear to its end); in a pipe, plain lines."""
    import pty
    job_id = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg", "http://x/b.jpg"])]))
    spool.jobs.claim(job_id)
    spool.jobs.write_status(JobStatus(str(job_id), Status.COMPLETED, Phase.FINISHED, images_total=2, images_done=2,
                                      images_processed=2, images_failed=0))
    spool.jobs.finish(job_id, Status.COMPLETED)
    line = f"job {job_id} completed [##############################] 2/2 images, 0 failed"
    code, out, _ = ctl(spool, "follow", str(job_id))
    assert (code, out) == (0, line + "\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ctl", "--spool-dir", str(spool.root), "follow", str(job_id)],
                            cwd=REPO, stdout=follower, stderr=subprocess.PIPE,
                            env={**os.environ, "RETAILPULSE_CONFIG": os.devnull})
    os.close(follower)
    assert proc.wait(timeout=60) == 0
    printed = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal's other end closed: all is read
            break
        if not chunk:
            break
        printed += chunk
    os.close(leader)
    assert printed.decode() == f"\r{line}\x1b[K\r\n"  # the terminal turns the final newline into CR LF


def test_ctl_purge_deletes_finished_jobs_and_refuses_running_ones(start_service, shelf):
    service = start_service(*SLOW)
    done = service.submit([visit("RP00001", [shelf])])
    service.wait(done)
    running = service.submit([visit("RP00001", [f"{shelf}?n={i}" for i in range(100)])])
    assert ctl(service, "purge", str(running))[0] == 1
    code, out, _ = ctl(service, "purge", str(done))
    assert code == 0 and out.strip() == f"job {done}: purged"
    r = service.http.get(f"{service.base}/api/status", params={"jobid": done})
    assert (r.status_code, r.json()) == (400, {})
    assert not service.spool.results.folder(done).exists() and not service.spool.jobs.meta_path(done).exists()


def test_cancel_and_purge_over_http(start_service, shelf):
    service = start_service(*SLOW)
    wait_until(lambda: service.http.get(f"{service.base}/healthz").status_code == 200, what="a healthy daemon")
    running = service.submit([visit("RP00001", [f"{shelf}?n={i}" for i in range(100)])])
    r = service.http.delete(f"{service.base}/api/job", params={"jobid": running})
    assert r.status_code == 409 and "queued or running" in r.json()["error"]
    r = service.http.post(f"{service.base}/api/cancel", params={"jobid": running})
    # The daemon carries the cancel out before the answer, which says how many images it cancelled.
    assert r.status_code == 200 and r.json()["cancel"] == "done" and r.json()["status"] == Status.FAILED, r.text
    results = service.results(running)["results"]
    assert len(results) == 100
    assert r.json()["images_cancelled"] == sum(x["error"] == "cancelled by request" for x in results) > 0
    assert service.status(running)["images_cancelled"] == r.json()["images_cancelled"]
    r = service.http.post(f"{service.base}/api/cancel", params={"jobid": running})
    assert r.status_code == 409 and "not queued or running" in r.json()["error"]
    r = service.http.delete(f"{service.base}/api/job", params={"jobid": running})
    assert (r.status_code, r.json()) == (200, {"job_id": str(running), "purged": True})
    assert service.http.delete(f"{service.base}/api/job", params={"jobid": running}).status_code == 400
    other = service.submit([visit("RP00001", [shelf])])
    service.wait(other)
    r = service.http.post(f"{service.base}/api/purge", params={"older_than_days": "0"})
    assert r.status_code == 200 and r.json()["purged"] == [other]
    bad = service.http.post(f"{service.base}/api/purge", params={"older_than_days": "soon"})
    assert bad.status_code == 400 and "older_than_days" in bad.json()["error"]


def test_retention_deletes_finished_jobs_older_than_the_setting(spool):
    old, recent = (spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])])) for _ in range(2))
    for job_id in (old, recent):
        spool.jobs.claim(job_id)
        spool.jobs.write_status(JobStatus(str(job_id), Status.COMPLETED, Phase.FINISHED))
        spool.jobs.finish(job_id, Status.COMPLETED)
    os.utime(spool.jobs.status_path(old), (time.time() - 8 * 86400,) * 2)
    Housekeeping(spool, retention_s=7 * 86400).apply_retention()
    assert spool.jobs.ids("done") == [recent] and spool.status(old) is None


def test_healthz_names_what_is_wrong(spool):
    app = make_app(spool)
    r = call_wsgi(app, "GET", "/healthz")
    assert r.status_code == 503 and "no heartbeat" in r.json()["checks"]["daemon"]
    spool.heartbeat.write(Heartbeat(pid=os.getpid(), heartbeat_at=time.time(), executor=Executor.LOCAL, processes=2))
    r = call_wsgi(app, "GET", "/healthz")  # alive, but its pool processes are still starting: nothing runs yet
    assert r.status_code == 503 and r.json()["checks"]["workers"] == \
        "no pool process is connected to the daemon (of 2): nothing runs"
    spool.heartbeat.write(Heartbeat(pid=os.getpid(), heartbeat_at=time.time(), executor=Executor.LOCAL, processes=2,
                                    workers=1))
    r = call_wsgi(app, "GET", "/healthz")
    assert (r.status_code, r.json()["ok"]) == (200, True)
    spool.heartbeat.write(Heartbeat(pid=os.getpid(), heartbeat_at=time.time() - 60, executor=Executor.LOCAL))
    assert "last heartbeat 60 s ago" in call_wsgi(app, "GET", "/healthz").json()["checks"]["daemon"]


def test_healthz_needs_no_token_and_metrics_does(spool, tmp_path):
    from webapi.auth import Tokens, digest
    (tmp_path / "tokens").write_text(f"ops {digest('s3cret')}\n")
    app = make_app(spool, tokens=Tokens.load(tmp_path / "tokens"))
    assert call_wsgi(app, "GET", "/healthz").status_code == 503  # answered, not 401
    assert call_wsgi(app, "GET", "/metrics").status_code == 401


def test_healthz_and_metrics_from_the_real_processes(start_service, image_server, shelf):
    service = start_service()
    wait_until(lambda: service.http.get(f"{service.base}/healthz").status_code == 200)
    job_id = service.submit([visit("RP00001", [shelf] * 3 + [f"{image_server.base}/missing.jpg"])])
    service.wait(job_id)

    def scraped():
        text = service.http.get(f"{service.base}/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    wait_until(lambda: scraped().get('retailpulse_images_processed_total{result="ok"}') == 3)
    metrics = scraped()
    assert metrics['retailpulse_images_failed_total{reason="http_4xx"}'] == 1
    assert metrics['retailpulse_jobs{state="failed"}'] == 1
    assert metrics["retailpulse_image_processing_seconds_count"] == 4
    assert metrics["retailpulse_download_bytes_total"] == 3 * len(image_bytes("JPEG", 64, 48))
    assert metrics["retailpulse_pool_processes"] == 2
    assert metrics['retailpulse_jobs_finished_total{status="failed"}'] == 1

    service.daemon.send_signal(signal.SIGKILL)
    service.daemon.wait()
    r = service.http.get(f"{service.base}/healthz")
    assert r.status_code == 503 and "gone" in r.json()["checks"]["daemon"]
    with pytest.raises(requests.HTTPError):
        r.raise_for_status()


# ------------------------------------------------------------------ cancel cancels
@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_ctl_cancel_of_a_running_job_of_640_images_ends_it_failed_at_once_and_says_how_many(start_service, shelf):
    # Every image in its 5 s GPU wait: with the defaults the whole job is in flight at once.
    service = start_service("--gpu-sleep-min-s", "5", "--gpu-sleep-max-s", "5")
    bystander = service.submit([visit("RP00002", [f"{shelf}?other={i}" for i in range(10)])])
    job_id = service.submit([visit("RP00001", [f"{shelf}?n={i}" for i in range(640)])])
    wait_until(lambda: (heartbeat(service) or NO_BEAT).images_in_flight == 650, what="both jobs wholly in flight")
    started = time.monotonic()
    code, out, err = ctl(service, "cancel", str(job_id))
    took = time.monotonic() - started

    assert (code, out.strip()) == (0, f"job {job_id}: cancelled 640 of 640 images; the job is failed"), err
    assert took < 3, f"ctl cancel took {took:.1f} s"
    final = service.status(job_id)
    assert (final["status"], final["images_done"], final["images_cancelled"]) == (Status.FAILED, 640, 640)
    assert final["error"] == [{"store_id": "RP00001", "error": "cancelled by request", "image_url": f"{shelf}?n=0",
                               "images_failed": 640}]
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(640))  # exactly one result per image
    assert {r["error"] for r in results} == {"cancelled by request"}
    # Nothing else is disturbed: the other job's images finish their wait and are measured.
    assert service.wait(bystander)["status"] == Status.COMPLETED
    assert [r["perimeter"] for r in service.results(bystander)["results"]] == [224] * 10
    assert f"job {job_id}: cancelled: 640 images will not be processed, 640 of them were in flight" in \
        service.daemon_output()


def test_cancel_takes_stalled_downloads_off_the_pool_and_frees_its_room_for_the_next_job(start_service,
                                                                                          image_server, shelf):
    service = start_service("--processes", "1", "--images-per-process", "32", "--chunk-images", "16")
    closed = []
    held = [f"/held.jpg?n={i}" for i in range(32)]
    for path in held:
        image_server.on(path, held_open(closed))
    stuck = service.submit([visit("RP00001", [image_server.base + path for path in held])])
    wait_until(lambda: sum(image_server.hits[path] for path in held) == 32, what="32 downloads under way")
    waiting = service.submit([visit("RP00002", [f"{shelf}?n={i}" for i in range(16)])])  # no room for it yet
    started = time.monotonic()
    r = service.http.post(f"{service.base}/api/cancel", params={"jobid": stuck}, timeout=30)
    assert (r.status_code, r.json()["images_cancelled"], r.json()["status"]) == (200, 32, Status.FAILED), r.text
    # The downloads leave the event loop: the server sees every connection closed, long before any timeout.
    wait_until(lambda: len(closed) == 32, timeout_s=5, what="the 32 stalled connections to close")
    assert max(closed) - started < 2
    # Their room is free at once: the job behind them runs now, not after the 10 s silence limit.
    assert service.wait(waiting, timeout_s=10)["status"] == Status.COMPLETED
    assert time.monotonic() - started < 5


@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_a_daemon_killed_in_the_middle_of_a_cancel_leaves_exactly_one_result_per_image(start_service, shelf):
    service = start_service("--gpu-sleep-min-s", "0.5", "--gpu-sleep-max-s", "1", "--chunk-images", "8",
                            "--images-per-process", "64")
    total = 16_000  # a cancel records it in files of 4,096 images: four of them, one after the other
    job_id = service.submit([visit("RP00001", [f"{shelf}?n={i}" for i in range(total)])])
    wait_until(lambda: service.status(job_id).get("images_done", 0) >= 64, what="work under way")

    def cancel_files():
        return [p for p in service.spool.results.chunks(job_id) if p[1] - p[0] > 8]

    service.spool.control.request(job_id, Control.CANCEL)  # what ctl and the API write; no waiting for the daemon here
    wait_until(lambda: cancel_files() or not service.spool.control.pending(job_id, Control.CANCEL),
               interval_s=0.001, what="the cancel to write its first file")
    service.daemon.send_signal(signal.SIGKILL)
    service.daemon.wait()
    print(f"killed with {len(cancel_files())} cancel file(s) written, request "
          f"{'still pending' if service.spool.control.pending(job_id, Control.CANCEL) else 'carried out'}")
    service.start_daemon()
    service.wait_for_daemon()
    final = service.wait(job_id, timeout_s=60)
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(total)), "each image has exactly one result"
    assert final["status"] == Status.FAILED and final["images_done"] == total
    assert final["images_cancelled"] == sum(r["error"] == "cancelled by request" for r in results) > total - 200


def test_every_ctl_command_says_no_job_for_a_job_that_does_not_exist(spool):
    for command in (["purge", "99"], ["show", "99"], ["follow", "99"], ["cancel", "99"], ["requeue", "99"]):
        code, out, err = ctl(spool, *command)
        assert (code, out, err) == (1, "", "retailpulse-ctl: no job 99\n"), command


def test_ctl_purge_older_than_names_the_jobs_it_purged(spool):
    old = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]))
    spool.jobs.claim(old)
    spool.jobs.write_status(JobStatus(str(old), Status.COMPLETED, Phase.FINISHED))
    spool.jobs.finish(old, Status.COMPLETED)
    code, out, _ = ctl(spool, "purge", "--older-than-days", "0")
    assert (code, out.strip()) == (0, f"purged 1 job finished more than 0 days ago: {old}")
