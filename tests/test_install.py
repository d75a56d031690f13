"""Installed as docs/operations.md's VM steps install it, the programs work: a non-editable install into a fresh venv
outside the checkout, the INI file, the daemon, the API and every retailpulse-ctl command of docs/operations.md,
run with the units' environment from another working directory, against one spool.

Differences from a VM, on purpose: the INI file is named by RETAILPULSE_CONFIG instead of sitting in
/etc/retail-pulse/ (a test does not write /etc), downloads may reach 127.0.0.1 (the image server), and the
wheels come from .venv/wheelhouse (`make` fills it) so the test needs no network.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import requests

from spool import Status
from tests.conftest import REPO, SAMPLE_STORE_MASTER, Service, image_bytes, visit, wait_until

pytestmark = pytest.mark.install  # needs a wheel built and installed into a fresh venv: left out of `make test-fast`

WHEELHOUSE = REPO / ".venv" / "wheelhouse"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the package installed from a wheel of this checkout (not editable): its bin/ folder."""
    if not WHEELHOUSE.is_dir():
        pytest.fail(f"{WHEELHOUSE} is missing: run the tests through `make test`, which fills it")
    work = tmp_path_factory.mktemp("install")
    # A copy of the tracked files: a build inside the checkout would reuse its build/ folder, stale files and all.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (work / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(work / "dist"), str(work / "src")], check=True, cwd=work, timeout=300)
    wheel, = (work / "dist").glob("retail_pulse-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "venv")], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(work / "venv" / "bin" / "python"), "install",
                    "--quiet", "--no-index", "--find-links", str(WHEELHOUSE), str(wheel)],
                   check=True, cwd=work, timeout=300)
    return work / "venv" / "bin"


@pytest.fixture
def vm(tmp_path, installed):
    """The INI file of docs/operations.md (spool_dir and store_master in it) and the units' environment."""
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(SAMPLE_STORE_MASTER, etc / "stores.csv")
    ini = etc / "retail-pulse.ini"
    ini.write_text(f"[common]\nspool_dir = {tmp_path / 'lib' / 'spool'}\n"
                   f"[daemon]\nstore_master = {etc / 'stores.csv'}\ngpu_sleep_min_s = 0.01\ngpu_sleep_max_s = 0.02\n"
                   "[download]\nallow_private_addresses = true\n"
                   "[api]\nport = 0\n")
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    # What systemd gives a unit: no virtualenv activated, no PYTHONPATH, nothing of the checkout.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "RETAILPULSE_CONFIG": str(ini), "PYTHONUNBUFFERED": "1"}
    return installed, env, elsewhere, tmp_path / "lib" / "spool"


def run(bin_dir, env, cwd, *argv, timeout=60):
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_package_is_imported_from_the_venv_not_the_checkout(vm):
    bin_dir, env, cwd, _ = vm
    out = run(bin_dir, env, cwd, "python", "-c", "import daemon, config, ctl, spool, webapi; "
              "print(daemon.__file__, config.__file__, ctl.__file__, spool.__file__, webapi.__file__)").stdout
    assert str(REPO) not in out and out.count("site-packages") == 5


def test_installed_service_runs_a_job_and_every_ctl_command_of_the_readme_works(vm, image_server):
    bin_dir, env, cwd, spool_dir = vm
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    shelf = f"{image_server.base}/shelf.jpg"
    daemon_log = cwd / "daemon.log"

    def start_daemon():
        with daemon_log.open("ab") as log:
            proc = subprocess.Popen([str(bin_dir / "retailpulse-daemon")], env=env, cwd=cwd,
                                    stdout=subprocess.DEVNULL, stderr=log)
        wait_until(lambda: daemon_log.read_text().count("daemon ready") > starts or proc.poll() is not None,
                   what="the daemon to start")
        assert proc.poll() is None, daemon_log.read_text()
        return proc

    starts = 0
    daemon = start_daemon()
    api = subprocess.Popen([str(bin_dir / "retailpulse-api")], env=env, cwd=cwd, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    try:
        base = Service._read_address(api, timeout_s=30)
        http = requests.Session()

        def submit(urls):
            r = http.post(f"{base}/api/submit/", json={"count": 1, "visits": [visit("RP00001", urls)]}, timeout=30)
            assert r.status_code == 201, r.text
            return r.json()["job_id"]

        def status(job_id):
            return http.get(f"{base}/api/status", params={"jobid": job_id}, timeout=30).json()["status"]

        page = http.get(f"{base}/", timeout=30)  # the status page's files are in the package
        assert page.status_code == 200 and "<html" in page.text.lower(), page.text[:200]
        assert http.get(f"{base}/ui/app.js", timeout=30).status_code == 200

        done = submit([shelf, f"{shelf}?n=2"])
        wait_until(lambda: status(done) == Status.COMPLETED, what="the job to complete")
        # The status turns final just before the job file moves to done/ (docs/design.md, "How it works").
        wait_until(lambda: (spool_dir / "done" / f"{done}.json").exists(), what="the job file in the INI's spool")

        def ctl(*argv):
            result = run(bin_dir, env, cwd, "retailpulse-ctl", *argv)
            return result.returncode, result.stdout, result.stderr

        code, out, err = ctl("list")
        assert code == 0 and f"{done}  done" in out and "-- 1 job" in out, err
        code, out, err = ctl("list", "--state", "failed")
        assert code == 0 and "-- 0 jobs" in out, err
        code, out, err = ctl("show", str(done), "--results", "1")
        assert code == 0 and "perimeter 224" in out and "--results 1" in out, err
        assert ctl("follow", str(done))[0] == 0

        # cancel: a job submitted while the daemon is stopped stays queued until the daemon returns.
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        queued = submit([f"{shelf}?n={i}" for i in range(10)])
        code, out, err = ctl("cancel", str(queued))
        assert code == 0 and "cancel requested" in out, err
        starts = 1
        daemon = start_daemon()
        wait_until(lambda: status(queued) == Status.FAILED, what="the cancelled job to end")
        assert ctl("follow", str(queued))[0] == 1

        code, out, err = ctl("requeue", str(queued), "--failed-only")
        assert code == 0 and "requeued: 10 failed images go round again" in out, err
        wait_until(lambda: status(queued) == Status.COMPLETED, what="the requeued images to be done")
        code, out, err = ctl("requeue", str(done))
        assert code == 0, err
        wait_until(lambda: not (spool_dir / "control" / f"{done}.requeue").exists() and status(done) == "completed",
                   what="the requeued job to complete again")

        code, out, err = ctl("purge", str(done))
        assert (code, out.strip()) == (0, f"job {done}: purged"), err
        code, out, err = ctl("purge", "--older-than-days", "0")
        assert code == 0 and "purged 1 job" in out, err
        assert "-- 0 jobs" in ctl("list")[1]
        http.close()
    finally:
        for proc in (api, daemon):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        api.stdout.close()


def test_the_installed_token_maker_is_a_command_that_runs_outside_the_checkout(vm):
    bin_dir, env, cwd, _ = vm
    made = run(bin_dir, env, cwd, "retailpulse-token", "acme")
    assert made.returncode == 0, made.stderr
    token = made.stdout.split("(shown once): ", 1)[1].split()[0]
    line = made.stdout.split("line for the tokens file:", 1)[1].strip()
    assert line.startswith("acme ") and token not in line


def test_installed_daemon_without_settings_names_what_is_missing(installed, tmp_path):
    """No INI file on this machine: the default store master (an installation path) is named, with exit 2."""
    env = {"PATH": "/usr/bin:/bin", "RETAILPULSE_CONFIG": os.devnull,
           "RETAILPULSE_SPOOL_DIR": str(tmp_path / "spool")}
    result = run(installed, env, tmp_path, "retailpulse-daemon")
    assert result.returncode == 2
    assert result.stderr.strip() == ("retailpulse-daemon: store_master (default): /etc/retail-pulse/stores.csv: "
                                     "[Errno 2] No such file or directory: '/etc/retail-pulse/stores.csv'")
