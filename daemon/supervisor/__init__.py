"""The supervisor side of the daemon: the only part that touches the spool.

    loop.py          Supervisor: the main loop, operator requests, admitting, dispatching, events
    loading.py       JobLoader: reading a job and its recorded results at claim and start-up, repairing
    jobs.py          Chunk, ActiveJob (a claimed job's bookkeeping) and after_loss (the death policy); pure
    recording.py     Recorder: results files, then status, then the job's folder; disk-full pauses
    housekeeping.py  chores on a clock: heartbeat, tmp/ cleaning, results checks, retention
    settings.py      SupervisorSettings
    stores.py        the store master
    metrics.py       counters for the heartbeat and /metrics
    webhooks.py      completion webhooks: the outbox the recorder writes, and the thread that delivers it
    notify.py        sd_notify for systemd

Import what you need from its module (``from daemon.supervisor.loop import Supervisor``): this file imports
nothing, so the settings table can read SupervisorSettings' defaults without loading the rest.
"""
