"""Upkeep of a spool: checks at start-up, cleaning after crashes, retention and purge. Apart from the other
parts because neither the API nor the daemon's work on jobs needs it, only their start-up, the daemon's
housekeeping and the operator's purge; and because purge is the one operation that touches every part."""
from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

from spool.control import Requests
from spool.files import CorruptFile, SpoolFiles, pid_exists, read_checked
from spool.jobs import Jobs
from spool.keys import Keys
from spool.outbox import Outbox
from spool.records import JobStatus
from spool.results import Results
from spool.vocabulary import FINISHED_FOLDERS, UNFINISHED_FOLDERS, Folder

log = logging.getLogger("retailpulse.spool")
#: What every writer names its tmp/ files (files.py): <final name>.<writer pid>.<random hex>.
_TMP_NAME = re.compile(r".+\.[0-9]+\.[0-9a-f]+", re.ASCII)


class Upkeep:
    def __init__(self, files: SpoolFiles, jobs: Jobs, results: Results, keys: Keys, outbox: Outbox,
                 control: Requests):
        self.files, self.root = files, files.root
        self.jobs, self.results, self.keys, self.outbox, self.control = jobs, results, keys, outbox, control

    def permission_problem(self) -> str | None:
        """Why other local users could tamper with this spool, or None. The programs refuse to start then."""
        for path in [self.root, *(self.root / name for name in Folder)]:
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                continue
            if mode & stat.S_IWOTH:
                return f"{path} is writable by every user (mode {stat.filemode(mode)}); chmod o-w it"
        return None

    def access_problem(self) -> str | None:
        """Why this process cannot work on the spool (a folder it may not read or write), or None."""
        for path in [self.root, *(self.root / name for name in Folder)]:
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                return f"{path}: cannot read and write it (permissions, or a read-only file system)"
        return None

    def finished_before(self, cutoff: float, since: float = 0.0) -> list[int]:
        """Ids of the finished jobs (done/, failed/) whose final status was written before ``cutoff`` (Unix s)
        and not before ``since``."""
        ids = []
        for folder in FINISHED_FOLDERS:
            for job_id in self.jobs.ids(folder):
                try:
                    if since <= self.jobs.status_path(job_id).stat().st_mtime < cutoff:
                        ids.append(job_id)
                except FileNotFoundError:
                    continue
        return sorted(ids)

    def purge_finished_before(self, cutoff: float, allowed: Callable[[int], bool], budget_s: float,
                              clock: Callable[[], float] = time.monotonic) -> tuple[list[int], int]:
        """Purge the finished jobs finished before ``cutoff`` that ``allowed(id)`` lets go, oldest first, for
        ``budget_s`` at most: (the ids purged, how many such jobs are left). A caller that must answer in
        time (the API) asks again while some are left; the work per call is bounded, not the spool."""
        deadline = clock() + budget_s
        candidates = self.finished_before(cutoff)
        purged = []
        for position, job_id in enumerate(candidates):  # one at least, then as many as the budget allows
            if allowed(job_id) and self.purge(job_id):
                purged.append(job_id)
                if clock() >= deadline:
                    return purged, sum(1 for left in candidates[position + 1:] if allowed(left))
        return purged, 0

    def purge(self, job_id: int) -> bool:
        """Delete a finished job and everything about it. False (nothing deleted) if it is not finished.

        The job file goes first, so an interrupted purge leaves a job that reads as unknown or, at worst,
        a status without a job; the status goes last, and purging again finishes the work.
        """
        folder = self.jobs.folder_of(job_id)
        if folder in UNFINISHED_FOLDERS:
            return False
        if folder is not None:
            self.jobs.path(folder, job_id).unlink(missing_ok=True)
        self.results.remove(job_id)
        self.control.forget(job_id)
        self.outbox.forget(job_id)
        meta = self.jobs.read_meta(job_id)
        if meta is not None and meta.idempotency_key:
            self.keys.forget(job_id, meta.idempotency_key)  # the key expires with its job
        self.jobs.meta_path(job_id).unlink(missing_ok=True)
        self.jobs.status_path(job_id).unlink(missing_ok=True)
        return True

    def clean_tmp(self, older_than_s: float) -> int:
        """Remove leftovers of writes that never finished (a crash between write and rename).

        A file is a leftover when the process that wrote it no longer exists (the pid in its name; the spool
        is on one machine), or, should that pid have been reused, when it is older than ``older_than_s``.
        Anything else found there (a folder, a link, a name no writer gives) is moved to corrupt/ for a
        human: never fatal.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self.root / Folder.TMP):
            parts = entry.name.rsplit(".", 2)
            pid_text = parts[1] if len(parts) == 3 else ""
            well_named = bool(_TMP_NAME.fullmatch(entry.name))
            writer = int(pid_text) if well_named and len(pid_text) < 12 else None
            try:
                if not entry.is_file(follow_symlinks=False):
                    self.files.move_aside(Path(entry.path), "not a file: tmp/ holds only files being written")
                elif not well_named:
                    self.files.move_aside(Path(entry.path), f"tmp/{entry.name}: not a name the spool's writers "
                                                            "give (<final name>.<writer pid>.<random hex>)")
                elif (writer is not None and not pid_exists(writer)) or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def orphan_meta_ids(self, older_than_s: float) -> list[int]:
        """Ids with a meta file but no job file and no status, older than ``older_than_s``: what a submit
        that failed (full disk) or was killed between its two writes left behind."""
        cutoff = time.time() - older_than_s
        orphans = []
        for job_id in self.jobs.ids(Folder.META):
            try:
                meta = self.jobs.meta_path(job_id).lstat()
                if (stat.S_ISREG(meta.st_mode) and meta.st_mtime < cutoff and self.jobs.folder_of(job_id) is None
                        and not self.jobs.status_path(job_id).exists()):
                    orphans.append(job_id)
            except FileNotFoundError:
                continue
        return orphans

    def remove_orphan_metas(self, older_than_s: float) -> list[int]:
        """Remove the meta files orphan_meta_ids finds; their ids."""
        orphans = self.orphan_meta_ids(older_than_s)
        for job_id in orphans:
            self.jobs.meta_path(job_id).unlink(missing_ok=True)
        return orphans

    def unreadable_status_ids(self) -> list[int]:
        """Ids whose status file exists but does not parse (a disk that lied about a write, a human edit), or
        is a folder or link. One this process may not read (permissions) is not corrupt: it is logged, left
        alone, and the API answers 503 naming it until an operator fixes it."""
        ids = []
        for job_id in self.jobs.ids(Folder.STATUS):
            try:
                read_checked(self.jobs.status_path(job_id), JobStatus)
            except CorruptFile:
                ids.append(job_id)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("status/%d.json: cannot read it (%s); left alone, fix its owner or mode",
                          job_id, exc.strerror or exc)
        return ids
