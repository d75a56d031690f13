"""Checking a submission. Pure: bytes in, a clean job or an InvalidSubmission naming the field out.

Memory is bounded whatever the body's shape (docs/guarantees.md, "Limits and security"). The body is decoded by
msgspec straight into the fields the service uses: fields it does not use are skipped while scanning,
never built, so ``{"x": [{},{},...]}`` costs nothing; strings are decoded one by one from the bytes, so one
emoji does not widen a copy of the whole body. What msgspec does build (the visits and their URL lists) is
bounded before it starts by counting the commas outside strings (``SubmitLimits.max_commas``): a list
cannot hold more elements than there are commas. Every failure names the field: msgspec's own errors
carry a path; for the few that carry only a byte offset (malformed JSON, NaN, a lone surrogate, nesting)
``_Walker`` finds the field at that offset.
"""
from __future__ import annotations

import json
import re
import unicodedata
from urllib.parse import urlsplit

import msgspec

from daemon.engine.urls import ascii_url
from spool.records import Visit
from spool.vocabulary import INVISIBLE_CATEGORIES
from webapi.settings import SubmitLimits  # the limits are settings, declared with the API's others


class InvalidSubmission(ValueError):
    """The message is what the client is told: which field, what is wrong."""


class _Visit(msgspec.Struct):
    store_id: str
    visit_time: str
    image_url: list[str]


class Submission(msgspec.Struct):
    """The fields of a submission the service reads; every other field is skipped unbuilt."""

    count: int
    visits: list[_Visit]
    callback_url: str | msgspec.UnsetType = msgspec.UNSET  # absent, or a string (not null): submit_options.py

    def callback(self) -> str | None:
        """The callback_url, None when the client named none."""
        return None if self.callback_url is msgspec.UNSET else self.callback_url


#: Immutable, made once: msgspec decoders keep no state between calls.
_DECODER = msgspec.json.Decoder(Submission)
#: Python refuses to convert longer digit strings to int (sys.get_int_max_str_digits(), CVE-2020-10735);
#: refused anywhere in a body, named by field, as before msgspec skipped unknown fields unconverted.
MAX_INT_DIGITS = 4300
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
#: An escaped printable ASCII character (\u0041): a key could hide behind one; see _duplicate_key.
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7]")
_KNOWN_KEYS = (b'"count"', b'"visits"', b'"store_id"', b'"visit_time"', b'"image_url"')
_URL_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
#: The walker names a nesting this deep; msgspec itself stops at Python's recursion limit (1,000).
_WALK_MAX_DEPTH = 500
#: A bound on the walker's work (it runs only after a failure, or for a body with suspect keys).
_WALK_MAX_TOKENS = 5_000_000


def _string(value: str, where: str, max_chars: int, control_ok: bool = False) -> str:
    if not value.strip():
        raise InvalidSubmission(f"{where}: must not be empty")
    if len(value) > max_chars:
        raise InvalidSubmission(f"{where}: longer than {max_chars} characters")
    if not control_ok and not value.isprintable():  # C speed; only then, which character and why
        _refuse_invisible(value, where)
    return value


def _refuse_invisible(value: str, where: str) -> None:
    """store_id and visit_time are shown in pages, CSV files, terminals and logs: no character that hides or
    changes the text around it there (spool.vocabulary.INVISIBLE_CATEGORIES). A store id with a zero-width
    space looks exactly like the store's own; a right-to-left override reverses the rest of the line."""
    for ch in value:
        category = unicodedata.category(ch)
        if category == "Cc":
            raise InvalidSubmission(f"{where}: must not contain control characters (found U+{ord(ch):04X})")
        if category in INVISIBLE_CATEGORIES:
            name = unicodedata.name(ch, "")
            raise InvalidSubmission(f"{where}: must not contain invisible format characters, which hide or "
                                    f"reorder the text around them (found U+{ord(ch):04X}{' ' + name if name else ''})")


def check_url(url: str, where: str, limits: SubmitLimits) -> str:
    """The URL as the client wrote it, once it passed every rule on the ASCII form the download will use
    (daemon/engine/urls.py: IDNA host, percent-encoded path, as a browser sends it)."""
    url = _string(url, where, limits.max_url_chars, control_ok=True)
    if _URL_FORBIDDEN.search(url):
        raise InvalidSubmission(f"{where}: URL contains spaces or control characters")
    try:
        sent = ascii_url(url)
        parts = urlsplit(sent)
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:
        raise InvalidSubmission(f"{where}: not a valid URL ({exc})") from None
    if len(sent) > limits.max_url_chars:
        raise InvalidSubmission(f"{where}: longer than {limits.max_url_chars} characters once percent-encoded")
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InvalidSubmission(f"{where}: not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidSubmission(f"{where}: URLs with credentials are not accepted")
    return url


def parse_submission(body: bytes, limits: SubmitLimits) -> tuple[int, list[Visit]]:
    """(count, visits) of a valid submission, with only the fields the service uses."""
    return check_submission(decode_submission(body, limits), limits)


def check_submission(doc: Submission, limits: SubmitLimits) -> tuple[int, list[Visit]]:
    """(count, visits) of a decoded submission, every rule checked (submit_options.py checks the rest)."""
    count, visits = doc.count, doc.visits
    if not visits:
        raise InvalidSubmission("visits: must not be empty")
    if count != len(visits):
        raise InvalidSubmission(f"count: is {count} but visits has {len(visits)} entries")
    clean, images = [], 0
    for i, visit in enumerate(visits):
        where = f"visits[{i}]"
        store_id = _string(visit.store_id, f"{where}.store_id", limits.max_field_chars)
        visit_time = _string(visit.visit_time, f"{where}.visit_time", limits.max_field_chars)
        if not visit.image_url:
            raise InvalidSubmission(f"{where}.image_url: must not be empty")
        images += len(visit.image_url)
        if images > limits.max_images_per_job:
            raise InvalidSubmission(f"too many images: more than {limits.max_images_per_job} in one job")
        urls = [check_url(url, f"{where}.image_url[{j}]", limits) for j, url in enumerate(visit.image_url)]
        clean.append(Visit(store_id, visit_time, urls))
    return count, clean


def decode_submission(body: bytes, limits: SubmitLimits) -> Submission:
    """The submission's known fields, or InvalidSubmission naming the field (see the module docstring)."""
    _refuse_too_many_values(body, limits)
    _refuse_long_integers(body)
    try:
        doc = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidSubmission(_validation_message(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidSubmission(_decode_message(body, str(exc))) from None
    except RecursionError:
        where = _Walker(body).run(max_depth=_WALK_MAX_DEPTH)
        raise InvalidSubmission(f"{where or 'body'}: not valid JSON: nested too deeply") from None
    duplicate = _duplicate_key(body, len(doc.visits))
    if duplicate:
        raise InvalidSubmission(duplicate)
    return doc


_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_EXPECTED = {"int": "must be an integer", "str": "must be a string", "array": "must be a list",
             "object": "must be an object"}


def _validation_message(text: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.visits[0].count`" in our words, naming the field."""
    match = _MSGSPEC_PATH.match(text)
    what, path = match["what"], (match["path"] or "").lstrip(".")
    missing = re.match(r"Object missing required field `([^`]+)`", what)
    if missing:
        return f"{path + '.' if path else ''}{missing[1]}: missing"
    if not path:
        return "body must be a JSON object with count and visits"
    expected = re.match(r"Expected `([a-z]+)`", what)
    if expected:
        words = _EXPECTED.get(expected[1], f"must be of type {expected[1]}")
        if path.endswith(".image_url") and expected[1] == "array":
            words = "must be a list of URLs"
        return f"{path}: {words}"
    if what.startswith("Integer value out of range"):
        return f"{path}: integer out of range"
    return f"{path}: {what}"


def _decode_message(body: bytes, text: str) -> str:
    """A malformed body, named by the field where the parser stopped (msgspec gives only the byte)."""
    offset = re.search(r"\(byte (\d+)\)", text)
    if offset is None:  # msgspec names no byte for invalid UTF-8
        if "UTF-8" in text:
            return "body is not UTF-8 text"
        return f"body is not valid JSON: {text}"
    at = int(offset[1])
    where = _Walker(body).run(stop=at) or "body"
    if at < len(body) and body[at] >= 0x80:
        return f"{where}: body is not UTF-8 text (byte {at})"
    reason = text.removeprefix("JSON is malformed: ")
    reason = re.sub(r"\s*\(byte \d+\)", "", reason)
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        if body.startswith(literal, at):
            reason = f"{literal.decode().lstrip('-')} is not allowed"
    if "surrogate" in reason:
        reason = "a lone UTF-16 surrogate (\\ud800-\\udfff) is not text"
    return f"{where}: not valid JSON: {reason} (byte {at})"


def _refuse_too_many_values(body: bytes, limits: SubmitLimits) -> None:
    """Refuse a body with more list elements than a job can need, before anything is built (see the module
    docstring). Counted in C: commas, then (only when there are many) those inside strings, which are
    found one by one only when there are not too many strings to look at."""
    commas = body.count(b",")
    if commas <= limits.max_commas:
        return
    strings = (body.count(b'"') - body.count(b'\\"')) // 2
    if strings > limits.max_strings:
        raise InvalidSubmission(f"body: more than {limits.max_strings} strings ({strings}); "
                                f"a job holds at most {limits.max_images_per_job} images")
    commas -= sum(match.group().count(b",") for match in _STRING.finditer(body))
    if commas > limits.max_commas:
        raise InvalidSubmission(f"body: more than {limits.max_commas} JSON values ({commas} commas outside "
                                f"strings); a job holds at most {limits.max_images_per_job} images")


#: Digits as "0", anything else as " ": runs of digits become runs of "0" that bytes.find sees in C.
_DIGITS_ONLY = bytes(ord("0") if chr(b).isdigit() and b < 128 else ord(" ") for b in range(256))


def _refuse_long_integers(body: bytes) -> None:
    """An integer literal longer than Python converts, anywhere (a run of digits in a string is fine).
    Linear whatever the runs' lengths: a regular expression would rescan a long run from each digit."""
    if len(body) <= MAX_INT_DIGITS:
        return
    digits, run, start = body.translate(_DIGITS_ONLY), b"0" * (MAX_INT_DIGITS + 1), 0
    while (found := digits.find(run, start)) != -1:
        walker = _Walker(body)
        where = walker.run(stop=found)
        if not walker.in_string:
            raise InvalidSubmission(f"{where or 'body'}: an integer of more than {MAX_INT_DIGITS} digits")
        start = digits.find(b" ", found) if digits.find(b" ", found) != -1 else len(body)


def _duplicate_key(body: bytes, visits: int) -> str | None:
    """A key given twice in one object of the fields we read, named, or None.

    Cheap proof first: each known key appears exactly as often as it must (once, or once per visit) and no
    key can hide behind an escape; only otherwise does the walker look at every object."""
    counts = [body.count(key) for key in _KNOWN_KEYS]
    if (counts == [1, 1, visits, visits, visits] and body.count(b'"callback_url"') <= 1
            and not _ASCII_ESCAPE.search(body)):
        return None
    walker = _Walker(body)
    walker.run(duplicates=True)
    return walker.duplicate


_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]|[^\s\[\]{},:"]+')


class _Walker:
    """A path-tracking scan of a JSON body, only for naming a field: where byte ``stop`` is, where nesting
    passes ``max_depth``, or which key comes twice. Regular expressions find the tokens (C speed); the
    bookkeeping is one small step per token, within _WALK_MAX_TOKENS."""

    def __init__(self, body: bytes):
        self.body = body
        self.frames: list[list] = []  # [is_object, key or index, keys seen (objects), expecting a key]
        self.in_string = False
        self.duplicate: str | None = None

    def path(self) -> str:
        parts = []
        for is_object, label, _seen, _expect in self.frames:
            if label is None:
                break
            parts.append(f"[{label}]" if not is_object else (f".{label}" if parts else str(label)))
        text = "".join(parts)
        return text if len(text) <= 200 else text[:200] + "..."

    def run(self, stop: int | None = None, max_depth: int | None = None, duplicates: bool = False) -> str:
        end = len(self.body) if stop is None else stop
        for n, match in enumerate(_TOKEN.finditer(self.body, 0, len(self.body))):
            if match.start() >= end or n >= _WALK_MAX_TOKENS:
                break
            if match.end() > end and match.group()[:1] == b'"':
                self.in_string = True
                break
            token = match.group()
            if token in (b"{", b"["):
                self.frames.append([token == b"{", None if token == b"{" else 0, set(), token == b"{"])
                if max_depth is not None and len(self.frames) > max_depth:
                    break
            elif token in (b"}", b"]"):
                if self.frames:
                    self.frames.pop()
            elif token == b",":
                if self.frames:
                    frame = self.frames[-1]
                    if frame[0]:
                        frame[3] = True
                    else:
                        frame[1] += 1
            elif token[:1] == b'"' and self.frames and self.frames[-1][0] and self.frames[-1][3]:
                frame = self.frames[-1]
                key = _key_text(token)
                frame[3] = False
                if duplicates and key in frame[2]:
                    frame[1] = key
                    self.duplicate = f"{self.path()}: duplicate key {key!r} (body is not valid JSON)"
                    break
                frame[2].add(key)
                frame[1] = key
        return self.path()


def _key_text(token: bytes) -> str:
    if b"\\" not in token:
        return token[1:-1].decode("utf-8", "replace")
    try:
        return json.loads(token)
    except ValueError:
        return token[1:-1].decode("utf-8", "replace")
