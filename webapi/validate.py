"""Checking a submission. Pure: bytes in, a clean job or an InvalidSubmission naming the field out."""
from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class SubmitLimits:
    max_body_bytes: int = 64 * 1024 * 1024  # a job of 200,000 URLs of ~100 characters is ~25 MB
    max_images_per_job: int = 200_000
    max_url_chars: int = 2048
    max_field_chars: int = 256  # store_id, visit_time


class InvalidSubmission(ValueError):
    """The message is what the client is told: which field, what is wrong."""


def _reject_constant(name: str):
    raise InvalidSubmission(f"body is not valid JSON: {name} is not allowed")


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise InvalidSubmission(f"body is not valid JSON: duplicate key {dup!r}")
    return doc


#: Python refuses to convert longer digit strings to int (sys.get_int_max_str_digits(), CVE-2020-10735).
MAX_INT_DIGITS = 4300


def _bounded_int(literal: str) -> int:
    """An integer literal the parser can hold, or InvalidSubmission naming why not (never a bare ValueError)."""
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidSubmission(f"body is not valid JSON: an integer of more than {MAX_INT_DIGITS} digits")
    return int(literal)


def parse_json(body: bytes) -> object:
    """Strict JSON: no NaN/Infinity, no duplicate keys, no nesting deep enough to crash the parser, no number
    too long to convert. Whatever the parser cannot hold becomes InvalidSubmission, so the client gets a 400."""
    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_int=_bounded_int,
                          object_pairs_hook=_object_without_duplicates)
    except UnicodeDecodeError:
        raise InvalidSubmission("body is not UTF-8 text") from None
    except RecursionError:
        raise InvalidSubmission("body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidSubmission(f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except InvalidSubmission:
        raise
    except (ValueError, OverflowError, MemoryError) as exc:  # any other value the parser cannot hold
        raise InvalidSubmission(f"body is not valid JSON: {exc}") from None


def _string(value: object, where: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidSubmission(f"{where}: must be a string")
    if not value.strip():
        raise InvalidSubmission(f"{where}: must not be empty")
    if len(value) > max_chars:
        raise InvalidSubmission(f"{where}: longer than {max_chars} characters")
    return value


def check_url(url: object, where: str, limits: SubmitLimits) -> str:
    url = _string(url, where, limits.max_url_chars)
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise InvalidSubmission(f"{where}: URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:
        raise InvalidSubmission(f"{where}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InvalidSubmission(f"{where}: not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidSubmission(f"{where}: URLs with credentials are not accepted")
    return url


def parse_submission(body: bytes, limits: SubmitLimits) -> tuple[int, list[dict]]:
    """(count, visits) of a valid submission, with only the fields the service uses."""
    return check_submission(parse_json(body), limits)


def check_submission(doc: object, limits: SubmitLimits) -> tuple[int, list[dict]]:
    """parse_submission on a parsed body (webapi/submit_options.py reads more fields from the same one)."""
    if not isinstance(doc, dict):
        raise InvalidSubmission("body must be a JSON object with count and visits")
    for field in ("count", "visits"):
        if field not in doc:
            raise InvalidSubmission(f"{field}: missing")
    count, visits = doc["count"], doc["visits"]
    if not isinstance(count, int) or isinstance(count, bool):
        raise InvalidSubmission("count: must be an integer")
    if not isinstance(visits, list):
        raise InvalidSubmission("visits: must be a list")
    if not visits:
        raise InvalidSubmission("visits: must not be empty")
    if count != len(visits):
        raise InvalidSubmission(f"count: is {count} but visits has {len(visits)} entries")
    clean, images = [], 0
    for i, visit in enumerate(visits):
        where = f"visits[{i}]"
        if not isinstance(visit, dict):
            raise InvalidSubmission(f"{where}: must be an object")
        for field in ("store_id", "image_url", "visit_time"):
            if field not in visit:
                raise InvalidSubmission(f"{where}.{field}: missing")
        store_id = _string(visit["store_id"], f"{where}.store_id", limits.max_field_chars)
        visit_time = _string(visit["visit_time"], f"{where}.visit_time", limits.max_field_chars)
        urls = visit["image_url"]
        if not isinstance(urls, list):
            raise InvalidSubmission(f"{where}.image_url: must be a list of URLs")
        if not urls:
            raise InvalidSubmission(f"{where}.image_url: must not be empty")
        images += len(urls)
        if images > limits.max_images_per_job:
            raise InvalidSubmission(f"too many images: more than {limits.max_images_per_job} in one job")
        urls = [check_url(url, f"{where}.image_url[{j}]", limits) for j, url in enumerate(urls)]
        clean.append({"store_id": store_id, "visit_time": visit_time, "image_url": urls})
    return count, clean
