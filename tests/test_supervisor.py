"""The supervisor in-process, with the real engine and a real image server: resuming, chunking, the death
policy, a full disk. Time is a clock passed in wherever waiting is not the point."""
import errno
import http.server
import json
import os
import subprocess
import threading
import time

import pytest

from daemon.engine.loop import Engine
from daemon.engine.netguard import AddressPolicy
from daemon.engine.outcome import ImageOutcome
from daemon.engine.settings import EngineSettings
from daemon.runners import Loss, TaskDone, TaskLost, TaskProgress
from daemon.supervisor.jobs import Chunk, after_loss, spans, uncovered
from daemon.supervisor.stores import load_store_master
from daemon.supervisor.loop import Events, Supervisor
from daemon.supervisor.settings import SupervisorSettings
from spool import Control, Spool, Status
from tests.conftest import SAMPLE_STORE_MASTER, call_wsgi, image_bytes, mount_tmpfs, unmount, wait_until, records, result_line
from webapi.app import make_app

STORES = load_store_master(SAMPLE_STORE_MASTER)


@pytest.mark.parametrize("total, covered, size, expected", [
    (10, [], 4, [(0, 4), (4, 8), (8, 10)]),
    (10, [(0, 4)], 4, [(4, 8), (8, 10)]),
    (10, [(4, 8)], 3, [(0, 3), (3, 4), (8, 10)]),
    (10, [(0, 4), (4, 10)], 4, []),
    (5, [(2, 3)], 10, [(0, 2), (3, 5)]),
])
def test_uncovered_images_are_cut_into_chunks(total, covered, size, expected):
    assert list(uncovered(total, covered, size)) == expected


class EngineRunner:
    """A TaskRunner that measures with the real engine on a thread of this process: the supervisor's logic
    against real downloads, without starting pool processes for every test (tests/test_crash_safety.py runs
    the real pool)."""

    def __init__(self, on_event, images_per_process: int = 16):
        self.on_event, self.images_per_process, self.in_flight = on_event, images_per_process, {}
        self.engine = Engine(EngineSettings(max_transfers=16, gpu_sleep_min_s=0, gpu_sleep_max_s=0,
                                            addresses=AddressPolicy(allow_private=True)))
        self.engine.start()

    def has_room(self, images):
        return not self.in_flight or sum(self.in_flight.values()) + images <= self.images_per_process

    def submit(self, task_id, images, isolated=False):
        self.in_flight[task_id] = len(images)

        def done(outcomes):
            del self.in_flight[task_id]
            self.on_event(TaskDone(task_id, outcomes))

        self.engine.submit(images, done, key=task_id)

    def cancel(self, task_ids):
        self.engine.cancel(task_ids)

    def watch(self):
        pass  # one thread in this process: nothing to stall unseen

    def workers(self):
        return 1

    def describe(self):
        return {"workers": 1}

    def close(self, timeout_s=5):
        self.engine.close(timeout_s)


@pytest.mark.parametrize("chunks, most, expected", [
    ([(4, 8), (0, 4), (8, 10)], 100, [(0, 10)]),  # in flight and waiting, in any order: one file
    ([(0, 4), (6, 8)], 100, [(0, 4), (6, 8)]),  # a recorded chunk between them is left alone
    ([(0, 4), (4, 8), (8, 12)], 5, [(0, 5), (5, 10), (10, 12)]),
    ([], 5, []),
])
def test_a_cancel_records_its_images_in_few_files(chunks, most, expected):
    assert spans([Chunk(1, first, stop) for first, stop in chunks], most) == expected


@pytest.fixture
def supervised(spool):
    """make(settings) -> a Supervisor on ``spool`` measuring with an EngineRunner (closed afterwards)."""
    runners = []

    def make(settings: SupervisorSettings = SupervisorSettings(poll_interval_s=0.02), target=None, clock=None):
        events = Events()
        runner = EngineRunner(events.put)
        runners.append(runner)
        return Supervisor(target or spool, STORES, settings, runner, events, **({"clock": clock} if clock else {}))

    yield make
    for runner in runners:
        runner.close()


def run_until_finished(spool, supervised, chunk_images=3):
    supervisor = supervised(SupervisorSettings(chunk_images=chunk_images, poll_interval_s=0.02))
    supervisor.run(lambda: bool(spool.jobs.ids("done") or spool.jobs.ids("failed")) and not supervisor.jobs)


def put_active_job(spool, urls):
    job_id = spool.jobs.submit(1, records([{"store_id": "RP00001", "visit_time": "t", "image_url": urls}]))
    spool.jobs.claim(job_id)
    return job_id


def test_restarted_daemon_keeps_recorded_results_and_does_only_the_rest(spool, supervised, image_server):
    base, folder = image_server
    (folder / "a.png").write_bytes(image_bytes("PNG", 10, 20))
    job_id = put_active_job(spool, [f"{base}/a.png"] * 7)
    # What a daemon killed after its first chunk leaves behind; the marker shows whether it is redone.
    recorded = [result_line(i, perimeter=-1, url=f"{base}/a.png") for i in range(3)]
    spool.results.write(job_id, 0, 3, recorded)

    run_until_finished(spool, supervised)

    results = [json.loads(line) for line in spool.results.lines(job_id)]
    assert [r["index"] for r in results] == list(range(7))
    assert [r["perimeter"] for r in results] == [-1, -1, -1, 60, 60, 60, 60]
    assert spool.status(job_id).status == "completed"
    assert spool.jobs.ids("done") == [job_id]


def test_unreadable_results_file_is_moved_aside_and_its_images_redone(spool, supervised, image_server):
    base, folder = image_server
    (folder / "a.png").write_bytes(image_bytes("PNG", 10, 20))
    job_id = put_active_job(spool, [f"{base}/a.png"] * 4)
    (spool.results.folder(job_id)).mkdir()
    (spool.results.folder(job_id) / "00000000-00000003.jsonl").write_bytes(b'{"index": 0}\n{"ind')

    run_until_finished(spool, supervised)

    assert [json.loads(line)["perimeter"] for line in spool.results.lines(job_id)] == [60] * 4
    assert [p.name for p in (spool.root / "corrupt").iterdir() if p.suffix == ".why"]


def test_unreadable_job_file_fails_that_job_with_the_reason(spool, supervised):
    (spool.root / "incoming" / "5.json").write_bytes(b"\x00not json")
    supervisor = supervised()
    supervisor.admit_incoming()
    status = spool.status(5)
    assert status.status == "failed"
    assert status.error[0].error.startswith("job file unreadable")
    assert spool.jobs.ids("active") == [] and len(list((spool.root / "corrupt").iterdir())) == 2


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_start_up_removes_leftovers_of_dead_writers_but_not_a_write_in_progress(spool, supervised):
    tmp = spool.root / "tmp"
    dead_writer, old = tmp / f"7.json.{dead_pid()}.aa", tmp / "9.json.x.cc"
    live_writer = tmp / f"8.json.{os.getpid()}.bb"
    for path in (dead_writer, old, live_writer):
        path.write_text("half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    supervised().run(lambda: True)
    assert [p.name for p in tmp.iterdir()] == [live_writer.name]


def finished_job(spool, base, n):
    job_id = put_active_job(spool, [f"{base}/a.png"] * n)
    lines = [result_line(i, url=f"{base}/a.png") for i in range(n)]
    spool.results.write(job_id, 0, n, lines)
    spool.jobs.finish(job_id, Status.COMPLETED)
    return job_id


def test_garbage_status_of_finished_job_is_moved_aside_and_rebuilt(spool, supervised, image_server):
    job_id = finished_job(spool, image_server.base, 3)
    spool.jobs.status_path(job_id).write_bytes(b'{"job_id": "1", "sta')
    supervised().run(lambda: True)
    status = spool.status(job_id)
    assert (status.status, status.images_done) == ("completed", 3)
    moved = sorted(p.name for p in (spool.root / "corrupt").iterdir())
    assert len(moved) == 2 and moved[0].startswith(f"status-{job_id}.json.") and moved[1].endswith(".why")


def test_finished_job_with_garbage_status_and_results_goes_back_and_is_redone(spool, supervised, image_server):
    base, folder = image_server
    (folder / "a.png").write_bytes(image_bytes("PNG", 10, 20))
    job_id = finished_job(spool, base, 3)
    spool.jobs.status_path(job_id).write_bytes(b"\x00")
    next(spool.results.folder(job_id).iterdir()).write_bytes(b"{trunc")
    run_until_finished(spool, supervised)
    assert spool.status(job_id).status == "completed"
    assert [json.loads(line)["index"] for line in spool.results.lines(job_id)] == [0, 1, 2]


# ---------------------------------------------------------------- a full disk, for real
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, as a full disk."""
    mount_tmpfs(tmp_path / "disk")
    yield tmp_path / "disk"
    unmount(tmp_path / "disk")


def fill(folder):
    """Write until the filesystem says ENOSPC; return the file that took the space."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_full_disk_pauses_the_job_and_never_finishes_it_without_results(small_disk, supervised, image_server):
    base, folder = image_server
    (folder / "a.png").write_bytes(image_bytes("PNG", 10, 20))
    spool = Spool(small_disk / "spool").create()
    release = threading.Event()
    image_server.on("/a.png", lambda handler: release.wait(20) and http.server.SimpleHTTPRequestHandler.do_GET(handler))
    job_id = put_active_job(spool, [f"{base}/a.png"] * 7)
    clock = FakeClock()
    supervisor = supervised(SupervisorSettings(chunk_images=3, poll_interval_s=0.02, disk_retry_interval_s=5),
                            target=spool, clock=clock)
    supervisor.recover()
    wait_until(lambda: supervisor.step() or image_server.hits, what="the first download")
    filler = fill(small_disk)  # the disk fills while images are being downloaded
    release.set()
    wait_until(lambda: supervisor.step() or supervisor.recorder.unrecorded, what="a write to hit the full disk")
    for _ in range(20):  # paused: however long the loop turns, nothing moves until the retry is due
        supervisor.step()
    assert spool.jobs.ids("active") == [job_id] and not spool.jobs.ids("done")
    assert not supervisor.dispatched  # nothing new dispatched while results are owed
    filler.unlink()
    supervisor.step()
    assert supervisor.recorder.paused, "a write was tried again before disk_retry_interval_s"
    clock.now += 5
    wait_until(lambda: supervisor.step() or spool.jobs.ids("done"), what="the job to finish")
    supervisor.drain()
    assert spool.status(job_id).status == "completed"
    assert [json.loads(line)["index"] for line in spool.results.lines(job_id)] == list(range(7))


def test_full_disk_submit_is_503_and_leaves_no_partial_job(small_disk):
    spool = Spool(small_disk / "spool").create()
    fill(small_disk)
    app = make_app(spool)
    body = json.dumps({"count": 1, "visits": [{"store_id": "RP00001", "visit_time": "t",
                                                "image_url": ["http://img.example/a.jpg"] * 2000}]}).encode()
    r = call_wsgi(app, "POST", "/api/submit/", body)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "No space left on device" in r.json()["error"]
    assert spool.jobs.ids("incoming") == [] and list((spool.root / "tmp").iterdir()) == []


def test_a_cancel_that_meets_a_full_disk_keeps_its_request_until_its_results_are_written(small_disk):
    spool = Spool(small_disk / "spool").create()
    now = [0.0]
    supervisor = Supervisor(spool, STORES, SupervisorSettings(chunk_images=2), RecordingRunner(room_for_tasks=0),
                            Events(), clock=lambda: now[0])
    job_id = put_active_job(spool, [f"http://x/{i}.jpg" for i in range(6)])
    supervisor.load(job_id, spool.jobs.path("active", job_id))
    spool.control.request(job_id, Control.CANCEL)
    filler = fill(small_disk)
    supervisor.handle_requests()
    assert supervisor.recorder.owes(job_id)
    assert spool.control.pending(job_id, Control.CANCEL), "a kill now must not lose the cancel"
    filler.unlink()
    now[0] += 60  # past the retry interval
    supervisor.forget_finished(supervisor.recorder.retry())
    supervisor.handle_requests()
    assert not spool.control.pending(job_id, Control.CANCEL)
    assert spool.status(job_id).images_cancelled == 6
    assert [json.loads(line)["error"] for line in spool.results.lines(job_id)] == ["cancelled by request"] * 6


class RecordingRunner:
    """Stands in for the pool only to see what goes out, in what order; nothing is measured through it."""

    def __init__(self, room_for_tasks: int):
        self.room_for_tasks, self.tasks, self.images = room_for_tasks, [], {}

    def has_room(self, images):
        return len(self.tasks) < self.room_for_tasks

    def submit(self, task_id, images, isolated=False):
        self.images[task_id] = list(images)
        self.tasks.append(([url.rsplit("/", 1)[1] for _, url in images], isolated))


def test_chunks_go_out_one_job_after_another_and_a_chunk_that_saw_a_death_goes_isolated(spool):
    runner = RecordingRunner(room_for_tasks=5)
    supervisor = Supervisor(spool, STORES, SupervisorSettings(chunk_images=2), runner, Events())
    ids = [put_active_job(spool, [f"http://x/{j}-{i}.jpg" for i in range(4)]) for j in range(3)]
    for job_id in ids:
        supervisor.load(job_id, spool.jobs.path("active", job_id))
    supervisor.jobs[ids[1]].pending.appendleft(Chunk(ids[1], 0, 1, deaths=1))
    supervisor.dispatch()
    assert runner.tasks == [(["0-0.jpg", "0-1.jpg"], False), (["1-0.jpg"], True), (["2-0.jpg", "2-1.jpg"], False),
                            (["0-2.jpg", "0-3.jpg"], False), (["1-0.jpg", "1-1.jpg"], False)]


# ---------------------------------------------------------------- the death policy (tests/test_death_policy.py has its rules)
@pytest.mark.parametrize("poison", [0, 5, 63])
def test_a_poison_image_ends_alone_and_failed_and_never_takes_an_innocent_with_it(poison):
    """Replay the policy against an image that kills whatever measures it: count the deaths it costs."""
    pending, deaths, failed = [Chunk(1, 0, 64)], 0, {}
    while pending:
        chunk = pending.pop(0)
        if not chunk.first <= poison < chunk.stop:
            continue  # measured fine: its images get results
        deaths += 1
        verdict = after_loss(chunk, Loss.DIED, max_deaths=3)
        if verdict.give_up:
            failed[chunk.first] = verdict.give_up
        pending[:0] = verdict.retry
    assert failed == {poison: "the process measuring this image died each time (8 attempts)"}
    assert deaths == 1 + 1 + 6  # shared, alone whole, then halving 64 -> 1 (log2 64) and dying alone


def test_lost_tasks_follow_the_policy_and_the_poison_image_alone_is_failed(spool):
    runner = RecordingRunner(room_for_tasks=100)
    events = Events()
    supervisor = Supervisor(spool, STORES, SupervisorSettings(chunk_images=4, max_worker_deaths=2), runner, events)
    job_id = put_active_job(spool, [f"http://x/{i}.jpg" for i in range(4)])
    supervisor.load(job_id, spool.jobs.path("active", job_id))
    poison = "2.jpg"
    while supervisor.jobs:
        supervisor.dispatch()
        for task_id, task in list(supervisor.dispatched.items()):
            names = [url.rsplit("/", 1)[1] for _, url in runner.images[task_id]]
            if poison in names:
                events.put(TaskLost(task_id, "pool process 1 died"))
            else:
                events.put(TaskDone(task_id, [ImageOutcome(i, 1, 1, 4, None, None, 0.0, 10)
                                              for i, _ in runner.images[task_id]]))
        supervisor.wait_for_events(0)
        supervisor.forget_finished(supervisor.recorder.flush())
    results = [json.loads(line) for line in spool.results.lines(job_id)]
    # 4 deaths: the shared process, the chunk alone, its half, the image alone (max_worker_deaths counts alone).
    assert [r["error"] for r in results] == [None, None, "the process measuring this image died each time (4 attempts)",
                                             None]
    assert runner.tasks == [(["0.jpg", "1.jpg", "2.jpg", "3.jpg"], False), (["0.jpg", "1.jpg", "2.jpg", "3.jpg"], True),
                            (["0.jpg", "1.jpg"], True), (["2.jpg", "3.jpg"], True), (["2.jpg"], True), (["3.jpg"], True)]


# ---------------------------------------------------------------- progress between chunks (supervisor/progress.py)
def test_progress_between_records_is_written_once_a_second_and_never_goes_back(spool):
    """The runner's per-image progress shows in images_processed, written at most once a second per job;
    images_done counts only recorded images; a lost task takes nothing back from what was shown."""
    runner, events, now = RecordingRunner(room_for_tasks=100), Events(), [0.0]
    supervisor = Supervisor(spool, STORES, SupervisorSettings(chunk_images=4), runner, events, clock=lambda: now[0])
    job_id = put_active_job(spool, [f"http://x/{i}.jpg" for i in range(8)])
    supervisor.load(job_id, spool.jobs.path("active", job_id))
    supervisor.dispatch()
    first, second = sorted(supervisor.dispatched)

    def step(*happened, after_s: float = 0.0):
        now[0] += after_s
        for event in happened:
            events.put(event)
        supervisor.wait_for_events(0)
        supervisor.forget_finished(supervisor.recorder.flush())  # the turn's records, as step() writes them
        supervisor.progress.write_due(supervisor.jobs)
        status = spool.status(job_id)
        return status.images_processed, status.images_done

    assert step(TaskProgress({first: 1, second: 2})) == (3, 0)  # the status its loading wrote, this same turn
    assert step(TaskProgress({first: 3}), after_s=0.25) == (3, 0)  # taken up 0.25 s ago: not yet (0.5 s)
    assert step(after_s=0.25) == (5, 0)
    outcomes = [ImageOutcome(i, 1, 1, 4, None, None, 0.0, 10) for i in range(4)]
    assert step(TaskDone(first, outcomes)) == (6, 4)  # recorded: its own status write, at once
    assert step(TaskLost(second, "pool process 1 died"), after_s=1) == (6, 4)  # redone: the figure holds
    supervisor.dispatch()
    [again] = [task_id for task_id in supervisor.dispatched if task_id not in (first, second)]
    assert step(TaskProgress({again: 1}), after_s=1) == (6, 4)
    assert step(TaskProgress({again: 3}), after_s=1) == (7, 4)
    assert step(TaskDone(again, [ImageOutcome(i, 1, 1, 4, None, None, 0.0, 10) for i in range(4, 8)])) == (8, 8)
    assert spool.status(job_id).status is Status.COMPLETED
