"""Upkeep of a spool: checks at start-up, cleaning after crashes, retention and purge. Mixed into Spool
(spool/__init__.py, which documents the format); kept apart because neither the API nor the daemon's work
on jobs needs it, only their start-up and the daemon's housekeeping."""
from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

from spool import Control, CorruptFile, Folder, pid_exists

log = logging.getLogger("retailpulse.spool")


class Upkeep:
    """Needs Spool's layout (root, FOLDERS, paths) and primitives (move_aside, _read_json, job_ids)."""

    def permission_problem(self) -> str | None:
        """Why other local users could tamper with this spool, or None. The programs refuse to start then."""
        for path in [self.root, *(self.root / name for name in self.FOLDERS)]:
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                continue
            if mode & stat.S_IWOTH:
                return f"{path} is writable by every user (mode {stat.filemode(mode)}); chmod o-w it"
        return None

    def access_problem(self) -> str | None:
        """Why this process cannot work on the spool (a folder it may not read or write), or None."""
        for path in [self.root, *(self.root / name for name in self.FOLDERS)]:
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                return f"{path}: cannot read and write it (permissions, or a read-only file system)"
        return None

    def finished_before(self, cutoff: float, since: float = 0.0) -> list[int]:
        """Ids of the finished jobs (done/, failed/) whose final status was written before ``cutoff`` (Unix s)
        and not before ``since``."""
        ids = []
        for folder in self.FINISHED_FOLDERS:
            for job_id in self.job_ids(folder):
                try:
                    if since <= self.status_path(job_id).stat().st_mtime < cutoff:
                        ids.append(job_id)
                except FileNotFoundError:
                    continue
        return sorted(ids)

    def purge(self, job_id: int) -> bool:
        """Delete a finished job and everything about it. False (nothing deleted) if it is not finished.

        The job file goes first, so an interrupted purge leaves a job that reads as unknown or, at worst,
        a status without a job; the status goes last, and purging again finishes the work.
        """
        folder = self.job_folder(job_id)
        if folder in self.UNFINISHED_FOLDERS:
            return False
        if folder is not None:
            self.job_path(folder, job_id).unlink(missing_ok=True)
        results = self.results_dir(job_id)
        if results.exists():
            for entry in os.scandir(results):
                os.unlink(entry.path)
            results.rmdir()
        for verb in Control:
            (self.root / Folder.CONTROL / f"{job_id}.{verb}").unlink(missing_ok=True)
        self.forget_notifications(job_id)
        self.forget_key(job_id, (self.read_meta(job_id) or {}).get("idempotency_key"))  # expires with its job
        self.meta_path(job_id).unlink(missing_ok=True)
        self.status_path(job_id).unlink(missing_ok=True)
        return True

    def clean_tmp(self, older_than_s: float) -> int:
        """Remove leftovers of writes that never finished (a crash between write and rename).

        A file is a leftover when the process that wrote it no longer exists (the pid in its name; the spool
        is on one machine), or, should that pid have been reused, when it is older than ``older_than_s``.
        Anything else found there (a folder, a link) is moved to corrupt/ for a human: never fatal.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self.root / Folder.TMP):
            parts = entry.name.rsplit(".", 2)
            pid_text = parts[1] if len(parts) == 3 else ""
            writer = int(pid_text) if pid_text.isascii() and pid_text.isdigit() and len(pid_text) < 12 else None
            try:
                if not entry.is_file(follow_symlinks=False):
                    self.move_aside(Path(entry.path), "not a file: tmp/ holds only files being written")
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
        for job_id in self.job_ids(Folder.META):
            try:
                meta = self.meta_path(job_id).lstat()
                if (stat.S_ISREG(meta.st_mode) and meta.st_mtime < cutoff and self.job_folder(job_id) is None
                        and not self.status_path(job_id).exists()):
                    orphans.append(job_id)
            except FileNotFoundError:
                continue
        return orphans

    def unreadable_status_ids(self) -> list[int]:
        """Ids whose status file exists but does not parse (a disk that lied about a write, a human edit), or
        is a folder or link. One this process may not read (permissions) is not corrupt: it is logged, left
        alone, and the API answers 503 naming it until an operator fixes it."""
        ids = []
        for job_id in self.job_ids(Folder.STATUS):
            try:
                self._read_json(self.status_path(job_id))
            except CorruptFile:
                ids.append(job_id)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("status/%d.json: cannot read it (%s); left alone, fix its owner or mode",
                          job_id, exc.strerror or exc)
        return ids
