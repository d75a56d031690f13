"""Spool trouble the daemon outlives: a folder or file it may not read, list or move (permissions), a disk too
full to write a note. Never fatal, never a crash loop: each kind is logged when it starts, again every
REPEAT_S while it lasts (the main loop meets it every turn), and once when it is over; whatever failed is
tried again on a later turn. The API answers 503 naming the same path meanwhile (it reads the same files).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("retailpulse.daemon")

#: While a trouble lasts, its log line comes back this often (not every turn of the loop).
REPEAT_S = 60.0


def spool_error(exc: OSError) -> str:
    """``results/7: Permission denied``: the file an OSError is about, named within the spool, and why."""
    name = str(exc.filename or "")
    where = "/".join(name.split("/")[-2:])
    return f"{where}: {exc.strerror or exc}" if where else str(exc.strerror or exc)


class Trouble:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.lasting: dict[str, float] = {}  # what failed -> clock() of its last log line

    def failed(self, what: str, exc: OSError | str) -> None:
        """``what`` (``"listing incoming/"``) failed with ``exc``; logged unless it was said lately."""
        now = self.clock()
        last = self.lasting.get(what)
        if last is None or now - last >= REPEAT_S:
            why = spool_error(exc) if isinstance(exc, OSError) else exc
            log.error("%s: %s; the daemon carries on and tries again", what, why)
            self.lasting[what] = now

    def ok(self, what: str) -> None:
        """``what`` worked: if it had failed, say it is over."""
        if self.lasting.pop(what, None) is not None:
            log.info("%s: works again", what)
