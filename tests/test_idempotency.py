"""Idempotency-Key on submit: a retried submit answers the job the first one made, whatever crashed or raced."""
import json
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from spool import JOB_FOLDERS, Folder, Spool
from spool.keys import key_digest
from tests import openapi_check
from tests.api_process import running_api
from tests.conftest import call_wsgi, kill_at_write_step, records, visit
from webapi.app import make_app
from webapi.auth import Tokens, digest

JOB = {"count": 1, "visits": [visit("RP00001", ["http://img.example/a.jpg", "http://img.example/b.jpg"])]}


def submit(app, body: dict | bytes, key: str | None = None, token: str | None = None):
    extra = {}
    if key is not None:
        extra["HTTP_IDEMPOTENCY_KEY"] = key
    if token is not None:
        extra["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call_wsgi(app, "POST", "/api/submit/", data, extra=extra)


def jobs(spool: Spool) -> list[int]:
    return sorted(job_id for folder in JOB_FOLDERS for job_id in spool.jobs.ids(folder))


def test_a_retry_with_the_same_key_answers_the_first_job_and_says_it_is_a_replay(spool):
    app = make_app(spool)
    first = submit(app, JOB, key="7c9e6679-7425-40de-944b-e07fc1f90ae7")
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    respaced = json.dumps(JOB, indent=4, sort_keys=True).encode()  # the same job, other bytes
    for retry in (submit(app, JOB, key="7c9e6679-7425-40de-944b-e07fc1f90ae7"),
                  submit(app, respaced, key='"7c9e6679-7425-40de-944b-e07fc1f90ae7"')):  # the IETF draft's form
        assert retry.status_code == 201
        assert retry.json() == first.json()
        assert retry.headers["idempotent-replayed"] == "true"
    assert jobs(spool) == [first.json()["job_id"]]
    assert submit(app, JOB).json()["job_id"] != first.json()["job_id"]  # without a key: a new job, as ever


def test_the_same_key_with_another_body_is_422_naming_the_key(spool):
    app = make_app(spool)
    job_id = submit(app, JOB, key="order-1182").json()["job_id"]
    other = {**JOB, "visits": [visit("RP00002", ["http://img.example/a.jpg"])]}
    r = submit(app, other, key="order-1182")
    assert r.status_code == 422
    assert "order-1182" in r.json()["error"] and f"job {job_id}" in r.json()["error"]
    assert jobs(spool) == [job_id]


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "caf\u00e9", "a b", 'a"b', "a\\b", '"', '""'])
def test_a_malformed_key_is_400_and_stores_nothing(spool, key):
    r = submit(make_app(spool), JOB, key=key.encode("utf-8").decode("latin-1"))
    assert r.status_code == 400 and r.json()["error"].startswith("Idempotency-Key:")
    assert jobs(spool) == []


def test_keys_belong_to_the_token_that_sent_them(spool, tmp_path):
    (tmp_path / "tokens").write_text(f"acme {digest('t-acme')}\nzeta {digest('t-zeta')}\n")
    app = make_app(spool, tokens=Tokens.load(tmp_path / "tokens"))
    acme = submit(app, JOB, key="k1", token="t-acme").json()["job_id"]
    zeta = submit(app, JOB, key="k1", token="t-zeta")
    assert zeta.status_code == 201 and "idempotent-replayed" not in zeta.headers
    assert zeta.json()["job_id"] != acme  # the same key from another client is another client's key
    assert submit(app, JOB, key="k1", token="t-acme").json()["job_id"] == acme


def test_a_replay_is_answered_even_when_the_queue_is_full(spool):
    app = make_app(spool, max_queued_images=2)
    job_id = submit(app, JOB, key="k").json()["job_id"]
    assert submit(app, {**JOB, "visits": [visit("RP00001", ["http://img.example/c.jpg"])]}).status_code == 503
    retry = submit(app, JOB, key="k")
    assert (retry.status_code, retry.json()["job_id"]) == (201, job_id)


def test_a_key_expires_with_its_job(spool):
    app = make_app(spool)
    job_id = submit(app, JOB, key="k").json()["job_id"]
    spool.jobs.claim(job_id)
    spool.jobs.finish(job_id, "completed")
    assert spool.upkeep.purge(job_id)  # what retention_days does to a finished job
    assert os.listdir(spool.root / Folder.IDEMPOTENCY) == [f"{key_digest(None, 'k')[:2]}.lock"]
    again = submit(app, JOB, key="k")
    assert again.status_code == 201 and again.json()["job_id"] != job_id
    assert "idempotent-replayed" not in again.headers


# ------------------------------------------------------------------ a crash at every step
def _submit_then_die_at_step(spool_root: str, step: int) -> None:
    """In a process of its own: a keyed submit through the real app, SIGKILLed just before its step-th fsync or
    rename, or the id counter's write (every write in the spool is made of those), as a kill -9 or a power cut at that instant would."""
    done = kill_at_write_step(step)
    r = submit(make_app(Spool(spool_root)), JOB, key="retry-me")
    print(json.dumps({"steps": done[0], "status": r.status_code}))


@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_a_crash_at_any_step_of_a_keyed_submit_leaves_no_job_and_no_key_or_both(tmp_path):
    context = multiprocessing.get_context("spawn")
    step, outcomes = 0, []
    while True:
        step += 1
        spool = Spool(tmp_path / f"spool-{step}").create()
        child = context.Process(target=_submit_then_die_at_step, args=(str(spool.root), step))
        child.start()
        child.join(60)
        made, key = jobs(spool), spool.keys.record(key_digest(None, "retry-me"))
        # The promise: a job exists exactly when its key does, and a job that exists is whole.
        assert (made == []) == (key is None), (step, made, key)
        for job_id in made:
            assert spool.jobs.read(spool.jobs.path(Folder.INCOMING, job_id)).visits == records(JOB["visits"])
            assert key.job_id == job_id
        # The client retries: it gets that job if there was one, else a new one; never two.
        retry = submit(make_app(spool), JOB, key="retry-me")
        assert retry.status_code == 201
        assert (retry.headers.get("idempotent-replayed") == "true") == bool(made)
        assert jobs(spool) == (made or [retry.json()["job_id"]])
        # What the dead writer left behind (tmp/ files, a key record without its job) is tidied away.
        spool.upkeep.clean_tmp(older_than_s=3600)
        spool.keys.remove_orphans(older_than_s=0)
        assert os.listdir(spool.root / Folder.TMP) == []
        assert len([n for n in os.listdir(spool.root / Folder.IDEMPOTENCY) if n.endswith(".json")]) == 1
        outcomes.append("whole" if made else "none")
        if child.exitcode == 0:  # no step left to die at: the submit went through
            break
        assert child.exitcode == -signal.SIGKILL
    # the id counter (rewritten in place: one step), then the meta file, the key record, the job file: 3 writes
    # of 3 steps each (fsync, rename, fsync of the folder)
    assert step == 11 and outcomes == ["none"] * 9 + ["whole"] * 2, outcomes
    print(f"\nkilled before each of {step - 1} steps: {outcomes.count('none')} left no job and no key, "
          f"{outcomes.count('whole') - 1} a whole job with its key; every retry got exactly one job")


# ------------------------------------------------------------------ concurrent retries, two API processes
@pytest.mark.slow  # seconds of real time on purpose: left out of `make test-fast`
def test_concurrent_identical_submits_with_one_key_on_two_api_processes_make_one_job(tmp_path):
    spool_dir = tmp_path / "spool"
    body = json.dumps(JOB).encode()
    clients = 24
    with running_api(spool_dir) as first, running_api(spool_dir) as second:
        start = threading.Barrier(clients)

        def post(i: int) -> requests.Response:
            base = (first, second)[i % 2]
            with requests.Session() as http:
                http.get(f"{base}/api/openapi.json", timeout=30)  # connected before the barrier
                start.wait(timeout=30)
                return http.post(f"{base}/api/submit/", data=body, timeout=60,
                                 headers={"Content-Type": "application/json", "Idempotency-Key": "one-key"})

        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(post, range(clients)))
    for r in answers:
        openapi_check.check_requests_response(r)
    assert {r.status_code for r in answers} == {201}
    assert len({r.json()["job_id"] for r in answers}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in answers) == 1
    assert jobs(Spool(spool_dir)) == [answers[0].json()["job_id"]]
    print(f"\n{clients} simultaneous submits, one key, two API processes: one job, {clients - 1} replays")
