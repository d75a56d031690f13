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
import stat
import sys
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class TokenFileError(ValueError):
    pass


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, digests: dict[str, str]):
        self._digests = [(bytes.fromhex(d), name) for d, name in digests.items()]

    @classmethod
    def load(cls, path: Path) -> Tokens:
        digests = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"{path}: {exc}") from None
        if mode & stat.S_IWOTH:  # whoever can write it can let themselves in
            raise TokenFileError(f"{path} is writable by every user (mode {stat.filemode(mode)}); chmod o-w it")
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not _NAME.fullmatch(parts[0]) or not _DIGEST.fullmatch(parts[1]):
                raise TokenFileError(f"{path}:{number}: expected '<name> <64 hex digits>'")
            digests[parts[1]] = parts[0]
        if not digests:
            raise TokenFileError(f"{path}: no tokens")
        return cls(digests)

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
    if len(argv) != 1 or not _NAME.fullmatch(argv[0]):
        print("usage: retailpulse-token <name>   (letters, digits, _ . -)", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    print(f"token for the client (shown once): {token}")
    print(f"line for the tokens file:          {argv[0]} {digest(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
