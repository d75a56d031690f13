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
import sys
import time
from pathlib import Path

import pytest

from config import webhook_secrets
from spool import Folder, Spool, Status
from tests.conftest import REPO, wait_until
from tests.powerloss import sweep
from tests.powerloss.durable import Replay
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.powerloss

SEED = int(os.environ.get("POWERLOSS_SEED", "1"))
SAVED_RUN = os.environ.get("POWERLOSS_RUN")  # a folder a failing sweep saved: check its cuts again
ONLY_CUT = os.environ.get("POWERLOSS_CUT")
RESTARTS = int(os.environ.get("POWERLOSS_RESTARTS", "6"))  # cut states the real processes restart on
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
        purged = {a.job_id for a in sweep.acknowledged(recording, cut.at, "purge") + sweep.maybe(recording, cut.at, "purge")}
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
    restart_at = {c.at for c, _ in rng.sample(distinct[1:-1], min(RESTARTS - 1, len(distinct) - 2))} | {distinct[-1][0].at}
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
