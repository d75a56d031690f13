"""The HTTP API. It only speaks HTTP: submissions go into the spool, status and results come out of it."""
from __future__ import annotations

import json
import logging
import time

import bottle
from bottle import Bottle, HTTPResponse, request

from spool import Spool, parse_job_id, pid_exists
from webapi.auth import Tokens
from webapi.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from webapi.metrics import render as render_metrics
from webapi.validate import InvalidSubmission, SubmitLimits, parse_submission

log = logging.getLogger("retailpulse.webapi")

_RESULTS_BATCH_BYTES = 64 * 1024
#: The daemon writes its heartbeat every second; this much silence means it is stuck or gone.
HEARTBEAT_STALE_S = 10.0

# Request bodies are read by read_body(), bounded by SubmitLimits.max_body_bytes, and never through
# bottle.request.body. webapi/__main__ still sets Bottle's MEMFILE_MAX on purpose (see BOTTLE_MEMFILE_MAX).


def json_response(status: int, payload: dict, **headers) -> HTTPResponse:
    body = json.dumps(payload, separators=(",", ":"))
    return HTTPResponse(body, status=status, headers={"Content-Type": "application/json",
                                                      "Cache-Control": "no-store", **headers})


class BodyTooLarge(Exception):
    pass


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


def make_app(spool: Spool, limits: SubmitLimits | None = None, tokens: Tokens | None = None,
             max_queued_images: int | None = None) -> Bottle:
    """The WSGI app. ``tokens``: None serves everyone (local use); else every route but /healthz needs one.
    ``max_queued_images``: above it, submit answers 503 + Retry-After instead of taking more work."""
    limits = limits or SubmitLimits()
    app = Bottle()
    app.config["json.enable"] = False  # every route builds its own JSON response

    def caller() -> str | None | HTTPResponse:
        """The token name of the request (None when tokens are off), or the 401 that refuses it."""
        if tokens is None:
            return None
        name = tokens.identify(request.get_header("Authorization"))
        if name is None:
            return json_response(401, {"error": "missing or unknown API token (Authorization: Bearer ...)"},
                                 **{"WWW-Authenticate": 'Bearer realm="retail-pulse"'})
        return name

    def submit():
        owner = caller()
        if isinstance(owner, HTTPResponse):
            return owner
        try:
            body = read_body(request.environ, limits.max_body_bytes)
        except BodyTooLarge:
            return json_response(413, {"error": f"body larger than {limits.max_body_bytes} bytes"})
        try:
            count, visits = parse_submission(body, limits)
        except InvalidSubmission as exc:
            return json_response(400, {"error": str(exc)})
        images = sum(len(visit["image_url"]) for visit in visits)
        try:
            if max_queued_images is not None:
                queued = spool.queued_images()
                if queued + images > max_queued_images:
                    log.warning("submit refused: %d images queued, %d more asked, limit %d",
                                queued, images, max_queued_images)
                    return json_response(503, {"error": f"too much work queued ({queued} images waiting, "
                                                        f"limit {max_queued_images}); try again later"},
                                         **{"Retry-After": "60"})
            job_id = spool.submit(count, visits, owner=owner)
        except OSError as exc:
            log.error("submit: cannot write to the spool: %s", exc)
            return json_response(503, {"error": f"cannot store the job now: {exc.strerror or exc}"},
                                 **{"Retry-After": "30"})
        log.info("job %d: submitted, %d visits, %d images%s", job_id, count, images,
                 f", by {owner}" if owner else "")
        return json_response(201, {"job_id": job_id})

    app.route("/api/submit", "POST", submit)
    app.route("/api/submit/", "POST", submit)

    def known_job() -> tuple[int, dict] | HTTPResponse:
        """The job named by ?jobid= and its status, or the 400 that explains why there is none.

        With tokens on, another client's job is answered exactly like a job that does not exist."""
        owner = caller()
        if isinstance(owner, HTTPResponse):
            return owner
        raw = request.query.getunicode("jobid")
        if raw is None or raw == "":
            return json_response(400, {"error": "jobid: missing (use ?jobid=123)"})
        job_id = parse_job_id(raw)
        if job_id is None:
            return json_response(400, {"error": "jobid: must be a positive integer"})
        if tokens is not None and (spool.read_meta(job_id) or {}).get("owner") != owner:
            return json_response(400, {})
        doc = spool.read_status(job_id)
        if doc is None:
            return json_response(400, {})
        return job_id, doc

    @app.get("/api/status")
    def status():
        found = known_job()
        if isinstance(found, HTTPResponse):
            return found
        return json_response(200, found[1])

    @app.get("/api/results")
    def results():
        found = known_job()
        if isinstance(found, HTTPResponse):
            return found
        job_id, doc = found
        head = {"job_id": doc["job_id"], "status": doc["status"]}
        return HTTPResponse(stream_results(spool, job_id, head), status=200,
                            headers={"Content-Type": "application/json", "Cache-Control": "no-store"})

    def job_of_caller() -> tuple[int, str | None] | HTTPResponse:
        """For the routes that change a job: its id, after the same checks as status (owner included)."""
        found = known_job()
        if isinstance(found, HTTPResponse):
            return found
        return found[0], spool.job_folder(found[0])

    @app.post("/api/cancel")
    def cancel():
        """Ask the daemon to stop a job: images not yet started get "cancelled by request"."""
        found = job_of_caller()
        if isinstance(found, HTTPResponse):
            return found
        job_id, folder = found
        if folder not in ("incoming", "active"):
            return json_response(409, {"error": f"job {job_id} is not queued or running (it is {folder})"})
        try:
            spool.request(job_id, "cancel")
        except OSError as exc:
            return json_response(503, {"error": f"cannot store the request now: {exc.strerror or exc}"},
                                 **{"Retry-After": "30"})
        log.info("job %d: cancel requested", job_id)
        return json_response(202, {"job_id": str(job_id), "cancel": "requested"})

    @app.delete("/api/job")
    def purge_one():
        """Delete a finished job: its file, status and results. 409 while it is queued or running."""
        found = job_of_caller()
        if isinstance(found, HTTPResponse):
            return found
        job_id, _folder = found
        try:
            purged = spool.purge(job_id)
        except OSError as exc:
            return json_response(503, {"error": f"cannot delete now: {exc.strerror or exc}"}, **{"Retry-After": "30"})
        if not purged:
            return json_response(409, {"error": f"job {job_id} is queued or running; cancel it first"})
        log.info("job %d: purged", job_id)
        return json_response(200, {"job_id": str(job_id), "purged": True})

    @app.post("/api/purge")
    def purge_old():
        """Delete every finished job older than ?older_than_days= (the caller's own, with tokens on)."""
        owner = caller()
        if isinstance(owner, HTTPResponse):
            return owner
        raw = request.query.getunicode("older_than_days") or ""
        try:
            days = float(raw)
            if not 0 <= days <= 36500:
                raise ValueError
        except ValueError:
            return json_response(400, {"error": "older_than_days: must be a number of days, 0 to 36500"})
        purged = [job_id for job_id in spool.finished_before(time.time() - days * 86400)
                  if (tokens is None or (spool.read_meta(job_id) or {}).get("owner") == owner)
                  and spool.purge(job_id)]
        log.info("purged %d finished job(s) older than %g days", len(purged), days)
        return json_response(200, {"purged": sorted(purged)})

    @app.get("/healthz")
    def healthz():
        """200 when the API can write the spool and the daemon's heartbeat is fresh; 503 naming what is not."""
        checks = {"api": "ok", "spool_writable": "ok", "daemon": "ok"}
        try:
            spool.write_atomic(spool.root / "tmp" / "healthz", b"ok\n", durable=False)
        except OSError as exc:
            checks["spool_writable"] = f"cannot write: {exc.strerror or exc}"
        beat = spool.read_heartbeat()
        if beat is None:
            checks["daemon"] = "no heartbeat (daemon.json missing): daemon not running"
        else:
            age = time.time() - beat.get("heartbeat_at", 0)
            if age > HEARTBEAT_STALE_S:
                checks["daemon"] = f"last heartbeat {age:.0f} s ago"
            elif not pid_exists(int(beat.get("pid", 0))):
                checks["daemon"] = f"process {beat.get('pid')} is gone"
            elif beat.get("paused"):
                checks["daemon"] = "paused: cannot write results (disk full?)"
        healthy = all(value == "ok" for value in checks.values())
        return json_response(200 if healthy else 503, {"ok": healthy, "checks": checks})

    @app.get("/metrics")
    def metrics():
        owner = caller()
        if isinstance(owner, HTTPResponse):
            return owner
        return HTTPResponse(render_metrics(spool), status=200, headers={"Content-Type": METRICS_CONTENT_TYPE})

    def json_error(err: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        bottle.response.set_header("Cache-Control", "no-store")
        if err.status_code >= 500:
            log.error("%s %s: %s", request.method, request.path, err.exception or err.body)
        reason = {400: "bad request", 404: "no such route", 405: "method not allowed",
                  413: "request too large"}.get(
            err.status_code, "internal error")
        return json.dumps({"error": reason})

    for code in (400, 404, 405, 413, 500):
        app.error_handler[code] = json_error
    return app


def stream_results(spool: Spool, job_id: int, head: dict):
    """{"job_id":..,"status":..,"results":[...]}, produced a batch at a time: memory does not grow with the job."""
    opening = json.dumps(head, separators=(",", ":"))[:-1] + ',"results":['
    batch, size, separator = [opening.encode()], 0, b""
    for line in spool.iter_result_lines(job_id):
        batch.append(separator + line)
        separator = b","
        size += len(line)
        if size >= _RESULTS_BATCH_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
    batch.append(b"]}")
    yield b"".join(batch)
