"""What a power cut leaves: the durable picture after the first N operations of a trace (lazyfs.py).

The rules, the harshest a POSIX filesystem may apply (ext4 with delayed allocation comes close): a file holds
the bytes of its last fsync (nothing if it never had one); a folder holds the entries it had at its last
fsync (the ones it started with if none), so a create, rename, unlink or mkdir survives only once the folder
it changed is fsynced, and a rename across folders may survive in one and not the other (the file then has
two names, or none). Folders are read by inode, so a folder whose own entry was lost takes everything in it.

``Replay`` walks the trace once, forward; ``snapshot()`` at any point materialises what survives into a real
folder, which the spool library, the daemon's recovery and the real processes then use as the spool.
"""
from __future__ import annotations

import os
from pathlib import Path

from tests.powerloss.lazyfs import Op, Trace

#: The kinds after which the durable picture can change (a cut anywhere else equals a cut at the last of these).
DURABLE_KINDS = ("fsync", "fsyncdir")


class Replay:
    def __init__(self, trace: Trace):
        self.trace = trace
        self.entries = {ino: dict(names) for ino, names in trace.initial_dirs.items()}  # current namespace
        self.durable_entries = {ino: dict(names) for ino, names in trace.initial_dirs.items()}
        self.durable_data = dict(trace.initial_data)
        self.links: dict[int, bytes] = {}
        self.position = 0  # operations applied
        self.version = 0  # bumped whenever the durable picture changes

    def advance(self, to: int) -> None:
        """Apply the operations up to ``to`` (exclusive), i.e. a cut right after operation ``to - 1``."""
        for op in self.trace.ops[self.position:to]:
            self.apply(op)
        self.position = max(self.position, to)

    def apply(self, op: Op) -> None:
        kind = op.kind
        if kind in ("create", "symlink"):
            self.entries[op.parent][op.name] = op.ino
            if kind == "symlink":
                self.links[op.ino] = op.data
        elif kind == "mkdir":
            self.entries[op.parent][op.name] = op.ino
            self.entries[op.ino] = {}
            self.durable_entries.setdefault(op.ino, {})
        elif kind == "link":
            self.entries[op.parent][op.name] = op.ino
        elif kind in ("unlink", "rmdir"):
            self.entries[op.parent].pop(op.name, None)
        elif kind == "rename":
            self.entries[op.parent].pop(op.name, None)
            self.entries[op.parent2][op.name2] = op.ino
        elif kind == "fsync":
            self.durable_data[op.ino] = op.data
            self.version += 1
        elif kind == "fsyncdir":
            self.durable_entries[op.ino] = dict(self.entries[op.ino])
            self.version += 1

    def snapshot(self, dest: Path) -> Path:
        """Write the durable picture (of the operations applied so far) under ``dest``; return ``dest``."""
        dest.mkdir(mode=0o700, parents=True)
        stack = [(1, dest)]
        while stack:
            ino, folder = stack.pop()
            for name, child in self.durable_entries.get(ino, {}).items():
                path = folder / name
                if child in self.entries or child in self.durable_entries:  # a folder
                    path.mkdir(mode=0o700)
                    stack.append((child, path))
                elif child in self.links:
                    os.symlink(self.links[child], path)
                else:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.write(fd, self.durable_data.get(child, b""))
                    finally:
                        os.close(fd)
        return dest
