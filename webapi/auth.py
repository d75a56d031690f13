"""Optional API tokens: a client sends ``Authorization: Bearer <token>``; we keep only SHA-256 digests.

The tokens file (setting ``api_tokens_file``) has one line per client, ``<name> <sha256 hex of the token>``,
and ``#`` comments. Make a token and its line with ``retailpulse-token <name>`` (this module's main, installed
as a command with the package). A job belongs to the
name whose token submitted it; other tokens see it as unknown. A presented token is hashed and compared
with every digest in constant time, so neither the comparison nor the loop tells which one came close.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from pathlib import Path

from config.name_files import NAME, NameFileError, read_name_file

_DIGEST = re.compile(r"[0-9a-f]{64}")


class TokenFileError(NameFileError):
    pass


def _digest(text: str) -> str:
    if not _DIGEST.fullmatch(text):
        raise ValueError("expected '<name> <64 hex digits>'")
    return text


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, digests: dict[str, str]):
        self._digests = [(bytes.fromhex(d), name) for d, name in digests.items()]

    @classmethod
    def load(cls, path: Path) -> Tokens:
        """The tokens file; a name may have several tokens (one per line: rotation). Raises TokenFileError."""
        try:
            lines = read_name_file(path, _digest, "<name> <64 hex digits>")
        except NameFileError as exc:
            raise TokenFileError(str(exc).replace(": no lines", ": no tokens")) from None
        return cls({digest: name for name, digest in lines})

    def identify(self, authorization: str | None) -> str | None:
        """The name behind an ``Authorization`` header, or None if it carries no valid bearer token."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for stored, name in self._digests:
            if hmac.compare_digest(presented, stored):
                found = name
        return found


def main(argv: list[str] | None = None) -> int:
    """``retailpulse-token <name>``: a new token for a client, and its line for the tokens file."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not NAME.fullmatch(argv[0]):
        print("usage: retailpulse-token <name>   (letters, digits, _ . -)", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    print(f"token for the client (shown once): {token}")
    print(f"line for the tokens file:          {argv[0]} {digest(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
