"""Webhook signing secrets: the file named by the ``webhook_secrets_file`` setting, read by both programs.

One line per API token name, ``<name> whsec_<base64>`` (Standard Webhooks' secret format: 24 to 64 random
bytes), and ``#`` comments. Jobs submitted with that token are signed with that secret, and only its owner
can verify them. ``*`` names the secret of jobs submitted with tokens off (no api_tokens_file). The API
refuses a ``callback_url`` from a caller with no secret; the daemon signs with it. Make a secret and its line
with ``python -m config.webhook_secrets <name>``; give the client the secret (over a safe channel).

The setting that names the file is declared here too (SecretsSettings): both programs read it, and config is
the one package both may import; the API may not import the daemon, nor the daemon the API.
"""
from __future__ import annotations

import base64
import binascii
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "whsec_"
ANYONE = "*"  # the line for jobs without an owner (tokens off)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as the tokens file's names (webapi/auth.py)
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64


class SecretsFileError(ValueError):
    pass


@dataclass(frozen=True)
class SecretsSettings:
    webhook_secrets_file: str = field(default="", metadata={
        "section": "webhook",
        "help": "file of '<token name> whsec_<base64>' lines ('*' for jobs submitted with tokens off): the secret "
                "each job's completion webhook is signed with. Empty: no webhooks, and a callback_url is refused "
                "(make a line: python -m config.webhook_secrets NAME)"})


def parse_secret(text: str) -> bytes:
    """The secret's bytes; ValueError says what is wrong with it."""
    if not text.startswith(PREFIX):
        raise ValueError(f"a secret starts with {PREFIX}")
    try:
        raw = base64.b64decode(text[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 after whsec_") from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise ValueError(f"{len(raw)} bytes; a secret is {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes")
    return raw


def load(path: Path) -> dict[str | None, bytes]:
    """Token name (None for ``*``) -> secret bytes. Raises SecretsFileError naming the line."""
    found: dict[str | None, bytes] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretsFileError(f"{path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not (parts[0] == ANYONE or _NAME.fullmatch(parts[0])):
            raise SecretsFileError(f"{path}:{number}: expected '<token name or *> whsec_<base64>'")
        try:
            secret = parse_secret(parts[1])
        except ValueError as exc:
            raise SecretsFileError(f"{path}:{number}: {exc}") from None
        found[None if parts[0] == ANYONE else parts[0]] = secret
    if not found:
        raise SecretsFileError(f"{path}: no secrets")
    return found


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (argv[0] == ANYONE or _NAME.fullmatch(argv[0])):
        print("usage: python -m config.webhook_secrets <token name, or * with tokens off>", file=sys.stderr)
        return 2
    print(f"{argv[0]} {new_secret()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
