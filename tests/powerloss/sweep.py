"""The power-loss sweep: one real run of a job's whole life on lazyfs, then every cut of its trace.

Why a recorded trace is as strong as cutting a live run (ALICE's argument): a power cut after operation N
leaves what the first N operations made durable, and nothing the processes do after N reaches the disk; the
processes cannot see the future, so operations 1..N of a live run cut at N are those of a run that went on.
Every prefix of one recorded run is therefore a state a live cut could have left, and the durable picture
of each is computed exactly (durable.py). What the clients were told is placed in the same order: a request
sent after operation S and answered before operation K did all its writes in between, so at a cut >= K it
is acknowledged (its promise must hold), and at a cut < K it may or may not have happened (absent or whole).
The API, the daemon and the clients are the real ones, over real HTTP, on a real FUSE filesystem; each cut
state is then checked with the spool library, recovered by the daemon's real Supervisor (measuring with
the real engine against the same image server) and, for a seeded sample, by the real API and daemon
processes restarted on it. Named tests in tests/test_power_loss.py cut live runs at the points that found
losses, to show a live cut and a recorded one agree.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


from daemon.supervisor.loop import Events, Supervisor
from daemon.supervisor.settings import SupervisorSettings
from daemon.supervisor.stores import load_store_master
from spool import FINISHED_FOLDERS, JOB_FOLDERS, Control, CorruptFile, Folder, Spool
from spool.files import read_checked
from spool.keys import key_digest
from spool.records import Heartbeat, JobFile, JobStatus, KeyRecord, Notification
from tests.conftest import SAMPLE_STORE_MASTER, held_open, image_bytes, visit, wait_until
from tests.powerloss.durable import Replay
from tests.powerloss.lazyfs import MUTATIONS, Trace

STORES = load_store_master(SAMPLE_STORE_MASTER)
SPOOL = "spool"  # the spool's folder on the mount


@dataclass
class Ack:
    """A request and what it was answered: sent after operation ``sent`` and answered before ``answered``."""

    what: str  # submit, cancel, purge, requeue
    sent: int
    answered: int
    status: int
    job_id: int | None = None
    images: int = 0
    key: str | None = None
    callback: bool = False
    cancelled: int = 0


@dataclass
class Recording:
    trace: Trace
    acks: list[Ack]
    phases: list[tuple[int, str]] = field(default_factory=list)  # (operation index, phase) in order

    def phase_at(self, cut: int) -> str:
        name = "start"
        for index, phase in self.phases:
            if index > cut:
                break
            name = phase
        return name


# ------------------------------------------------------------------ the recorded run
def wait_finished(service, job_id: int, timeout_s: float = 60) -> dict:
    """Service.wait, but a passing 400 is not the end: on lazyfs an open that races a rename over the same
    file can answer ENOENT (libfuse's high-level API forgets the replaced file's path; a kernel filesystem
    keeps the inode), so a status read while the daemon rewrites it may miss it once."""
    def finished():
        r = service.http.get(f"{service.base}/api/status", params={"jobid": job_id}, timeout=30)
        doc = r.json() if r.status_code == 200 else {}
        return doc if doc.get("status") in ("completed", "failed") else None
    return wait_until(finished, timeout_s=timeout_s, interval_s=0.05, what=f"job {job_id} to finish")



def life_of_jobs(service, fs, image_server, receiver, rng: random.Random) -> Recording:
    """Submits (plain, keyed, replayed, with callbacks), processing, a failing job, a cancel mid-download, a
    requeue and a requeue-failed, a purge, the webhooks delivered: the whole life of jobs, once."""
    acks: list[Ack] = []
    phases = []
    http, base = service.http, service.base
    (image_server.folder / "shelf.jpg").write_bytes(image_bytes("JPEG", 64, 48))

    def mark(phase):
        phases.append((fs.mark(phase), phase))

    def urls(n, tag):
        return [f"{image_server.base}/shelf.jpg?{tag}={i}" for i in range(n)]

    def submit(visits, key=None, callback=None) -> Ack:
        body = {"count": len(visits), "visits": visits}
        if callback:
            body["callback_url"] = callback
        headers = {"Idempotency-Key": key} if key else {}
        sent = fs.count()
        r = http.post(f"{base}/api/submit/", json=body, headers=headers, timeout=30)
        ack = Ack("submit", sent, fs.count(), r.status_code, r.json().get("job_id") if r.status_code == 201 else None,
                  sum(len(v["image_url"]) for v in visits), key, bool(callback))
        acks.append(ack)
        assert r.status_code == 201, r.text
        return ack

    mark("submit")
    keyed = {}
    for i in range(12):
        n = rng.randint(1, 5)
        key = f"key-{i}" if i % 3 == 1 else None
        callback = receiver.url if i % 4 == 2 else None
        visits = [visit("RP00001", urls(n, f"j{i}"))]
        ack = submit(visits, key, callback)
        if key:
            keyed[key] = (visits, ack.job_id)
    for key, (visits, job_id) in list(keyed.items())[:2]:  # clients that retry: the same job, never a second
        assert submit(visits, key).job_id == job_id
    ids = [a.job_id for a in acks]
    for job_id in ids:
        wait_finished(service, job_id)

    mark("failing")
    # The failed image shares its results file with a good one: requeue-failed must split that file.
    failing = submit([visit("RP00001", [*urls(1, "f"), f"{image_server.base}/missing.jpg", *urls(2, "g")])]).job_id
    wait_finished(service, failing)

    mark("cancel")
    closed = []
    for i in range(3):
        image_server.on(f"/held-{i}.jpg", held_open(closed))
    held = submit([visit("RP00001", urls(2, "c") + [f"{image_server.base}/held-{i}.jpg" for i in range(3)])],
                  callback=receiver.url).job_id
    wait_until(lambda: http.get(f"{base}/api/status", params={"jobid": held}, timeout=30).json().get("images_done", 0)
               >= 2, what="the first images of the held job")
    sent = fs.count()
    r = http.post(f"{base}/api/cancel", params={"jobid": held}, timeout=30)
    assert r.status_code == 200, r.text
    acks.append(Ack("cancel", sent, fs.count(), 200, held, cancelled=r.json()["images_cancelled"]))
    wait_finished(service, held)

    mark("requeue")
    control = Spool(fs.mount / SPOOL).control
    for job_id, verb in ((ids[0], Control.REQUEUE), (failing, Control.REQUEUE_FAILED)):
        sent = fs.count()
        control.request(job_id, verb)
        acks.append(Ack("requeue", sent, fs.count(), 200, job_id))
        wait_until(lambda: not control.pending(job_id, verb), what=f"{verb} of job {job_id}")
        wait_finished(service, job_id)

    mark("purge")
    sent = fs.count()
    r = http.delete(f"{base}/api/job", params={"jobid": ids[-1]}, timeout=30)
    assert r.status_code == 200, r.text
    acks.append(Ack("purge", sent, fs.count(), 200, ids[-1]))

    mark("end")
    webhooks = sum(a.callback for a in acks if a.what == "submit" and a.job_id != ids[-1])
    wait_until(lambda: len(list((fs.mount / SPOOL / Folder.SENT).iterdir())) >= webhooks, what="every webhook sent")
    return Recording(Trace(), acks, phases)


# ------------------------------------------------------------------ the cuts
@dataclass(frozen=True)
class Cut:
    at: int  # the number of operations that reached the disk's durable picture's input (a cut after op at-1)
    kind: str  # what kind of operation it follows ("random" for the seeded ones)
    path: str

    def describe(self, recording: Recording) -> str:
        return f"cut {self.at} (after {self.kind} of {self.path or '-'}, phase {recording.phase_at(self.at)})"


def cut_points(recording: Recording, seed: int, random_cuts: int = 40) -> list[Cut]:
    """A cut after every operation that changes durability or the namespace, after every write, and at
    ``random_cuts`` seeded random operations."""
    ops = recording.trace.ops
    cuts = [Cut(i + 1, op.kind, op.path) for i, op in enumerate(ops) if op.kind in MUTATIONS]
    rng = random.Random(seed)
    cuts += [Cut(at, "random", ops[at - 1].path) for at in sorted(rng.sample(range(1, len(ops) + 1),
                                                                            min(random_cuts, len(ops))))]
    return sorted(cuts, key=lambda c: c.at)


# ------------------------------------------------------------------ the checks
def acknowledged(recording: Recording, cut: int, what: str) -> list[Ack]:
    return [a for a in recording.acks if a.what == what and a.answered <= cut and a.status < 300]


def maybe(recording: Recording, cut: int, what: str) -> list[Ack]:
    return [a for a in recording.acks if a.what == what and a.sent < cut < a.answered]


def job_files(spool: Spool) -> dict[int, list[Folder]]:
    found: dict[int, list[Folder]] = {}
    for folder in JOB_FOLDERS:
        for job_id in spool.jobs.ids(folder):
            found.setdefault(job_id, []).append(folder)
    return found


def check_spool(root: Path, recording: Recording, cut: int) -> list[str]:
    """What the cut state itself must show, before anything recovers it."""
    spool, bad = Spool(root), []
    if not root.exists():
        return [] if not acknowledged(recording, cut, "submit") else ["the spool folder itself did not survive"]
    purged = {a.job_id for a in acknowledged(recording, cut, "purge")}
    purging = {a.job_id for a in maybe(recording, cut, "purge")}
    files = job_files(spool) if (root / Folder.INCOMING).exists() else {}
    for folder in Folder:
        if folder is not Folder.TMP and not (root / folder).is_dir() and acknowledged(recording, cut, "submit"):
            bad.append(f"{folder}/ is gone")
    for ack in acknowledged(recording, cut, "submit"):
        if ack.job_id in purged or ack.job_id in purging:
            continue
        if ack.job_id not in files:
            bad.append(f"job {ack.job_id} was answered 201 and has no job file")
            continue
        if spool.jobs.read_meta(ack.job_id) is None:
            bad.append(f"job {ack.job_id} was answered 201 and has no meta file")
        if ack.key and spool.keys.record(key_digest(None, ack.key)) is None:
            bad.append(f"job {ack.job_id} was answered 201 for key {ack.key!r}, which no longer names it")
    for job_id in purged:
        left = [f"{f}/" for f in files.get(job_id, [])]
        left += ["status"] if spool.jobs.status_path(job_id).exists() else []
        if left:
            bad.append(f"job {job_id} was purged (answered 200) and is back: {', '.join(left)}")
    ids = set(files)
    for job_id, folders in files.items():
        for folder in folders:
            try:
                job = read_checked(spool.jobs.path(folder, job_id), JobFile)
                if job.job_id != job_id:
                    bad.append(f"{folder}/{job_id}.json holds job {job.job_id}")
            except (CorruptFile, OSError) as exc:
                bad.append(f"{folder}/{job_id}.json is not whole: {exc}")
    bad += _check_records(spool, ids, root)
    # Ids: the counter is not fsynced on every id (spool/jobs.py, next_id); what every program does at start
    # (restore_counter) must give an id above every id given (answered 201, or purged after one) and held.
    given = ids | {a.job_id for a in acknowledged(recording, cut, "submit")} | set(purged)
    next_id = Spool(root).jobs.restore_counter()
    if given and next_id <= max(given):
        bad.append(f"after a restart the next id would be {next_id}, but job {max(given)} was given: twice")
    for job_id in ids:
        bad += _check_finished(spool, job_id, files[job_id], before_recovery=True)
    for ack in acknowledged(recording, cut, "cancel"):
        status = spool.jobs._status_file(ack.job_id) if (root / Folder.STATUS).exists() else None
        if status is None or (status.images_cancelled or 0) < ack.cancelled:
            bad.append(f"job {ack.job_id}: its cancel was answered ({ack.cancelled} images) but the status says "
                       f"{status.images_cancelled if status else 'nothing'}")
    return bad


def _check_records(spool: Spool, ids: set[int], root: Path) -> list[str]:
    """Every record file the spool keeps decodes (written whole or not at all), keys make one job each."""
    bad = []
    kinds = {Folder.STATUS: JobStatus, Folder.OUTBOX: Notification, Folder.SENT: Notification,
             Folder.IDEMPOTENCY: KeyRecord}
    for folder, kind in kinds.items():
        if not (root / folder).is_dir():
            continue
        for path in (root / folder).glob("*.json"):
            try:
                read_checked(path, kind)
            except CorruptFile as exc:
                bad.append(f"{folder}/{path.name} is damaged: {exc}")
    by_key = Counter()
    if (root / Folder.META).is_dir():
        for job_id in spool.jobs.ids(Folder.META):
            meta = spool.jobs.read_meta(job_id)
            if meta is None:
                bad.append(f"meta/{job_id}.json is damaged")
            elif meta.idempotency_key and job_id in ids:
                by_key[meta.idempotency_key] += 1
    bad += [f"key {digest[:12]}... made {n} jobs" for digest, n in by_key.items() if n > 1]
    beat = root / "daemon.json"
    if beat.exists() and beat.stat().st_size:
        try:  # not fsynced on purpose: absent, empty or stale after a power cut, but never half of one
            read_checked(beat, Heartbeat)
        except CorruptFile as exc:
            bad.append(f"daemon.json is damaged: {exc}")
    return bad


def _check_finished(spool: Spool, job_id: int, folders: list[Folder], before_recovery: bool) -> list[str]:
    """A job marked done has all its results, whole; its notification is there if it has a callback."""
    bad = []
    try:
        status = read_checked(spool.jobs.status_path(job_id), JobStatus)
    except (FileNotFoundError, CorruptFile):
        status = None
    finished_folder = any(f in FINISHED_FOLDERS for f in folders)
    finished = status is not None and status.finished
    if not (finished_folder or finished):
        return bad
    folder = next(f for f in folders if f in FINISHED_FOLDERS) if finished_folder else folders[0]
    job = read_checked(spool.jobs.path(folder, job_id), JobFile)
    damage = spool.results.damage(job_id, job.images)
    requeued = any(spool.control.pending(job_id, verb) for verb in (Control.REQUEUE, Control.REQUEUE_FAILED))
    if damage is not None and (finished or not before_recovery) and not (before_recovery and requeued):
        # (a requeue in progress has deleted the results it redoes: its request, still there, finishes it)
        bad.append(f"job {job_id} is marked {status.status if finished else folder} without all its results: "
                   f"{damage[1]}")
    if finished and job.callback_url and spool.outbox.read(job_id) is None and \
            spool.outbox.read(job_id, Folder.SENT) is None:
        bad.append(f"job {job_id} is {status.status} and its notification is gone")
    return bad


def check_recovered(root: Path, recording: Recording, cut: int) -> list[str]:
    """After recovery: every job finished, with exactly one result per image; nothing acknowledged lost."""
    spool, bad = Spool(root), []
    files = job_files(spool)
    purged = {a.job_id for a in acknowledged(recording, cut, "purge") + maybe(recording, cut, "purge")}
    for ack in acknowledged(recording, cut, "submit"):
        if ack.job_id not in files and ack.job_id not in purged:
            bad.append(f"job {ack.job_id} was answered 201 and is gone after recovery")
    for job_id, folders in files.items():
        if len(folders) != 1 or folders[0] not in FINISHED_FOLDERS:
            bad.append(f"job {job_id} is in {', '.join(folders)} after recovery")
            continue
        job = read_checked(spool.jobs.path(folders[0], job_id), JobFile)
        try:
            indices = [json.loads(line)["index"] for line in spool.results.lines(job_id, total=job.images)]
        except Exception as exc:  # noqa: BLE001 -- a damaged file is what this reports
            bad.append(f"job {job_id}: results unreadable after recovery: {exc}")
            continue
        if indices != list(range(job.images)):
            dupes = [i for i, n in Counter(indices).items() if n > 1]
            bad.append(f"job {job_id}: {len(indices)} results for {job.images} images (twice: {dupes[:5]})")
        status = spool.status(job_id)
        if status is None or not status.finished or status.done != job.images:
            bad.append(f"job {job_id}: status after recovery {status and (status.status, status.images_done)}")
        bad += _check_finished(spool, job_id, folders, before_recovery=False)
    for ack in acknowledged(recording, cut, "cancel"):
        status = spool.status(ack.job_id)
        if status is not None and (status.images_cancelled or 0) < ack.cancelled:
            bad.append(f"job {ack.job_id}: cancel answered for {ack.cancelled} images, "
                       f"{status.images_cancelled or 0} after recovery")
    return bad


# ------------------------------------------------------------------ recovery
def recover_in_process(root: Path, timeout_s: float = 30) -> None:
    """The daemon's own recovery and main loop on ``root`` (measuring with the real engine on a thread of this
    process), until nothing is queued, running or requested."""
    from tests.test_supervisor import EngineRunner

    spool = Spool(root).create()
    events = Events()
    runner = EngineRunner(events.put)
    supervisor = Supervisor(spool, STORES, SupervisorSettings(chunk_images=2, poll_interval_s=0.005), runner, events)
    deadline = time.monotonic() + timeout_s

    def idle() -> bool:
        if time.monotonic() > deadline:
            raise AssertionError(f"recovery did not finish in {timeout_s} s: {job_files(spool)}")
        return (not supervisor.jobs and not supervisor.recorder.paused and not spool.jobs.ids(Folder.INCOMING)
                and not spool.control.waiting())

    try:
        supervisor.run(idle)
    finally:
        runner.close()


def states(recording: Recording, cuts: list[Cut], work: Path):
    """(cut, the folder holding its spool) for each cut, one folder per distinct durable picture and set of
    answers (a cut after a write equals the cut after the fsync before it, answered the same)."""
    replay = Replay(recording.trace)
    seen: dict[tuple, Path] = {}
    for cut in cuts:
        replay.advance(cut.at)
        answered = tuple(a.answered <= cut.at for a in recording.acks)
        key = (replay.version, answered)
        if key not in seen:
            seen[key] = replay.snapshot(work / f"cut-{cut.at}")
            yield cut, seen[key], True
        else:
            yield cut, seen[key], False

