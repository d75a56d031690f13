"""The runners' settings: how many pool processes, how many images each holds, where the Dask cluster is,
when a process or worker counts as stalled. Light (imports nothing of ours), so the daemon's start-up and the
settings table read them without loading multiprocessing's pool or Dask.

Each field an operator sets says so in its metadata (section, meaning, bounds; config/__init__.py reads it),
and its default is the setting's. Which runner runs is the ``executor`` setting, the supervisor's
(supervisor/settings.py): its values are the spool's vocabulary (spool.Executor, in daemon.json), which
this room does not import.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunnerSettings:
    processes: int = field(default=0, metadata={
        "section": "daemon", "min": 0, "max": 256, "help": "local pool processes; 0 means one per core"})
    images_per_process: int = field(default=4096, metadata={
        "section": "daemon", "min": 1, "max": 65536,
        "help": "images in flight at once per pool process or Dask worker (waiting for a download slot, "
                "downloading, or in their GPU wait), on one libcurl event loop; also the most a crash makes it "
                "download again"})
    dask_scheduler: str = field(default="", metadata={
        "section": "daemon", "help": "the Dask scheduler's address, e.g. tls://10.0.0.5:8786 (executor = dask)"})
    dask_tls_ca_file: str = field(default="", metadata={
        "section": "daemon", "help": "CA certificate that signed the scheduler's and workers' certificates (PEM); "
                                     "with the two below, the daemon talks TLS to the cluster"})
    dask_tls_cert_file: str = field(default="", metadata={
        "section": "daemon", "help": "the daemon's own certificate for the cluster (PEM)"})
    dask_tls_key_file: str = field(default="", metadata={
        "section": "daemon", "help": "the key of dask_tls_cert_file (PEM)"})
    min_workers: int = field(default=0, metadata={
        "section": "daemon", "min": 0, "max": 100000,
        "help": "the Dask workers the operator expects (executor = dask): with fewer, /healthz answers 503 "
                "(checks.capacity), /metrics has retailpulse_degraded 1 and `retailpulse-ctl health` says "
                "degraded; the work goes on, slower. 0: no expectation"})
    # Well above the longest one image can take with the default download limits (3 attempts x 30 s, 2
    # backoffs of at most 10 s, the GPU wait: about 111 s); the daemon warns when the limits set exceed it.
    stall_timeout_s: float = field(default=180.0, metadata={
        "section": "daemon", "min": 1, "max": 86400,
        "help": "a pool process or Dask worker that holds tasks and finishes none for this long is stalled: "
                "/healthz answers 503 naming it, and a pool process is replaced (its images are redone)"})
