"""The spool's on-disk contract: atomic writes, ids that never repeat, the folder as the state."""
import json
import multiprocessing
import os
import stat
import time

import pytest

from spool import CorruptFile, Folder, Phase, Spool, Status, parse_job_id
from spool.records import JobStatus
from tests.conftest import records, result_line


def test_create_makes_every_folder_private(spool):
    for name in tuple(Folder):
        mode = (spool.root / name).stat().st_mode
        assert stat.S_IMODE(mode) == 0o700, name


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(spool):
    dest = spool.root / "status" / "1.json"
    spool.files.write_atomic(dest, b"old")
    spool.files.write_atomic(dest, b"new")
    assert dest.read_bytes() == b"new"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert list((spool.root / "tmp").iterdir()) == []


def test_job_ids_increase_across_spool_instances(spool):
    ids = [Spool(spool.root).jobs.next_id() for _ in range(3)]
    assert ids == [1, 2, 3]


def _take_ids(root, n, out):
    out.put([Spool(root).jobs.next_id() for _ in range(n)])


def test_job_ids_never_repeat_across_processes(spool):
    out = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_take_ids, args=(spool.root, 25, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    taken = sorted(i for _ in procs for i in out.get(timeout=60))
    for p in procs:
        p.join(timeout=60)
    assert taken == list(range(1, 101))


def test_submit_writes_a_complete_job_into_incoming(spool):
    visits = [{"store_id": "RP00001", "visit_time": "t", "image_url": ["http://h/a.jpg"]}]
    job_id = spool.jobs.submit(1, records(visits))
    doc = spool.jobs.read(spool.jobs.path("incoming", job_id))
    assert doc.job_id == job_id and doc.visits == records(visits) and doc.count == 1
    assert spool.jobs.ids("incoming") == [job_id]


def test_claim_moves_job_from_incoming_to_active(spool):
    job_id = spool.jobs.submit(1, records([]))
    spool.jobs.claim(job_id)
    assert spool.jobs.ids("incoming") == [] and spool.jobs.ids("active") == [job_id]
    with pytest.raises(FileNotFoundError):
        spool.jobs.claim(job_id)  # a second claimer loses cleanly


def test_job_ids_ignore_files_that_are_not_jobs(spool):
    for name in ("7.json", "x.json", "8.json.part", "0.json", "09.json", ".9.json", "10.txt"):
        (spool.root / "incoming" / name).write_text("{}")
    assert spool.jobs.ids("incoming") == [7]


def test_status_is_unknown_then_queued_then_what_the_daemon_wrote(spool):
    assert spool.status(1) is None
    job_id = spool.jobs.submit(1, records([]))
    assert spool.status(job_id) == JobStatus("1", Status.ONGOING, Phase.QUEUED)
    spool.jobs.write_status(JobStatus("1", Status.COMPLETED, Phase.FINISHED))
    assert spool.status(job_id).status is Status.COMPLETED


def test_unparsable_status_file_reads_as_queued_not_as_a_crash(spool):
    job_id = spool.jobs.submit(1, records([]))
    spool.jobs.status_path(job_id).write_bytes(b'{"job_id": "1", "sta')
    assert spool.status(job_id).phase is Phase.QUEUED


def test_read_job_refuses_garbage(spool):
    path = spool.root / "active" / "3.json"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CorruptFile):
        spool.jobs.read(path)
    path.write_text(json.dumps({"job_id": 3}))
    with pytest.raises(CorruptFile):
        spool.jobs.read(path)


def test_results_are_listed_and_streamed_in_image_order(spool):
    spool.results.write(5, 3, 5, [result_line(3), result_line(4)])
    spool.results.write(5, 0, 3, [result_line(i) for i in range(3)])
    assert [(a, b) for a, b, _ in spool.results.chunks(5)] == [(0, 3), (3, 5)]
    assert [json.loads(line)["index"] for line in spool.results.lines(5)] == [0, 1, 2, 3, 4]
    assert list(spool.results.lines(6)) == []


def test_move_aside_keeps_the_file_and_says_why(spool):
    path = spool.root / "active" / "4.json"
    path.write_bytes(b"junk")
    dest = spool.files.move_aside(path, "not JSON")
    assert not path.exists()
    assert dest.parent == spool.root / "corrupt" and dest.read_bytes() == b"junk"
    assert dest.with_name(dest.name + ".why").read_text() == "not JSON\n"


def test_clean_tmp_removes_only_old_leftovers(spool):
    # named as writers name them, after a process that still runs (this one): only their age tells
    old, new = (spool.root / "tmp" / f"{name}.json.{os.getpid()}.0a1b2c3d" for name in ("1", "2"))
    old.write_text("x")
    new.write_text("y")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert spool.upkeep.clean_tmp(older_than_s=60) == 1
    assert [p.name for p in (spool.root / "tmp").iterdir()] == [new.name]


@pytest.mark.parametrize("text, expected", [
    ("1", 1), ("123", 123), (42, 42), ("0", None), ("01", None), ("-1", None), ("1.0", None), ("", None),
    ("../1", None), ("1\n", None), ("1\x00", None), ("9" * 17, None), (True, None), (None, None),
])
def test_parse_job_id(text, expected):
    assert parse_job_id(text) == expected


def assert_durable_write(events, dest, new_file=True):
    """dest was written as: fsync of the new file, rename (or, for a move, link) onto dest, then fsync of dest's
    folder."""
    [rename] = [i for i, e in enumerate(events) if e[0] in ("rename", "link") and e[2] == str(dest)]
    if new_file:
        assert ("fsync", events[rename][1]) in events[:rename], "file not fsynced before the rename"
    assert ("fsync", str(dest.parent)) in events[rename + 1:], "folder not fsynced after the rename"
    return rename


def test_submitted_job_is_durable_before_the_api_answers(spool, syscalls):
    from tests.conftest import call_wsgi
    from webapi.app import make_app
    body = json.dumps({"count": 1, "visits": [{"store_id": "RP00001", "visit_time": "t",
                                                "image_url": ["http://img.example/a.jpg"]}]}).encode()
    r = call_wsgi(make_app(spool), "POST", "/api/submit/", body)
    assert r.status_code == 201  # call_wsgi returns after the app did: every syscall below came first
    job_id = r.json()["job_id"]
    meta = assert_durable_write(syscalls, spool.jobs.meta_path(job_id))
    job = assert_durable_write(syscalls, spool.jobs.path("incoming", job_id))
    assert meta < job  # the meta file, which keeps the id taken after a power loss, is durable first


def test_ids_stay_unique_and_increasing_when_the_counter_is_lost_or_stale(spool):
    """The counter is not fsynced on every id (next_id): a power loss can leave it empty or older than the last
    id given. Start-up raises it above every id the spool holds, so no id is ever given twice."""
    first, second = (spool.jobs.submit(1, records([{"store_id": "RP00001", "visit_time": "t",
                                                     "image_url": ["http://x/a.jpg"]}])) for _ in range(2))
    for lost in (b"", b"1\n", b"\x00\x00"):
        (spool.root / "next_job_id").write_bytes(lost)
        assert Spool(spool.root).jobs.restore_counter() == second + 1
        assert Spool(spool.root).jobs.next_id() == second + 1
    spool.jobs.claim(second)
    spool.jobs.finish(second, Status.COMPLETED)
    (spool.root / "next_job_id").write_bytes(b"2\n")  # stale, as a power loss could leave it
    assert spool.upkeep.purge(second)  # the highest id: nothing names it any more ...
    assert Spool(spool.root).jobs.restore_counter() > second  # ... but purge made the counter durable first
    assert first < second


def test_results_are_durable_before_the_status_counts_them(spool, syscalls):
    from daemon.engine.outcome import ImageOutcome
    from daemon.supervisor.stores import load_store_master
    from daemon.supervisor.loop import Events, Supervisor
    from daemon.supervisor.settings import SupervisorSettings
    from tests.conftest import SAMPLE_STORE_MASTER
    job_id = spool.jobs.submit(1, records([{"store_id": "RP00001", "visit_time": "t", "image_url": ["http://x/a.jpg"]}]))
    supervisor = Supervisor(spool, load_store_master(SAMPLE_STORE_MASTER), SupervisorSettings(), runner=None,
                            events=Events())  # nothing is dispatched here: no runner needed
    supervisor.load(job_id, spool.jobs.claim(job_id))
    job = supervisor.jobs[job_id]
    del syscalls[:]
    chunk = job.pending.popleft()  # as dispatching does
    job.chunks_in_flight += 1
    supervisor.record(job, chunk, [ImageOutcome(0, 1, 1, 4, None, None, 0.2, 100)])  # what the pool returned
    supervisor.forget_finished(supervisor.recorder.flush())  # the turn's writes, all at once
    [written] = spool.results.folder(job_id).glob("00000000-00000001.*.jsonl")  # named with its checksum
    results = assert_durable_write(syscalls, written)
    status = assert_durable_write(syscalls, spool.jobs.status_path(job_id))
    finished = assert_durable_write(syscalls, spool.jobs.path("done", job_id), new_file=False)
    assert results < status < finished
