"""The supervisor's settings. Light: the settings table and the daemon's start-up
read them without loading the rest of the supervisor.

Each field an operator sets says so in its metadata (section, setting name when not the field's, meaning,
bounds; config/__init__.py reads it), and its default is the setting's; the other fields are fixed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spool import Executor


@dataclass(frozen=True)
class SupervisorSettings:
    store_master: Path = field(default=Path("/etc/retail-pulse/stores.csv"), metadata={
        "section": "daemon", "help": "CSV with AreaCode,StoreName,StoreID"})
    # Which runner the supervisor dispatches to; a value of the spool's (daemon.json says it), so here, where
    # the spool may be imported, and not with the runners' own settings.
    executor: Executor = field(default=Executor.LOCAL, metadata={
        "section": "daemon",
        "help": "where images are measured: local (a process pool on this machine) or dask (the Dask cluster at "
                "dask_scheduler; needs retail-pulse[dask])"})
    chunk_images: int = field(default=64, metadata={
        "section": "daemon", "min": 1, "max": 100_000,
        "help": "images per chunk: the unit of fairness between jobs, of results files and of work redone after a "
                "crash"})
    max_active_jobs: int = field(default=32, metadata={
        "section": "daemon", "min": 1, "max": 100_000,
        "help": "jobs progressing at once (their images share the pool chunk by chunk); more wait in incoming/, "
                "except small ones"})
    small_job_images: int = field(default=1000, metadata={
        "section": "daemon", "min": 0, "max": 1_000_000,
        "help": "a job of at most this many images starts at once, however many jobs run: it never waits behind a "
                "crowd of big ones"})
    poll_interval_s: float = field(default=1.0, metadata={
        "section": "daemon", "min": 0.001, "max": 86400,
        "help": "how often incoming/ and control/ are looked at without a wake-up: the kernel (inotify) tells "
                "the daemon of a new job or request at once; this is the fallback where it cannot"})
    drain_timeout_s: float = field(default=60.0, metadata={
        "section": "daemon", "min": 0, "max": 3600,
        "help": "on SIGTERM, how long in-flight images may take to finish; the rest is redone after the restart"})
    max_worker_deaths: int = field(default=3, metadata={
        "section": "daemon", "min": 1, "max": 100,
        "help": "an image whose process dies this many times is failed (a poison image); also the tries of a task "
                "that cannot run on a Dask worker before its images fail"})
    disk_retry_interval_s: float = 5.0  # while writes fail (disk full), how often they are tried again
    retention_days: float = field(default=7.0, metadata={
        "section": "daemon", "min": 0,
        "help": "finished jobs (files, status, results) older than this are deleted, checked every 10 minutes; 0 "
                "keeps them forever"})
