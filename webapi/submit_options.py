"""What a client may add to a submission besides the job: an ``Idempotency-Key`` header, so that a retried
submit answers the job the first one made, and a ``callback_url``, told when the job finishes. Pure: text
in, a clean value or an InvalidSubmission naming the field out."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

import msgspec

from spool.records import Visit

from webapi.validate import InvalidSubmission, SubmitLimits, check_url

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # Stripe's name for "this answer is the first request's"
MAX_KEY_CHARS = 255
#: Visible ASCII but the double quote and the backslash: a UUID, base64, a client's own ids all fit, and a key
#: can be echoed in a message and kept in a file as it is.
_KEY = re.compile(r'[!#-\[\]-~]{1,%d}' % MAX_KEY_CHARS)
#: The same rule for the OpenAPI document, with the IETF draft's quoted form (a Structured Field string).
KEY_PATTERN = r'^([!#-\[\]-~]{1,%d}|"[!#-\[\]-~]{1,%d}")$' % (MAX_KEY_CHARS, MAX_KEY_CHARS)


def header_text(environ: dict, name: str) -> str | None:
    """Header ``name`` of a request as text, None when absent. A WSGI server hands headers over as bytes read
    as Latin-1; HTTP's text is UTF-8 (RFC 9110 allows only ASCII in new headers), so anything else is the
    client's mistake: InvalidSubmission naming the header and the byte, never an error deeper in (a 500)."""
    raw = environ.get("HTTP_" + name.upper().replace("-", "_"))
    if raw is None:
        return None
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError as exc:  # (encode: a server that gave us text already; then it is what it is)
        if isinstance(exc, UnicodeEncodeError):
            return raw
        raise InvalidSubmission(f"{name}: header is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                                f"{exc.start}); send ASCII") from None


def idempotency_key(header: str | None) -> str | None:
    """The key the header carries, None without one. ``"abc"`` (the IETF draft's quoted form) and ``abc`` are
    the same key."""
    if header is None:
        return None
    key = header.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _KEY.fullmatch(key):
        raise InvalidSubmission(f"{IDEMPOTENCY_HEADER}: must be 1 to {MAX_KEY_CHARS} visible ASCII characters "
                                "without quotes or backslashes (a UUID will do)")
    return key


def request_sha256(count: int, visits: list[Visit], callback_url: str | None) -> str:
    """The request as the service understands it, fingerprinted: the same job sent with other spacing or key
    order is the same request; any change to what would be stored is another. (The same text as before
    visits were records: a retry across an upgrade still finds its key.)"""
    canonical = json.dumps({"count": count, "visits": msgspec.to_builtins(visits), "callback_url": callback_url},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def callback_url(value: str | None, limits: SubmitLimits, owner: str | None,
                 secrets: Mapping[str | None, bytes] | None) -> str | None:
    """The submission's callback_url (``value``, None when absent), checked as image URLs are (its address is
    checked when the daemon connects); refused when no webhook secret would sign it."""
    if value is None:
        return None
    url = check_url(value, "callback_url", limits)
    if secrets is None:
        raise InvalidSubmission("callback_url: this service sends no webhooks (no webhook_secrets_file)")
    if owner not in secrets:
        raise InvalidSubmission(f"callback_url: no webhook secret is set up for token {owner!r}; ask the operator"
                                if owner else "callback_url: no webhook secret is set up for jobs without a token")
    return url
