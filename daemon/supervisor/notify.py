"""The sd_notify protocol, the few lines of it we need: one datagram per message to $NOTIFY_SOCKET.

Under systemd with ``Type=notify`` the daemon says READY=1 once its start-up recovery is done, WATCHDOG=1
while its main loop makes progress (at half of $WATCHDOG_USEC), STATUS=<a line for systemctl status> and
STOPPING=1. Without $NOTIFY_SOCKET (a terminal, the tests) every call does nothing.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises. None: no watchdog.
        self.watchdog_interval_s = int(usec) / 2e6 if watched else None
        self._next_ping = 0.0

    def send(self, **fields: object) -> None:
        """send(READY=1, STATUS="...") -> "READY=1\\nSTATUS=..."; errors are ignored, as sd_notify does."""
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError:
            pass

    def progress(self, status: str) -> None:
        """Called by the main loop each turn: a watchdog ping and a status line, at most every interval."""
        now = time.monotonic()
        if self.address is None or now < self._next_ping:
            return
        self._next_ping = now + (self.watchdog_interval_s or 1.0)
        if self.watchdog_interval_s is not None:
            self.send(WATCHDOG=1, STATUS=status)
        else:
            self.send(STATUS=status)
