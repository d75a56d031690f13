"""A FUSE filesystem that remembers what a power cut would keep, after Jepsen's LazyFS.

What processes see is served at once from a real backing folder (the page cache). Beside it, the trace
records every operation that could change what is on disk, in the order the kernel handed them to us (one
mutex serves them one at a time, so that order is the order of their effects), with what the disk would hold after it:
a file's data becomes durable only at its fsync/fdatasync (the trace keeps those bytes), a folder's entries
(create, rename, unlink, mkdir, rmdir) only at an fsync of that folder; a rename across folders needs both.
``durable.py`` turns any prefix of the trace into the spool a power cut there leaves behind.

Faults, as LazyFS takes them (``lazyfs::crash::op=...::from_rgx=...::occurrence=N``): the Nth operation of a
kind on a path matching a regex either *crashes* the filesystem right after it (every later operation fails
with EIO: the machine is gone, and the test kills the processes) or *fails* with EIO itself, optionally after
a delay (an fsync that fails makes nothing durable).

Run as ``python -m tests.powerloss.lazyfs BACKING MOUNT``; commands on stdin, one reply line each on stdout
(``LazyFS`` below is the test's side): ``count``, ``mark TEXT``, ``crash OP REGEX N``, ``eio OP REGEX N
[DELAY_S]``, ``freeze``, ``dump PATH`` (the trace, pickled). Unmounting (``fusermount3 -u``) ends it.

mfusepy: ctypes over libfuse3's high-level API, pure Python (pip installs it; Debian's fuse3 brings the
library and fusermount3), where pyfuse3 must be compiled against libfuse3-dev and brings trio.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The kinds of operation the trace records; a cut can be placed after any of them.
MUTATIONS = ("create", "mkdir", "write", "truncate", "fsync", "fsyncdir", "rename", "unlink", "rmdir", "link",
             "symlink", "chmod")


@dataclass
class Op:
    """One traced operation. ``ino``/``parent``/``name`` in the filesystem's own inode numbers (root: 1);
    ``data``: for fsync, the bytes made durable; ``path``: as the process named it (for faults, reports)."""

    kind: str
    pid: int
    path: str
    ino: int = 0
    parent: int = 0
    name: str = ""
    parent2: int = 0
    name2: str = ""
    data: bytes | None = None
    is_dir: bool = False


@dataclass
class Fault:
    action: str  # "crash" (freeze after it) or "eio" (fail it)
    op: str
    pattern: re.Pattern
    occurrence: int
    delay_s: float = 0.0
    sync: str = ""  # crash: a folder fsynced (by "another process") right before the power goes
    seen: int = 0

    def matches(self, op: str, path: str) -> bool:
        if op not in self.op.split("|") or not self.pattern.search(path):
            return False
        self.seen += 1
        return self.seen == self.occurrence


@dataclass
class Trace:
    """What the filesystem started with (every file and folder durable) and the operations since."""

    initial_dirs: dict[int, dict[str, int]] = field(default_factory=dict)  # folder ino -> name -> ino
    initial_data: dict[int, bytes] = field(default_factory=dict)  # file ino -> bytes
    initial_is_dir: dict[int, bool] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)


class PassThrough:
    """The mfusepy operations: passthrough to ``backing``, every change recorded in ``self.trace``."""

    use_ns = True

    def __init__(self, backing: Path):
        self.backing = backing
        self.mutex = threading.Lock()  # not .lock: that name is FUSE's POSIX-lock operation
        self.trace = Trace()
        self.entries: dict[int, dict[str, int]] = {}  # the current namespace, in our inode numbers
        self.is_dir: dict[int, bool] = {}
        self.handles: dict[int, int] = {}  # open file handle (backing fd) -> ino
        self.next_ino = 1
        self.faults: list[Fault] = []
        self.frozen = False
        self._scan(1, backing)
        self.trace.initial_dirs = {ino: dict(names) for ino, names in self.entries.items()}
        self.trace.initial_is_dir = dict(self.is_dir)

    def _new_ino(self, is_dir: bool) -> int:
        ino, self.next_ino = self.next_ino, self.next_ino + 1
        self.is_dir[ino] = is_dir
        if is_dir:
            self.entries[ino] = {}
        return ino

    def _scan(self, _root: int, folder: Path) -> None:
        root = self._new_ino(True)
        stack = [(root, folder)]
        while stack:
            ino, path = stack.pop()
            for entry in os.scandir(path):
                child = self._new_ino(entry.is_dir(follow_symlinks=False))
                self.entries[ino][entry.name] = child
                if self.is_dir[child]:
                    stack.append((child, Path(entry.path)))
                elif entry.is_file(follow_symlinks=False):
                    self.trace.initial_data[child] = Path(entry.path).read_bytes()

    # ------------------------------------------------------------ names
    def _real(self, path: str) -> str:
        return str(self.backing) + path

    def _lookup(self, path: str) -> tuple[int, str, int | None]:
        """(parent ino, name, ino or None) of a path as FUSE gives it ("/a/b")."""
        parent = 1
        parts = [p for p in path.split("/") if p]
        for part in parts[:-1]:
            parent = self.entries[parent][part]
        name = parts[-1] if parts else ""
        return parent, name, (self.entries[parent].get(name) if parts else 1)

    # ------------------------------------------------------------ faults and tracing
    def _gate(self, kind: str, path: str) -> Fault | None:
        """Before an operation: EIO if frozen or if an eio fault hits it now; the crash fault it hits, if any."""
        if self.frozen:
            raise OSError(errno.EIO, "power cut")
        crash = None
        for fault in self.faults:
            if fault.matches(kind, path.lstrip("/")):
                if fault.action == "eio":
                    if fault.delay_s:  # the other operations go on meanwhile, as on a slow failing disk
                        self.mutex.release()
                        time.sleep(fault.delay_s)
                        self.mutex.acquire()
                    raise OSError(errno.EIO, "injected fsync failure")
                crash = fault
        return crash

    def _record(self, op: Op, crash: Fault | None) -> None:
        self.trace.ops.append(op)
        if crash is not None:
            if crash.sync:
                self.trace.ops.append(Op("fsyncdir", 0, crash.sync, ino=self._lookup("/" + crash.sync)[2]))
            self.frozen = True

    def _pid(self) -> int:
        from mfusepy import fuse_get_context
        return fuse_get_context()[2]

    def _mutate(self, kind: str, path: str, action, **fields):
        with self.mutex:
            crash = self._gate(kind, path)
            result = action()
            op = fields.pop("op", None) or Op(kind, self._pid(), path.lstrip("/"), **fields)
            self._record(op, crash)
            return result

    def _read(self, path: str, action):
        with self.mutex:
            if self.frozen:
                raise OSError(errno.EIO, "power cut")
            return action()

    # ------------------------------------------------------------ reads
    def getattr(self, path, fh=None):
        def stat():  # an open file's fstat comes without its path (the kernel gives the handle only)
            st = os.fstat(fh) if path is None and fh is not None else os.lstat(self._real(path))
            return {key: getattr(st, key) for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                                      "st_ino")} | {
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}
        return self._read(path or "", stat)

    def access(self, path, amode):
        def check():
            if not os.access(self._real(path), amode):
                raise OSError(errno.EACCES, "no access")
        return self._read(path, check)

    def readdir(self, path, fh):
        return self._read(path, lambda: [".", "..", *os.listdir(self._real(path))])

    def readlink(self, path):
        return self._read(path, lambda: os.readlink(self._real(path)))

    def statfs(self, path):
        def statfs():
            st = os.statvfs(self._real(path))
            return {key: getattr(st, key) for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                      "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}
        return self._read(path, statfs)

    def open(self, path, flags):
        def do_open():
            # Read-write underneath even when the process writes only: fsync reads back what it makes durable.
            access = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
            fd = os.open(self._real(path), (flags & ~os.O_ACCMODE & ~os.O_CREAT & ~os.O_EXCL) | access)
            self.handles[fd] = self._lookup(path)[2]
            return fd
        if flags & os.O_TRUNC:
            parent, name, ino = self._lookup(path)
            return self._mutate("truncate", path, do_open, ino=ino)
        return self._read(path, do_open)

    def read(self, path, size, offset, fh):
        return self._read(path, lambda: os.pread(fh, size, offset))

    def opendir(self, path):
        return self._read(path, lambda: 0)

    def releasedir(self, path, fh):
        return 0

    def release(self, path, fh):
        with self.mutex:
            self.handles.pop(fh, None)
            os.close(fh)
        return 0

    def flush(self, path, fh):
        return 0

    # ------------------------------------------------------------ changes
    def create(self, path, mode, flags):
        def do_create():
            fd = os.open(self._real(path), (flags & ~os.O_ACCMODE) | os.O_RDWR | os.O_CREAT, mode)
            parent, name, ino = self._lookup(path)
            if ino is None:
                ino = self._new_ino(False)
                self.entries[parent][name] = ino
            self.handles[fd] = ino
            return fd, parent, name, ino
        with self.mutex:
            crash = self._gate("create", path)
            fd, parent, name, ino = do_create()
            self._record(Op("create", self._pid(), path.lstrip("/"), ino=ino, parent=parent, name=name), crash)
            return fd

    def write(self, path, data, offset, fh):
        return self._mutate("write", path, lambda: os.pwrite(fh, data, offset), ino=self.handles.get(fh, 0))

    def truncate(self, path, length, fh=None):
        def do_truncate():
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._real(path), length)
        ino = self.handles.get(fh) if fh is not None else self._lookup(path)[2]
        return self._mutate("truncate", path, do_truncate, ino=ino)

    def fsync(self, path, datasync, fh):
        def do_fsync():
            os.fsync(fh)
            return os.pread(fh, os.fstat(fh).st_size, 0)
        with self.mutex:
            crash = self._gate("fsync", path or "")
            data = do_fsync()
            self._record(Op("fsync", self._pid(), (path or "").lstrip("/"), ino=self.handles[fh], data=data), crash)
        return 0

    def fsyncdir(self, path, datasync, fh):
        def do_fsyncdir():
            fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self._mutate("fsyncdir", path, do_fsyncdir, ino=self._lookup(path)[2])

    def mkdir(self, path, mode):
        with self.mutex:
            crash = self._gate("mkdir", path)
            os.mkdir(self._real(path), mode)
            parent, name, _ = self._lookup(path)
            ino = self._new_ino(True)
            self.entries[parent][name] = ino
            self._record(Op("mkdir", self._pid(), path.lstrip("/"), ino=ino, parent=parent, name=name,
                            is_dir=True), crash)
        return 0

    def _remove(self, kind: str, path: str, remove) -> int:
        with self.mutex:
            crash = self._gate(kind, path)
            remove(self._real(path))
            parent, name, ino = self._lookup(path)
            del self.entries[parent][name]
            self._record(Op(kind, self._pid(), path.lstrip("/"), ino=ino, parent=parent, name=name), crash)
        return 0

    def unlink(self, path):
        return self._remove("unlink", path, os.unlink)

    def rmdir(self, path):
        return self._remove("rmdir", path, os.rmdir)

    def rename(self, old, new):
        with self.mutex:
            crash = self._gate("rename", old)
            os.rename(self._real(old), self._real(new))
            parent, name, ino = self._lookup(old)
            parent2, name2, _ = self._lookup(new)
            del self.entries[parent][name]
            self.entries[parent2][name2] = ino
            self._record(Op("rename", self._pid(), old.lstrip("/"), ino=ino, parent=parent, name=name,
                            parent2=parent2, name2=name2), crash)
        return 0

    def link(self, target, source):
        with self.mutex:
            crash = self._gate("link", target)
            os.link(self._real(source), self._real(target))
            ino = self._lookup(source)[2]
            parent, name, _ = self._lookup(target)
            self.entries[parent][name] = ino
            self._record(Op("link", self._pid(), target.lstrip("/"), ino=ino, parent=parent, name=name), crash)
        return 0

    def symlink(self, target, source):
        with self.mutex:
            crash = self._gate("symlink", target)
            os.symlink(source, self._real(target))
            parent, name, _ = self._lookup(target)
            ino = self._new_ino(False)
            self.entries[parent][name] = ino
            self._record(Op("symlink", self._pid(), target.lstrip("/"), ino=ino, parent=parent, name=name,
                            data=os.fsencode(source)), crash)
        return 0

    def chmod(self, path, mode, fh=None):
        return self._mutate("chmod", path, lambda: os.chmod(self._real(path), mode), ino=self._lookup(path)[2])

    def chown(self, path, uid, gid, fh=None):
        return self._read(path, lambda: os.lchown(self._real(path), uid, gid))

    def utimens(self, path, times=None, fh=None):
        return self._read(path, lambda: os.utime(self._real(path), ns=times) if times else os.utime(self._real(path)))

    # ------------------------------------------------------------ control (stdin)
    def command(self, line: str) -> str:
        words = line.split()
        with self.mutex:
            if words[0] == "count":
                return str(len(self.trace.ops))
            if words[0] == "mark":
                self.trace.ops.append(Op("mark", os.getpid(), line.split(None, 1)[1]))
                return str(len(self.trace.ops))
            if words[0] in ("crash", "eio"):
                extra = words[4] if len(words) > 4 else ""
                delay, sync = (float(extra or 0), "") if words[0] == "eio" else (0.0, extra)
                self.faults.append(Fault(words[0], words[1], re.compile(words[2]), int(words[3]), delay, sync))
                return "ok"
            if words[0] == "freeze":
                self.frozen = True
                return str(len(self.trace.ops))
            if words[0] == "frozen":
                return "yes" if self.frozen else "no"
            if words[0] == "dump":
                Path(words[1]).write_bytes(pickle.dumps(self.trace, protocol=pickle.HIGHEST_PROTOCOL))
                return "ok"
        return f"unknown command {words[0]}"


def serve(backing: Path, mount: Path) -> None:
    import mfusepy

    ops = PassThrough(backing)

    def control():
        for line in sys.stdin:
            if line.strip():
                sys.stdout.write(ops.command(line.strip()) + "\n")
                sys.stdout.flush()

    def init(_path):  # libfuse calls it once the mount is there: only then may the test use it
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        threading.Thread(target=control, daemon=True).start()

    ops.init = init
    # Each operation runs under one mutex, so the trace's order is the order of the operations' effects.
    # Entries and attributes are not cached by the kernel, so every lookup after a power cut fails too.
    mfusepy.FUSE(ops, str(mount), foreground=True, fsname="lazyfs", hard_remove=True, entry_timeout=0,
                 attr_timeout=0, negative_timeout=0)


class LazyFS:
    """The test's side: mounts ``mount`` over ``backing`` in a child process and talks to it."""

    def __init__(self, backing: Path, mount: Path):
        self.backing, self.mount = backing, mount
        backing.mkdir(parents=True, exist_ok=True)
        mount.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.powerloss.lazyfs", str(backing), str(mount)],
                                     cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"lazyfs did not mount {mount} (exit code {self.proc.wait()})")

    def ask(self, line: str) -> str:
        with self.lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline().strip()

    def count(self) -> int:
        return int(self.ask("count"))

    def mark(self, text: str) -> int:
        return int(self.ask(f"mark {text}"))

    def crash_after(self, op: str, pattern: str, occurrence: int = 1, sync: str = "") -> None:
        """Freeze right after the ``occurrence``-th ``op`` (kinds joined by |) on a path matching ``pattern``;
        ``sync``: a folder fsynced just before, as another process's fsync would."""
        assert self.ask(f"crash {op} {pattern} {occurrence} {sync}".rstrip()) == "ok"

    def fail(self, op: str, pattern: str, occurrence: int = 1, delay_s: float = 0.0) -> None:
        assert self.ask(f"eio {op} {pattern} {occurrence} {delay_s}") == "ok"

    def freeze(self) -> int:
        return int(self.ask("freeze"))

    def frozen(self) -> bool:
        return self.ask("frozen") == "yes"

    def trace(self, path: Path) -> Trace:
        assert self.ask(f"dump {path}") == "ok"
        return pickle.loads(path.read_bytes())

    def unmount(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False, capture_output=True)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


if __name__ == "__main__":  # the classes pickled in the trace must be this module's, not __main__'s
    from tests.powerloss import lazyfs
    lazyfs.serve(Path(sys.argv[1]), Path(sys.argv[2]))
