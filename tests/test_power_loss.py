"""Power loss, not only kill -9: the API and the daemon on lazyfs (tests/powerloss/), a FUSE filesystem
that keeps only what was fsynced, cut at every point of a job's life, then recovered by the real code.

The sweep (tests/powerloss/sweep.py says why a recorded trace is as strong as cutting live runs) prints a
failing cut with its seed and saves the run, so one cut can be checked again alone:
    make test-powerloss POWERLOSS_SEED=7
    POWERLOSS_RUN=tests/artifacts/powerloss/seed-7 POWERLOSS_CUT=123 make test-powerloss
The named tests cut live runs where the sweep found losses, and make fsyncs fail (EIO) where a false
success would lose a job or a result.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from config import webhook_secrets
from spool import JOB_FOLDERS, Folder, Spool, Status
from tests.conftest import REPO, wait_until
from tests.powerloss import sweep
from tests.powerloss.durable import Replay
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.powerloss

SEED = int(os.environ.get("POWERLOSS_SEED") or "1")
SAVED_RUN = os.environ.get("POWERLOSS_RUN")  # a folder a failing sweep saved: check its cuts again
ONLY_CUT = os.environ.get("POWERLOSS_CUT")
RESTARTS = int(os.environ.get("POWERLOSS_RESTARTS") or "6")  # cut states the real processes restart on
ARTIFACTS = REPO / "tests" / "artifacts" / "powerloss"
SECRET = webhook_secrets.new_secret()


def _fuse_missing() -> str | None:
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (Debian's fuse3) is missing"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy cannot load libfuse3: {exc}"
    return None


@pytest.fixture
def lazyfs(tmp_path):
    missing = _fuse_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"power-loss tests need FUSE: {missing} (.ci/run installs fuse3)")
        pytest.skip(f"no FUSE here: {missing}")
    from tests.powerloss.lazyfs import LazyFS
    fs = LazyFS(tmp_path / "backing", tmp_path / "mnt")
    yield fs
    fs.unmount()


@pytest.fixture
def webhooks(tmp_path):
    secrets = tmp_path / "webhook-secrets"
    secrets.write_text(f"* {SECRET}\n")
    receiver = Receiver(SECRET)
    yield secrets, receiver
    receiver.close()


def service_args(secrets: Path) -> dict:
    return dict(daemon_args=("--chunk-images", "2", "--processes", "1", "--webhook-secrets-file", str(secrets),
                             "--webhook-backoff-s", "0.2"),
                api_args=("--webhook-secrets-file", str(secrets)))


def start(start_service, spool_dir: Path, secrets: Path):
    args = service_args(secrets)
    return start_service(*args["daemon_args"], api_args=args["api_args"], spool_dir=spool_dir)


def kill(service) -> None:
    """The power is gone: nothing the processes do from now on reaches the disk."""
    for proc in (service.api, service.daemon):
        if proc.poll() is None:
            subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)  # its own children only
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ the sweep
def record(tmp_path, lazyfs, start_service, image_server, webhooks) -> sweep.Recording:
    secrets, receiver = webhooks
    service = start(start_service, lazyfs.mount / sweep.SPOOL, secrets)
    try:
        recording = sweep.life_of_jobs(service, lazyfs, image_server, receiver, random.Random(SEED))
    finally:
        service.stop()
    recording.trace = lazyfs.trace(tmp_path / "trace.pickle")
    return recording


def save(recording: sweep.Recording) -> Path:
    folder = ARTIFACTS / f"seed-{SEED}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recording.pickle").write_bytes(pickle.dumps(recording))
    return folder


def restart_real(state: Path, work: Path, recording: sweep.Recording, cut: sweep.Cut, start_service,
                 webhooks) -> list[str]:
    """The real API and daemon restarted on what survived: every job answered 201 finishes, one result an image."""
    copy = work / f"restart-{cut.at}"
    shutil.copytree(state, copy, symlinks=True)
    spool_dir = copy / sweep.SPOOL
    if not spool_dir.exists():
        spool_dir.mkdir(mode=0o700)
    service = start(start_service, spool_dir, webhooks[0])
    bad = []
    try:
        purges = sweep.acknowledged(recording, cut.at, "purge") + sweep.maybe(recording, cut.at, "purge")
        purged = {a.job_id for a in purges}
        for ack in sweep.acknowledged(recording, cut.at, "submit"):
            if ack.job_id in purged:
                continue
            doc = wait_until(lambda: finished_or_unknown(service, ack.job_id), timeout_s=30,
                             what=f"job {ack.job_id} to finish after the restart")
            if "status" not in doc:
                bad.append(f"job {ack.job_id} was answered 201 and is unknown after the restart")
                continue
            r = service.http.get(f"{service.base}/api/results", params={"jobid": ack.job_id}, timeout=30)
            if r.status_code != 200:
                bad.append(f"job {ack.job_id}: /api/results answers {r.status_code} after the restart: {r.text}")
                continue
            results = r.json()["results"]
            if [r["index"] for r in results] != list(range(ack.images)):
                bad.append(f"job {ack.job_id}: {len(results)} results over HTTP for {ack.images} images")
            if doc["images_done"] != ack.images:
                bad.append(f"job {ack.job_id}: images_done {doc['images_done']} of {ack.images}")
        wait_until(lambda: service.http.get(f"{service.base}/healthz", timeout=10).status_code == 200,
                   timeout_s=15, what="/healthz 200 after the restart")
    finally:
        service.stop()
    return bad + sweep.check_recovered(spool_dir, recording, cut.at)


def finished_or_unknown(service, job_id: int) -> dict | None:
    r = service.http.get(f"{service.base}/api/status", params={"jobid": job_id}, timeout=30)
    if r.status_code == 400:
        return {"unknown": True}
    doc = r.json()
    return doc if doc.get("status") in (Status.COMPLETED, Status.FAILED) else None


@pytest.mark.timeout(600)
def test_every_cut_of_a_jobs_life_keeps_every_promise(tmp_path, request, start_service, image_server, webhooks):
    """At least 200 cuts over submits, claims, results, statuses, finishes, cancel, requeue, webhooks and a
    purge: each cut state checked as it is, recovered by the daemon's own code, a seeded sample restarted."""
    if SAVED_RUN:
        recording = pickle.loads((Path(SAVED_RUN) / "recording.pickle").read_bytes())
    else:
        lazyfs = request.getfixturevalue("lazyfs")
        recording = record(tmp_path, lazyfs, start_service, image_server, webhooks)
    image_server.httpd.hooks.clear()  # the held images answer now: recovery is not about stalled servers
    for i in range(3):
        (image_server.folder / f"held-{i}.jpg").write_bytes((image_server.folder / "shelf.jpg").read_bytes())
    cuts = [c for c in sweep.cut_points(recording, SEED) if c.path.startswith(sweep.SPOOL) or c.kind == "random"]
    if ONLY_CUT:
        cuts = [c for c in cuts if c.at == int(ONLY_CUT)][:1] or [sweep.Cut(int(ONLY_CUT), "chosen", "")]
    assert len(cuts) >= 200 or ONLY_CUT, f"only {len(cuts)} cut points"
    rng = random.Random(SEED)
    failures, checked, by_phase, started = [], 0, {}, time.monotonic()
    work = tmp_path / "cuts"
    distinct = []
    for cut, state, new in sweep.states(recording, cuts, work):
        by_phase.setdefault(recording.phase_at(cut.at), []).append(cut.kind)
        if not new:
            continue
        distinct.append((cut, state))
    sample = rng.sample(distinct[1:-1], min(RESTARTS - 1, len(distinct) - 2))
    restart_at = {c.at for c, _ in sample} | {distinct[-1][0].at}  # the last state too: after a whole life
    for cut, state in distinct:
        checked += 1
        root = state / sweep.SPOOL
        bad = sweep.check_spool(root, recording, cut.at)
        if cut.at in restart_at or ONLY_CUT:
            bad += restart_real(state, tmp_path, recording, cut, start_service, webhooks)
        if not bad:
            try:
                sweep.recover_in_process(root)
                bad = sweep.check_recovered(root, recording, cut.at)
            except Exception as exc:  # noqa: BLE001 -- a recovery that crashes is what this reports
                bad = [f"recovery raised {type(exc).__name__}: {exc}"]
        if bad:
            failures.append(f"{cut.describe(recording)}, seed {SEED}: " + "; ".join(bad))
        shutil.rmtree(state, ignore_errors=True)
    summary = ", ".join(f"{phase}: {len(kinds)}" for phase, kinds in by_phase.items())
    kinds = {}
    for k in (k for ks in by_phase.values() for k in ks):
        kinds[k] = kinds.get(k, 0) + 1
    print(f"\npower-loss sweep, seed {SEED}: {len(cuts)} cuts ({summary}; by kind {kinds}), {checked} distinct "
          f"states checked, {len(restart_at)} restarted for real, {time.monotonic() - started:.1f} s")
    if failures:
        saved = SAVED_RUN or save(recording)
        (Path(saved) / "failures.txt").write_text("\n".join(failures) + "\n")
        pytest.fail(f"{len(failures)} cut(s) lost something (run saved in {saved}; one cut again: "
                    f"POWERLOSS_RUN={saved} POWERLOSS_CUT=<cut> make test-powerloss):\n" + "\n".join(failures[:25]))


# ------------------------------------------------------------------ live cuts where the sweep found losses
def power_cut(fs, service, tmp_path, name: str = "after-cut") -> Path:
    """The power goes (if a fault has not taken it already): the filesystem freezes, the processes are killed,
    and what was durable is the spool that survived, as a plain folder."""
    fs.freeze()
    kill(service)
    trace = fs.trace(tmp_path / f"{name}.pickle")
    replay = Replay(trace)
    replay.advance(len(trace.ops))
    return replay.snapshot(tmp_path / name) / sweep.SPOOL


def shelf_visits(image_server, n: int, tag: str = "n") -> list[dict]:
    from tests.conftest import image_bytes, visit
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))
    return [visit("RP00001", [f"{image_server.base}/shelf.jpg?{tag}={i}" for i in range(n)])]


def post_job(service, visits) -> requests.Response:
    return service.http.post(f"{service.base}/api/submit/", json={"count": len(visits), "visits": visits},
                             timeout=30)


def test_a_new_spools_folders_survive_with_its_first_job(tmp_path, lazyfs, start_service, image_server, webhooks):
    """Found by the sweep: nothing fsynced the spool's folders after making them, so a cut lost every job."""
    lazyfs.crash_after("fsyncdir", r"^spool/incoming$")  # the first job's folder fsync: the 201 may go now
    service = start(start_service, lazyfs.mount / sweep.SPOOL, webhooks[0])
    r = post_job(service, shelf_visits(image_server, 2))
    assert r.status_code == 201, r.text
    spool = Spool(power_cut(lazyfs, service, tmp_path))
    assert spool.jobs.folder_of(r.json()["job_id"]) is Folder.INCOMING
    assert spool.jobs.read_meta(r.json()["job_id"]).images == 2


def test_a_finished_job_keeps_its_results_folder(tmp_path, lazyfs, start_service, image_server, webhooks):
    """Found by the sweep: results/<id>/ itself was never fsynced into results/, so a job marked completed
    lost every result in a cut."""
    service = start(start_service, lazyfs.mount / sweep.SPOOL, webhooks[0])
    job_id = service.submit(shelf_visits(image_server, 3))
    sweep.wait_finished(service, job_id)
    root = power_cut(lazyfs, service, tmp_path)
    assert Spool(root).results.damage(job_id, 3) is None, "a completed job without all its results"
    again = start(start_service, root, webhooks[0])
    assert [r["index"] for r in again.results(job_id)["results"]] == [0, 1, 2]


def test_a_job_under_two_names_after_a_cut_is_done_once(tmp_path, lazyfs, start_service, image_server, webhooks):
    """Found by the sweep: a cut between the claim's two folder fsyncs left the job in incoming/ and active/;
    the restarted daemon loaded it twice and crashed at every start. The later name wins, the stale one goes."""
    lazyfs.crash_after("fsyncdir", r"^spool/active$")
    service = start(start_service, lazyfs.mount / sweep.SPOOL, webhooks[0])
    job_id = service.submit(shelf_visits(image_server, 3))
    wait_until(lazyfs.frozen, what="the claim's cut")
    root = power_cut(lazyfs, service, tmp_path)
    jobs = Spool(root).jobs
    assert jobs.path(Folder.INCOMING, job_id).exists() and jobs.path(Folder.ACTIVE, job_id).exists()
    again = start(start_service, root, webhooks[0])
    assert again.wait(job_id, timeout_s=30)["images_done"] == 3
    assert [r["index"] for r in again.results(job_id)["results"]] == [0, 1, 2]
    assert again.daemon.poll() is None and not Spool(root).jobs.path(Folder.INCOMING, job_id).exists()


def test_a_move_keeps_a_durable_name_when_another_writer_fsyncs_the_old_folder(tmp_path, lazyfs):
    """Found by the sweep: a rename out of incoming/ whose old folder another writer fsynced (the next job
    stored there) before the new folder was fsynced lost a job answered 201. Moves now link first."""
    spool = Spool(lazyfs.mount / sweep.SPOOL).create()
    from tests.conftest import records, visit
    job_id = spool.jobs.submit(1, records([visit("RP00001", ["http://x/a.jpg"])]))
    lazyfs.crash_after("rename|unlink", rf"^spool/incoming/{job_id}\.json$", sync="spool/incoming")
    try:
        spool.jobs.claim(job_id)
    except OSError:
        pass  # the power went in the middle of it
    trace = lazyfs.trace(tmp_path / "trace.pickle")
    replay = Replay(trace)
    replay.advance(len(trace.ops))
    left = Spool(replay.snapshot(tmp_path / "after") / sweep.SPOOL)
    assert left.jobs.folder_of(job_id) in (Folder.INCOMING, Folder.ACTIVE), "the job lost in the move"


def test_a_purge_answered_stays_purged(tmp_path, lazyfs, start_service, image_server, webhooks):
    """Found by the sweep: purge's removals were not fsynced, so a purged job came back after a cut."""
    service = start(start_service, lazyfs.mount / sweep.SPOOL, webhooks[0])
    kept, job_id = service.submit(shelf_visits(image_server, 1)), service.submit(shelf_visits(image_server, 1))
    sweep.wait_finished(service, kept), sweep.wait_finished(service, job_id)
    assert service.http.delete(f"{service.base}/api/job", params={"jobid": job_id}, timeout=30).status_code == 200
    spool = Spool(power_cut(lazyfs, service, tmp_path))
    assert spool.jobs.folder_of(job_id) is None and not spool.jobs.status_path(job_id).exists()
    assert spool.jobs.folder_of(kept) is Folder.DONE


# ------------------------------------------------------------------ fsync failures (EIO)
def test_a_submit_whose_folder_fsync_fails_is_a_503_and_never_processed(lazyfs, start_service, image_server,
                                                                        webhooks):
    """fsyncgate: the job file is in incoming/ when its folder's fsync fails. It must not be processed as if
    stored (the daemon looks at incoming/ ten times a second meanwhile), nor stay to make a duplicate when the
    client retries: the API takes it back and answers 503; the retry makes the one job."""
    lazyfs.fail("fsyncdir", r"^spool/incoming$", occurrence=1, delay_s=1.0)
    service = start(start_service, lazyfs.mount / sweep.SPOOL, webhooks[0])
    visits = shelf_visits(image_server, 2, tag="once")
    r = post_job(service, visits)
    assert r.status_code == 503 and "cannot store the job" in r.json()["error"], r.text
    first = Spool(lazyfs.mount / sweep.SPOOL).jobs
    assert first.folder_of(1) is None and not first.status_path(1).exists(), "a job answered 503 was stored"
    retry = post_job(service, visits)
    assert retry.status_code == 201
    assert sweep.wait_finished(service, retry.json()["job_id"])["images_done"] == 2
    assert sum(n for path, n in image_server.hits.items() if "once=" in path) == 2, "the images measured twice"
    assert first.folder_of(1) is None and service.status(1) == {}


@pytest.mark.parametrize("op, path, occurrence", [
    ("fsync", r"^spool/tmp/\d{8}-\d{8}\.", 1),  # a results file's own fsync
    ("fsyncdir", r"^spool/results/\d+$", 1),  # its folder's, after the rename made it visible
    ("fsyncdir", r"^spool/active$", 2),  # the finish's: the job left active/ but that is not durable
], ids=["results-file", "results-folder", "finish"])
def test_a_result_that_could_not_be_made_durable_is_written_again_never_taken_as_done(
        op, path, occurrence, lazyfs, start_service, image_server, webhooks):
    """The daemon pauses, says so in its log and /healthz, writes the same thing again (never fsyncs the same
    pages again hoping), and the job ends with one result per image, in done/ alone."""
    lazyfs.fail(op, path, occurrence)
    service = start(start_service, lazyfs.mount / sweep.SPOOL, webhooks[0])
    job_id = service.submit(shelf_visits(image_server, 3))
    health = wait_until(lambda: (r := service.http.get(f"{service.base}/healthz", timeout=10)).status_code == 503
                        and "paused" in r.json()["checks"]["daemon"] and r.json(), what="/healthz to say paused")
    assert "durable" in health["checks"]["daemon"]
    assert "Input/output error" in service.daemon_output()
    assert sweep.wait_finished(service, job_id, timeout_s=30)["images_done"] == 3
    assert [r["index"] for r in service.results(job_id)["results"]] == [0, 1, 2]
    spool = Spool(lazyfs.mount / sweep.SPOOL)
    assert [f for f in JOB_FOLDERS if spool.jobs.path(f, job_id).exists()] == [Folder.DONE]
    wait_until(lambda: service.http.get(f"{service.base}/healthz", timeout=10).status_code == 200,
               what="/healthz 200 once the writes work again")
