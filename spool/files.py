"""The spool's file primitives: every write is atomic (tmp/ + fsync + rename + fsync of the folder), every
read is checked (a regular file, decoded into its record type), every move keeps a durable name (a link into
the new folder, fsynced, before the old name goes). The parts of the spool (jobs.py, results.py, ...) do all
their I/O through these.

Encoding is msgspec's (records.py): the same JSON as json.dumps with compact separators, but for non-ASCII
text, which is written as UTF-8 instead of \\u escapes (both read back the same). Jobs stored before the API
refused lone UTF-16 surrogates may hold one; msgspec neither reads nor writes them, so for those files
alone json (which escapes them) is the fallback, both ways.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import msgspec

from spool.vocabulary import Folder, parse_job_id

log = logging.getLogger("retailpulse.spool")

FILE_MODE = 0o600
DIR_MODE = 0o700
T = TypeVar("T")
_ENCODER = msgspec.json.Encoder()


class CorruptFile(Exception):
    """A spool file exists but is not what it should be: it does not decode into its record, or a folder, a
    link or a FIFO stands where the file should be."""


def encode(record: object) -> bytes:
    """A record (or a list of them, a dict, ...) as the compact JSON the spool keeps."""
    try:
        return _ENCODER.encode(record)
    except UnicodeEncodeError:  # a lone surrogate from an old job: json escapes it (\udXXX)
        return json.dumps(msgspec.to_builtins(record), separators=(",", ":")).encode()


def encode_lines(records: list) -> bytes:
    """Records as JSON lines, each ending with a newline (a results file's body)."""
    try:
        return _ENCODER.encode_lines(records)
    except UnicodeEncodeError:
        return b"".join(encode(record) + b"\n" for record in records)


def decode(data: bytes, type: type[T], name: str = "") -> T:
    """``data`` as a ``type``; CorruptFile (naming ``name`` and what is wrong) when it is not one."""
    try:
        return msgspec.json.decode(data, type=type)
    except msgspec.ValidationError as exc:
        raise CorruptFile(f"{name}: {exc}") from None
    except msgspec.DecodeError as exc:
        try:  # an old file with a lone surrogate escaped in it (see the module docstring)
            return msgspec.convert(json.loads(data), type)
        except (ValueError, RecursionError, msgspec.ValidationError):
            raise CorruptFile(f"{name}: {exc}") from None


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file. A symbolic link or a folder where a spool file should be
    raises IsADirectoryError or OSError(ELOOP) without being followed; a FIFO does not block the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise IsADirectoryError(21, f"not a regular file ({stat.filemode(mode)})", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_checked(path: Path, type: type[T]) -> T:
    """The record in ``path``. CorruptFile when it does not decode into ``type``, or when a folder, a link or a
    FIFO stands where the file should be (never followed, never blocking); FileNotFoundError and other
    OSErrors (permissions) pass: those are not damage."""
    try:
        data = read_regular(path)
    except IsADirectoryError as exc:
        raise CorruptFile(f"{path.name}: {exc.strerror}, not a file") from exc
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise CorruptFile(f"{path.name}: a symbolic link, not a file") from exc
    return decode(data, type, path.name)


def ids_in(folder: Path, suffix: str = "json") -> list[int]:
    """Ids of the well-named ``<id>.<suffix>`` files in ``folder``, oldest (smallest) first."""
    ids = []
    for entry in os.scandir(folder):
        stem, dot, ext = entry.name.partition(".")
        job_id = parse_job_id(stem)
        if job_id is not None and dot and ext == suffix:
            ids.append(job_id)
    return sorted(ids)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _spool_name(path: Path) -> str:
    """``incoming/7.json``: a spool path as the log and the notes name it."""
    return f"{path.parent.name}/{path.name}"


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: str | Path, b: str | Path) -> bool:
    sa, sb = os.lstat(a), os.lstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without sending)."""
    if not 0 < pid <= 2**22:  # the kernel's largest pid (pid_max); 0 and negatives mean process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: the pid exists
    return True


class FolderSync:
    """Group commit of a folder's fsync: threads that each renamed a file into the folder and need it durable
    share one fsync instead of each making their own. A thread takes a ticket after its rename; a sync that
    starts after the ticket was taken covers it. One thread at a time runs the fsync (the leader) for every
    ticket taken before it started; the others wait for it and return (or raise its error) without a
    syscall of their own. Under load, N concurrent submits cost one fsync of incoming/, not N."""

    def __init__(self):
        self._cond = threading.Condition()
        self._taken = 0  # tickets handed out
        self._covered = 0  # tickets whose sync has ended (well or not)
        self._syncing = False
        self._failed: deque[tuple[int, int, OSError]] = deque(maxlen=64)  # (first, last ticket, error)

    def sync(self, folder: Path) -> None:
        """Return once an fsync of ``folder`` that started after this call's start has succeeded; raise the
        OSError of the one that failed instead (the caller's rename may not be durable: never assume it is)."""
        with self._cond:
            self._taken += 1
            ticket = self._taken
            while self._covered < ticket and self._syncing:
                self._cond.wait()
            if self._covered >= ticket:
                self._raise_if_failed(ticket)
                return
            self._syncing, first, last = True, self._covered + 1, self._taken
        error = None
        try:
            fsync_dir(folder)
        except OSError as exc:
            error = exc
        with self._cond:
            self._syncing, self._covered = False, last
            if error is not None:
                self._failed.append((first, last, error))
            self._cond.notify_all()
        if error is not None:
            raise error

    def _raise_if_failed(self, ticket: int) -> None:
        for first, last, error in self._failed:
            if first <= ticket <= last:
                raise error


class SpoolFiles:
    """The primitives, bound to one spool's root (its tmp/ and corrupt/ folders). Safe to share between the
    threads of a process: concurrent durable writes into one folder share its fsync (FolderSync)."""

    def __init__(self, root: Path):
        self.root = root
        self._tmp = os.path.join(root, Folder.TMP)  # paths as text on the hot path: pathlib costs more than I/O
        self._syncs: dict[str, FolderSync] = {}
        self._syncs_lock = threading.Lock()

    def sync_folder(self, folder: str | Path) -> None:
        """fsync ``folder``, shared with the other threads of this process that need the same (FolderSync)."""
        folder = os.fspath(folder)
        with self._syncs_lock:
            syncer = self._syncs.get(folder) or self._syncs.setdefault(folder, FolderSync())
        syncer.sync(folder)

    def _write_tmp(self, dest: str, data: bytes, durable: bool) -> str:
        """``data`` in a new tmp/ file named after ``dest``, fsynced when ``durable``; removed on any error."""
        tmp = f"{self._tmp}/{os.path.basename(dest)}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def write_atomic(self, dest: Path, data: bytes, durable: bool = True) -> None:
        """Write ``data`` to ``dest`` so that readers see the old file or the whole new one, never a part.

        ``durable``: also fsync the file and the folder, so the write survives a power loss once this returns.
        """
        [error] = self.write_all([(dest, data)], durable)
        if error is not None:
            raise error

    def publish(self, dest: Path, data: bytes) -> None:
        """write_atomic for a file another process takes from its folder (a job into incoming/): held under an
        exclusive flock from before it appears until its folder is fsynced, so the taker (Jobs.claim) leaves
        it alone meanwhile. If that fsync fails (EIO), the file is taken back out of the folder before the
        error is raised: the caller answers that it was not stored, and nothing stored it behind its back.
        (After a failed fsync nothing says what the disk holds; another fsync would not prove more.)"""
        tmp = self.root / Folder.TMP / f"{dest.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fsync(fd)
            os.replace(tmp, dest)
            try:
                self.sync_folder(dest.parent)  # shared with the other submits of this moment (FolderSync)
            except OSError:
                os.replace(dest, tmp)  # taken back: the taker never held it (it waits for the lock)
                raise
            # Unlocked before the close: the close is what wakes the daemon (IN_CLOSE_WRITE, spool/watch.py),
            # and the kernel reports it before it drops a lock the close would release.
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def write(self, dest: Path, record: object, durable: bool = True) -> None:
        """A record, encoded, written as write_atomic writes."""
        self.write_atomic(dest, encode(record), durable)

    def write_all(self, items: Sequence[tuple[str | Path, bytes]], durable: bool = True,
                  folders: bool = True) -> list[OSError | None]:
        """Write several files as write_atomic writes each, sharing their folders' fsyncs: every file is
        written (and fsynced), then renamed into place, then each folder is fsynced once. For each item, in
        order: None once it is in place (durable, when asked), or the OSError that kept it from being so.

        ``folders=False`` (with ``durable``): each file's bytes are fsynced before its rename, but not its
        folder: after a power cut a reader finds the old file or the whole new one, never a name whose bytes
        were lost (which a later fsync of the folder by anyone would otherwise make durable). For files whose
        loss is harmless, as long as they are never garbage (a running job's status)."""
        errors: list[OSError | None] = [None] * len(items)
        renamed: dict[str, list[int]] = {}
        for i, (dest, data) in enumerate(items):
            dest = os.fspath(dest)
            try:
                tmp = self._write_tmp(dest, data, durable)
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    _unlink(tmp)
                    raise
            except OSError as exc:
                errors[i] = exc
                continue
            renamed.setdefault(os.path.dirname(dest), []).append(i)
        if durable and folders:
            for folder, written in renamed.items():
                try:
                    self.sync_folder(folder)
                except OSError as exc:
                    for i in written:
                        errors[i] = exc
        return errors

    def rename(self, src: str | Path, dest: str | Path) -> None:
        """Move a file, durably: rename_all for one."""
        [error] = self.rename_all([(src, dest)])
        if error is not None:
            raise error

    def rename_all(self, moves: Sequence[tuple[str | Path, str | Path]]) -> list[OSError | None]:
        """Move files, each durably, so that a power cut at any instant leaves each under one of its names at
        least; moves that share folders share those folders' fsyncs (what one turn of the daemon moves).

        Across folders the new name is linked and its folder fsynced before the old name is removed and its
        folder fsynced: with a plain rename, any fsync of the source folder (another job stored there
        meanwhile) makes the removal durable before the new name is, and the file is lost. A cut between the
        two leaves both names; the later state is the true one, and the daemon's start-up removes the stale
        name (Upkeep.remove_stale_names). Over an existing file it is a rename: the old file stays until the
        new one replaces it. For each move, in order: None once it is durable, or its OSError (a move whose
        new name's folder could not be fsynced keeps its old name too)."""
        errors: list[OSError | None] = [None] * len(moves)
        linked, replaced = [], []  # indexes: old name still to remove / moved by a rename
        pairs = [(os.fspath(src), os.fspath(dest)) for src, dest in moves]
        for i, (src, dest) in enumerate(pairs):
            try:
                if os.path.dirname(src) == os.path.dirname(dest):
                    os.replace(src, dest)
                    replaced.append(i)
                    continue
                try:
                    os.link(src, dest, follow_symlinks=False)
                except FileExistsError:
                    if not _same_file(src, dest):
                        os.replace(src, dest)
                        replaced.append(i)
                        continue
                    os.unlink(dest)  # a retry after a failed fsync: the link is made anew, not trusted
                    os.link(src, dest, follow_symlinks=False)
                except FileNotFoundError:
                    raise
                except OSError:  # no hard link to a folder (a folder moved aside to corrupt/): renamed instead
                    os.replace(src, dest)
                    replaced.append(i)
                    continue
                linked.append(i)
            except OSError as exc:
                errors[i] = exc
        self._sync_folders_of([pairs[i][1] for i in (*linked, *replaced)], [*linked, *replaced], errors)
        gone = []
        for i in linked:
            if errors[i] is None:
                try:
                    os.unlink(pairs[i][0])
                    gone.append(i)
                except OSError as exc:
                    errors[i] = exc
        moved_across = gone + [i for i in replaced if errors[i] is None
                               and os.path.dirname(pairs[i][0]) != os.path.dirname(pairs[i][1])]
        self._sync_folders_of([pairs[i][0] for i in moved_across], moved_across, errors)
        return errors

    def _sync_folders_of(self, paths: list[str], indexes: list[int], errors: list[OSError | None]) -> None:
        """fsync the folder of each path once; a failure is the error of every index whose path is there."""
        folders: dict[str, list[int]] = {}
        for path, i in zip(paths, indexes):
            folders.setdefault(os.path.dirname(path), []).append(i)
        for folder, members in folders.items():
            try:
                self.sync_folder(folder)
            except OSError as exc:
                for i in members:
                    errors[i] = errors[i] or exc

    def move_aside(self, path: Path, why: str) -> Path:
        """Move an unreadable file into corrupt/ with a note, so a human can look at it. OSError when it cannot
        be moved; a note that cannot be written (a full disk) is logged instead, since the move is what counts."""
        dest = self.root / Folder.CORRUPT / f"{path.parent.name}-{path.name}.{int(time.time())}"
        if os.path.lexists(dest):  # moved aside twice within a second: keep both
            dest = dest.with_name(f"{dest.name}.{secrets.token_hex(3)}")
        self.rename(path, dest)
        try:
            self.write_atomic(dest.with_name(dest.name + ".why"), (why + "\n").encode())
        except OSError as exc:
            log.error("%s moved to corrupt/%s; its note could not be written (%s): %s", _spool_name(path),
                      dest.name, exc.strerror or exc, why)
        return dest

    def check_writable(self) -> None:
        """Create and remove a file under tmp/ (named as every tmp/ file is); raises OSError when that fails."""
        probe = self.root / Folder.TMP / f"write-probe.{os.getpid()}.{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        probe.unlink()
