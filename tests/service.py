"""The service as real processes (the API and the daemon on one spool), for the tests and the benchmark.

Also the one place that knows where the shared kit lives (``../shared`` beside the repository): its real
store master and its benchmark tools. Both are optional; what needs them says so when they are absent."""
from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from spool import Spool, Status

REPO = Path(__file__).resolve().parent.parent
SAMPLE_STORE_MASTER = REPO / "data" / "stores.csv"
SHARED = REPO.parent / "shared"
REAL_STORE_MASTER = SHARED / "data" / "StoreMasterAssignment.csv"
SHARED_BENCH_KIT = SHARED / "bench"
#: Run as root but without the capabilities that let root read and write any file: so a test can make a
#: spool file unreadable (chmod 000) for the service, as it is for an unprivileged one, with no other user.
WITHOUT_FILE_PERMISSION_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


class Service:
    """The API and the daemon as two real processes on one spool."""

    def __init__(self, spool_dir: Path, daemon_args: list[str], api_args: list[str] = (),
                 store_master: Path = SAMPLE_STORE_MASTER, check_contract: bool = True, prefix: list[str] = ()):
        """``prefix``: a command both programs run under, e.g. WITHOUT_FILE_PERMISSION_OVERRIDE."""
        self.spool = Spool(spool_dir)
        self.spool_dir, self.daemon_args, self.store_master = spool_dir, daemon_args, store_master
        self.prefix = list(prefix)
        # The tests' settings only: never a configuration file of the machine they run on.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "RETAILPULSE_CONFIG": os.devnull}
        self.daemon_log = spool_dir.parent / "daemon.log"  # a file, not a pipe: a full pipe would block it
        self.api_args = list(api_args)
        self.start_daemon()
        self.api = self._popen_api(0)
        self.http = requests.Session()
        if check_contract:  # every answer the tests see must be what the OpenAPI document says
            from tests import openapi_check
            self.http.hooks["response"].append(openapi_check.check_requests_response)
        try:
            self.base = self._read_address(self.api, timeout_s=30)
            self.wait_for_daemon(timeout_s=30)
        except BaseException:
            self.stop()  # a half-started service must not outlive the test
            raise

    def _popen_api(self, port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "webapi", "--spool-dir", str(self.spool_dir), "--port", str(port),
             "--api-workers", "2", *self.api_args],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop_api(self) -> None:
        """Stop the API alone (SIGTERM); start_api() brings it back on the same port."""
        stop_processes(self.api)
        self.api.stdout.close()

    def start_api(self) -> None:
        """Start the API again on the port it had, as a restart looks to its clients (and to nginx)."""
        self.api = self._popen_api(int(self.base.rsplit(":", 1)[1]))
        self.base = self._read_address(self.api, timeout_s=30)

    def start_daemon(self) -> None:
        self._daemon_log_offset = self.daemon_log.stat().st_size if self.daemon_log.exists() else 0
        with self.daemon_log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "daemon", "--spool-dir", str(self.spool_dir),
                 "--store-master", str(self.store_master), *self.daemon_args],
                cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=log)

    def daemon_output(self) -> str:
        """What the current daemon process has logged so far."""
        with self.daemon_log.open("rb") as f:
            f.seek(self._daemon_log_offset)
            return f.read().decode(errors="replace")

    def wait_for_daemon(self, timeout_s: float = 30) -> None:
        """Wait for the daemon's "daemon ready" log line: it holds the spool lock and its pool is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "daemon ready" in self.daemon_output():
                return
            if self.daemon.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start (exit code {self.daemon.poll()}): {self.daemon_output()[-2000:]}")

    @staticmethod
    def _read_address(proc: subprocess.Popen, timeout_s: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if selector.select(timeout=deadline - time.monotonic()):
                line = proc.stdout.readline()
                if not line:
                    break
                if "listening on " in line:
                    return line.strip().rsplit(" ", 1)[-1]
        raise RuntimeError(f"API did not start (exit code {proc.poll()})")

    def submit(self, visits: list[dict]) -> int:
        r = self.http.post(f"{self.base}/api/submit/", json={"count": len(visits), "visits": visits}, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["job_id"]

    def status(self, job_id) -> dict:
        return self.http.get(f"{self.base}/api/status", params={"jobid": job_id}, timeout=30).json()

    def wait(self, job_id: int, timeout_s: float = 60) -> dict:
        """Poll until the job is completed or failed; the job's final status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = self.status(job_id)
            if doc["status"] in (Status.COMPLETED.value, Status.FAILED.value):
                return doc
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not finished after {timeout_s} s: {doc}")

    def results(self, job_id: int) -> dict:
        r = self.http.get(f"{self.base}/api/results", params={"jobid": job_id}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        self.http.close()  # an idle keep-alive connection would hold the API's graceful stop for 2 s
        stop_processes(self.api, self.daemon)
        self.api.stdout.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for programs that cannot be told port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_processes(*procs: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to each (they stop together), then wait; SIGKILL whatever has not exited after timeout_s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
