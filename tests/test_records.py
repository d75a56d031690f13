"""The spool's records read what earlier versions wrote, and write what earlier readers read.

tests/golden/spool-9ce1eab/ is a spool written by main at 9ce1eab (before the records were types) by running
the real API and daemon: a completed job (one URL with non-ASCII text), a failed one submitted with an
Idempotency-Key and a callback_url (unknown store; its webhook delivered after one 500), a cancelled one, a
running one and a queued one left by a daemon killed with -9 (its heartbeat with tasks held, a cancel request
waiting in control/). tests/golden/api-answers-9ce1eab.json is what that version's API answered on it."""
import json
import shutil
from pathlib import Path

import pytest

from spool import Spool
from spool.files import decode, encode
from spool.records import (ControlRequest, Heartbeat, JobFile, JobMeta, JobStatus, KeyRecord, Notification,
                           ResultLine)
from tests.conftest import call_wsgi
from webapi.app import make_app

GOLDEN = Path(__file__).resolve().parent / "golden"
WRITTEN_BY_9CE1EAB = GOLDEN / "spool-9ce1eab"
RECORD_OF = {"incoming": JobFile, "active": JobFile, "done": JobFile, "failed": JobFile, "meta": JobMeta,
             "status": JobStatus, "sent": Notification, "outbox": Notification, "idempotency": KeyRecord}


@pytest.fixture
def old_spool(tmp_path) -> Spool:
    shutil.copytree(WRITTEN_BY_9CE1EAB, tmp_path / "spool")
    return Spool(tmp_path / "spool").create()


def golden_files():
    return sorted(p for p in WRITTEN_BY_9CE1EAB.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: str(p.relative_to(WRITTEN_BY_9CE1EAB)))
def test_every_file_an_older_version_wrote_decodes_into_its_record(path):
    folder = path.relative_to(WRITTEN_BY_9CE1EAB).parts[0]
    data = path.read_bytes()
    if path.name == "daemon.json":
        record = decode(data, Heartbeat, path.name)
    elif folder == "results":
        record = decode(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]", list[ResultLine], path.name)
        data = b"[" + b",".join(data.splitlines()) + b"]"
    elif folder in RECORD_OF:
        record = decode(data, RECORD_OF[folder], path.name)
    else:  # next_job_id, control/<id>.<verb>: one line of text
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        return
    # What this version writes of it is what the older version wrote, value for value (its readers read it).
    assert json.loads(encode(record)) == json.loads(data)


def test_hot_records_are_written_byte_for_byte_as_before():
    """A status and the result lines, the records written most, keep their bytes exactly (field order and
    all); only non-ASCII text differs (UTF-8 now, \\u escapes before; both read back the same)."""
    for path in (WRITTEN_BY_9CE1EAB / "status").iterdir():
        assert encode(decode(path.read_bytes(), JobStatus)) == path.read_bytes()
    for path in (WRITTEN_BY_9CE1EAB / "results" / "2").iterdir():
        lines = path.read_bytes().splitlines()
        assert [encode(decode(line, ResultLine)) for line in lines] == lines


def test_the_parts_read_an_older_spool(old_spool):
    assert old_spool.jobs.ids("done") == [1] and old_spool.jobs.ids("failed") == [2, 3]
    assert old_spool.jobs.read(old_spool.jobs.path("failed", 2)).callback_url.endswith("/hooks/retail-pulse")
    assert old_spool.jobs.read_meta(2).idempotency_key == "8e807fabca9e2a8dcd5f0e551264323c53f21dfef212245e561c5e55917a3934"
    assert old_spool.keys.record(old_spool.jobs.read_meta(2).idempotency_key).job_id == 2
    assert old_spool.outbox.read(2, "sent").attempts == 2
    assert old_spool.heartbeat.read().tasks_by_worker == {"pool process 9543": 1, "pool process 9542": 1}
    assert old_spool.control.waiting() == [ControlRequest(5, "cancel", "2026-12-04T18:44:11Z")]
    assert old_spool.results.damage(1, total=3) is None and old_spool.results.damage(2, total=3) is None
    assert [line.perimeter for line in old_spool.results.read(1, 0, 2, old_spool.results.chunks(1)[0][2])] == \
        [2240, 2800]


def test_the_api_answers_an_older_spool_as_that_version_did(old_spool):
    """Every job's status, results (whole and paged), CSV, and the job list: the same JSON as 9ce1eab gave."""
    expected = json.loads((GOLDEN / "api-answers-9ce1eab.json").read_text())
    app = make_app(old_spool)
    for job_id in range(1, 7):
        for name, path, query in (("status", "/api/status", ""), ("results", "/api/results", ""),
                                  ("page", "/api/results", "&offset=1&limit=2"), ("csv", "/api/results.csv", "")):
            r = call_wsgi(app, "GET", path, query=f"jobid={job_id}{query}")
            body = r.json() if r.body[:1] in b"{[" else r.body.decode()
            assert [r.status_code, body] == expected[f"{name} {job_id}"], (name, job_id)
    r = call_wsgi(app, "GET", "/api/jobs")
    assert [r.status_code, r.json()] == expected["jobs"]
