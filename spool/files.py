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
import os
import secrets
import stat
import time
from pathlib import Path
from typing import TypeVar

import msgspec

from spool.vocabulary import Folder, parse_job_id

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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
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


class SpoolFiles:
    """The primitives, bound to one spool's root (its tmp/ and corrupt/ folders)."""

    def __init__(self, root: Path):
        self.root = root

    def write_atomic(self, dest: Path, data: bytes, durable: bool = True) -> None:
        """Write ``data`` to ``dest`` so that readers see the old file or the whole new one, never a part.

        ``durable``: also fsync the file and the folder, so the write survives a power loss once this returns.
        """
        tmp = self.root / Folder.TMP / f"{dest.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if durable:
            fsync_dir(dest.parent)

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
                fsync_dir(dest.parent)
            except OSError:
                os.replace(dest, tmp)  # taken back: the taker never held it (it waits for the lock)
                raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def write(self, dest: Path, record: object, durable: bool = True) -> None:
        """A record, encoded, written as write_atomic writes."""
        self.write_atomic(dest, encode(record), durable)

    def rename(self, src: Path, dest: Path) -> None:
        """Move a file, durably, so that a power cut at any instant leaves it under one of its names at least.

        Across folders the new name is linked and its folder fsynced before the old name is removed and its
        folder fsynced: with a plain rename, any fsync of the source folder (another job stored there
        meanwhile) makes the removal durable before the new name is, and the file is lost. A cut between the
        two leaves both names; the later state is the true one, and the daemon's start-up removes the stale name
        (Upkeep.remove_stale_names). Over an existing file it is a rename: the old file stays
        until the new one replaces it."""
        if src.parent != dest.parent:
            try:
                os.link(src, dest, follow_symlinks=False)
            except FileNotFoundError:
                raise
            except FileExistsError:
                if not _same_file(src, dest):
                    os.replace(src, dest)
                    fsync_dir(dest.parent)
                    fsync_dir(src.parent)
                    return
                os.unlink(dest)  # a retry after a failed fsync: the link is made anew, not trusted
                os.link(src, dest, follow_symlinks=False)
            except OSError:  # no hard link to a folder (a folder moved aside to corrupt/): renamed instead
                os.replace(src, dest)
                fsync_dir(dest.parent)
                fsync_dir(src.parent)
                return
            fsync_dir(dest.parent)
            os.unlink(src)
            fsync_dir(src.parent)
            return
        os.replace(src, dest)
        fsync_dir(dest.parent)
        if src.parent != dest.parent:
            fsync_dir(src.parent)

    def move_aside(self, path: Path, why: str) -> Path:
        """Move an unreadable file into corrupt/ with a note, so a human can look at it."""
        dest = self.root / Folder.CORRUPT / f"{path.parent.name}-{path.name}.{int(time.time())}"
        self.rename(path, dest)
        self.write_atomic(dest.with_name(dest.name + ".why"), (why + "\n").encode())
        return dest

    def check_writable(self) -> None:
        """Create and remove a file under tmp/ (named as every tmp/ file is); raises OSError when that fails."""
        probe = self.root / Folder.TMP / f"write-probe.{os.getpid()}.{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        probe.unlink()
