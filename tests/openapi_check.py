"""Every response the tests see, checked against the API's OpenAPI document (webapi/openapi.py).

jsonschema (python-jsonschema: the reference implementation, Draft 2020-12 which is OpenAPI 3.1's schema
dialect, already a dependency of schemathesis) validates the bodies; a status a route does not document
fails too. Hooked into tests/conftest.py's call_wsgi and the Service HTTP session."""
from __future__ import annotations

import json
import re
from functools import cache

import jsonschema

from webapi.openapi import document


@cache
def _document() -> dict:
    return document()


def _operation(method: str, path: str) -> dict | None:
    """The documented operation, None for an unknown route; raises for a known route without the method."""
    paths = _document()["paths"]
    for template, item in paths.items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")) + "$"
        if re.match(pattern, path):
            return item.get(method.lower(), {"responses": {"405": {"content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}}}})
    return None


def check(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """AssertionError when this answer is not what the document promises."""
    assert status < 500 or status == 503, f"{method} {path}: {status} {body[:200]!r}"
    operation = _operation(method, path)
    if operation is None:  # no such route: Bottle's 404 (or 405), as JSON
        operation = {"responses": {str(status): {"content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}}} if status in (404, 405) else {"responses": {}}
    answer = operation["responses"].get(str(status))
    assert answer is not None, f"{method} {path}: status {status} is not documented"
    media = answer.get("content", {})
    if "application/json" not in media or method == "HEAD":
        return
    assert content_type.split(";")[0] == "application/json", f"{method} {path}: {content_type}"
    schema = {**media["application/json"]["schema"], "components": _document()["components"]}
    jsonschema.validate(json.loads(body), schema, cls=jsonschema.Draft202012Validator)


def check_requests_response(response, *args, **kwargs):
    """A requests response hook (Session.hooks["response"])."""
    from urllib.parse import urlsplit
    check(response.request.method, urlsplit(response.url).path, response.status_code,
          response.headers.get("content-type", ""), response.content)
