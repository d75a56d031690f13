"""Starting and stopping `make run` as a newcomer does, with the shipped nginx site in front of it: /healthz is not
ok before a pool process can take work; Ctrl-C at any moment of the start (pool processes still importing, an
API process just forked) or after traffic through nginx (its keep-alive connections to gunicorn) stops all
three programs within seconds, with no traceback and no API process killed at gunicorn's graceful timeout."""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, wait_until
from tests.service import free_port, stop_processes
from tests.test_front_door import Nginx

pytestmark = [pytest.mark.nginx, pytest.mark.slow]  # a real nginx, and `make run` started and stopped on purpose

#: What "within seconds" means here: the daemon drains nothing (no job), gunicorn's quick stop, the pool joined.
STOPPED_WITHIN_S = 10


def proc_field(pid: int, name: str) -> str:
    """A line of /proc/<pid>/status, e.g. SigCgt; '' once the process is gone."""
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith(name + ":")), "")
    except OSError:
        return ""


def has_signal(mask_hex: str, signum: int) -> bool:
    return bool(mask_hex) and bool(int(mask_hex, 16) & (1 << (signum - 1)))


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def child_pids(pid: int) -> set[int]:
    found = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            found |= {int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
    except OSError:
        pass
    return found


class MakeRun:
    """`make run` in a session of its own (Ctrl-C is a SIGINT to its process group, as a terminal sends it),
    its folder and ports out of the way; its output in a file."""

    def __init__(self, tmp_path: Path):
        self.port, self.images_port = free_port(), free_port()
        self.log_path = tmp_path / "make-run.log"
        command = ["make", "--no-print-directory", "-s", "-o", ".venv/bin/.installed", "run", f"VAR={tmp_path / 'var'}",
                   f"PORT={self.port}", f"IMAGES_PORT={self.images_port}"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> list[int]:
        """Its processes that still run (zombies have exited)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getpgid(int(entry)) == self.proc.pid and proc_field(int(entry), "State")[:1] not in "Z":
                        pids.append(int(entry))
                except OSError:
                    continue
        return pids

    def one(self, *words: str, timeout_s: float = 30) -> int:
        """The pid of its process whose command line has ``words``, once there is one."""
        def found():
            pids = [pid for pid in self.alive() if all(word in cmdline(pid) for word in words)]
            return pids[0] if pids else None
        return wait_until(found, timeout_s=timeout_s, what=" ".join(words), interval_s=0.001)

    def ctrl_c(self) -> float:
        """SIGINT to the whole group; the seconds until make returned and every process of it had exited."""
        start = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
            wait_until(lambda: not self.alive(), timeout_s=60, what="every process of make run to exit")
        finally:
            self.kill()
        return time.monotonic() - start

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()


@pytest.fixture
def make_run(tmp_path):
    run = MakeRun(tmp_path)
    yield run
    run.kill()


@pytest.fixture
def front(tmp_path, make_run):
    """The shipped nginx site in front of make run's API, as docs/operations.md installs it."""
    nginx = Nginx(tmp_path, make_run.base).start()
    yield nginx
    stop_processes(nginx.proc)


def assert_stopped_cleanly(run: MakeRun, seconds: float) -> None:
    log = run.log()
    assert seconds < STOPPED_WITHIN_S, f"make run took {seconds:.1f} s to stop:\n{log[-3000:]}"
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "SIGKILL" not in log, log[-3000:]  # gunicorn's "Worker ... was sent SIGKILL! Perhaps out of memory?"
    assert "daemon stopped" in log, log[-3000:]  # it drained: no job was left to a kill


def test_healthz_is_not_ok_before_a_pool_process_can_take_work(make_run, front):
    """The daemon is up (heartbeat) a second before its pool processes have imported the engine: until one
    is connected, /healthz says that nothing runs; its first 200 counts a worker. Through nginx, as monitoring
    sees it."""
    answers = []

    def healthy():
        try:
            r = requests.get(f"{front.base}/healthz", verify=str(front.cert), timeout=5)
        except requests.ConnectionError:
            return False
        answers.append((r.status_code, r.json()))
        return r.status_code == 200

    wait_until(healthy, timeout_s=60, what="/healthz to answer 200", interval_s=0.01)
    status, doc = answers[-1]
    assert doc["workers"] >= 1, doc
    waiting = [doc for status, doc in answers if doc.get("checks", {}).get("workers")]
    assert all("no pool process is connected to the daemon (of 2)" in doc["checks"]["workers"] for doc in waiting)
    assert_stopped_cleanly(make_run, make_run.ctrl_c())


def test_ctrl_c_while_the_pool_processes_import_stops_in_seconds_without_a_traceback(make_run, front):
    """Ctrl-C reaches the pool processes too, and they take a second to import pycurl and Pillow before they
    can ignore it: it must neither kill them with a KeyboardInterrupt traceback nor hold the stop."""
    daemon = make_run.one("-m", "daemon")

    def importing():  # Python is up in a pool process (it catches SIGINT: KeyboardInterrupt), not yet connected
        return any("spawn_main" in " ".join(cmdline(pid)) and has_signal(proc_field(pid, "SigCgt"), signal.SIGINT)
                   for pid in child_pids(daemon))

    wait_until(importing, what="a pool process importing the engine", interval_s=0.001)
    assert "connected" not in make_run.log(), "the pool processes connected already: too late to test this"
    assert_stopped_cleanly(make_run, make_run.ctrl_c())


def test_ctrl_c_as_an_api_process_starts_does_not_leave_it_running_until_gunicorns_graceful_timeout(make_run, front):
    """An API process forked a moment before Ctrl-C still has gunicorn's master's signal handlers: the SIGINT
    and the master's SIGQUIT that reach it then were lost, and gunicorn killed it 30 s later. Caught in that
    moment on purpose: one more API process (SIGTTIN), stopped (SIGSTOP) while its handlers are the master's
    (it still catches SIGHUP), given Ctrl-C and the master's SIGQUIT, then let go (SIGCONT)."""
    wait_until(lambda: requests.get(f"{front.base}/healthz", verify=str(front.cert), timeout=5).status_code == 200,
               timeout_s=60, what="make run up", interval_s=0.05)
    master = make_run.one("-m", "webapi")
    while "-m" in cmdline(parent := int(Path(f"/proc/{master}/stat").read_text().rsplit(")", 1)[1].split()[1])) \
            and "webapi" in cmdline(parent):
        master = parent  # an API process is a fork of the master, with the same command line
    caught = None
    for _ in range(50):
        before = child_pids(master)
        os.kill(master, signal.SIGTTIN)  # gunicorn: one more API process
        new = wait_until(lambda: child_pids(master) - before, timeout_s=10, what="a new API process", interval_s=0)
        (pid,) = new
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: proc_field(pid, "State").startswith("T"), what="it to stop", interval_s=0.001)
        if has_signal(proc_field(pid, "SigCgt"), signal.SIGHUP):  # the master's handlers: before its own
            caught = pid
            break
        os.kill(pid, signal.SIGCONT)
    assert caught is not None, "no API process could be stopped before it installed its signal handlers"
    start = time.monotonic()
    os.killpg(make_run.proc.pid, signal.SIGINT)
    wait_until(lambda: has_signal(proc_field(caught, "ShdPnd"), signal.SIGQUIT), what="the master's SIGQUIT",
               interval_s=0.005)
    os.kill(caught, signal.SIGCONT)
    make_run.proc.wait(timeout=60)
    wait_until(lambda: not make_run.alive(), timeout_s=60, what="every process of make run to exit")
    assert_stopped_cleanly(make_run, time.monotonic() - start)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_stopping_after_traffic_through_nginx_takes_seconds(make_run, front, stop):
    """The page polls through nginx, whose upstream keep-alive connections stay open in gunicorn between
    requests; still polling, make run is stopped: by Ctrl-C, or by SIGTERM to its group (`timeout make run`),
    gunicorn's graceful stop."""
    wait_until(lambda: requests.get(f"{front.base}/healthz", verify=str(front.cert), timeout=5).status_code == 200,
               timeout_s=60, what="make run up", interval_s=0.05)
    polling, statuses = threading.Event(), []

    def poll():
        with requests.Session() as http:
            while not polling.is_set():
                try:
                    statuses.append(http.get(f"{front.base}/api/jobs?offset=0&limit=20", verify=str(front.cert),
                                             timeout=10).status_code)
                except requests.RequestException:
                    statuses.append(None)
                polling.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        wait_until(lambda: statuses.count(200) >= 5, what="the page's polls through nginx")
        if stop == "ctrl-c":
            seconds = make_run.ctrl_c()
        else:
            start = time.monotonic()
            os.killpg(make_run.proc.pid, signal.SIGTERM)
            make_run.proc.wait(timeout=60)
            wait_until(lambda: not make_run.alive(), timeout_s=60, what="every process of make run to exit")
            seconds = time.monotonic() - start
    finally:
        polling.set()
        poller.join(timeout=30)
    assert_stopped_cleanly(make_run, seconds)
    assert statuses[-1] == 503  # nginx's answer once the API is gone, JSON as ever


def signal_burst(pid: int, signals: tuple[int, ...], seconds: float) -> None:
    """Stop signals at ``pid`` as fast as they can be sent, for ``seconds``: some land while the handler of an
    earlier one runs, as Ctrl-C and the SIGTERM (or gunicorn's SIGQUIT) that follows it can."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for signum in signals:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return


def running(pid: int) -> bool:
    return proc_field(pid, "State")[:1] not in ("", "Z")


def test_stop_signals_that_land_in_each_others_handlers_still_stop_the_daemon_and_an_api_process(start_service):
    """A second stop signal runs the handler again in the middle of the first. A handler that took a lock
    (the daemon's Event.set(), gthread's thread pool shutdown on SIGQUIT) then waited for ever on the lock its
    first call held: `make run` hung after Ctrl-C about once in six. After a burst of them, each stops in
    seconds, the daemon drained."""
    service = start_service()
    worker = wait_until(lambda: [pid for pid in child_pids(service.api.pid) if "webapi" in " ".join(cmdline(pid))],
                        what="an API process")[0]
    signal_burst(worker, (signal.SIGINT, signal.SIGQUIT), 2.0)
    wait_until(lambda: not running(worker), timeout_s=10, what=f"API process {worker} to exit")
    signal_burst(service.daemon.pid, (signal.SIGINT, signal.SIGTERM), 2.0)
    service.daemon.wait(timeout=10)
    assert "daemon stopped" in service.daemon_output(), service.daemon_output()[-2000:]
