"""Results files: ``results/<id>/<first>-<stop>.<crc32>.jsonl``, one ResultLine a line (records.py; where
they live and who writes them: spool/__init__.py).

Self-checking, by their names: a file named ``00000064-00000128.1a2b3c4d.jsonl`` must hold exactly 64 complete
lines, the first of image 64 and the last of image 127, whose bytes have the CRC-32 1a2b3c4d; a finished
job's files must cover images 0..N-1 without a gap. Every reader checks that before it trusts a file (as
Postfix checks a queue file's END record), so a file cut short by a disk that lied, or a line garbled,
lost or duplicated anywhere in it, is reported as damaged, never served. The checksum is computed in C
(zlib) at a gigabyte a second: every read can afford it. Files written before checksums
(``<first>-<stop>.jsonl``) are checked line by line instead: each must parse and hold its own index.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from spool.files import CorruptFile, SpoolFiles, decode, encode_lines, read_regular
from spool.records import ResultLine
from spool.vocabulary import Folder

#: How many jobs' folders Results remembers as durable; beyond that, the oldest are fsynced again if written.
DURABLE_FOLDERS_KEPT = 100_000
RESULT_NAME = re.compile(r"([0-9]{8})-([0-9]{8})(?:\.([0-9a-f]{8}))?\.jsonl")


class DamagedResults(Exception):
    """A results file is not whole, or a finished job's files leave a gap. ``path``: the file, if one."""

    def __init__(self, why: str, path: Path | None = None):
        super().__init__(why)
        self.why, self.path = why, path


class UnreadableResults(Exception):
    """A results file this process may not read (permissions) or that is no file at all. Not damage: the
    operator's to fix, so nothing is moved or redone for it."""

    def __init__(self, why: str, path: Path):
        super().__init__(why)
        self.why, self.path = why, path


def file_damage(job_id: int, first: int, stop: int, data: bytes, path: Path | None = None) -> str | None:
    """Why the bytes of results file first..stop-1 are not whole, or None. The name's checksum covers every
    byte; the line count and the first and last index say which damage it is when one is found."""
    name = f"results/{job_id}/{path.name if path is not None else f'{first:08d}-{stop:08d}.jsonl'}"
    if not data.endswith(b"\n"):
        return f"{name}: cut short (it ends in the middle of a line)"
    lines = data.count(b"\n")
    if lines != stop - first:
        return f"{name}: {lines} lines for the {stop - first} images it must hold"
    last_start = data.rindex(b"\n", 0, -1) + 1 if lines > 1 else 0
    try:
        ends = json.loads(data[:data.index(b"\n")])["index"], json.loads(data[last_start:])["index"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        return f"{name}: unreadable ({exc})"
    if ends != (first, stop - 1):
        return f"{name}: holds images {ends[0]}..{ends[1]}, not {first}..{stop - 1}"
    match = RESULT_NAME.fullmatch(path.name) if path is not None else None
    crc = match[3] if match else None
    if crc is not None and zlib.crc32(data) == int(crc, 16):
        return None
    bad_line = _first_bad_line(first, data)
    if bad_line is not None:
        return f"{name}: {bad_line}"
    if crc is not None:
        return f"{name}: its bytes do not match their checksum {crc} (changed after it was written)"
    return None


def _first_bad_line(first: int, data: bytes) -> str | None:
    """Line by line: the first line that does not parse or does not hold its own image. For files without a
    checksum (written before them), and to say where a checksum mismatch is."""
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            index = json.loads(line)["index"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return f"line {number} is garbled (not a result)"
        if index != first + number - 1:
            return f"line {number} holds image {index}, not {first + number - 1} (a line lost or duplicated)"
    return None


def _read_results_file(job_id: int, path: Path) -> bytes:
    """Its bytes; DamagedResults for a folder or link in its place (moved aside like any damage),
    UnreadableResults when this process may not read it. FileNotFoundError passes through."""
    name = f"results/{job_id}/{path.name}"
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise
    except IsADirectoryError as exc:
        raise DamagedResults(f"{name}: {exc.strerror}, not a results file", path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DamagedResults(f"{name}: a symbolic link, not a results file", path) from None
        raise UnreadableResults(f"cannot read {name}: {exc.strerror or exc}", path) from None


class Results:
    """The results files of every job: written by the daemon, read (checked) by everyone."""

    def __init__(self, files: SpoolFiles):
        self.files, self.root = files, files.root
        # Jobs whose folder's entry in results/ this process has made durable (fsynced results/ after it).
        self._folders_durable: OrderedDict[int, None] = OrderedDict()

    def folder(self, job_id: int) -> Path:
        return self.root / Folder.RESULTS / str(job_id)

    def write(self, job_id: int, first: int, stop: int, lines: list[ResultLine]) -> None:
        """Record the results of images first..stop-1 as one file. Durable when this returns. (The daemon is
        the writer: a file, link or FIFO where the job's folder should be is moved aside, never written into.)"""
        [error] = self.write_many([(job_id, first, stop, lines)])
        if error is not None:
            raise error

    def write_many(self, files: list[tuple[int, int, int, list[ResultLine]]]) -> list[OSError | None]:
        """Several results files (job id, first, stop, lines) at once, each durable when this returns, sharing
        the folders' fsyncs (files.py, write_all): what the supervisor records in one turn of its loop. A
        job's first file makes its folder, and the folder's entry in results/ is made durable too. For each
        file: None, or the OSError that kept it from being written."""
        made, errors, items, where = [], [None] * len(files), [], []
        results = os.path.join(self.root, Folder.RESULTS)
        for i, (job_id, first, stop, lines) in enumerate(files):
            folder = f"{results}/{job_id}"
            try:
                if self._not_a_folder(job_id) is not None:
                    self._folders_durable.pop(job_id, None)
                    self.files.move_aside(Path(folder), f"results/{job_id}: not a folder; the job's results go in "
                                                        "a new one")
                os.mkdir(folder, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                errors[i] = exc
                continue
            if job_id not in self._folders_durable:  # made now, or by a process that may have died before
                made.append(i)                       # its fsync of results/ (kill -9 keeps what it made)
            body = encode_lines(lines)
            items.append((f"{folder}/{first:08d}-{stop:08d}.{zlib.crc32(body):08x}.jsonl", body))
            where.append(i)
        if made:
            try:
                self.files.sync_folder(results)
                for i in made:
                    self._folders_durable[files[i][0]] = None
                while len(self._folders_durable) > DURABLE_FOLDERS_KEPT:
                    self._folders_durable.popitem(last=False)
            except OSError as exc:
                for i in made:
                    errors[i] = exc
        for i, error in zip(where, self.files.write_all(items)):
            errors[i] = errors[i] or error
        return errors

    def _not_a_folder(self, job_id: int) -> str | None:
        """What stands at results/<id> when it is not a folder (a file, a link, a FIFO), or None: a folder, or
        nothing. Looked at without following a link, so results are never read from elsewhere."""
        try:
            mode = os.lstat(self.folder(job_id)).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(mode):
            return None
        return "a symbolic link" if stat.S_ISLNK(mode) else f"not a folder ({stat.filemode(mode)})"

    def chunks(self, job_id: int) -> list[tuple[int, int, Path]]:
        """(first, stop, path) of each results file of a job, in image order. DamagedResults (naming it) when
        results/<id> is not a folder, which the daemon moves aside; UnreadableResults when this process may
        not list it (permissions)."""
        folder = self.folder(job_id)
        try:
            odd = self._not_a_folder(job_id)
            if odd is None:
                entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UnreadableResults(f"cannot read results/{job_id}/: {exc.strerror or exc}", folder) from None
        if odd is not None:
            raise DamagedResults(f"results/{job_id}: {odd}, where the job's results folder should be", folder)
        chunks = []
        for entry in entries:
            match = RESULT_NAME.fullmatch(entry.name)
            if match:
                chunks.append((int(match[1]), int(match[2]), Path(entry.path)))
        return sorted(chunks)

    def _checked_files(self, job_id: int, total: int | None, first_index: int = 0, stop_index: int | None = None,
                       ) -> Iterator[tuple[int, int, Path, bytes]]:
        """Each results file holding images from first_index on (and before stop_index), with its bytes,
        checked whole. With ``total`` (a finished job) a gap is damage too. Raises DamagedResults."""
        expected = 0
        for first, stop, path in self.chunks(job_id):
            if stop_index is not None and first >= stop_index:
                if total is not None and first != expected and expected < stop_index:
                    raise DamagedResults(f"results/{job_id}: images {expected}..{first - 1} have no results file")
                return  # the files beyond the window are not read
            if total is not None and first != expected and first > first_index:
                raise DamagedResults(f"results/{job_id}: images {expected}..{first - 1} have no results file")
            expected = stop
            if stop <= first_index:
                continue
            try:
                data = _read_results_file(job_id, path)
            except FileNotFoundError:
                continue  # requeued or purged meanwhile
            why = file_damage(job_id, first, stop, data, path)
            if why is not None:
                raise DamagedResults(why, path)
            yield first, stop, path, data
        if total is not None and expected != total and (stop_index is None or expected < stop_index):
            raise DamagedResults(f"results/{job_id}: images {expected}..{total - 1} have no results file")

    def damage(self, job_id: int, total: int | None = None) -> tuple[Path | None, str] | None:
        """(the damaged file or None, why) if the job's results are not whole, else None. ``total``: the
        job is finished, so its files must cover images 0..total-1. Raises UnreadableResults."""
        try:
            for _ in self._checked_files(job_id, total):
                pass
        except DamagedResults as exc:
            return exc.path, exc.why
        return None

    def lines(self, job_id: int, first_index: int = 0, total: int | None = None,
              stop_index: int | None = None) -> Iterator[bytes]:
        """Result lines (JSON, no newline) of images first_index onwards (up to stop_index - 1, if given), in
        image order, one file in memory at a time; files outside the window are skipped unread. Images with no
        result yet are absent, so a line's place says nothing: its "index" does. Raises DamagedResults on a
        damaged file (and, with ``total``, on a gap in the window), before yielding any line of it."""
        for first, stop, _path, data in self._checked_files(job_id, total, first_index, stop_index):
            lines = data.split(b"\n")[:-1]
            end = stop if stop_index is None else min(stop, stop_index)
            yield from lines[max(0, first_index - first):end - first]

    def read(self, job_id: int, first: int, stop: int, path: Path) -> list[ResultLine]:
        """The result lines of one results file; DamagedResults unless it holds exactly images first..stop-1
        (a folder or link in its place is damage too: the daemon moves it aside and redoes its images)."""
        data = _read_results_file(job_id, path)
        why = file_damage(job_id, first, stop, data, path)
        records = []
        if why is None:
            try:
                records = decode(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]", list[ResultLine], path.name)
            except CorruptFile as exc:
                why = str(exc)
        if why is None and [r.index for r in records] != list(range(first, stop)):
            why = f"{path.name}: not the results of images {first}..{stop - 1}"
        if why is not None:
            raise DamagedResults(why, path)
        return records

    def forget(self, job_id: int, redo: Callable[[ResultLine], bool]) -> int:
        """Delete the results for which ``redo(record)`` is true, keeping the others; how many were deleted.

        Each results file that loses lines is deleted and its kept lines are written back as smaller
        files: a crash in between redoes good images, never counts one twice. A damaged file cannot say which
        of its images failed: it is moved to corrupt/ and all of them are redone."""
        redone = 0
        try:
            chunks = self.chunks(job_id)
        except DamagedResults as exc:  # no folder at results/<id>: nothing of it can be kept
            self.files.move_aside(exc.path, f"{exc.why}; all the job's images are redone (requeue)")
            return 0
        for first, stop, path in chunks:
            try:
                records = self.read(job_id, first, stop, path)
            except DamagedResults as exc:
                self.files.move_aside(path, f"{exc.why}; its images are redone (requeue)")
                redone += stop - first
                continue
            keep = [not redo(record) for record in records]
            if all(keep):
                continue
            path.unlink()
            run_start = None
            for offset, ok in enumerate(keep + [False]):
                if ok and run_start is None:
                    run_start = offset
                elif not ok and run_start is not None:
                    self.write(job_id, first + run_start, first + offset, records[run_start:offset])
                    run_start = None
            redone += keep.count(False)
        return redone

    def remove(self, job_id: int) -> None:
        """Purge: every results file of the job, then its folder (or whatever stands in its place)."""
        folder = self.folder(job_id)
        if self._not_a_folder(job_id) is not None:
            folder.unlink()
        elif folder.exists():
            for entry in os.scandir(folder):
                os.unlink(entry.path)
            folder.rmdir()
