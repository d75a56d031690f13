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
from spool.files import CorruptFile, SpoolFiles, fsync_dir, pid_exists, read_checked
from spool.jobs import Jobs
from spool.keys import Keys
from spool.outbox import Outbox
from spool.records import JobStatus
from spool.results import Results
from spool.vocabulary import FINISHED_FOLDERS, JOB_FOLDERS, UNFINISHED_FOLDERS, Folder

log = logging.getLogger("retailpulse.spool")
#: What every writer names its tmp/ files (files.py): <final name>.<writer pid>.<random hex>.
_TMP_NAME = re.compile(r".+\.[0-9]+\.[0-9a-f]+", re.ASCII)
#: A time-bounded purge deletes this many jobs between looks at the clock: they share their folders' fsyncs,
#: and a batch takes well under a second (a dozen fsyncs and a few unlinks per job).
PURGE_BATCH = 256


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
        time (the API) asks again while some are left; the work per call is bounded, not the spool. Jobs go
        PURGE_BATCH at a time, sharing their folders' fsyncs (purge_all)."""
        deadline = clock() + budget_s
        candidates = [job_id for job_id in self.finished_before(cutoff) if allowed(job_id)]
        purged = []
        for start in range(0, len(candidates), PURGE_BATCH):  # one batch at least, then as the budget allows
            purged += self.purge_all(candidates[start:start + PURGE_BATCH])
            left = len(candidates) - start - PURGE_BATCH
            if left > 0 and clock() >= deadline:
                return purged, left
        return purged, 0

    def purge(self, job_id: int) -> bool:
        """Delete a finished job and everything about it. False (nothing deleted) if it is not finished."""
        return bool(self.purge_all([job_id]))

    def purge_all(self, job_ids: list[int]) -> list[int]:
        """Delete these jobs, those finished, and everything about them; the ids deleted.

        The job files go first, so an interrupted purge leaves jobs that read as unknown or, at worst, a
        status without a job; the statuses go last, and purging again finishes the work. Each removal is made
        durable (its folder fsynced), the job files' first: a purge answered is not undone by a power cut, and
        one cut short leaves the same as one interrupted. The id counter is made durable before anything goes
        (its ids must stay taken after a power loss, though nothing names them), and jobs purged together
        share every folder's fsync: a purge of thousands costs a dozen fsyncs, not thousands."""
        finished = [(job_id, folder) for job_id in job_ids
                    if (folder := self.jobs.folder_of(job_id)) not in UNFINISHED_FOLDERS]
        if not finished:
            return []
        self.jobs.remember_counter()
        for job_id, folder in finished:
            if folder is not None:
                self.jobs.path(folder, job_id).unlink(missing_ok=True)
        for folder in {folder for _, folder in finished if folder is not None}:
            self.files.sync_folder(self.root / folder)
        for job_id, _ in finished:
            self.results.remove(job_id)
            self.control.forget(job_id)
            self.outbox.forget(job_id)
            meta = self.jobs.read_meta(job_id)
            if meta is not None and meta.idempotency_key:
                self.keys.forget(job_id, meta.idempotency_key)  # the key expires with its job
            self.jobs.meta_path(job_id).unlink(missing_ok=True)
            self.jobs.status_path(job_id).unlink(missing_ok=True)
        for name in (Folder.RESULTS, Folder.CONTROL, Folder.OUTBOX, Folder.SENT, Folder.IDEMPOTENCY, Folder.META,
                     Folder.STATUS):
            self.files.sync_folder(self.root / name)
        return [job_id for job_id, _ in finished]

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

    def remove_stale_names(self) -> list[tuple[int, Folder]]:
        """A job file under two names (a power cut between the two folder fsyncs of its rename): keep the
        later state (done/failed over active over incoming, the order renames move a job, and requeue's
        own request stays until its move is done), remove the earlier name durably. What was removed."""
        seen: dict[int, Folder] = {}
        removed = []
        for folder in reversed(JOB_FOLDERS):
            for job_id in self.jobs.ids(folder):
                if job_id not in seen:
                    seen[job_id] = folder
                    continue
                self.jobs.path(folder, job_id).unlink(missing_ok=True)
                removed.append((job_id, folder))
        for folder in {folder for _, folder in removed}:
            fsync_dir(self.root / folder)
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
