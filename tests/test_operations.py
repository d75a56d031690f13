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
from spool import Status
from tests.conftest import REPO, call_wsgi, image_bytes, visit, wait_until
from webapi.app import make_app

SLOW = ["--gpu-sleep-min-s", "0.2", "--gpu-sleep-max-s", "0.3", "--chunk-images", "4",
        "--images-per-process", "8", "--processes", "1"]


def ctl(service, *args):
    result = subprocess.run([sys.executable, "-m", "ctl", "--spool-dir", str(service.spool.root), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "RETAILPULSE_CONFIG": os.devnull})
    return result.returncode, result.stdout, result.stderr


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
    assert out.splitlines()[-1] == "-- 3 job(s)"

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
    assert ctl(service, "requeue", str(job_id), "--failed-only")[0] == 0
    wait_until(lambda: service.status(job_id)["status"] == Status.COMPLETED)
    results = service.results(job_id)["results"]
    assert [r["index"] for r in results] == list(range(7)) and results[6]["perimeter"] == 40
    hits = image_server.hits
    assert all(hits[f"/shelf.jpg?n={i}"] == 1 for i in range(6)) and hits["/late.jpg"] == 2


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
    assert not service.spool.results_dir(done).exists() and not service.spool.meta_path(done).exists()


def test_cancel_and_purge_over_http(start_service, shelf):
    service = start_service(*SLOW)
    running = service.submit([visit("RP00001", [f"{shelf}?n={i}" for i in range(100)])])
    r = service.http.post(f"{service.base}/api/cancel", params={"jobid": running})
    assert (r.status_code, r.json()) == (202, {"job_id": str(running), "cancel": "requested"})
    # Images in flight still finish (each takes at least its 0.2 s GPU wait), so the job is running now.
    r = service.http.delete(f"{service.base}/api/job", params={"jobid": running})
    assert r.status_code == 409 and "queued or running" in r.json()["error"]
    service.wait(running)
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
    old, recent = (spool.submit(1, [visit("RP00001", ["http://x/a.jpg"])]) for _ in range(2))
    for job_id in (old, recent):
        spool.claim(job_id)
        spool.write_status(job_id, {"job_id": str(job_id), "status": "completed"})
        spool.finish(job_id, Status.COMPLETED)
    os.utime(spool.status_path(old), (time.time() - 8 * 86400,) * 2)
    Housekeeping(spool, retention_s=7 * 86400).apply_retention()
    assert spool.job_ids("done") == [recent] and spool.read_status(old) is None


def test_healthz_names_what_is_wrong(spool):
    app = make_app(spool)
    r = call_wsgi(app, "GET", "/healthz")
    assert r.status_code == 503 and "no heartbeat" in r.json()["checks"]["daemon"]
    spool.write_heartbeat({"pid": os.getpid(), "heartbeat_at": time.time()})
    r = call_wsgi(app, "GET", "/healthz")
    assert (r.status_code, r.json()["ok"]) == (200, True)
    spool.write_heartbeat({"pid": os.getpid(), "heartbeat_at": time.time() - 60})
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
