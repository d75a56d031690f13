"""Each shipped unit's program runs inside that unit's sandbox: the API, the daemon (local pool and Dask),
the Dask scheduler and a worker, started from their units' ExecStart lines (tests/units.py) under the
unit's restrictions that can be reproduced without systemd (``units.sandboxed``: read-only system, private
/tmp, hidden home folders, /proc reduced as ProcSubset= and ProtectProc= say, an unprivileged user with no
capabilities). A directive that breaks its program (ProcSubset=pid under Dask did) fails here.

Needs root (mount namespaces) and util-linux's unshare and setpriv; with CI set, fails instead of skipping.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from tests.conftest import SAMPLE_STORE_MASTER, image_bytes, wait_until
from tests.units import SANDBOX_UID, Installation, free_port, free_port_range, sandboxed
from tests.service import stop_processes

can_sandbox = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("setpriv")
pytestmark = [pytest.mark.slow,  # real processes held for seconds on purpose: left out of `make test-fast`
              pytest.mark.skipif(not can_sandbox and "CI" not in os.environ,
                                 reason="needs root, unshare and setpriv to reproduce the units' sandboxes")]
API, DAEMON = "retail-pulse-api.service", "retail-pulse-daemon.service"
SCHEDULER, WORKER = "retail-pulse-dask-scheduler.service", "retail-pulse-dask-worker@.service"


class Machine:
    """One folder standing for a VM set up as docs/operations.md says, and the units' programs started in it."""

    def __init__(self, root):
        self.vm = Installation(root)
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.logs = root.parent

    def configure(self, daemon: dict[str, str]) -> None:
        """/etc/retail-pulse/retail-pulse.ini as docs/operations.md's steps write it (the test's port and settings),
        named by /etc/retail-pulse/env, which the units read."""
        ini = self.vm.etc / "retail-pulse.ini"
        lines = ["[common]", f"spool_dir = {self.vm.root}/var/lib/retail-pulse/spool", "[api]", f"port = {self.port}",
                 "[daemon]", f"store_master = {self.vm.etc}/stores.csv", "processes = 2",
                 "gpu_sleep_min_s = 0.01", "gpu_sleep_max_s = 0.02",
                 *(f"{key} = {value}" for key, value in daemon.items()),
                 "[download]", "allow_private_addresses = true"]  # the image server is on 127.0.0.1
        ini.write_text("\n".join(lines) + "\n")
        (self.vm.etc / "env").write_text(f"RETAILPULSE_CONFIG={ini}\n")
        shutil.copy(SAMPLE_STORE_MASTER, self.vm.etc / "stores.csv")

    def start(self, unit: str, instance: str = "") -> subprocess.Popen:
        self.vm.state_directories(unit, instance)
        subprocess.run(["chown", "-R", f"{SANDBOX_UID}:{SANDBOX_UID}", str(self.vm.root)], check=True)
        env = self.vm.environment(unit)
        command = sandboxed(self.vm, unit, self.vm.command(unit, env, instance), env, instance)
        name = unit.split(".")[0].replace("@", "") + instance
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def submit_and_wait(self, image_server, images: int) -> dict:
        (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
        body = {"count": 1, "visits": [{"store_id": "RP00001", "visit_time": "2026-11-23T10:00:00",
                                        "image_url": [f"{image_server.base}/shelf.jpg?n={i}" for i in range(images)]}]}
        job_id = requests.post(f"{self.base}/api/submit/", json=body, timeout=30).json()["job_id"]
        return wait_until(lambda: (doc := requests.get(f"{self.base}/api/status", params={"jobid": job_id},
                                                       timeout=30).json())["status"] != "ongoing" and doc,
                          timeout_s=60, what="the job to finish")

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.base}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self) -> None:
        stop_processes(*self.processes, timeout_s=15)


@pytest.fixture
def machine(tmp_path):
    machine = Machine(tmp_path / "vm")
    yield machine
    machine.stop()


def alive(machine: Machine, proc: subprocess.Popen, name: str) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"{name} exited {proc.returncode} in its sandbox:\n{machine.log(name)[-3000:]}")
    return True


def test_the_sandbox_is_what_the_units_say(machine):
    """The emulation itself: under the API unit's rules, /proc has no meminfo, the system cannot be written,
    /tmp is private, the home folders are empty, the state folder is writable, no capabilities, not root."""
    vm = machine.vm
    vm.state_directories(API)
    subprocess.run(["chown", "-R", f"{SANDBOX_UID}:{SANDBOX_UID}", str(vm.root)], check=True)
    probe = """if 1:
        import json, os, sys
        state = sys.argv[1]
        print(json.dumps({"meminfo": os.path.exists("/proc/meminfo"), "status": os.path.exists("/proc/self/status"),
                          "usr_writable": os.access("/usr", os.W_OK), "tmp": sorted(os.listdir("/tmp")),
                          "home": sorted(os.listdir("/root")) if os.path.isdir("/root") else [],
                          "state_writable": os.access(state, os.W_OK), "uid": os.getuid(),
                          "caps": open("/proc/self/status").read().split("CapEff:")[1].split()[0]}))"""
    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="host-only-") as host_file:
        out = subprocess.run(sandboxed(vm, API, [sys.executable, "-c", probe, str(vm.root / "var/lib/retail-pulse")],
                                       {}), capture_output=True, text=True, timeout=60)
        seen = json.loads(out.stdout or "{}")
        assert seen and Path(host_file.name).name not in seen["tmp"], out.stderr
    python_home = Path(sys.base_prefix).parts[2:3] if Path(sys.base_prefix).is_relative_to("/root") else ()
    assert seen == {"meminfo": False, "status": True, "usr_writable": False, "tmp": seen["tmp"],
                    "home": list(python_home), "state_writable": True, "uid": SANDBOX_UID,
                    "caps": "0000000000000000"}, seen


def test_the_api_and_the_local_daemon_run_a_job_inside_their_units_sandboxes(machine, image_server):
    machine.configure({"executor": "local"})
    daemon, api = machine.start(DAEMON), machine.start(API)
    wait_until(lambda: alive(machine, daemon, "retail-pulse-daemon") and alive(machine, api, "retail-pulse-api")
               and machine.healthy(), timeout_s=60, what="the API and the daemon to be healthy")
    assert machine.submit_and_wait(image_server, 50)["status"] == "completed"


def test_the_scheduler_a_worker_and_the_dask_daemon_run_a_job_inside_their_units_sandboxes(machine, image_server):
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    vm = machine.vm
    scheduler_port, (first, last) = free_port(), free_port_range(10)
    vm.ports.update({"--port 8786": f"--port {scheduler_port}", "127.0.0.1:8787": "127.0.0.1:0"})
    (vm.etc / "dask.env").write_text(f"RETAILPULSE_DASK_SCHEDULER=tls://127.0.0.1:{scheduler_port}\n"
                                     f"RETAILPULSE_DASK_WORKER_PORTS={first}:{last}\n")
    certs = vm.make_certificates(("scheduler", "scheduler"), ("worker", "worker"), ("client", "client"))
    machine.configure({"executor": "dask", "dask_scheduler": f"tls://127.0.0.1:{scheduler_port}",
                       "dask_tls_ca_file": certs / "ca.pem", "dask_tls_cert_file": certs / "client.pem",
                       "dask_tls_key_file": certs / "client.key", "images_per_process": 64, "chunk_images": 16})
    scheduler = machine.start(SCHEDULER)
    wait_until(lambda: alive(machine, scheduler, "retail-pulse-dask-scheduler")
               and "Scheduler at:" in machine.log("retail-pulse-dask-scheduler"), what="the scheduler to listen")
    worker = machine.start(WORKER, "1")
    daemon, api = machine.start(DAEMON), machine.start(API)
    wait_until(lambda: all(alive(machine, proc, name) for proc, name in (
        (worker, "retail-pulse-dask-worker1"), (daemon, "retail-pulse-daemon"), (api, "retail-pulse-api")))
               and machine.healthy(), timeout_s=90, what="the cluster and the service to be healthy")
    assert machine.submit_and_wait(image_server, 50)["status"] == "completed"
    # Each wrote only where its unit lets it: the scratch folders of their own.
    assert any((vm.root / "var/lib/retail-pulse-dask/worker-1").iterdir())
    assert "Local Directory: " + str(vm.root / "var/lib/retail-pulse-dask/worker-1") in \
        machine.log("retail-pulse-dask-worker1")


def test_the_sandbox_is_made_whatever_the_host_has_mounted_under_tmp(tmp_path):
    """A mount under the host's /tmp (here a tmpfs; on a developer's machine, anything) is hidden by the
    private /tmp: the read-only remount of every mount must pass over it instead of failing the sandbox."""
    from tests.conftest import mount_tmpfs, unmount
    under_tmp = Path(tempfile.mkdtemp(prefix="host-mount-", dir="/tmp"))  # wherever pytest's own folders are
    host_mount = under_tmp / "mnt"
    mount_tmpfs(host_mount)
    try:
        vm = Installation(tmp_path / "vm")
        vm.state_directories(API)
        command = sandboxed(vm, API, ["sh", "-c", f"test ! -e {host_mount} && echo hidden"], {})
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        unmount(host_mount)
        shutil.rmtree(under_tmp)
    assert (result.returncode, result.stdout) == (0, "hidden\n"), result.stderr
