"""The job as clients really send it, one visit of a few photos: admitted the moment it is stored, followed to its
end by waiting instead of polling, its ids unique whatever runs at once or dies, and its fixed costs shared.
Against the real API and daemon processes (tests/service.py) unless a rule is checked in-process."""
import json
import multiprocessing
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from spool import JOB_FOLDERS, Folder, Spool, Status
from tests.api_process import running_api
from tests.conftest import call_wsgi, kill_at_write_step, held_open, image_bytes, records, visit, wait_until
from webapi.app import make_app

FIVE = 5


def photos(image_server, n: int = FIVE, tag: str = "") -> list[dict]:
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    return [visit("RP00001", [f"{image_server.base}/shelf.jpg?{tag}{i}" for i in range(n)])]


def wait_for_end(service, job_id: int, wait_s: int = 30, etag: str | None = None) -> requests.Response:
    headers = {"Prefer": f"wait={wait_s}", **({"If-None-Match": etag} if etag else {})}
    return service.http.get(f"{service.base}/api/status", params={"jobid": job_id}, headers=headers,
                            timeout=wait_s + 30)


# ------------------------------------------------------------------ the daemon hears of a job when it is stored
def test_a_job_is_admitted_when_stored_though_the_daemon_looks_only_once_an_hour(start_service, image_server):
    service = start_service("--poll-interval-s", "3600")
    first = service.submit(photos(image_server, 1, "warm"))  # and the pool processes are up
    assert wait_for_end(service, first).json()["status"] == Status.COMPLETED
    for n in range(3):
        stored = time.monotonic()
        job_id = service.submit(photos(image_server, tag=f"{n}-"))
        wait_until(lambda: not service.spool.jobs.path(Folder.INCOMING, job_id).exists(), timeout_s=5,
                   interval_s=0.002, what="the daemon to claim the job")
        claimed_after_s = time.monotonic() - stored
        assert claimed_after_s < 0.5, f"claimed {claimed_after_s:.3f} s after its 201"
        assert wait_for_end(service, job_id).json()["status"] == Status.COMPLETED
    # A request dropped into control/ (by retailpulse-ctl, or by hand) wakes it too.
    closed = []
    for i in range(3):
        image_server.on(f"/slow.jpg?{i}", held_open(closed))
    job_id = service.submit([visit("RP00001", [f"{image_server.base}/slow.jpg?{i}" for i in range(3)])])
    wait_until(lambda: len(image_server.hits) and sum(image_server.hits[f"/slow.jpg?{i}"] for i in range(3)) == 3,
               timeout_s=10, what="the three downloads to be held open")
    asked = time.monotonic()
    service.spool.control.request(job_id, "cancel")
    wait_until(lambda: not service.spool.control.pending(job_id, "cancel"), timeout_s=5, interval_s=0.002,
               what="the daemon to carry the cancel out")
    assert time.monotonic() - asked < 0.5
    assert wait_for_end(service, job_id).json()["images_cancelled"] == 3


# ------------------------------------------------------------------ a client can wait for the end
def test_a_waiting_client_is_answered_within_50_ms_of_the_final_status(start_service, image_server):
    service = start_service("--gpu-sleep-min-s", "0.3", "--gpu-sleep-max-s", "0.4")
    for n in range(3):
        job_id = service.submit(photos(image_server, tag=f"{n}-"))
        r = wait_for_end(service, job_id)
        answered = time.time()
        final = service.spool.jobs.status_path(job_id).stat().st_mtime
        assert r.status_code == 200 and r.json()["status"] == Status.COMPLETED
        assert r.headers["Preference-Applied"] == "wait=30"
        assert answered - final < 0.05, f"answered {1000 * (answered - final):.0f} ms after the final status"


def test_waiting_with_if_none_match_answers_each_change_then_304_when_the_time_is_up(start_service, image_server):
    service = start_service("--gpu-sleep-min-s", "0.5", "--gpu-sleep-max-s", "0.5", "--chunk-images", "1")
    job_id = service.submit(photos(image_server, 3))
    first = service.http.get(f"{service.base}/api/status", params={"jobid": job_id}, timeout=30)
    etag, seen = first.headers["ETag"], []
    while True:
        r = wait_for_end(service, job_id, etag=etag)
        if r.status_code == 304:
            break
        etag, doc = r.headers["ETag"], r.json()
        seen.append(doc["images_done"] if "images_done" in doc else doc["phase"])
        if doc["status"] != Status.ONGOING:
            r = wait_for_end(service, job_id, wait_s=1, etag=etag)  # finished: no change will come
            assert r.status_code == 304 and r.headers["ETag"] == etag
            break
    assert seen[-1] == 3 and len(seen) >= 2  # woken by changes on the way, the last one the end
    plain = service.http.get(f"{service.base}/api/status", params={"jobid": job_id}, timeout=30)
    assert plain.status_code == 200 and "Preference-Applied" not in plain.headers  # polling answers as before


def _raw_wait(base: str, job_id: int, wait_s: int) -> socket.socket:
    """A client that asks to wait and then only holds its connection (no thread of ours per client)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"GET /api/status?jobid={job_id} HTTP/1.1\r\nHost: {host}\r\nPrefer: wait={wait_s}\r\n\r\n".encode())
    return sock


def _threads(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{child}/task")) for child in [pid, *children(pid)])


def children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if int(open(f"/proc/{entry.name}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.slow
def test_a_thousand_waiting_clients_hold_no_thread_and_never_delay_a_submit_or_healthz(start_service, image_server):
    service = start_service("--gpu-sleep-min-s", "60", "--gpu-sleep-max-s", "60")
    job_id = service.submit(photos(image_server, 1))  # runs for a minute: every waiter waits
    waiters = [_raw_wait(service.base, job_id, 30) for _ in range(1000)]
    try:
        wait_until(lambda: sum(len(os.listdir(f"/proc/{p}/fd")) for p in children(service.api.pid)) > 1000,
                   timeout_s=30, what="the API processes to hold the waiting connections")
        # gunicorn's arbiter, and per API process (2): its loop, its pool of api_threads (8), the spool watch
        # and the waits' deadlines: the same however many wait.
        assert _threads(service.api.pid) <= 1 + 2 * (1 + 8 + 2), "waiting clients cost threads"
        submits, healths = [], []
        for n in range(20):
            started = time.monotonic()
            service.submit(photos(image_server, 1, f"crowd{n}-"))
            submits.append(time.monotonic() - started)
            started = time.monotonic()
            assert requests.get(f"{service.base}/healthz", timeout=10).status_code in (200, 503)
            healths.append(time.monotonic() - started)
        assert max(submits) < 0.5 and max(healths) < 0.5, (submits, healths)
        for sock in waiters[::50]:  # and they are still waiting: none was answered at once
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in waiters:
            sock.close()


# ------------------------------------------------------------------ ids
def _submit_many(base: str, n: int, out) -> None:
    session = requests.Session()
    body = {"count": 1, "visits": [visit("RP00001", ["http://img.example/a.jpg"])]}
    ids = [session.post(f"{base}/api/submit/", json=body, timeout=30).json()["job_id"] for _ in range(n)]
    out.put(ids)


def test_ids_are_unique_and_increasing_across_two_api_processes_of_two_workers_each(tmp_path):
    spool = Spool(tmp_path / "spool").create()
    out = multiprocessing.get_context("spawn").Queue()
    with running_api(spool.root) as first, running_api(spool.root) as second:
        with ThreadPoolExecutor(8) as pool:
            for base in (first, second) * 4:
                pool.submit(_submit_many, base, 40, out)
        taken = [out.get(timeout=60) for _ in range(8)]
    every = [i for ids in taken for i in ids]
    assert len(every) == len(set(every)) == 320
    assert all(ids == sorted(ids) for ids in taken)  # each client's later job has the larger id
    assert sorted(every) == sorted(spool.jobs.ids(Folder.META))


def _plain_submit_then_die_at_step(spool_root: str, step: int) -> None:
    """A plain submit through the real app in a process of its own, SIGKILLed just before its step-th fsync,
    rename or counter write (a kill -9 at that instant)."""
    done = kill_at_write_step(step)
    r = call_wsgi(make_app(Spool(spool_root)), "POST", "/api/submit/",
                  json.dumps({"count": 1, "visits": [visit("RP00001", ["http://img.example/a.jpg"])]}).encode())
    print(json.dumps({"steps": done[0], "status": r.status_code}))


@pytest.mark.slow
def test_a_kill_between_any_two_writes_of_a_submit_never_lets_an_id_be_given_twice(tmp_path):
    context = multiprocessing.get_context("spawn")
    spool = Spool(tmp_path / "spool").create()
    step, given = 0, []
    while True:
        step += 1
        before = set(spool.jobs.ids(Folder.META)) | {i for f in JOB_FOLDERS for i in spool.jobs.ids(f)}
        child = context.Process(target=_plain_submit_then_die_at_step, args=(str(spool.root), step))
        child.start()
        child.join(60)
        after = {i for f in (Folder.META, *JOB_FOLDERS) for i in spool.jobs.ids(f)}
        # A restarted API (start-up raises the counter above what the spool holds) gives a fresh id.
        restarted = Spool(spool.root)
        restarted.jobs.restore_counter()
        retry = call_wsgi(make_app(restarted), "POST", "/api/submit/", json.dumps(
            {"count": 1, "visits": [visit("RP00001", ["http://img.example/a.jpg"])]}).encode()).json()["job_id"]
        assert retry not in after and retry > max(after | before | {0}), (step, retry, after)
        given.append(retry)
        if child.exitcode == 0:  # the submit ran to its end: every step has been cut
            break
    assert step > 4 and len(given) == len(set(given))


# ------------------------------------------------------------------ fixed costs shared
def test_concurrent_submits_share_the_fsyncs_of_their_folders(spool, syscalls):
    app = make_app(spool)
    body = json.dumps({"count": 1, "visits": [visit("RP00001", ["http://img.example/a.jpg"])]}).encode()
    barrier = threading.Barrier(16)

    def one(_):
        barrier.wait()
        return call_wsgi(app, "POST", "/api/submit/", body).status_code

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [201] * 16
    incoming = [e for e in syscalls if e == ("fsync", str(spool.root / "incoming"))]
    jobs = [e for e in syscalls if e[0] == "fsync" and "/tmp/" in e[1] and ".json." in e[1]]
    assert len(jobs) == 32  # every meta and job file is fsynced, each ...
    assert len(incoming) < 16  # ... but the folder's fsync is shared


def test_jobs_finishing_in_one_turn_share_their_folders_fsyncs(spool, syscalls):
    from daemon.engine.outcome import ImageOutcome
    from daemon.supervisor.loop import Events, Supervisor
    from daemon.supervisor.settings import SupervisorSettings
    from daemon.supervisor.stores import load_store_master
    from tests.conftest import SAMPLE_STORE_MASTER
    supervisor = Supervisor(spool, load_store_master(SAMPLE_STORE_MASTER), SupervisorSettings(), runner=None,
                            events=Events())
    ids = [spool.jobs.submit(1, records([visit("RP00001", [f"http://x/{n}.jpg"])])) for n in range(10)]
    supervisor.admit_incoming()
    del syscalls[:]
    for job_id in ids:  # ten small jobs whose only chunk finished in the same turn
        job = supervisor.jobs[job_id]
        chunk = job.pending.popleft()
        job.chunks_in_flight += 1
        supervisor.record(job, chunk, [ImageOutcome(0, 1, 1, 4, None, None, 0.2, 100)])
    supervisor.forget_finished(supervisor.recorder.flush())
    assert spool.jobs.ids(Folder.DONE) == ids
    for folder in ("status", "done", "active"):
        assert syscalls.count(("fsync", str(spool.root / folder))) == 1, folder
