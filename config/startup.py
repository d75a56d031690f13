"""What both programs do before their real work: settings, logging, the spool. One place, one behaviour.

A problem here is the operator's to fix (a bad value, a spool nobody may write), so it ends start-up with
exit code 2 and one line naming the setting and where its value came from; systemd does not restart on 2
(RestartPreventExitStatus=2), so a bad setting does not turn into a restart loop.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from config import Config, SettingError, load, webhook_secrets
from spool import Spool

#: The exit code of a start-up refused for a setting or the spool; the units do not restart on it.
EXIT_BAD_SETTING = 2


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator reads."""


def start(prog: str, description: str | None, classes: Iterable[type], sections: Iterable[str],
          argv: list[str] | None) -> Config:
    """Settings resolved (CommonSettings and ``classes``'; ``sections``: the INI sections the program owns)
    and logging configured. Raises StartupError."""
    try:
        config = load(prog, description, classes, sections, argv)
    except SettingError as exc:
        raise StartupError(str(exc)) from None
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    return config


def open_spool(config: Config) -> Spool:
    """The spool named by the settings, created if missing, refused if others could tamper with it or we
    cannot write it, its id counter above every id it holds. Raises StartupError."""
    where = f"spool_dir ({config.source('spool_dir')})"
    try:
        spool = Spool(config.spool_dir).create()
        problem = spool.upkeep.permission_problem() or spool.upkeep.access_problem()
    except OSError as exc:
        raise StartupError(f"{where}: {config.spool_dir}: {exc.strerror or exc}") from None
    if problem:
        raise StartupError(f"{where}: {problem}")
    try:
        spool.jobs.restore_counter()  # after a power loss the id counter may be older than the last id given
    except OSError as exc:
        raise StartupError(f"{where}: {spool.root / 'next_job_id'}: {exc.strerror or exc}") from None
    return spool


def load_webhook_secrets(config: Config) -> dict[str | None, bytes] | None:
    """The secrets webhook_secrets_file names (config/webhook_secrets.py), or None when it names none.
    Raises StartupError."""
    if not config.webhook_secrets_file:
        return None
    try:
        return webhook_secrets.load(Path(config.webhook_secrets_file))
    except webhook_secrets.SecretsFileError as exc:
        raise StartupError(f"webhook_secrets_file ({config.source('webhook_secrets_file')}): {exc}") from None


def run_main(prog: str, main) -> int:
    """Call ``main()``; a StartupError becomes its one line on stderr and exit code 2."""
    try:
        return main()
    except StartupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
