"""A pool process that holds work and finishes nothing is reported and replaced: the stall rule
(daemon/runners/__init__.py, Progress) on the real daemon, with a pool process really stopped (SIGSTOP)."""
import os
import signal

import pytest

from spool import Status
from tests.conftest import pool_worker_pids, visits_of, wait_until
from tests.test_crash_safety import SLOW, assert_one_result_per_image

pytestmark = pytest.mark.slow  # real processes held for seconds on purpose: left out of `make test-fast`


def test_a_stopped_pool_process_is_named_by_healthz_then_replaced_and_its_images_redone(start_service, image_server):
    service = start_service(*SLOW, "--stall-timeout-s", "2")
    total = 1000
    job_id = service.submit(visits_of(image_server, total))
    wait_until(lambda: service.status(job_id).get("images_done", 0) >= 64, what="work under way")
    stopped = pool_worker_pids(service.daemon.pid)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        doc = wait_until(lambda: (r := service.http.get(f"{service.base}/healthz", timeout=30)).status_code == 503
                         and "stalled" in r.json()["checks"] and r.json(), timeout_s=20,
                         what="/healthz to name the stalled pool process")
        assert doc["checks"]["stalled"].startswith(f"pool process {stopped} holds "), doc
        wait_until(lambda: stopped not in pool_worker_pids(service.daemon.pid), what="it to be replaced")
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    final = service.wait(job_id, timeout_s=60)
    assert final["status"] == Status.COMPLETED, final
    assert_one_result_per_image(service, job_id, total)
    log = service.daemon_output()
    assert f"pool: pool process {stopped} holds" in log and f"killing stalled pool process {stopped}" in log
    assert f"pool process {stopped} stalled" in log  # the reason its chunks went out again
    wait_until(lambda: len(pool_worker_pids(service.daemon.pid)) == 2, what="a new pool process")
    wait_until(lambda: service.http.get(f"{service.base}/healthz", timeout=30).status_code == 200,
               what="/healthz to be 200 again")
    metrics = service.http.get(f"{service.base}/metrics", timeout=30).text
    assert "\nretailpulse_stalled_replaced_total 1.0\n" in metrics
