"""The status page's routes: paged job and result lists, the CSV download, and the page's own files.

Paged so the page stays fast whatever the spool holds: a list of 1,000 jobs or a job of 100,000 images is
never sent whole to a browser. The unpaged /api/results (app.py) stays as existing clients know it."""
from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

from bottle import HTTPResponse, request

from spool import Folder, Spool
from spool.vocabulary import visible
from spool.files import decode
from spool.records import RESULT_COLUMNS, ResultLine

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The only files /ui/ serves, with their types: no path from the request ever reaches the filesystem.
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
MAX_PAGE_ITEMS = 1000
DEFAULT_PAGE_ITEMS = 50
CSV_COLUMNS = RESULT_COLUMNS  # a result line's fields, in order (spool/records.py, ResultLine)
_CSV_BATCH_ROWS = 512
#: What a spreadsheet takes as the start of a formula (OWASP, "CSV Injection"): =, +, -, @, tab, carriage return.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A value as a CSV cell a spreadsheet shows and never runs: a text starting like a formula gets a
    leading apostrophe, as OWASP recommends (the csv module quotes whatever needs quoting); invisible
    characters an old job may hold (a zero-width space, a bidi override) are shown escaped (visible()).
    Numbers stay numbers; None is an empty cell."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = visible(value)
        if value.startswith(_FORMULA_START):
            return "'" + value
    return value


def page_window(json_response) -> tuple[int, int]:
    """(offset, limit) from the query; raises the 400 naming the bad parameter."""
    window = []
    for name, default, low, high in (("offset", 0, 0, 10**9), ("limit", DEFAULT_PAGE_ITEMS, 1, MAX_PAGE_ITEMS)):
        raw = request.query.getunicode(name)
        if raw is None or raw == "":
            window.append(default)
            continue
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and low <= int(raw) <= high):
            raise json_response(400, {"error": f"{name}: must be an integer from {low} to {high}"})
        window.append(int(raw))
    return window[0], window[1]


def is_paged() -> bool:
    return "offset" in request.query or "limit" in request.query


def jobs_page(spool: Spool, visible, offset: int, limit: int) -> dict:
    """Newest first, each job's status document plus "images" (from its meta file) and its owner check."""
    ids = [job_id for job_id in reversed(spool.jobs.ids(Folder.META)) if visible(job_id)]
    jobs = []
    for job_id in ids[offset:offset + limit]:
        doc = spool.status(job_id)
        if doc is not None:
            jobs.append(doc)
    return {"total": len(ids), "offset": offset, "limit": limit, "jobs": jobs}


def results_page(spool: Spool, job_id: int, head: dict, offset: int, limit: int,
                 total: int | None) -> HTTPResponse:
    """Results of images offset .. offset+limit-1, those of them recorded so far, as JSON: a window of image
    indices, not of recorded lines, so while a job runs no image is on two pages and none is missed. Only the
    results files of the window are read (and checked: DamagedResults); ``total`` for a finished job, where a
    gap is damage."""
    lines = list(spool.results.lines(job_id, offset, total, stop_index=offset + limit))
    body = (json.dumps({**head, "offset": offset, "limit": limit}, separators=(",", ":"))[:-1]
            + ',"results":[' + ",".join(line.decode() for line in lines) + "]}")
    return HTTPResponse(body, status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-store"})


def results_csv(spool: Spool, job_id: int) -> HTTPResponse:
    """One CSV line per recorded image, with a header, streamed a batch of rows at a time."""
    def rows():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        lines = spool.results.lines(job_id)
        while True:
            batch = list(itertools.islice(lines, _CSV_BATCH_ROWS))
            for line in batch:
                result = decode(line, ResultLine, "results")
                writer.writerow([csv_cell(getattr(result, col)) for col in CSV_COLUMNS])
            yield buffer.getvalue().encode("utf-8", "backslashreplace")  # a lone surrogate of an old job too
            buffer.seek(0)
            buffer.truncate()
            if not batch:
                return
    return HTTPResponse(rows(), status=200, headers={
        "Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="job-{job_id}-results.csv"'})


#: The page's policy: its own script and style files and calls to its own API; nothing inline, nothing from
#: elsewhere, no framing. nginx serves these files itself with the same string (systemd/nginx/retail-pulse.conf;
#: tests/test_front_door.py compares them).
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def static_file(name: str, json_response) -> HTTPResponse:
    """One of the page's own files, or the JSON 404 of any unknown path."""
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        raise json_response(404, {"error": "no such route"})
    return HTTPResponse((STATIC_DIR / name).read_bytes(), status=200, headers={
        "Content-Type": content_type, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": PAGE_CSP})
