"""sd_notify: the real daemon talks to a fake $NOTIFY_SOCKET the way it would talk to systemd."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from daemon.supervisor.notify import Notifier
from tests.conftest import REPO, SAMPLE_STORE_MASTER


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(20)
    yield sock, path
    sock.close()


def messages_until(sock, predicate, timeout_s=20):
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        seen.append(fields)
        if predicate(fields):
            return seen
    raise AssertionError(f"not seen: {seen}")


def test_daemon_says_ready_pings_watchdog_with_status_and_says_stopping(tmp_path, notify_socket):
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "RETAILPULSE_CONFIG": os.devnull}
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--spool-dir", str(tmp_path / "spool"),
                               "--store-master", str(SAMPLE_STORE_MASTER), "--processes", "1"],
                              cwd=REPO, env=env, stderr=log)
    try:
        first = messages_until(sock, lambda m: True)[0]
        assert first["READY"] == "1" and first["STATUS"].startswith("ready: 1 pool processes")
        assert "daemon ready" in (tmp_path / "daemon.log").read_text()  # READY only after recovery
        started = time.monotonic()
        pings = messages_until(sock, lambda m: m.get("WATCHDOG") == "1")
        assert pings[-1]["STATUS"] == "0 jobs, 0 images in flight"
        second = messages_until(sock, lambda m: m.get("WATCHDOG") == "1")
        assert len(second) >= 1 and time.monotonic() - started < 2  # pinged at half of 0.4 s, not rarely
        daemon.send_signal(signal.SIGTERM)
        assert messages_until(sock, lambda m: m.get("STOPPING") == "1")[-1]["STATUS"].startswith("stopping")
        assert daemon.wait(timeout=20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        log.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert notifier.address is None and notifier.watchdog_interval_s is None
    notifier.send(READY=1)  # no error, no socket


@pytest.mark.parametrize("environ, address, interval", [
    ({"NOTIFY_SOCKET": "@sd-notify", "WATCHDOG_USEC": "30000000"}, "\0sd-notify", 15.0),
    ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, "/run/x", None),
    ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "0"}, "/run/x", None),
])
def test_notify_environment_is_read_as_sd_notify_does(environ, address, interval):
    notifier = Notifier(environ)
    assert (notifier.address, notifier.watchdog_interval_s) == (address, interval)
