"""The Retail Pulse daemon: takes jobs from the spool and measures their images. Four rooms:

    supervisor/     claims jobs, cuts them into chunks, dispatches tasks to a runner, records results,
                    carries out requests, chores on a clock; the daemon's only writer of jobs' state.
    notifications/  completion webhooks: the outbox the recorder writes, and the thread that delivers it.
    runners/        where a task runs: LocalPool (pool processes on this machine) or DaskRunner (a Dask
                    cluster); both run the engine.
    engine/         downloads and measures images on one libcurl event loop; what ships to Dask workers.

Rooms import downward, and tests/test_imports.py fails the build when one does not (an ast walk of every
import statement):

    engine/         nothing of ours
    runners/        engine/
    notifications/  engine/, spool/, config/
    supervisor/     notifications/, runners/, engine/, spool/, config/
    daemon/__main__.py, daemon/settings.py   any room of the daemon (they wire it together)
    spool/          nothing of ours: the contract every program shares
    config/         spool/
    webapi/, ctl/   spool/, config/, and each its own; never the daemon, with one exception written down:
                    webapi/validate.py imports daemon/engine/urls.py (pure, idna only), so that a URL is
                    checked at submit in exactly the form the engine will download
Start-up stays cheap: importing ctl, config or a room's settings module loads neither libcurl nor Pillow.

Glossary (the code's names follow it):
    job           one submission: visits, stored as a job file in the spool; its id is an integer.
    visit         a store_id, a visit_time and a list of image URLs, as the client sent them.
    image         one URL of a visit; numbered 0..N-1 in submission order (its "index").
    chunk         images first..stop-1 of one job (``chunk_images``, 64): the unit of fairness between jobs,
                  of results files, and of work redone after a crash (supervisor/jobs.py, Chunk).
    task          a chunk handed to a runner once (a task id, the chunk's (index, url) pairs, TaskImages);
                  it ends as TaskDone or TaskLost. A chunk lost with a process goes out again as new tasks.
    worker        whatever runs an engine for the daemon: a pool process (executor local) or a Dask worker
                  (executor dask). Hence ``workers()``, ``max_worker_deaths``, "tasks_by_worker".
    pool process  one process of the local multiprocessing.Pool: a worker on this machine.
    Dask worker   a worker of a Dask cluster, named by its address. (Gunicorn's are "API processes".)
    engine        the event loop in one worker that downloads, measures and waits.
    outcome       what measuring one image gives (ImageOutcome): a size and perimeter, or an error.
    recorded      an image whose result is on disk; the status document's "images_done" counts them.
    processed     an image with an outcome, recorded or not yet: what "images_processed" counts, so that
                  progress moves while a chunk runs (supervisor/progress.py); not durable, never recorded.
    notification  a finished job's completion webhook: a record in the spool's outbox/ until delivered
                  (notifications/); each POST of it is an "attempt", all with one webhook-id.
"""
