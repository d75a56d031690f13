"""The checkout explains itself: `make run` as the README's quick start runs it, the README's first job (taken
from the README itself) completing on the images `make run` serves, and `make ctl` on the same spool."""
import json
import os
import re
import signal
import stat
import subprocess

import pytest
import requests

from tests.conftest import REPO, wait_until
from tests.service import free_port

README = REPO / "README.md"



def readme_first_job() -> dict:
    """The body of the quick start's first `curl ... /api/submit/ ... -d '...'`, as the README has it."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"curl -s -X POST http://127\.0\.0\.1:8080/api/submit/.*?-d '(.*?)'", quick_start, re.S)
    assert command, "the quick start has no submit example any more: update this test"
    return json.loads(command[1])


def make(*args: str) -> list[str]:
    # -o: the venv is up to date (`make test` made it); never rebuilt in the middle of the tests
    return ["make", "--no-print-directory", "-s", "-o", ".venv/bin/.installed", *args]


@pytest.fixture
def make_run(tmp_path):
    """`make run` with its folder and ports moved out of the way; stopped as Ctrl-C stops it."""
    var, port, images_port = tmp_path / "var", free_port(), free_port()
    settings = [f"VAR={var}", f"PORT={port}", f"IMAGES_PORT={images_port}"]
    log = (tmp_path / "make-run.log").open("wb")
    proc = subprocess.Popen(make("run", *settings), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, (tmp_path / "make-run.log").read_text()
        try:
            return requests.get(f"{base}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(healthy, timeout_s=60, what="make run's API and daemon", interval_s=0.1)
        yield base, images_port, var, settings
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_the_readme_first_job_completes_and_make_ctl_sees_it_on_the_same_spool(make_run):
    base, images_port, var, settings = make_run
    body = json.dumps(readme_first_job()).replace("127.0.0.1:8081", f"127.0.0.1:{images_port}")
    r = requests.post(f"{base}/api/submit/", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    status = wait_until(lambda: (doc := requests.get(f"{base}/api/status", params={"jobid": job_id},
                                                      timeout=30).json())["status"] != "ongoing" and doc,
                        what="the first job to finish")
    assert status["status"] == "completed", status
    results = requests.get(f"{base}/api/results", params={"jobid": job_id}, timeout=30).json()["results"]
    assert [(r["width"], r["height"], r["perimeter"]) for r in results] == [(640, 480, 2240), (800, 600, 2800)]

    listed = subprocess.run(make("ctl", *settings, "ARGS=list"), cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"{job_id}  done      completed" in listed.stdout and "-- 1 job(s)" in listed.stdout
    shown = subprocess.run(make("ctl", *settings, f"ARGS=show {job_id}"), cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "perimeter 2240" in shown.stdout, shown.stderr

    # Owner-only, as the README says: the spool folder, the lock files, the INI file make run wrote.
    spool = var / "spool"
    for path, mode in ((spool, 0o700), (spool / "daemon.lock", 0o600), (spool / "next_job_id.lock", 0o600),
                       (var / "retail-pulse.ini", 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path.name}: {oct(path.stat().st_mode)}"


def test_retailpulse_ctl_without_settings_says_how_to_name_the_spool(tmp_path):
    ctl = REPO / ".venv" / "bin" / "retailpulse-ctl"
    result = subprocess.run([str(ctl), "--spool-dir", str(tmp_path / "nothing"), "list"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is not a spool" in result.stderr
    assert "(spool_dir, from --spool-dir)" in result.stderr and "make ctl ARGS=list" in result.stderr
