"""The Retail Pulse daemon: takes jobs from the spool and measures their images. Three rooms, each importing
only the ones below it:

    supervisor/   the only part that touches the spool: claims jobs, cuts them into chunks, dispatches
                  tasks to a runner, records results, chores on a clock.             (imports runners, engine)
    runners/      where a task runs: LocalPool (pool processes on this machine) or DaskRunner (a Dask
                  cluster); both run the engine.                                     (imports engine)
    engine/       downloads and measures images on one libcurl event loop; what ships to Dask workers.
                                                                                     (imports nothing of ours)

Glossary (the code's names follow it):
    job           one submission: visits, stored as a job file in the spool; its id is an integer.
    visit         a store_id, a visit_time and a list of image URLs, as the client sent them.
    image         one URL of a visit; numbered 0..N-1 in submission order (its "index").
    chunk         images first..stop-1 of one job (``chunk_images``, 64): the unit of fairness between jobs,
                  of results files, and of work redone after a crash (supervisor/jobs.py, Chunk).
    task          a chunk handed to a runner once (a task id, the chunk's (index, url) pairs, TaskImages);
                  it ends as TaskDone or TaskLost. A chunk lost with a process goes out again as new tasks.
    pool process  one process of the local multiprocessing.Pool; runs one engine.
    worker        a Dask worker process; runs one engine. (Gunicorn's processes are "API processes".)
    engine        the event loop in one pool process or worker that downloads, measures and waits.
    outcome       what measuring one image gives (ImageOutcome): a size and perimeter, or an error.
    recorded      an image whose result is on disk; the status document's "images_done" counts them.
    notification  a finished job's completion webhook: a record in the spool's outbox/ until delivered
                  (supervisor/webhooks.py); each POST of it is an "attempt", all with one webhook-id.
"""
