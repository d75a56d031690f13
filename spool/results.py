"""Results files: ``results/<id>/<first>-<stop>.jsonl`` (the format is documented in spool/__init__.py).

Self-checking by their names: a file named ``00000064-00000128.jsonl`` must hold exactly 64 complete lines,
the first of image 64 and the last of image 127, and a finished job's files must cover images 0..N-1
without a gap. Every reader checks that before it trusts a file (as Postfix checks a queue file's END
record), so a file cut short by a disk that lied or by a hand is reported as damaged, never served as
whole. Kept apart from the rest of the spool because it is the one part with a format of its own.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

RESULT_NAME = re.compile(r"([0-9]{8})-([0-9]{8})\.jsonl")


class DamagedResults(Exception):
    """A results file is not whole, or a finished job's files leave a gap. ``path``: the file, if one."""

    def __init__(self, why: str, path: Path | None = None):
        super().__init__(why)
        self.why, self.path = why, path


def file_damage(job_id: int, first: int, stop: int, data: bytes) -> str | None:
    """Why the bytes of results file first..stop-1 are not whole, or None. Only its first and last line
    are parsed: enough to catch a cut, a lost line or a misnamed file, cheap enough for every read."""
    name = f"results/{job_id}/{first:08d}-{stop:08d}.jsonl"
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
    return None


class ResultFiles:
    """The results part of Spool (mixed into it): needs ``results_dir`` and ``write_atomic``."""

    def write_results(self, job_id: int, first: int, stop: int, lines: Iterable[dict]) -> None:
        """Record the results of images first..stop-1 as one file. Durable when this returns."""
        folder = self.results_dir(job_id)
        folder.mkdir(mode=0o700, exist_ok=True)
        body = b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
        self.write_atomic(folder / f"{first:08d}-{stop:08d}.jsonl", body)

    def result_chunks(self, job_id: int) -> list[tuple[int, int, Path]]:
        """(first, stop, path) of each results file of a job, in image order."""
        try:
            entries = list(os.scandir(self.results_dir(job_id)))
        except FileNotFoundError:
            return []
        chunks = []
        for entry in entries:
            match = RESULT_NAME.fullmatch(entry.name)
            if match:
                chunks.append((int(match[1]), int(match[2]), Path(entry.path)))
        return sorted(chunks)

    def _checked_files(self, job_id: int, total: int | None, first_index: int = 0,
                       ) -> Iterator[tuple[int, int, Path, bytes]]:
        """Each results file holding images from first_index on, with its bytes, checked whole. With
        ``total`` (a finished job) a gap is damage too. Raises DamagedResults."""
        expected = 0
        for first, stop, path in self.result_chunks(job_id):
            if total is not None and first != expected and first > first_index:
                raise DamagedResults(f"results/{job_id}: images {expected}..{first - 1} have no results file")
            expected = stop
            if stop <= first_index:
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # requeued or purged meanwhile
            why = file_damage(job_id, first, stop, data)
            if why is not None:
                raise DamagedResults(why, path)
            yield first, stop, path, data
        if total is not None and expected != total:
            raise DamagedResults(f"results/{job_id}: images {expected}..{total - 1} have no results file")

    def results_damage(self, job_id: int, total: int | None = None) -> tuple[Path | None, str] | None:
        """(the damaged file or None, why) if the job's results are not whole, else None. ``total``: the
        job is finished, so its files must cover images 0..total-1."""
        try:
            for _ in self._checked_files(job_id, total):
                pass
        except DamagedResults as exc:
            return exc.path, exc.why
        return None

    def iter_result_lines(self, job_id: int, first_index: int = 0, total: int | None = None) -> Iterator[bytes]:
        """Result lines (JSON, no newline) of images first_index onwards, in image order, one file in memory at
        a time; files before first_index are skipped unread. Raises DamagedResults on a damaged file (and, with
        ``total``, on a gap), before yielding any line of it."""
        for first, _stop, _path, data in self._checked_files(job_id, total, first_index):
            lines = data.split(b"\n")[:-1]
            yield from lines[max(0, first_index - first):]

    def read_results(self, job_id: int, first: int, stop: int, path: Path) -> list[dict]:
        """The result lines of one results file; DamagedResults unless it holds exactly images first..stop-1."""
        data = path.read_bytes()
        why = file_damage(job_id, first, stop, data)
        try:
            records = [json.loads(line) for line in data.splitlines()] if why is None else []
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            why = f"{path.name}: {exc}"
        if why is None and [r.get("index") if isinstance(r, dict) else None for r in records] != \
                list(range(first, stop)):
            why = f"{path.name}: not the results of images {first}..{stop - 1}"
        if why is not None:
            raise DamagedResults(why, path)
        return records

    def forget_results(self, job_id: int, redo: Callable[[dict], bool]) -> int:
        """Delete the results for which ``redo(record)`` is true, keeping the others; how many were deleted.

        Each results file that loses lines is deleted and its kept lines are written back as smaller
        files: a crash in between redoes good images, never counts one twice."""
        redone = 0
        for first, stop, path in self.result_chunks(job_id):
            records = self.read_results(job_id, first, stop, path)
            keep = [not redo(record) for record in records]
            if all(keep):
                continue
            path.unlink()
            run_start = None
            for offset, ok in enumerate(keep + [False]):
                if ok and run_start is None:
                    run_start = offset
                elif not ok and run_start is not None:
                    self.write_results(job_id, first + run_start, first + offset, records[run_start:offset])
                    run_start = None
            redone += keep.count(False)
        return redone
