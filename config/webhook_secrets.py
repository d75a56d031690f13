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
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from config.name_files import NAME, NameFileError, read_name_file

PREFIX = "whsec_"
ANYONE = "*"  # the line for jobs without an owner (tokens off)
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64


class SecretsFileError(NameFileError):
    pass


@dataclass(frozen=True)
class SecretsSettings:
    webhook_secrets_file: str = field(default="", metadata={
        "section": "webhook",
        "help": "file of '<token name> whsec_<base64>' lines ('*' for jobs submitted with tokens off): the secret "
                "each job's completion webhook is signed with. Empty: no webhooks, and a callback_url is refused "
                "(make a line: /opt/retail-pulse/.venv/bin/python -m config.webhook_secrets NAME)"})


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
    """Token name (None for ``*``) -> secret bytes; a name given twice keeps its last line. Raises
    SecretsFileError naming the line."""
    try:
        lines = read_name_file(path, parse_secret, "<token name or *> whsec_<base64>", other_names=(ANYONE,))
    except NameFileError as exc:
        raise SecretsFileError(str(exc).replace(": no lines", ": no secrets")) from None
    return {None if name == ANYONE else name: secret for name, secret in lines}


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (argv[0] == ANYONE or NAME.fullmatch(argv[0])):
        print("usage: python -m config.webhook_secrets <token name, or * with tokens off>", file=sys.stderr)
        return 2
    print(f"{argv[0]} {new_secret()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
