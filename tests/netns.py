"""Virtual machines on one LAN, for the tests: a network namespace per VM, each joined to a bridge (in a namespace
of its own) by a veth pair, or by a delay link where latency matters, and partitions made by taking a VM's
port on the bridge down (its packets are dropped, nothing is refused: a cut cable, not a closed port), or between
two VMs only, by a rule on the bridge (nftables' bridge family) that drops what goes between them.

This kernel has no netem, so a delay link is user-space: a TAP device in the VM, another on the bridge, and a
process (``python -m tests.netns delay ...``) that copies each frame from one to the other after the delay.

Everything is made by the test that uses it, under names with its pid, and removed by ``close()``; nothing is
routed to or from the machine's own network. Threads enter a VM with ``inside(vm)``: sockets made there, and
processes started there, are the VM's (a namespace is per thread, and a child inherits its parent thread's).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
SUBNET = "10.29.0"  # the LAN's addresses exist only in the namespaces below


def available() -> str | None:
    """Why these tests cannot run here (not root, no `ip`), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "no `ip` (iproute2) or `nft` (nftables)"
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def _nft(ns: str, rules: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True,
                          timeout=30)
    if done.returncode:
        raise RuntimeError(f"nft in {ns}: {done.stderr.strip()}")


def setns(path: str) -> None:
    """This thread into the network namespace at ``path`` (/run/netns/NAME, or a /proc/.../ns/net)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def require() -> None:
    """Skip the calling test module where namespaces cannot be made; in CI (CI set, .ci/run installs the
    tools) that is a failure, not a skip."""
    import pytest
    why = available()
    if why and os.environ.get("CI"):
        pytest.fail(f"CI: {why}", pytrace=False)
    if why:
        pytest.skip(why, allow_module_level=True)


@dataclass
class Vm:
    name: str  # the test's name for it: "svc", "sched", "w1"
    ns: str  # its namespace
    address: str  # its one address on the LAN
    port: str  # its port's name on the bridge (what a partition takes down)
    delay: subprocess.Popen | None = None


class Lan:
    """VMs on one bridge. ``add(name, delay_ms=...)``; ``cut(name)`` / ``heal(name)``; ``inside(name)``."""

    def __init__(self):
        self.tag = f"rp{os.getpid() % 100000}x{id(self) % 1000}"
        self.bridge_ns = f"{self.tag}-lan"
        self.vms: dict[str, Vm] = {}
        _ip("netns", "add", self.bridge_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        _ip("link", "set", "br0", "up", ns=self.bridge_ns)

    def add(self, name: str, delay_ms: float = 0) -> Vm:
        """A VM: its namespace, loopback up, eth0 with the next address, on the bridge (through a delay link
        of ``delay_ms`` each way, if any)."""
        ns, address, port = f"{self.tag}-{name}", f"{SUBNET}.{len(self.vms) + 2}", f"p{len(self.vms) + 2}"
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
        delay = None
        if delay_ms:
            _ip("tuntap", "add", "dev", "eth0", "mode", "tap", ns=ns)
            _ip("tuntap", "add", "dev", port, "mode", "tap", ns=self.bridge_ns)
            delay = subprocess.Popen([sys.executable, "-m", "tests.netns", "delay", str(delay_ms), ns, "eth0",
                                      self.bridge_ns, port], stdout=subprocess.PIPE, text=True,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if delay.stdout.readline().strip() != "ready":
                raise RuntimeError("the delay link did not start")
        else:
            _ip("link", "add", port, "netns", self.bridge_ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", port, "master", "br0", ns=self.bridge_ns)
        _ip("link", "set", port, "up", ns=self.bridge_ns)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        self.vms[name] = vm = Vm(name, ns, address, port, delay)
        return vm

    def cut(self, name: str) -> None:
        """Partition the VM from every other: its port on the bridge goes down, its packets go nowhere."""
        _ip("link", "set", self.vms[name].port, "down", ns=self.bridge_ns)

    def heal(self, name: str) -> None:
        _ip("link", "set", self.vms[name].port, "up", ns=self.bridge_ns)

    def partition(self, a: str, b: str) -> None:
        """Drop whatever goes between VMs ``a`` and ``b`` (both ways); each still reaches every other VM."""
        x, y = self.vms[a].address, self.vms[b].address
        _nft(self.bridge_ns, "add table bridge partitions\n"
             "add chain bridge partitions forward { type filter hook forward priority 0; }\n"
             f"add rule bridge partitions forward ip saddr {x} ip daddr {y} drop\n"
             f"add rule bridge partitions forward ip saddr {y} ip daddr {x} drop\n")

    def rejoin(self) -> None:
        """Every partition() undone."""
        _nft(self.bridge_ns, "add table bridge partitions\ndelete table bridge partitions\n")

    @contextlib.contextmanager
    def inside(self, name: str):
        """This thread in the VM ``name`` for the block (its sockets, and the processes it starts, are the VM's)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            setns(f"/run/netns/{self.vms[name].ns}")
            try:
                yield self.vms[name]
            finally:
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(home)

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process in the VM."""
        return subprocess.Popen(["ip", "netns", "exec", self.vms[name].ns, *argv], **kwargs)

    def close(self) -> None:
        for vm in self.vms.values():
            if vm.delay is not None:
                vm.delay.kill()
                vm.delay.wait()
            subprocess.run(["ip", "netns", "del", vm.ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.bridge_ns], capture_output=True, timeout=30)


# ------------------------------------------------------------------ the delay link (its own process)
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


def _open_tap(ns: str, device: str) -> int:
    setns(f"/run/netns/{ns}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def delay_link(delay_s: float, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    """Copy frames between the two TAP devices, each after ``delay_s``, in order (a constant delay: a FIFO per
    direction is the whole schedule). A frame that cannot be written (the port is down) is dropped."""
    a, b = _open_tap(ns_a, dev_a), _open_tap(ns_b, dev_b)
    queues = {a: deque(), b: deque()}  # by destination: (due, frame)
    peer = {a: b, b: a}
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                with contextlib.suppress(OSError):
                    os.write(fd, queue.popleft()[1])
        due = [queue[0][0] for queue in queues.values() if queue]
        readable, _, _ = select.select([a, b], [], [], max(0.0, min(due) - now) if due else 1.0)
        now = time.monotonic()
        for fd in readable:
            for _ in range(64):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:  # the device is down
                    break
                queues[peer[fd]].append((now + delay_s, frame))


if __name__ == "__main__":
    if sys.argv[1] == "delay":
        threading.current_thread().name = "delay-link"
        delay_link(float(sys.argv[2]) / 1000, *sys.argv[3:7])
