"""The spool's file primitives: every write is atomic (tmp/ + fsync + rename + fsync of the folder), every
read is checked (a regular file, decoded into its record type), every move is a rename whose folders are
fsynced. The parts of the spool (jobs.py, results.py, ...) do all their I/O through these.

Encoding is msgspec's (records.py): the same JSON as json.dumps with compact separators, but for non-ASCII
text, which is written as UTF-8 instead of \\u escapes (both read back the same). Jobs stored before the API
refused lone UTF-16 surrogates may hold one; msgspec neither reads nor writes them, so for those files
alone json (which escapes them) is the fallback, both ways.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
import time
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


def _spool_name(path: Path) -> str:
    """``incoming/7.json``: a spool path as the log and the notes name it."""
    return f"{path.parent.name}/{path.name}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def write(self, dest: Path, record: object, durable: bool = True) -> None:
        """A record, encoded, written as write_atomic writes."""
        self.write_atomic(dest, encode(record), durable)

    def rename(self, src: Path, dest: Path) -> None:
        """Move a file, durably: both folders are fsynced, so after a power loss it is in one of them."""
        os.replace(src, dest)
        fsync_dir(dest.parent)
        if src.parent != dest.parent:
            fsync_dir(src.parent)

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
