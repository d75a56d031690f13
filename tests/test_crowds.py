"""Crowds of jobs: a small job never waits behind big ones, and jobs that run share the work evenly.

The real API and daemon, a real image server; the pool is made small and the GPU wait fixed (0.1 s) so
that a crowd of big jobs takes seconds, while the small job takes about a tenth of one."""
import pytest

from spool import Phase, Status
from tests.conftest import image_bytes, visit


def urls(image_server, tag: str, n: int) -> list[str]:
    return [f"{image_server.base}/shelf.jpg?{tag}={i}" for i in range(n)]


@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_a_small_job_finishes_first_however_many_big_jobs_are_queued_or_running(start_service, image_server):
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    service = start_service("--max-active-jobs", "2", "--small-job-images", "10", "--chunk-images", "8",
                            "--images-per-process", "16", "--gpu-sleep-min-s", "0.1", "--gpu-sleep-max-s", "0.1")
    big = [service.submit([visit("RP00001", urls(image_server, f"big{j}", 160))]) for j in range(6)]
    small = service.submit([visit("RP00002", urls(image_server, "small", 5))])

    assert service.wait(small, timeout_s=60)["status"] == Status.COMPLETED
    crowd = [service.status(job_id) for job_id in big]
    # It did not wait for the big ones: none of them has finished, and those beyond max_active_jobs are
    # still queued behind it.
    assert all(doc["status"] == Status.ONGOING for doc in crowd), crowd
    assert sum(doc.get("phase") == Phase.QUEUED for doc in crowd) == 4, crowd
    # The two running jobs share the pool chunk by chunk: neither is more than a few chunks ahead.
    running = [doc["images_done"] for doc in crowd if doc.get("phase") == Phase.RUNNING]
    assert len(running) == 2 and abs(running[0] - running[1]) <= 4 * 8, crowd

    for job_id in big:
        assert service.wait(job_id, timeout_s=120)["status"] == Status.COMPLETED
