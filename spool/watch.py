"""Watching spool folders for files that arrive (inotify(7), a few lines of ctypes over libc): how the daemon
hears of a job the moment its file is renamed into incoming/ (or of a request in control/), as Postfix's
pickup hears of new mail through its FIFO, and how an API process hears that a status it has clients
waiting on was rewritten. Nothing is asked of the writer: a file dropped by hand is seen too.

Looking stays the fallback where the kernel cannot tell (a limit on watches, a spool shared over NFS):
``Watch.available`` says so, and the reason is logged once. A thread of its own blocks on the watch and calls
``on_change`` with the names that arrived, in batches (one call for however many arrived at once).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("retailpulse.spool")

IN_MOVED_TO = 0x00000080  # a rename into the folder: how every spool file arrives
IN_CLOSE_WRITE = 0x00000008  # a file written in place (by hand: echo > control/7.cancel)
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENTS = IN_MOVED_TO | IN_CLOSE_WRITE
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class Watch:
    """Calls ``on_change(changes)`` from a thread of its own whenever files arrive in ``folders``; ``changes``
    is a list of (folder, file name). When the kernel cannot watch, nothing ever calls it (``available``)."""

    def __init__(self, folders: Iterable[Path], on_change: Callable[[list[tuple[Path, str]]], None]):
        folders = list(folders)
        self.on_change = on_change
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._fd, self._folders = -1, {}
        self._thread: threading.Thread | None = None
        try:
            self._fd, self._folders = _watch(folders)
        except OSError as exc:
            log.warning("no wake-ups from the kernel for %s (%s): found by looking instead",
                        ", ".join(str(f) for f in folders), exc.strerror or exc)
            return
        self._thread = threading.Thread(target=self._run, name="spool-watch", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            changes = []
            try:
                while data := os.read(self._fd, 65536):  # drain: one call for however many arrived
                    changes.extend(self._parse(data))
            except BlockingIOError:
                pass
            except OSError as exc:
                log.warning("watching the spool stopped (%s): found by looking instead", exc)
                return
            self.on_change(changes)

    def _parse(self, data: bytes) -> list[tuple[Path, str]]:
        changes, offset = [], 0
        while offset + _EVENT.size <= len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].split(b"\0", 1)[0]
            offset += _EVENT.size + length
            if wd in self._folders:
                changes.append((self._folders[wd], os.fsdecode(name)))
        return changes

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        for fd in (self._fd, self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)


def _watch(folders: list[Path]) -> tuple[int, dict[int, Path]]:
    """An inotify file descriptor watching ``folders`` for files arriving, and watch number -> folder; OSError
    when there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOSYS, f"inotify is not available here ({exc})") from None
    add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    fd = init(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    watched = {}
    for folder in folders:
        wd = add(fd, os.fsencode(folder), _EVENTS)
        if wd < 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise OSError(code, f"{folder}: {os.strerror(code)}")
        watched[wd] = Path(folder)
    return fd, watched
