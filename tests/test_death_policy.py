"""The pure rules of the runner/supervisor seam, in milliseconds: what becomes of a lost task's chunk
(jobs.after_loss), what a lost task's answer says (the same from a pool process as from a Dask worker), and
when a pool process or worker counts as stalled (runners.Progress)."""
from daemon.engine.outcome import ErrorKind
from daemon.runners import Loss, Message, Progress, Stall, TaskLost
from daemon.runners.plain_data import encode_result, parse_result
from daemon.runners.pool import answer_event
from daemon.runners.sandbox import STOPPED, loss_of
from daemon.supervisor.jobs import Chunk, after_loss


def test_a_chunk_lost_through_no_fault_goes_out_again_as_it_was_at_once():
    chunk = Chunk(1, 0, 64, deaths=1, failures=1)
    assert after_loss(chunk, Loss.AWAY, 3).retry == (chunk,)
    assert after_loss(chunk, Loss.AWAY, 3).delay_s == 0


def test_a_death_isolates_then_halves_then_fails_the_image_alone():
    first = after_loss(Chunk(1, 0, 64), Loss.DIED, 3)
    assert first.retry == (Chunk(1, 0, 64, deaths=1),) and first.delay_s == 0
    assert after_loss(Chunk(1, 0, 64, deaths=1), Loss.DIED, 3).retry == (Chunk(1, 0, 32, 2), Chunk(1, 32, 64, 2))
    verdict = after_loss(Chunk(1, 7, 8, deaths=2), Loss.DIED, 3)
    assert verdict.give_up == "the process measuring this image died each time (3 attempts)"
    assert verdict.kind is ErrorKind.WORKER_DIED


def test_a_task_that_cannot_run_counts_against_its_whole_chunk_with_a_growing_wait_then_fails_it():
    chunk, waits = Chunk(1, 0, 64), []
    for _ in range(2):
        verdict = after_loss(chunk, Loss.RAISED, 3, "TypeError: measure_task() takes 1 positional argument")
        (chunk,) = verdict.retry
        waits.append(verdict.delay_s)
    assert chunk == Chunk(1, 0, 64, deaths=0, failures=2)  # whole: a failure says nothing about one image
    assert waits == [1.0, 2.0]
    verdict = after_loss(chunk, Loss.RAISED, 3, "TypeError: measure_task() takes 1 positional argument")
    assert verdict.retry == () and verdict.kind is ErrorKind.TASK_FAILED
    assert verdict.give_up == ("the task could not run on the cluster (3 attempts): "
                               "TypeError: measure_task() takes 1 positional argument")


def test_deaths_and_failures_are_counted_apart():
    verdict = after_loss(Chunk(1, 0, 2, deaths=1, failures=2), Loss.DIED, 3)
    assert verdict.retry == (Chunk(1, 0, 1, 2, 2), Chunk(1, 1, 2, 2, 2))


def test_a_holder_is_stalled_when_it_holds_tasks_and_finishes_none_for_the_timeout():
    progress = Progress(timeout_s=10)
    progress.holding("pool process 1", 2, now=100)
    progress.holding("pool process 2", 1, now=100)
    assert progress.stalled(now=109) == []
    progress.finished("pool process 2", now=105)  # it keeps finishing: fine
    progress.holding("pool process 1", 3, now=106)  # more work does not reset its clock
    assert progress.stalled(now=111) == [Stall("pool process 1", 3, 11)]
    assert progress.changes(now=111) == ([Stall("pool process 1", 3, 11)], [])
    assert progress.changes(now=112) == ([], [])  # logged once
    progress.finished("pool process 1", now=113)
    assert progress.stalled(now=114) == [] and progress.changes(now=114) == ([], ["pool process 1"])


def test_an_idle_holder_is_never_stalled_and_its_clock_starts_when_it_takes_work():
    progress = Progress(timeout_s=10)
    progress.holding("w", 1, now=0)
    progress.holding("w", 0, now=5)  # finished its last task: idle
    progress.holding("w", 1, now=50)
    assert progress.stalled(now=59) == [] and progress.stalled(now=60) == [Stall("w", 1, 10)]
    progress.forget("w")
    assert progress.stalled(now=100) == []


def test_a_lost_task_says_why_and_its_cause_the_same_from_a_pool_process_as_from_a_dask_worker():
    images = [(0, "http://img.example/a.jpg")]
    for why in ("the isolated process was killed by SIGKILL", STOPPED):
        pool = answer_event(Message.LOST, 7, [why, loss_of(why).value], "pool process 12")
        dask, _worker = parse_result(7, encode_result("tls://10.0.0.7:8790", lost=why, cause=loss_of(why)), images)
        assert pool == TaskLost(7, why, loss_of(why), where="pool process 12")
        assert (dask.why, dask.cause) == (pool.why, pool.cause)
    assert loss_of("the isolated process was killed by SIGKILL") is Loss.DIED  # its images are suspects
    assert loss_of(STOPPED) is Loss.AWAY  # sent again as it was
