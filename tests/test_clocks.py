"""Steps of the wall clock under the real daemon (issue 31), made with libfaketime (Debian's, .ci/run installs it)
on the daemon alone, as NTP or `date -s` makes them: the wall clock moves, the monotonic clock does not
(FAKETIME_DONT_FAKE_MONOTONIC). Liveness counts by the monotonic clock; retention by a clock that a step
cannot move ahead; a status is never updated before its job was submitted."""
import os
import signal
from pathlib import Path

import pytest

from spool import Status
from tests.conftest import visit, wait_until

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture
def faketime():
    if not LIBFAKETIME.exists():
        why = "libfaketime is not installed (apt-get install libfaketime)"
        if os.environ.get("CI"):
            pytest.fail(why + ", and CI is set: .ci/run should have installed it")
        pytest.skip(why)

    def restart_daemon_at(service, offset: str) -> None:
        """Stop the service's daemon and start it again with its wall clock ``offset`` away ("+8d", "-1h")."""
        service.daemon.terminate()
        assert service.daemon.wait(timeout=30) == 0
        service.env = {**service.env, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset,
                       "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # the daemon only: the API keeps the true time
        service.start_daemon()
        service.wait_for_daemon()
    return restart_daemon_at


@pytest.fixture
def shelf(image_server):
    from tests.test_engine import JPEG
    (image_server.folder / "a.jpg").write_bytes(JPEG)
    return f"{image_server.base}/a.jpg"


def beats_of(service) -> bool:
    """Whether daemon.json is the running daemon's: it has been through its chores once (retention first)."""
    beat = service.spool.heartbeat.read()
    return beat is not None and beat.pid == service.daemon.pid


def wait_for_health(service) -> None:
    """/healthz says 200 once the restarted daemon's pool processes are connected: within seconds."""
    wait_until(lambda: service.http.get(f"{service.base}/healthz", timeout=30).status_code == 200, timeout_s=15,
               interval_s=0.1, what="/healthz to say the daemon is healthy")


def test_a_daemon_whose_clock_jumped_eight_days_ahead_deletes_no_fresh_job(start_service, shelf, faketime):
    service = start_service("--retention-days", "7")
    jobs = [service.submit([visit("RP00001", [shelf])]) for _ in range(6)]
    for job_id in jobs:
        service.wait(job_id)
    faketime(service, "+8d")
    wait_until(lambda: beats_of(service), what="the daemon's first chores")
    assert [service.status(job_id)["status"] for job_id in jobs] == [Status.COMPLETED] * 6  # before: all deleted
    assert "the wall clock is +691200 s from what the monotonic clock counted" in service.daemon_output()


def test_a_daemon_whose_clock_is_an_hour_behind_is_healthy_and_updates_after_the_submit(start_service, shelf,
                                                                                        faketime):
    service = start_service()
    faketime(service, "-1h")
    wait_until(lambda: beats_of(service), what="the daemon's first heartbeat")
    wait_for_health(service)  # before: "last heartbeat 3600 s ago", for as long as it runs
    doc = service.wait(service.submit([visit("RP00001", [shelf])]))
    assert doc["updated_at"] >= doc["submitted_at"]  # before: an hour before it


@pytest.mark.slow  # seconds of real time on purpose: a heartbeat must go stale (10 s)
def test_a_stopped_daemon_whose_clock_is_an_hour_ahead_is_unhealthy_within_seconds(start_service, faketime):
    service = start_service()
    faketime(service, "+1h")
    wait_until(lambda: beats_of(service), what="the daemon's first heartbeat")
    healthz = lambda: service.http.get(f"{service.base}/healthz", timeout=30)  # noqa: E731
    wait_for_health(service)
    service.daemon.send_signal(signal.SIGSTOP)
    try:
        doc = wait_until(lambda: (r := healthz()).status_code == 503 and r.json(), timeout_s=20, interval_s=0.5,
                         what="/healthz to see the stopped daemon")  # before: healthy for the hour to come
        assert doc["checks"]["daemon"].startswith("last heartbeat ")
    finally:
        service.daemon.send_signal(signal.SIGCONT)
