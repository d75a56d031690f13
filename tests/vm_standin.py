"""A Debian VM as docs/operations.md's steps meet it, on this machine: their commands run as written, as root,
in namespaces of their own (mount, network with its own loopback, pid), so that what they install and start
stays there and ends with them. Used by tests/test_docs_commands.py; not a test itself.

Inside: a private copy of /etc (useradd, /etc/systemd/system, nginx's sites, certificates), empty /opt,
/var/lib (dpkg's database and nginx's folder put back), /var/log, /run and /root, and three commands standing
in for what a test cannot have, each saying so when it cannot do as asked:

    apt-get     installs nothing (no network): each package must already be installed here, as on the VM after
                the step; "nginx" is started as its package's postinst does (the default site, port 80).
    systemctl   daemon-reload; enable --now / start / restart / stop / status / reload of the units in
                /etc/systemd/system, run as systemd runs them: User=, EnvironmentFile=, Environment=,
                StateDirectory=, Type=notify (it waits for READY=1 and shows STATUS=, through NOTIFY_SOCKET).
                Not the sandboxing directives (tests/test_units_sandbox.py runs those).
    journalctl  -u UNIT [-n N] [-f]: what the unit printed (with -f, what there is: a test cannot follow for ever);
                UNIT may be a pattern (-u 'retail-pulse-dask-worker@*'): each matching unit's lines, unit by unit.
    editor      a test cannot type: it leaves the file as it is (the test checks the file already holds what
                the page tells the reader to put there).

Everything else (useradd, git, python3 -m venv, pip, openssl, nginx -t, nft, curl, jq, runuser) is the real one.
pip has no network: PIP_NO_INDEX and PIP_FIND_LINKS point it at the checkout's .venv/wheelhouse. The VMs of
one test see each other on a StandInLan (10.0.0.0/24, the addresses the scale-out pages use), and nothing else.
"""
from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

SYSTEMCTL = r'''#!/usr/bin/python3
"""systemd's systemctl, as far as tests/vm_standin.py stands in for it (its docstring)."""
import os, pwd, shlex, socket, sys, time

STATE, LOGS = "/run/standin-systemd", "/var/log/standin-journal"


def unit_path(name):
    name = name if "." in name else name + ".service"
    stem, _, instance = name.partition("@")
    template = f"{stem}@.service" if instance else name
    return f"/etc/systemd/system/{template}", name, instance.removesuffix(".service")


def directives(name):
    path, full, instance = unit_path(name)
    found = {}
    with open(path) as f:
        text = f.read().replace("\\\n", " ")  # continuation lines
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            value = value.strip().replace("%i", instance).replace("%H", socket.gethostname())
            found.setdefault(key.strip(), []).append(value)
    return found, full


def environment(found):
    """Environment=, then EnvironmentFile= over it (systemd: a file's variables override Environment=)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for item in found.get("Environment", []):
        for pair in shlex.split(item):
            key, value = pair.split("=", 1)
            env[key] = value
    for item in found.get("EnvironmentFile", []):
        optional, path = item.startswith("-"), item.lstrip("-")
        try:
            lines = open(path).read().splitlines()
        except FileNotFoundError:
            if optional:
                continue
            raise
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip().strip('"')
    return env


def expand(word, env):
    for key, value in sorted(env.items(), key=lambda kv: -len(kv[0])):
        word = word.replace("${" + key + "}", value).replace("$" + key, value)
    return word


def state(full, key):
    try:
        return open(f"{STATE}/{full}.{key}").read()
    except FileNotFoundError:
        return ""


def alive(full):
    pid = state(full, "pid")
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def supervise(name):
    """The unit's process, and its notify socket read until it exits (run detached by start)."""
    found, full = directives(name)
    env = environment(found)
    user = found.get("User", ["root"])[-1]
    record = pwd.getpwnam(user)
    for directory in found.get("StateDirectory", []):
        for one in directory.split():
            path = f"/var/lib/{one}"
            os.makedirs(path, exist_ok=True)
            os.chown(path, record.pw_uid, record.pw_gid)
            os.chmod(path, int(found.get("StateDirectoryMode", ["0755"])[-1], 8))
    notify = f"{STATE}/{full}.notify"
    if os.path.exists(notify):
        os.unlink(notify)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify)
    os.chmod(notify, 0o777)
    env["NOTIFY_SOCKET"] = notify
    argv = [expand(word, env) for word in shlex.split(found["ExecStart"][-1].lstrip("-@+!"))]
    as_user = ["setpriv", f"--reuid={record.pw_uid}", f"--regid={record.pw_gid}", "--init-groups", "--"]
    log = open(f"{LOGS}/{full}.log", "ab")
    pid = os.fork()
    if pid == 0:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        os.chdir(found.get("WorkingDirectory", ["/"])[-1])
        os.execvpe(as_user[0], as_user + ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv], env)
    open(f"{STATE}/{full}.pid", "w").write(str(pid))
    open(f"{STATE}/{full}.since", "w").write(time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    sock.settimeout(0.2)
    while True:
        try:
            message = sock.recv(65536).decode()
        except socket.timeout:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                open(f"{STATE}/{full}.exit", "w").write(str(os.waitstatus_to_exitcode(code)))
                return
            continue
        for line in message.splitlines():
            key, _, value = line.partition("=")
            if key in ("READY", "STATUS", "STOPPING"):
                open(f"{STATE}/{full}.{key.lower()}", "w").write(value)


def start(name):
    found, full = directives(name)
    if alive(full):
        return 0
    for key in ("exit", "ready", "status", "stopping", "pid"):
        if os.path.exists(f"{STATE}/{full}.{key}"):
            os.unlink(f"{STATE}/{full}.{key}")
    if os.fork() == 0:  # detached, as systemd's children are not the shell's
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            supervise(name)
        os._exit(0)
    deadline = time.monotonic() + 90
    notify = found.get("Type", ["simple"])[-1] == "notify"
    while time.monotonic() < deadline:
        if state(full, "exit"):
            print(f"Job for {full} failed: it exited with {state(full, 'exit')}; see journalctl -u {full}",
                  file=sys.stderr)
            return 1
        if (state(full, "ready") == "1") if notify else state(full, "pid"):
            return 0
        time.sleep(0.05)
    print(f"Job for {full} failed: no READY=1 within 90 s", file=sys.stderr)
    return 1


def stop(name):
    _found, full = directives(name)
    if alive(full):
        os.kill(int(state(full, "pid")), 15)
        deadline = time.monotonic() + 90
        while (alive(full) or not state(full, "exit")) and time.monotonic() < deadline:
            time.sleep(0.05)  # until its supervisor has seen it exit: a start after this finds no stale state
    return 0


def status(name):
    found, full = directives(name)
    running = alive(full)
    print(f"* {full} - {found.get('Description', [''])[-1]}")
    print(f"     Active: {'active (running)' if running else 'inactive (dead)'}"
          f"{' since ' + state(full, 'since') if running else ''}")
    if running:
        print(f"   Main PID: {state(full, 'pid')}")
    if state(full, "status"):
        print(f"     Status: \"{state(full, 'status')}\"")
    return 0 if running else 3


def nginx_running():
    try:
        os.kill(int(open("/run/nginx.pid").read()), 0)
        return True
    except (OSError, ValueError):
        return False


def main(argv):
    os.makedirs(STATE, exist_ok=True)
    os.makedirs(LOGS, exist_ok=True)
    if argv[:1] == ["__supervise"]:
        return supervise(argv[1])
    verb, *rest = argv
    units = [word for word in rest if not word.startswith("-")]
    if verb == "daemon-reload":
        return 0
    if units == ["nginx"]:  # Debian's nginx package runs it; systemd only tells it
        if verb == "reload":
            if not nginx_running():
                print("nginx.service is not active, cannot reload.", file=sys.stderr)
                return 1
            return subprocess_call(["nginx", "-s", "reload"])
        if verb in ("start", "restart", "enable"):
            return 0 if nginx_running() else subprocess_call(["nginx"])
        if verb == "status":
            print(f"* nginx.service\n     Active: {'active (running)' if nginx_running() else 'inactive (dead)'}")
            return 0 if nginx_running() else 3
    if verb in ("enable", "start", "restart"):
        if verb == "enable" and "--now" not in rest:
            return 0
        codes = [(stop(unit) if verb == "restart" else 0) or start(unit) for unit in units]
        return max(codes, default=0)
    if verb == "stop":
        return max((stop(unit) for unit in units), default=0)
    if verb == "status":
        return max((status(unit) for unit in units), default=0)
    print(f"systemctl (the test's stand-in): cannot {verb}", file=sys.stderr)
    return 1


def subprocess_call(argv):
    import subprocess
    return subprocess.call(argv)


sys.exit(main(sys.argv[1:]))
'''

JOURNALCTL = r'''#!/usr/bin/python3
"""journalctl -u UNIT [-n N] [-f], as far as tests/vm_standin.py stands in for it."""
import fnmatch, os, sys
args, unit, lines = sys.argv[1:], None, None
while args:
    word = args.pop(0)
    if word == "-u":
        unit = args.pop(0)
    elif word == "-n":
        lines = int(args.pop(0))
folder = "/var/log/standin-journal"
known = sorted(name[:-4] for name in os.listdir(folder)) if os.path.isdir(folder) else []
text = []
for name in known:
    if fnmatch.fnmatchcase(name, unit) or fnmatch.fnmatchcase(name, unit + ".service"):
        with open(f"{folder}/{name}.log", errors="replace") as f:
            text += f.read().splitlines()
print("\n".join(text[-lines:] if lines else text))
'''

APT_GET = r'''#!/bin/sh
# apt-get, as tests/vm_standin.py stands in for it: no network, so every package must be installed already.
set -e
[ "$1" = update ] && exit 0
[ "$1" = install ] || { echo "apt-get (the test's stand-in): cannot $1" >&2; exit 100; }
shift
for package in "$@"; do
  case $package in -*) continue;; esac
  dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q '^install ok installed$' || {
    echo "E: $package is not installed on this test machine (and the test has no network)" >&2; exit 100; }
  if [ "$package" = nginx ] && ! { [ -f /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; }; then
    nginx  # as the package's postinst starts it
  fi
done
'''

EDITOR = r'''#!/bin/sh
# editor, as tests/vm_standin.py stands in for it: a test cannot type, so the file is left as it is.
[ -f "$1" ] || { echo "editor (the test's stand-in): no file $1" >&2; exit 1; }
'''

SETUP = r'''set -e
ip link set lo up
cp -a /etc "$VM/etc" && mount --bind "$VM/etc" /etc
mkdir -p "$VM/dpkg" && mount --bind /var/lib/dpkg "$VM/dpkg"
mount -t tmpfs -o mode=755 tmpfs /var/lib
mkdir -p /var/lib/dpkg /var/lib/nginx && mount --bind -o ro "$VM/dpkg" /var/lib/dpkg
for folder in /opt /var/log /run /root; do mount -t tmpfs -o mode=755 tmpfs "$folder"; done
mkdir -p /var/log/nginx
echo ready
exec sleep infinity
'''


class StandInVM:
    """The namespaces, held by a process of their own; ``run(script)`` runs a shell script in them, as root."""

    def __init__(self, folder: Path, wheelhouse: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        shims = folder / "shims"
        shims.mkdir()
        for name, text in (("systemctl", SYSTEMCTL), ("journalctl", JOURNALCTL), ("apt-get", APT_GET),
                           ("editor", EDITOR)):
            (shims / name).write_text(textwrap.dedent(text))
            (shims / name).chmod(0o755)
        self.env = {"PATH": f"{shims}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8", "HOME": "/root", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse),
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1", "VM": str(folder)}
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "--propagation", "private",
             "sh", "-c", SETUP], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the stand-in VM did not start: {self.holder.stderr.read()}")
        deadline = time.monotonic() + 10
        self.pid = None
        while self.pid is None and time.monotonic() < deadline:
            children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()
            self.pid = int(children[0]) if children else None

    def run(self, script: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """``script`` in the VM by bash -x (each command shown with its output), stopping at the first failure."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-n", "-p", "--", "bash", "-euo", "pipefail",
                               "-x", "-c", f"cd /root\n{script}"], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)

    def path(self, path: str) -> Path:
        """A path of the VM (its mounts: /etc, /root, /opt...) as this machine reaches it, to copy files in and out."""
        return Path(f"/proc/{self.pid}/root{path}")

    def close(self) -> None:
        """Ends every process of the VM: they are in its pid namespace, whose first process this kills."""
        if self.pid is not None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
        self.holder.wait(timeout=60)


class StandInLan:
    """The cluster's network: a bridge in a network namespace of its own, and each VM on it by a veth pair (eth0
    in the VM, with the address given). No route leads to or from this machine's own network."""

    def __init__(self):
        self.ns = f"rpvm{os.getpid() % 100000}x{id(self) % 1000}-lan"
        self.ports = 0
        self._ip("netns", "add", self.ns)
        self._ip("-n", self.ns, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.ns, "link", "set", "br0", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def join(self, vm: StandInVM, address: str) -> None:
        self.ports += 1
        port = f"p{self.ports}"
        self._ip("link", "add", port, "netns", self.ns, "type", "veth", "peer", "name", "eth0", "netns", str(vm.pid))
        self._ip("-n", self.ns, "link", "set", port, "master", "br0", "up")
        done = vm.run(f"ip addr add {address}/24 dev eth0 && ip link set eth0 up")
        if done.returncode:
            raise RuntimeError(f"eth0 in the VM: {done.stderr.strip()}")

    def close(self) -> None:
        """The bridge and every veth pair (a pair goes with its end here)."""
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
