"""Files of ``<name> <value>`` lines: the API tokens file (webapi/auth.py) and the webhook secrets file
(config/webhook_secrets.py). One parser for both, so they agree on what a name is, what a comment is, which
file is refused, and how a bad line is named: ``#`` starts a comment, blank lines are skipped, and a file
every user may write is refused (whoever can write it can let themselves in, or sign as anyone)."""
from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
#: A token's name: what /metrics, the logs and the spool's meta files call a client.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class NameFileError(ValueError):
    """The file cannot be used; the message names the file, and the line when one is wrong."""


def read_name_file(path: Path, parse_value: Callable[[str], T], expected: str,
                   other_names: tuple[str, ...] = ()) -> list[tuple[str, T]]:
    """(name, parsed value) of each line, in order. ``parse_value`` raises ValueError saying what is wrong
    with a value; ``expected`` says what a line looks like; ``other_names`` are names allowed besides NAME
    (the secrets file's ``*``). Raises NameFileError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise NameFileError(f"{path}: {exc}") from None
    if mode & stat.S_IWOTH:
        raise NameFileError(f"{path} is writable by every user (mode {stat.filemode(mode)}); chmod o-w it")
    found = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not (parts[0] in other_names or NAME.fullmatch(parts[0])):
            raise NameFileError(f"{path}:{number}: expected '{expected}'")
        try:
            found.append((parts[0], parse_value(parts[1])))
        except ValueError as exc:
            raise NameFileError(f"{path}:{number}: {exc}") from None
    if not found:
        raise NameFileError(f"{path}: no lines")
    return found
