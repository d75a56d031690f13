"""The spool: the on-disk contract between the API and the daemon, and the only state either keeps.

Everything below lives under one root folder (the ``spool_dir`` setting; folder names: the Folder enum).
The folder a job file is in *is* the job's state; every change is a write under ``tmp/`` + fsync +
``os.replace`` + fsync of the folder, so a reader never sees half a file and after a crash the state is
whatever the last rename said (as in Maildir). Each file holds one record whose type (records.py) is named
in [brackets] below: its fields, their meaning, and which are optional are there, in code, once.

    daemon.lock            held (filelock) by the one daemon working on this spool; a second one refuses to start.
    next_job_id            text, one integer: the id the next submission gets. Rewritten in place by the API
                           under an flock of the file itself, so ids only increase, across processes and
                           restarts; raised by the daemon past the id of a job file dropped into incoming/ by
                           hand. Not fsynced each time: a job's meta file (or its job file) is what makes its id
                           taken for good, so both programs raise the counter above every id the spool holds
                           when they start, and purge makes it durable before deleting (jobs.py, next_id). The
                           one file not replaced by a rename: it only grows. (A next_job_id.lock left by
                           versions before 2026-12 is unused.) Lock files are empty, mode 0600 like every other
                           file.
    tmp/                   files being written, named <final name>.<writer pid>.<random>. Never read.
                           Leftovers of a crash (writer pid gone, or older than an hour) are removed by
                           the daemon at start-up and every ten minutes; anything named otherwise goes
                           to corrupt/.
    meta/<id>.json         [JobMeta] a few facts about a job (images, the API token's name that submitted
                           it, its Idempotency-Key's digest, its callback_url), written by the API just
                           before its job file, never changed. Small, so the API counts queued images and
                           checks owners without reading job files.
    idempotency/<digest>.json
                           [KeyRecord] an Idempotency-Key and the job it made (keys.py), written by the API
                           after the job's meta file and before its job file. <digest> is the SHA-256 hex of
                           owner and key (keys are per token). It counts only while its job exists, so a
                           crash between the writes leaves no key; purge (retention) removes it with its
                           job, the daemon removes orphans.
    idempotency/<xx>.lock  flock held while a submit with a key whose digest starts with the hex digits xx
                           runs (256 shards, so unrelated keys rarely wait on each other).
    outbox/<id>.json       [Notification] a completion webhook to deliver (outbox.py): the job has a
                           callback_url and reached completed or failed. Written by the daemon before the
                           job's final status, rewritten after each attempt; delivered only once the job
                           file is in done/ or failed/.
    sent/<id>.json         the same record once its delivery is over (state delivered or gave_up); kept
                           until its job is purged.
    daemon.json            [Heartbeat] the daemon's heartbeat (heartbeat.py), rewritten every second while its
                           main loop runs (not fsynced: after a crash it is stale anyway, and says so by its
                           age): its pid, where the work runs and on which workers, what is in flight, whether
                           it is paused (a full disk), its counters; and the machine's monotonic clock at
                           the beat with the boot it counts from, by which readers age it. /healthz,
                           /metrics, backpressure and retailpulse-ctl read it.
    control/<id>.<verb>    [ControlRequest] a request to the daemon about a job (control.py; verbs: the
                           Control enum): cancel, requeue (all its images) or requeue-failed (only its failed
                           images). Written by the API (cancel) or retailpulse-ctl; its one line says when.
                           The daemon carries it out and removes it.
    incoming/<id>.json     [JobFile] a submitted job, complete, not yet claimed. Written by the API (or a
                           hand: then it has no meta file). Any other name here is moved to corrupt/.
    active/<id>.json       the same file, claimed (renamed) by the daemon, which is working on it.
    done/<id>.json         the job file once every image has a result and none failed.
    failed/<id>.json       the job file once every image has a result and at least one failed.
    corrupt/<name>         any file that could not be parsed, moved aside for a human with a .why note.
    status/<id>.json       [JobStatus] the job's status as the API serves it (jobs.py). Written by the
                           daemon only; readers fill in its callback's delivery from outbox/ or sent/.
                           Each write that counts recorded images is fsynced; while a job runs it is also
                           rewritten about once a second for "images_processed" alone, without fsync (that
                           figure is not durable: daemon/supervisor/progress.py).
                           A job with no status file yet but a job file in incoming/ or active/ is
                           "ongoing" with phase "queued".
    results/<id>/<first>-<stop>.<crc32>.jsonl
                           [ResultLine] results of images first .. stop-1 (zero-padded, half-open), one a
                           line, in submission order (results.py); <crc32>: 8 hex digits, zlib's CRC-32 of
                           the file's bytes. Written by the daemon once per finished chunk, and by a cancel
                           for the images it cancels, in files of up to 4,096 images. Checked by every
                           reader: the checksum, exactly stop-first whole lines, the first and last of images
                           first and stop-1; a finished job's files cover 0..N-1 with no gap. Files named
                           <first>-<stop>.jsonl (written before checksums) are checked line by line.

Power loss: a file's data is durable once fsynced, a name once its folder is (every folder, the spool's own
included, is fsynced after it is made). A move between folders links the new name and fsyncs its folder
before it removes the old name and fsyncs that one, so a power cut leaves a job under one name at least; one
left under two names is in the later state (done/ or failed/, then active/, then incoming/), and the daemon
removes the stale name at start-up. The API holds a job file it stores in incoming/ under flock until that
folder's fsync returns, and takes it back if the fsync failed; the daemon claims no job file so held
(tests/test_power_loss.py cuts and fails these writes).

Any file named by a spool folder must be a regular file, and results/<id> a folder: anything else in its
place (a folder, link or FIFO; a file or link) is read as corrupt and moved to corrupt/, never followed.

Images are numbered 0..N-1 in submission order (visit by visit, URL by URL); that number is a result's
"index". Code: vocabulary.py (the words: Status, Phase, Folder, Control, the job-id check), records.py (the
types), files.py (atomic write, checked read, rename with folder fsync), and one part per noun, each given
only the parts it needs: Spool(root).jobs, .results, .keys, .outbox, .control, .heartbeat, .upkeep.
"""
from __future__ import annotations

import os
from pathlib import Path

import filelock

from spool.control import Requests
from spool.files import DIR_MODE, FILE_MODE, CorruptFile, SpoolFiles, fsync_dir, pid_exists
from spool.heartbeat import HeartbeatFile
from spool.jobs import Jobs
from spool.keys import KeyBusy, KeyReused, Keys
from spool.outbox import Outbox
from spool.records import JobStatus
from spool.results import DamagedResults, Results, UnreadableResults
from spool.upkeep import Upkeep
from spool.vocabulary import (FINISHED_FOLDERS, JOB_FOLDERS, JOB_ID_PATTERN, UNFINISHED_FOLDERS, Control,
                              DeliveryState, Executor, Folder, Phase, Status, parse_job_id, utc_now)

__all__ = ["CorruptFile", "Control", "DamagedResults", "DeliveryState", "Executor", "FINISHED_FOLDERS", "Folder",
           "JOB_FOLDERS", "JOB_ID_PATTERN", "KeyBusy", "KeyReused", "Phase", "Spool", "Status", "UNFINISHED_FOLDERS",
           "UnreadableResults", "parse_job_id", "pid_exists", "utc_now"]


class Spool:
    """One spool folder and its parts. Holds no state but its root; every part is safe to use from any number
    of processes at once (the atomic renames and the lock files see to that)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.files = SpoolFiles(self.root)
        self.jobs = Jobs(self.files)
        self.results = Results(self.files)
        self.keys = Keys(self.files, self.jobs)
        self.outbox = Outbox(self.files)
        self.heartbeat = HeartbeatFile(self.files)
        self.control = Requests(self.files, self.heartbeat)
        self.upkeep = Upkeep(self.files, self.jobs, self.results, self.keys, self.outbox, self.control)

    def create(self) -> Spool:
        """Make the folders (idempotent), readable by the owner only, and durably: a folder's own entry
        survives a power cut only once the folder holding it is fsynced, and with it every job inside."""
        old_umask = os.umask(0o077)
        made = [path for path in (self.root, *self.root.parents) if not path.exists()]
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            for name in Folder:
                try:
                    (self.root / name).mkdir(mode=DIR_MODE)
                    made.append(self.root / name)
                except FileExistsError:  # made before, or by the other program starting at the same time
                    pass
        finally:
            os.umask(old_umask)
        for parent in sorted({path.parent for path in made}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(parent)
        return self

    def daemon_lock(self) -> filelock.FileLock:
        """The lock a daemon holds for its whole life: two daemons would both resume the jobs in active/."""
        return filelock.FileLock(str(self.root / "daemon.lock"), timeout=0, mode=FILE_MODE)

    def status(self, job_id: int) -> JobStatus | None:
        """A job's status as clients read it: the status file (or the queued status), with its callback's
        delivery filled in from the outbox. None for an unknown job; OSError when the spool cannot be read."""
        status = self.jobs.read_status(job_id)
        return None if status is None else self.outbox.with_delivery(status)

    def status_signature(self, job_id: int) -> tuple | None:
        """What status(job_id) is made of, as (inode, ctime) of its status file and of its notification's
        outbox/ and sent/ records: every rewrite is a new file, and any change to one (its mode too) moves its
        ctime, so an unchanged signature is an unchanged answer. None while there is no status file (queued,
        or unknown). Raises OSError but for missing files."""
        parts = []
        for path in (self.jobs.status_path(job_id), self.outbox.path(job_id), self.outbox.path(job_id, Folder.SENT)):
            try:
                st = os.stat(path)
                parts.append((st.st_ino, st.st_ctime_ns))
            except FileNotFoundError:
                parts.append(None)
        return tuple(parts) if parts[0] is not None else None

    def queued_images(self) -> int:
        """Images not yet done: those of jobs in incoming/ plus what the daemon last said remains in active/."""
        waiting = 0
        for job_id in self.jobs.ids(Folder.INCOMING):
            meta = self.jobs.read_meta(job_id)
            waiting += meta.images if meta is not None else 0
        beat = self.heartbeat.read()
        return waiting + (beat.images_remaining_active if beat is not None else 0)
