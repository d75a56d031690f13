"""Requests to the daemon about a job (control/<id>.<verb>, records.py ControlRequest): cancel, requeue,
requeue-failed. The API (cancel) and retailpulse-ctl write them; only the daemon carries them out, since
only the daemon moves job files, so requests never race with the work. It removes each once done (one still
there after a crash is carried out again at restart); whoever asked waits for the file to go, then reads
the job's status to say what was done."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from spool.files import SpoolFiles, read_regular
from spool.heartbeat import HeartbeatFile
from spool.records import ControlRequest
from spool.vocabulary import Control, Folder, parse_job_id, utc_now

_VERBS = tuple(Control)
log = logging.getLogger("retailpulse.spool")


class Requests:
    def __init__(self, files: SpoolFiles, heartbeat: HeartbeatFile):
        self.files, self.heartbeat, self.root = files, heartbeat, files.root

    def path(self, job_id: int, verb: Control) -> Path:
        return self.root / Folder.CONTROL / f"{job_id}.{Control(verb)}"

    def request(self, job_id: int, verb: Control) -> None:
        """Ask the daemon to cancel or requeue a job."""
        request = ControlRequest(job_id, Control(verb), utc_now())
        self.files.write_atomic(self.path(job_id, request.verb), (request.requested_at + "\n").encode())

    def pending(self, job_id: int, verb: Control) -> bool:
        """Whether a request is still waiting for the daemon."""
        return self.path(job_id, verb).exists()

    def waiting(self) -> list[ControlRequest]:
        """The requests waiting for the daemon, oldest job first. Anything in control/ that is not a request
        file (a folder, a link) is moved to corrupt/: the daemon removes what it carried out."""
        found = []
        for entry in os.scandir(self.root / Folder.CONTROL):
            stem, _, verb = entry.name.partition(".")
            job_id = parse_job_id(stem)
            if job_id is None or verb not in _VERBS:
                continue
            path = Path(entry.path)
            if not entry.is_file(follow_symlinks=False):
                try:
                    self.files.move_aside(path, "not a file: control/ holds only request files")
                except OSError as exc:  # corrupt/ not writable: the other requests still go
                    log.error("control/%s: not a file, and cannot be moved aside: %s", entry.name,
                              exc.strerror or exc)
                continue
            try:
                requested_at = read_regular(path).decode("utf-8", "replace").strip()
            except FileNotFoundError:
                continue  # carried out meanwhile
            except OSError:  # a request file this process may not read: its name says all that counts
                requested_at = ""
            found.append(ControlRequest(job_id, Control(verb), requested_at))
        return sorted(found, key=lambda r: (r.job_id, r.verb))

    def carried_out(self, request: ControlRequest) -> None:
        """The daemon did what it asks: remove it."""
        self.path(request.job_id, request.verb).unlink(missing_ok=True)

    def forget(self, job_id: int) -> None:
        """Purge: no request outlives its job."""
        for verb in Control:
            self.path(job_id, verb).unlink(missing_ok=True)

    def wait(self, job_id: int, verb: Control, timeout_s: float,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Whether the daemon carried out the request (its file gone) within ``timeout_s``; False at once when
        no daemon is at work (the request waits for one)."""
        if self.heartbeat.health() != "ok":
            return False
        deadline = clock() + timeout_s
        while self.pending(job_id, verb):
            if clock() >= deadline:
                return False
            sleep(0.02)
        return True
