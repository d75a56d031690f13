"""The API's contract as an OpenAPI 3.1 document, served at /api/openapi.json.

Kept true by the tests: every response the suite sees (in-process and over HTTP) is checked against it
(tests/openapi_check.py), and Schemathesis fuzzes the running API with it (tests/test_openapi.py)."""
from __future__ import annotations

import msgspec

from spool import JOB_ID_PATTERN, Executor, Status
from spool.records import JobStatus, ResultLine
from webapi.submit_options import IDEMPOTENCY_HEADER, KEY_PATTERN, REPLAYED_HEADER
from webapi.waits import MAX_WAIT_S

#: The one job-id check (spool.JOB_ID_PATTERN), anchored as JSON Schema's "pattern" wants it.
_JOB_ID = f"^{JOB_ID_PATTERN.pattern}$"
_STATUSES = [status.value for status in Status]

JSON = "application/json"
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string", "minLength": 1}}}
_EMPTY = {"type": "object", "maxProperties": 0, "description": "unknown job (or another token's job)"}
#: The spool's records, as JSON Schema (msgspec generates it from the types the daemon writes and the API
#: serves): a status document with its failures and callback, a result line, and the enums they use.
_RECORDS = msgspec.json.schema_components([JobStatus, ResultLine], ref_template="#/components/schemas/{name}")[1]
_RESULTS = {"type": "object", "required": ["job_id", "status", "results"], "properties": {
    "job_id": {"type": "string", "pattern": _JOB_ID}, "status": {"enum": _STATUSES},
    "offset": {"type": "integer", "minimum": 0}, "limit": {"type": "integer", "minimum": 1},
    "results": {"type": "array", "items": {"$ref": "#/components/schemas/ResultLine"}}}}
_JOBS = {"type": "object", "required": ["total", "offset", "limit", "jobs"], "properties": {
    "total": {"type": "integer", "minimum": 0}, "offset": {"type": "integer", "minimum": 0},
    "limit": {"type": "integer", "minimum": 1},
    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobStatus"}}}}
_SUBMISSION = {"type": "object", "required": ["count", "visits"], "properties": {
    "count": {"type": "integer", "minimum": 1},
    "callback_url": {"type": "string", "format": "uri", "maxLength": 2048,
                     "description": "POSTed the final status document, signed (Standard Webhooks), when the job "
                                    "is completed or failed; needs a webhook secret for the caller's token"},
    "visits": {"type": "array", "minItems": 1, "items": {"type": "object",
               "required": ["store_id", "visit_time", "image_url"], "properties": {
                   "store_id": {"type": "string", "minLength": 1, "maxLength": 256},
                   "visit_time": {"type": "string", "minLength": 1, "maxLength": 256},
                   "image_url": {"type": "array", "minItems": 1,
                                 "items": {"type": "string", "format": "uri", "maxLength": 2048}}}}}}}
_HEALTH = {"type": "object", "required": ["ok", "checks"], "properties": {
    "ok": {"type": "boolean"}, "checks": {
        "type": "object", "additionalProperties": {"type": "string"},
        "description": "each check, \"ok\" or what is wrong: api, spool_writable, spool_readable, daemon; "
                       "workers (executor dask: none seen); stalled (a pool process or Dask worker holding tasks "
                       "and finishing none, named); failing (Dask workers tasks fail on, named)"},
    "executor": {"enum": [executor.value for executor in Executor], "description": "where the daemon runs the image work"},
    "workers": {"type": "integer", "minimum": 0,
                "description": "processes the daemon can hand work to: its pool processes, or the Dask workers it sees"}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict, **headers: str) -> dict:
    answer = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = {name: {"description": why, "schema": {"type": "string"}} for name, why in headers.items()}
    return answer


def _text(description: str, media_type: str) -> dict:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


_UNAUTHORIZED = _json("API tokens are on and this request has none, or an unknown one", _ref("Error"),
                      **{"WWW-Authenticate": "Bearer realm"})
_BAD_JOB = _json("jobid missing or malformed ({error}), or no such job visible to the caller ({})",
                 {"oneOf": [_ref("Error"), _ref("Empty")]})
_UNAVAILABLE = _json("the spool cannot be written now (or, for a submit, the API process is busy with other "
                     "large bodies); nothing changed", _ref("Error"), **{"Retry-After": "seconds"})
#: Any route that reads a header (those that need a token, and submit) refuses one that is not UTF-8 text.
_BAD_HEADER = _json("a header that is not UTF-8 text, named", _ref("Error"))
_DAMAGED = _json("a results file of this job is damaged (cut short, a line changed, lost or duplicated) or "
                 "missing, or the API may not read it (permissions); the message names it", _ref("Error"))
_SPOOL_UNREADABLE = _json("the spool (this job's status, or the job list) cannot be read (permissions): "
                          "the operator's to fix",
                          _ref("Error"), **{"Retry-After": "seconds"})
_JOBID = {"name": "jobid", "in": "query", "required": True, "schema": {"type": "string", "pattern": _JOB_ID},
          "description": "a job id; anything else is a 400 naming jobid"}
_PREFER = {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
           "description": f"RFC 7240: wait=S (at most {MAX_WAIT_S}) answers when the job is finished, or, with "
                          "If-None-Match, when its status differs from that ETag; or when S seconds are up"}
_IF_NONE_MATCH = {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
                  "description": "the ETag of the status the client has: 304 while it is still the status"}
_STATUS_HEADERS = {"ETag": "identifies this status (weak): send it back in If-None-Match",
                   "Preference-Applied": "wait=S when the answer waited for a change (RFC 7240)"}
_OFFSET = {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 10**9}}
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
_PAGE_ERROR = _json("offset or limit out of range, or a jobid problem", {"oneOf": [_ref("Error"), _ref("Empty")]})


def _submit() -> dict:
    stored = _json("stored on disk; with Idempotent-Replayed: true, the job this Idempotency-Key made before",
                   {"type": "object", "required": ["job_id"], "properties": {"job_id": {"type": "integer", "minimum": 1}}},
                   **{REPLAYED_HEADER: "true when this answers a retry: no new job was made"})
    key = {"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
           "schema": {"type": "string", "pattern": KEY_PATTERN},
           "description": "the same key with the same body answers the same job; with another body, 422"}
    return {"summary": "Submit a job", "parameters": [key],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Submission")}}},
            "responses": {"201": stored,
                "400": _json("not a valid submission, or a malformed Idempotency-Key; the message names the field",
                             _ref("Error")),
                "401": _UNAUTHORIZED,
                "409": _json("a request with this Idempotency-Key is still being stored", _ref("Error"),
                             **{"Retry-After": "seconds"}),
                "413": _json("body or job too large", _ref("Error")),
                "422": _json("this Idempotency-Key made a job from a different request", _ref("Error")),
                "415": _json("the body is not declared Content-Type: application/json", _ref("Error"),
                             **{"Accept-Post": "application/json"}),
                "503": _UNAVAILABLE}}


def _static(summary: str, media_type: str) -> dict:
    return {"get": {"summary": summary, "security": [], "responses": {"200": _text("the file", media_type)}}}


def document() -> dict:
    """The whole document. A function, not a module constant: callers may change their copy freely."""
    doc = _document()
    for operations in doc["paths"].values():
        for operation in operations.values():
            if operation.get("security") != []:  # routes that read the Authorization header
                operation["responses"].setdefault("400", _BAD_HEADER)
    return doc


def _document() -> dict:
    job_routes = {
        "/api/status": {"get": {"summary": "A job's status; with Prefer: wait=S, once it is finished or changed",
                                "parameters": [_JOBID, _PREFER, _IF_NONE_MATCH], "responses": {
            "200": _json("the status document", _ref("JobStatus"), **_STATUS_HEADERS),
            "304": {"description": "If-None-Match named the status as it is: unchanged (after the wait, if asked)",
                    "headers": {name: {"description": why, "schema": {"type": "string"}}
                                for name, why in _STATUS_HEADERS.items()}},
            "400": _BAD_JOB, "401": _UNAUTHORIZED, "503": _SPOOL_UNREADABLE}}},
        "/api/results": {"get": {"summary": "A job's results; paged when offset or limit is given",
                                 "parameters": [_JOBID, _OFFSET, _LIMIT], "responses": {
            "200": _json("results recorded so far, in image order", _ref("Results")), "400": _PAGE_ERROR,
            "401": _UNAUTHORIZED, "503": _DAMAGED}}},
        "/api/results.csv": {"get": {"summary": "A job's results as CSV, one line per image, with a header",
                                     "parameters": [_JOBID], "responses": {
            "200": _text("CSV, streamed", "text/csv"), "400": _BAD_JOB, "401": _UNAUTHORIZED,
            "503": _DAMAGED}}},
        "/api/jobs": {"get": {"summary": "The caller's jobs, newest first", "parameters": [_OFFSET, _LIMIT],
                              "responses": {"200": _json("a page of status documents", _ref("Jobs")),
                                            "400": _json("offset or limit out of range", _ref("Error")),
                                            "401": _UNAUTHORIZED, "503": _SPOOL_UNREADABLE}}},
        "/api/cancel": {"post": {"summary": "Cancel a queued or running job", "parameters": [_JOBID], "responses": {
            "200": _json("done: every image without a result was cancelled; how many, and the job's status now",
                         {"type": "object", "required": ["job_id", "cancel", "status", "images_cancelled"],
                          "properties": {"job_id": {"type": "string", "pattern": _JOB_ID},
                                         "cancel": {"const": "done"}, "status": {"enum": _STATUSES},
                                         "images_cancelled": {"type": "integer", "minimum": 0}}}),
            "202": _json("requested: no daemon is at work now (not running, paused on a full disk, or it did "
                         "not act within 5 s); it is carried out once it is", {"type": "object", "required": ["job_id", "cancel"], "properties": {
                             "job_id": {"type": "string", "pattern": _JOB_ID}, "cancel": {"const": "requested"}}}),
            "400": _BAD_JOB, "401": _UNAUTHORIZED, "409": _json("the job is finished", _ref("Error")),
            "503": _UNAVAILABLE}}},
        "/api/job": {"delete": {"summary": "Delete a finished job", "parameters": [_JOBID], "responses": {
            "200": _json("deleted", {"type": "object", "required": ["job_id", "purged"]}),
            "400": _BAD_JOB, "401": _UNAUTHORIZED, "409": _json("queued or running", _ref("Error")),
            "503": _UNAVAILABLE}}},
        "/api/purge": {"post": {"summary": "Delete finished jobs older than some days", "parameters": [
            {"name": "older_than_days", "in": "query", "required": True,
             "schema": {"type": "number", "minimum": 0, "maximum": 36500}}], "responses": {
            "200": _json("the ids deleted, oldest first; a request deletes for 10 s at most, so while "
                         "\"remaining\" is not 0 (jobs as old still there) ask again",
                         {"type": "object", "required": ["purged", "remaining"], "properties": {
                             "purged": {"type": "array", "items": {"type": "integer"}},
                             "remaining": {"type": "integer", "minimum": 0}}}),
            "400": _json("older_than_days out of range", _ref("Error")), "401": _UNAUTHORIZED,
            "503": _UNAVAILABLE}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Retail Pulse", "version": "1",
                 "description": "Every JSON route answers JSON, errors included. Unknown routes: 404 "
                                "{error}; wrong methods: 405 {error}."},
        "paths": {
            "/api/submit/": {"post": _submit()}, "/api/submit": {"post": _submit()}, **job_routes,
            "/healthz": {"get": {"summary": "Health", "security": [], "responses": {
                "200": _json("API, spool and daemon fine", _ref("Health")),
                "503": _json("something is wrong, named in checks (e.g. no daemon running)", _ref("Health"))}}},
            "/metrics": {"get": {"summary": "Prometheus metrics: the whole service's figures", "responses": {
                "200": _text("Prometheus text format", "text/plain"), "401": _UNAUTHORIZED,
                "403": _json("tokens are on and this token is not one of metrics_tokens", _ref("Error")),
                "503": _SPOOL_UNREADABLE}}},
            "/api/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {
                "200": _json("OpenAPI 3.1", {"type": "object"})}}},
            "/": _static("The status page", "text/html"),
            "/ui/{name}": {"get": {"summary": "The status page's files", "security": [], "parameters": [
                {"name": "name", "in": "path", "required": True,
                 "schema": {"enum": ["index.html", "app.js", "style.css"]}}],
                "responses": {"200": {"description": "HTML, JavaScript or CSS", "content": {
                    media_type: {"schema": {"type": "string"}}
                    for media_type in ("text/html", "text/javascript", "text/css")}},
                              "404": _json("no such file", _ref("Error"))}}},
        },
        "components": {
            "schemas": {"Error": _ERROR, "Empty": _EMPTY, **_RECORDS, "Results": _RESULTS, "Jobs": _JOBS,
                        "Submission": _SUBMISSION, "Health": _HEALTH},
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "only when the API is started with a tokens file"}},
        },
        "security": [{}, {"token": []}],
    }
