"""The API alone as a real process (no daemon, so nothing is ever downloaded): for tests of the HTTP path
itself, where gunicorn and not the in-process WSGI call reads the body."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from tests.service import REPO, Service, stop_processes


@contextmanager
def running_api(spool_dir: Path, *api_args: str):
    """Yields the base URL of an API on a free loopback port; stops the process on the way out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RETAILPULSE_CONFIG": os.devnull}
    proc = subprocess.Popen([sys.executable, "-m", "webapi", "--spool-dir", str(spool_dir), "--port", "0",
                             "--api-workers", "2", *api_args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield Service._read_address(proc, timeout_s=30)
    finally:
        stop_processes(proc)
        proc.stdout.close()
