"""What the daemon accepts from a Dask worker: results as checked JSON, and, from Dask's own messages, only
exceptions and plain values, never a pickle that runs code (daemon/runners/plain_data.py)."""
import os
import pickle

import pytest

from daemon.engine.outcome import ErrorKind, ImageOutcome
from daemon.runners import Loss, TaskDone, TaskLost
from daemon.runners.plain_data import InvalidResult, NotPlainData, encode_result, parse_result, plain_loads

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
from distributed.core import Status, error_message  # noqa: E402
from distributed.scheduler import KilledWorker, WorkerState  # noqa: E402

IMAGES = [(4, "http://x/a.jpg"), (5, "http://x/b.jpg")]
OUTCOMES = [ImageOutcome(4, 64, 48, 224, None, None, 0.25, 1000),
            ImageOutcome(5, None, None, None, "HTTP 404 (permanent, 1 attempt)", ErrorKind.HTTP_4XX, 0.01, 0)]


def test_a_result_goes_through_as_json_and_comes_back_the_same():
    event, worker = parse_result(7, encode_result("tls://10.0.0.7:8790", OUTCOMES), IMAGES)
    assert event == TaskDone(7, OUTCOMES) and worker == "tls://10.0.0.7:8790"
    event, _ = parse_result(7, encode_result("tls://w", lost="no engine", cause=Loss.RAISED), IMAGES)
    assert event == TaskLost(7, "no engine", Loss.RAISED, where="tls://w")


@pytest.mark.parametrize("doc, why", [
    (b"\x80\x04K\x01.", "not JSON"),
    (b'{"done": []}', "naming its worker"),
    (b'{"worker": "w", "done": [[4, 64, 48, 224, null, null, 0.1, 1]]}', "1 outcomes for 2 images"),
    (b'{"worker": "w", "done": [[5, 64, 48, 224, null, null, 0.1, 1], [4, 1, 1, 4, null, null, 0, 0]]}',
     "the row is for image 5"),
    (b'{"worker": "w", "done": [[4, 64, 48, 999, null, null, 0.1, 1], [5, 1, 1, 4, null, null, 0, 0]]}',
     "perimeter 999"),
    (b'{"worker": "w", "done": [[4, 64, 48, 224, null, null, -1, 1], [5, 1, 1, 4, null, null, 0, 0]]}',
     "seconds or bytes"),
    (b'{"worker": "w", "done": [[4, null, null, null, "x", "rm -rf", 0, 0], [5, 1, 1, 4, null, null, 0, 0]]}',
     "without its kind"),
    (b'{"worker": "w", "lost": "x", "cause": "exploded"}', "its reason or cause"),
])
def test_a_result_that_is_not_what_the_task_makes_is_refused_with_the_reason(doc, why):
    with pytest.raises(InvalidResult, match=why):
        parse_result(7, doc, IMAGES)
    with pytest.raises(InvalidResult):
        parse_result(7, {"a": "dict, not bytes"}, IMAGES)


def test_the_exceptions_dask_sends_are_rebuilt_from_their_real_pickles():
    worker = WorkerState(address="tls://10.0.0.7:8790", pid=1, name="w", nthreads=2, memory_limit=1,
                         local_directory="/", nanny=None, server_id="Worker-1", status=Status.running)
    worker._occupancy_cache = 0.5  # what clean() reads of the scheduler's bookkeeping
    killed = plain_loads(pickle.dumps(KilledWorker(task="k", last_worker=worker.clean(), allowed_failures=0)))
    assert isinstance(killed, KilledWorker) and killed.last_worker.address == "tls://10.0.0.7:8790"
    try:
        import retailpulse_no_such_module  # noqa: F401
    except ImportError as exc:
        sent = error_message(exc)  # what a worker sends for a task that raised, traceback and all
    raised = plain_loads(sent["exception"].data)
    assert type(raised) is ModuleNotFoundError and "retailpulse_no_such_module" in str(raised)
    assert plain_loads(sent["traceback"].data) is None  # a traceback is not rebuilt: it would compile code


class RunsCode:
    def __reduce__(self):
        return os.system, ("true",)


def test_a_pickle_that_names_a_function_or_any_other_class_is_refused():
    for evil in (pickle.dumps(RunsCode()), pickle.dumps(os.getcwd), pickle.dumps(ValueError(RunsCode()))):
        with pytest.raises(NotPlainData):
            plain_loads(evil)
