"""The HTTP API. It only speaks HTTP: submissions go into the spool, status and results come out of it."""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping

import bottle
from bottle import Bottle, HTTPResponse, request

from spool import (UNFINISHED_FOLDERS, Control, DamagedResults, Executor, KeyBusy, KeyReused, Spool,
                   UnreadableResults, parse_job_id)
from spool.files import encode
from spool.heartbeat import capacity_health, certificate_health, daemon_health, worker_health
from spool.records import JobStatus
from webapi.auth import Tokens
from webapi.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from webapi.metrics import render as render_metrics
from webapi import openapi, pages, submit_options
from webapi.waits import RESUMED, Park, StatusViews, View, etag_matches, wait_preference
from webapi.validate import InvalidSubmission, SubmitLimits, check_submission, decode_submission

log = logging.getLogger("retailpulse.webapi")

_RESULTS_BATCH_BYTES = 64 * 1024
#: How long POST /api/cancel waits for a running daemon to carry the cancel out (it does within 0.1 s).
CANCEL_WAIT_S = 5.0
#: POST /api/purge deletes for this long at most, then answers what it did and how many are left, so that
#: no request outlives a client's (or nginx's 60 s) timeout however many jobs match; the client asks again.
PURGE_BUDGET_S = 10.0
#: A submit waits this long for room among the bodies in flight (BodyBudget), then gets 503.
BODY_WAIT_S = 10.0

# Request bodies are read by read_body(), bounded by SubmitLimits.max_body_bytes, and never through
# bottle.request.body. webapi/__main__ still sets Bottle's MEMFILE_MAX on purpose (see BOTTLE_MEMFILE_MAX).


def json_response(status: int, payload: object, **headers) -> HTTPResponse:
    """``payload``: a dict, or a spool record (a status document) as it is."""
    return HTTPResponse(encode(payload), status=status, headers={"Content-Type": "application/json",
                                                      "Cache-Control": "no-store", **headers})


class BodyTooLarge(Exception):
    pass


class BodyBudget:
    """The request bodies one API process holds at once, read or being decoded, bounded in bytes: memory per
    process stays bounded whatever the concurrency (docs/guarantees.md, "memory per API process"). A body
    takes its declared length (or the largest allowed, when it declares none) from the budget before a
    byte of it is read, and gives it back when its request is done."""

    def __init__(self, limit_bytes: int):
        self.limit, self.held = limit_bytes, 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int, wait_s: float):
        """Hold ``nbytes`` (at most the whole budget) for the block; raises the 503 when no room comes."""
        nbytes = min(nbytes, self.limit)
        with self._room:
            if not self._room.wait_for(lambda: self.held + nbytes <= self.limit, timeout=wait_s):
                log.warning("submit refused: %d bytes of bodies in flight, %d more asked, budget %d",
                            self.held, nbytes, self.limit)
                raise json_response(503, {"error": f"this API process is busy with other large submissions "
                                                   f"({self.held} bytes in flight); try again"}, **{"Retry-After": "5"})
            self.held += nbytes
        try:
            yield
        finally:
            with self._room:
                self.held -= nbytes
                self._room.notify_all()


def read_body(environ: dict, max_bytes: int) -> bytes:
    """The request body, refusing (before reading it) anything over max_bytes."""
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared.isdigit():
        if int(declared) > max_bytes:
            raise BodyTooLarge
        return environ["wsgi.input"].read(int(declared))
    body = environ["wsgi.input"].read(max_bytes + 1)  # no length given (chunked): read one byte past the cap
    if len(body) > max_bytes:
        raise BodyTooLarge
    return body


def refuse_unless_json(environ: dict) -> None:
    """Raises 415 unless the body is declared application/json. A browser sends text/plain, form-encoded
    or multipart bodies cross-site without asking first (no CORS preflight); application/json it never
    sends cross-site unasked, so no web page can make a visitor's browser submit jobs here."""
    media_type = (environ.get("CONTENT_TYPE") or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise json_response(415, {"error": f"Content-Type must be application/json, not "
                                           f"{media_type[:100] or 'missing'}"}, **{"Accept-Post": "application/json"})


class _Api:
    """The routes over one spool. Checks that refuse a request raise their HTTPResponse (Bottle sends a raised
    HTTPResponse as it is), so each route reads as its happy path."""

    def __init__(self, spool: Spool, limits: SubmitLimits, tokens: Tokens | None, max_queued_images: int | None,
                 webhook_secrets: Mapping[str | None, bytes] | None = None, metrics_readers: Iterable[str] = (),
                 max_body_bytes_in_flight: int | None = None):
        self.spool, self.limits, self.tokens, self.max_queued_images = spool, limits, tokens, max_queued_images
        self.webhook_secrets = webhook_secrets  # None: no webhooks, so no callback_url
        self.views = StatusViews(spool)  # status answers, kept while their files are unchanged
        self.metrics_readers = frozenset(metrics_readers)  # token names that may read /metrics
        self.bodies = BodyBudget(max_body_bytes_in_flight or limits.max_body_bytes)

    def caller(self) -> str | None:
        """The token name of the request (None when tokens are off); raises the 401 that refuses it."""
        if self.tokens is None:
            return None
        name = self.tokens.identify(header("Authorization"))
        if name is None:
            raise json_response(401, {"error": "missing or unknown API token (Authorization: Bearer ...)"},
                                **{"WWW-Authenticate": 'Bearer realm="retail-pulse"'})
        return name

    def owns(self, job_id: int, owner: str | None) -> bool:
        if self.tokens is None:
            return True
        meta = self.views.meta(job_id)
        return meta is not None and meta.owner == owner

    def known_job(self) -> tuple[int, JobStatus]:
        """The job named by ?jobid= and its status; raises the 400 that explains why there is none.

        With tokens on, another client's job is answered exactly like a job that does not exist."""
        job_id, view = self.known_view()
        return job_id, view.status

    def known_view(self) -> tuple[int, View]:
        """known_job(), as the status route answers it (with its ETag and bytes: waits.py, StatusViews)."""
        owner = self.caller()
        raw = request.query.getunicode("jobid")
        if raw is None or raw == "":
            raise json_response(400, {"error": "jobid: missing (use ?jobid=123)"})
        job_id = parse_job_id(raw)
        if job_id is None:
            raise json_response(400, {"error": "jobid: must be a positive integer"})
        if not self.owns(job_id, owner):
            raise json_response(400, {})
        try:
            view = self.views.view(job_id)
        except OSError as exc:  # permissions, a folder where a file should be: the operator's to fix
            log.error("job %d: cannot read its status: %s", job_id, exc)
            raise json_response(503, {"error": f"cannot read job {job_id}'s status from the spool: "
                                               f"{spool_error(exc)}"}, **{"Retry-After": "30"}) from None
        if view is None:
            raise json_response(400, {})
        return job_id, view

    def submit(self):
        owner = self.caller()
        refuse_unless_json(request.environ)
        declared = request.environ.get("CONTENT_LENGTH") or ""
        size = int(declared) if declared.isdigit() and int(declared) <= self.limits.max_body_bytes else \
            self.limits.max_body_bytes
        with self.bodies.hold(size, BODY_WAIT_S):
            return self._submit(owner)

    def _submit(self, owner: str | None):
        try:
            body = read_body(request.environ, self.limits.max_body_bytes)
        except BodyTooLarge:
            return json_response(413, {"error": f"body larger than {self.limits.max_body_bytes} bytes"})
        try:
            key = submit_options.idempotency_key(header(submit_options.IDEMPOTENCY_HEADER))
            doc = decode_submission(body, self.limits)
            count, visits = check_submission(doc, self.limits)
            callback_url = submit_options.callback_url(doc.callback(), self.limits, owner, self.webhook_secrets)
        except InvalidSubmission as exc:
            return json_response(400, {"error": str(exc)})
        images = sum(len(visit.image_url) for visit in visits)
        try:
            if key is None:
                self.refuse_when_queue_full(images)
                job_id, replayed = self.spool.jobs.submit(count, visits, owner, callback_url), False
            else:
                job_id, replayed = self.spool.keys.submit_once(
                    owner, key, submit_options.request_sha256(count, visits, callback_url), count, visits,
                    callback_url, admit=lambda: self.refuse_when_queue_full(images))
        except KeyReused as exc:
            return json_response(422, {"error": f"{submit_options.IDEMPOTENCY_HEADER} {key!r}: already used for "
                                                f"another request (job {exc.job_id}); a new job needs a new key"})
        except KeyBusy:
            return json_response(409, {"error": f"{submit_options.IDEMPOTENCY_HEADER} {key!r}: a request with "
                                                "this key is still being stored; try again"}, **{"Retry-After": "5"})
        except OSError as exc:
            log.error("submit: cannot write to the spool: %s", exc)
            return json_response(503, {"error": f"cannot store the job now: {exc.strerror or exc}"},
                                 **{"Retry-After": "30"})
        if replayed:
            log.info("job %d: submitted again with its Idempotency-Key; answered the same job", job_id)
            return json_response(201, {"job_id": job_id}, **{submit_options.REPLAYED_HEADER: "true"})
        log.info("job %d: submitted, %d visits, %d images%s", job_id, count, images,
                 f", by {owner}" if owner else "")
        return json_response(201, {"job_id": job_id})

    def refuse_when_queue_full(self, images: int) -> None:
        """Raises 503 + Retry-After when taking ``images`` more would pass max_queued_images."""
        if self.max_queued_images is None:
            return
        queued = self.views.queued_images()
        if queued + images > self.max_queued_images:
            log.warning("submit refused: %d images queued, %d more asked, limit %d",
                        queued, images, self.max_queued_images)
            raise json_response(503, {"error": f"too much work queued ({queued} images waiting, "
                                               f"limit {self.max_queued_images}); try again later"},
                                **{"Retry-After": "60"})

    def status(self):
        """The job's status; with ``Prefer: wait=S``, once it is finished or (with If-None-Match) changed
        (waits.py): a server that can park requests (webapi/server.py) has held it until then."""
        _job_id, view = self.known_view()
        headers = {"ETag": view.etag}
        wait = wait_preference(header("Prefer"))
        if wait is not None and RESUMED.get():
            headers["Preference-Applied"] = f"wait={wait:g}"
        if etag_matches(header("If-None-Match"), view.etag):
            return HTTPResponse(b"", status=304, headers={"Cache-Control": "no-store", **headers})
        return HTTPResponse(view.body, status=200, headers={"Content-Type": "application/json",
                                                            "Cache-Control": "no-store", **headers})

    def park(self, environ: dict) -> Park | None:
        """For webapi/server.py: whether this request is a status request that is to wait, and for what.
        None for anything that is to be answered now (not a wait, an error, a status that is ready); the
        route then answers it as usual."""
        if environ.get("PATH_INFO") != "/api/status" or environ.get("REQUEST_METHOD") != "GET":
            return None
        wait = wait_preference(environ.get("HTTP_PREFER"))
        if wait is None:
            return None
        request.bind(environ)
        try:
            job_id, view = self.known_view()
        except HTTPResponse:
            return None
        if_none_match = environ.get("HTTP_IF_NONE_MATCH")
        park = Park(job_id, time.monotonic() + wait, view.etag, until_finished=not if_none_match)
        if park.ready(view) or (if_none_match and not etag_matches(if_none_match, view.etag)):
            return None
        return park

    def results(self):
        job_id, doc = self.known_job()
        head = {"job_id": doc.job_id, "status": doc.status}
        total = finished_total(doc)
        if pages.is_paged():
            offset, limit = pages.page_window(json_response)
            try:
                return pages.results_page(self.spool, job_id, head, offset, limit, total)
            except DamagedResults as exc:
                raise damaged(job_id, exc) from None
            except UnreadableResults as exc:
                raise unreadable(job_id, exc.why) from None
        self.refuse_damaged(job_id, total)
        return HTTPResponse(stream_results(self.spool, job_id, head), status=200,
                            headers={"Content-Type": "application/json", "Cache-Control": "no-store"})

    def results_csv(self):
        job_id, doc = self.known_job()
        self.refuse_damaged(job_id, finished_total(doc))
        return pages.results_csv(self.spool, job_id)

    def refuse_damaged(self, job_id: int, total: int | None) -> None:
        """Before a whole-job answer starts streaming: every results file whole, and for a finished job
        no gap, or the error that names the damage (never fewer results served as all of them)."""
        try:
            damage = self.spool.results.damage(job_id, total)
        except UnreadableResults as exc:
            raise unreadable(job_id, exc.why) from None
        if damage is not None:
            raise damaged(job_id, DamagedResults(damage[1], damage[0]))

    def jobs(self):
        """The caller's jobs (everyone's with tokens off), newest first, a page at a time."""
        owner = self.caller()
        offset, limit = pages.page_window(json_response)
        try:
            doc = pages.jobs_page(self.spool, lambda job_id: self.owns(job_id, owner), offset, limit)
        except OSError as exc:  # status/ or meta/ the API may not read: the operator's to fix
            log.error("jobs: cannot read the spool: %s", exc)
            raise json_response(503, {"error": f"cannot read the job list from the spool: {spool_error(exc)}"},
                                **{"Retry-After": "30"}) from None
        return json_response(200, doc)

    def page(self, name: str = "index.html"):
        """The status page's files. Public like any static file: the data behind it needs the token."""
        return pages.static_file(name, json_response)

    def openapi(self):
        """The contract, public like /healthz: it says nothing about anyone's jobs."""
        return json_response(200, openapi.document())

    def cancel(self):
        """Ask the daemon to stop a job: every image without a result gets "cancelled by request". While a
        daemon runs, wait for it to do so and say how many images that was (200); else 202, still asked."""
        job_id, _doc = self.known_job()
        folder = self.spool.jobs.folder_of(job_id)
        if folder not in UNFINISHED_FOLDERS:
            return json_response(409, {"error": f"job {job_id} is not queued or running (it is {folder})"})
        try:
            self.spool.control.request(job_id, Control.CANCEL)
        except OSError as exc:
            return json_response(503, {"error": f"cannot store the request now: {exc.strerror or exc}"},
                                 **{"Retry-After": "30"})
        log.info("job %d: cancel requested", job_id)
        try:
            if not self.spool.control.wait(job_id, Control.CANCEL, CANCEL_WAIT_S):
                return json_response(202, {"job_id": str(job_id), "cancel": "requested"})
            doc = self.spool.status(job_id)
        except OSError as exc:  # the heartbeat or the status unreadable now: asked, not known to be done
            log.error("job %d: cancel asked, but the spool cannot be read: %s", job_id, exc)
            return json_response(202, {"job_id": str(job_id), "cancel": "requested"})
        return json_response(200, {"job_id": str(job_id), "cancel": "done", "status": doc and doc.status,
                                   "images_cancelled": (doc and doc.images_cancelled) or 0})

    def purge_one(self):
        """Delete a finished job: its file, status and results. 409 while it is queued or running."""
        job_id, _doc = self.known_job()
        try:
            purged = self.spool.upkeep.purge(job_id)
        except OSError as exc:
            return json_response(503, {"error": f"cannot delete now: {exc.strerror or exc}"}, **{"Retry-After": "30"})
        if not purged:
            return json_response(409, {"error": f"job {job_id} is queued or running; cancel it first"})
        log.info("job %d: purged", job_id)
        return json_response(200, {"job_id": str(job_id), "purged": True})

    def purge_old(self):
        """Delete every finished job older than ?older_than_days= (the caller's own, with tokens on)."""
        owner = self.caller()
        raw = request.query.getunicode("older_than_days") or ""
        try:
            days = float(raw)
            if not 0 <= days <= 36500:
                raise ValueError
        except ValueError:
            return json_response(400, {"error": "older_than_days: must be a number of days, 0 to 36500"})
        try:
            purged, remaining = self.spool.upkeep.purge_finished_before(
                time.time() - days * 86400, lambda job_id: self.owns(job_id, owner), PURGE_BUDGET_S)
        except OSError as exc:
            return json_response(503, {"error": f"cannot delete now: {spool_error(exc)}"}, **{"Retry-After": "30"})
        log.info("purged %d finished job(s) older than %g days%s", len(purged), days,
                 f"; {remaining} more to purge" if remaining else "")
        return json_response(200, {"purged": purged, "remaining": remaining})

    def healthz(self):
        """200 when the API can write the spool and the daemon's heartbeat is fresh; 503 naming what is not."""
        try:
            beat, unreadable_beat = self.spool.heartbeat.read(), None
        except OSError as exc:  # the spool root itself unreadable (permissions)
            beat, unreadable_beat = None, f"cannot read daemon.json: {exc.strerror or exc}"
        checks = {"api": "ok", "spool_writable": "ok", "spool_readable": self.spool.upkeep.access_problem() or "ok",
                  "daemon": unreadable_beat or daemon_health(beat)}
        if beat is not None:
            if beat.executor is Executor.DASK and not beat.workers:
                checks["workers"] = f"the daemon sees no Dask worker (scheduler {beat.scheduler}): nothing runs"
            elif not beat.workers:  # starting (its pool processes still importing), or all of them gone
                checks["workers"] = (f"no pool process is connected to the daemon (of {beat.processes or '?'}): "
                                     f"nothing runs")
            checks.update(worker_health(beat))
            checks.update(capacity_health(beat))
            checks.update(certificate_health(beat))
        try:
            self.spool.files.check_writable()
        except OSError as exc:
            checks["spool_writable"] = f"cannot write: {exc.strerror or exc}"
        checks.update(self.spool.heartbeat.full_disk_checks(beat))
        healthy = all(value == "ok" for value in checks.values())
        doc = {"ok": healthy, "checks": checks}
        if beat is not None:
            doc.update(executor=beat.executor, workers=beat.workers)
        return json_response(200 if healthy else 503, doc)

    def metrics(self):
        """The whole service's figures (every client's jobs): with tokens on, only for the tokens named in
        metrics_tokens."""
        name = self.caller()
        if self.tokens is not None and name not in self.metrics_readers:
            raise json_response(403, {"error": f"token {name!r} may not read /metrics, whose figures are every "
                                               "client's; the operator names the tokens that may (metrics_tokens)"})
        try:
            text = render_metrics(self.spool)
        except OSError as exc:  # the spool root or a folder the API may not read: the operator's to fix
            log.error("metrics: cannot read the spool: %s", exc)
            raise json_response(503, {"error": f"cannot read the spool for /metrics: {spool_error(exc)}"},
                                **{"Retry-After": "30"}) from None
        return HTTPResponse(text, status=200, headers={"Content-Type": METRICS_CONTENT_TYPE})


def header(name: str) -> str | None:
    """A request header as text (submit_options.header_text), or the 400 naming it."""
    try:
        return submit_options.header_text(request.environ, name)
    except InvalidSubmission as exc:
        raise json_response(400, {"error": str(exc)}) from None


def refuse_undecodable(callback):
    """Bottle plugin: a header that is not UTF-8 text, should anything read it through Bottle (which decodes
    it and raises), is the client's 400 naming it, never a 500. The routes themselves read headers through
    header(), which names the header before anything else sees it."""
    def route(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except UnicodeDecodeError:
            for key in request.environ:
                if key.startswith("HTTP_"):
                    header(key[5:].replace("_", "-").title())  # raises the 400 naming the first bad one
            raise  # not the request's bytes: a real error
    return route


def spool_error(exc: OSError) -> str:
    """An OSError in words that name the file, relative to nothing secret: "status/7.json: Permission denied"."""
    name = exc.filename
    where = "/".join(str(name).split("/")[-2:]) if name else ""
    return f"{where}: {exc.strerror or exc}" if where else str(exc.strerror or exc)

def json_error(err: bottle.HTTPError) -> str:
    """Bottle's own errors (no route, wrong method, a crash) as JSON instead of its HTML page."""
    bottle.response.content_type = "application/json"
    bottle.response.set_header("Cache-Control", "no-store")
    if err.status_code >= 500:
        log.error("%s %s: %s", request.method, request.path, err.exception or err.body)
    reason = {400: "bad request", 404: "no such route", 405: "method not allowed",
              413: "request too large"}.get(err.status_code, "internal error")
    return json.dumps({"error": reason})


def make_app(spool: Spool, limits: SubmitLimits | None = None, tokens: Tokens | None = None,
             max_queued_images: int | None = None, webhook_secrets: Mapping[str | None, bytes] | None = None,
             metrics_readers: Iterable[str] = (), max_body_bytes_in_flight: int | None = None) -> Bottle:
    """The WSGI app. ``tokens``: None serves everyone (local use); else every route but /healthz needs one.
    ``max_queued_images``: above it, submit answers 503 + Retry-After instead of taking more work.
    ``webhook_secrets``: whose jobs may carry a callback_url (config/webhook_secrets.py); None: nobody's.
    ``metrics_readers``: with tokens, the token names that may read /metrics. ``max_body_bytes_in_flight``:
    the bodies this process holds at once (BodyBudget); None: one of the largest allowed."""
    api = _Api(spool, limits or SubmitLimits(), tokens, max_queued_images, webhook_secrets, metrics_readers,
               max_body_bytes_in_flight)
    app = Bottle()
    app.config["json.enable"] = False  # every route builds its own JSON response
    # What webapi/server.py's worker needs to park status requests that wait (waits.py).
    app.config["retailpulse.park"] = api.park
    app.config["retailpulse.spool_root"] = spool.root
    app.route("/api/submit", "POST", api.submit)
    app.route("/api/submit/", "POST", api.submit)
    app.route("/api/status", "GET", api.status)
    app.route("/api/results", "GET", api.results)
    app.route("/api/results.csv", "GET", api.results_csv)
    app.route("/api/jobs", "GET", api.jobs)
    app.route("/api/openapi.json", "GET", api.openapi)
    app.route("/", "GET", api.page)
    app.route("/ui/<name>", "GET", api.page)
    app.route("/api/cancel", "POST", api.cancel)
    app.route("/api/job", "DELETE", api.purge_one)
    app.route("/api/purge", "POST", api.purge_old)
    app.route("/healthz", "GET", api.healthz)
    app.route("/metrics", "GET", api.metrics)
    app.install(refuse_undecodable)
    for code in (400, 404, 405, 413, 500):
        app.error_handler[code] = json_error
    return app


def finished_total(doc: JobStatus) -> int | None:
    """A finished job's image count (its results must cover every image), None while it runs."""
    return doc.images_total if doc.finished and isinstance(doc.images_total, int) else None


def damaged(job_id: int, exc: DamagedResults) -> HTTPResponse:
    """503 naming the damaged results: the daemon has moved the file to corrupt/ (or does at its next
    check); `retailpulse-ctl requeue` redoes the job's images."""
    log.error("job %d: results damaged: %s", job_id, exc.why)
    return json_response(503, {"error": f"results damaged: {exc.why}; an operator can redo the images with "
                                        f"`retailpulse-ctl requeue {job_id}`"})


def unreadable(job_id: int, why: str) -> HTTPResponse:
    """503 naming a results file this process may not read (permissions): the operator's to fix."""
    log.error("job %d: %s", job_id, why)
    return json_response(503, {"error": f"{why}; an operator must fix its owner or mode"}, **{"Retry-After": "30"})


def stream_results(spool: Spool, job_id: int, head: dict):
    """{"job_id":..,"status":..,"results":[...]}, produced a batch at a time: memory does not grow with the job."""
    opening = json.dumps(head, separators=(",", ":"))[:-1] + ',"results":['
    batch, size, separator = [opening.encode()], 0, b""
    for line in spool.results.lines(job_id):
        batch.append(separator + line)
        separator = b","
        size += len(line)
        if size >= _RESULTS_BATCH_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
    batch.append(b"]}")
    yield b"".join(batch)
