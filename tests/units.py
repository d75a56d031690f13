"""The shipped systemd units as the tests run them: a unit's directives, and the command line and environment
its ExecStart runs, with this test machine's folders and ports put in place of the installation's.

A VM keeps settings in /etc/retail-pulse, state in /var/lib, the program in /opt/retail-pulse/.venv. A test
has a folder standing for the VM's root (``Installation.root``), this checkout's venv, and free ports; every
path or port of the unit is rewritten to those, nothing else. So the tests start the scheduler, the workers,
the API and the daemon with exactly the unit's options, and a change to a unit's ExecStart reaches them.
"""
from __future__ import annotations

import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.service import REPO

UNITS = REPO / "systemd"
VENV_BIN = Path(sys.executable).parent
DASK_CERT = UNITS / "dask-cert"


def directives(unit: str | Path) -> list[tuple[str, str]]:
    """The [Service] section's (key, value) pairs in order; continuation lines joined, comments dropped."""
    text = (unit if isinstance(unit, Path) else UNITS / unit).read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    pairs, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            pairs.append((key.strip(), value.strip()))
    return pairs


def values(unit: str | Path, key: str) -> list[str]:
    return [value for k, value in directives(unit) if k == key]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int) -> tuple[int, int]:
    """``count`` consecutive ports free on 127.0.0.1 now (a worker unit's RETAILPULSE_DASK_WORKER_PORTS)."""
    for _ in range(50):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            probes = []
            for port in range(first, first + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return first, first + count - 1
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class Installation:
    """What stands for a VM's /etc/retail-pulse, /var/lib and /opt/retail-pulse/.venv on this machine."""

    root: Path  # stands for the VM's /
    ports: dict[str, str] = field(default_factory=dict)  # a unit's "--port 8786" -> "--port <free port>"

    def __post_init__(self):
        (self.root / "etc/retail-pulse/dask").mkdir(parents=True, exist_ok=True)
        (self.root / "var/lib").mkdir(parents=True, exist_ok=True)

    def path(self, text: str) -> str:
        """A unit's word with the installation's paths made this machine's."""
        text = text.replace("/opt/retail-pulse/.venv/bin/", f"{VENV_BIN}/")
        return re.sub(r"(?<![\w.])/(etc/retail-pulse|var/lib/retail-pulse)", lambda m: f"{self.root}/{m[1]}", text)

    @property
    def etc(self) -> Path:
        return self.root / "etc/retail-pulse"

    def make_certificates(self, *roles: tuple[str, str]) -> Path:
        """Run systemd/dask-cert as the README says: a CA, then each (role, name) with SAN IP:127.0.0.1, into
        etc/retail-pulse/dask (the CA's key included: a test machine is its own CA's keeper)."""
        import subprocess
        folder = self.etc / "dask"
        if not (folder / "ca.key").exists():
            subprocess.run([str(DASK_CERT), str(folder), "ca"], check=True, capture_output=True, timeout=60)
        for role, name in roles:
            subprocess.run([str(DASK_CERT), str(folder), role, name, "IP:127.0.0.1,DNS:localhost"], check=True,
                           capture_output=True, timeout=60)
        return folder

    def environment(self, unit: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The unit's Environment= and EnvironmentFile= settings (files read from this installation)."""
        env: dict[str, str] = {}
        for key, value in directives(unit):
            if key == "Environment":
                for word in shlex.split(value):
                    name, _, setting = word.partition("=")
                    env[name] = self.path(setting)
            elif key == "EnvironmentFile":
                path = Path(self.path(value.lstrip("-")))
                if path.is_file():
                    for line in path.read_text().splitlines():
                        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                            name, _, setting = line.partition("=")
                            env[name.strip()] = setting.strip()
                elif not value.startswith("-"):
                    raise FileNotFoundError(f"{unit} needs {path}")
        return {**env, **(extra or {})}

    def command(self, unit: str, env: dict[str, str], instance: str = "") -> list[str]:
        """The unit's ExecStart as argv: specifiers (%i, %H), ${VAR} from ``env``, this machine's paths and ports."""
        (exec_start,) = values(unit, "ExecStart")
        exec_start = exec_start.replace("%%", "\0").replace("%i", instance).replace("%H", socket.gethostname())
        exec_start = exec_start.replace("\0", "%")
        for unit_port, port in self.ports.items():
            exec_start = exec_start.replace(unit_port, port)
        argv = []
        for word in shlex.split(exec_start):
            argv.append(self.path(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word)))
        return argv

    def state_directories(self, unit: str, instance: str = "") -> list[Path]:
        """The unit's StateDirectory= folders, made here (systemd makes them before it starts the unit)."""
        made = []
        for value in values(unit, "StateDirectory"):
            for name in value.replace("%i", instance).split():
                folder = self.root / "var/lib" / name
                folder.mkdir(parents=True, exist_ok=True)
                made.append(folder)
        return made


# ------------------------------------------------------------------ the unit's sandbox, without systemd
#: The user the sandboxed programs run as (a unit's User=retailpulse: an unprivileged account of its own).
SANDBOX_UID = 65534


def sandboxed(installation: Installation, unit: str, argv: list[str], env: dict[str, str],
              instance: str = "") -> list[str]:
    """``argv`` as its unit would run it, as far as a test can reproduce without systemd: a mount namespace
    of its own (``unshare -m``) in which

      ProtectSystem=strict   every mount is read-only but /proc, /dev, the private /tmp and ReadWritePaths=
      ReadWritePaths=        stay writable (this installation's folders)
      PrivateTmp=true        /tmp and /var/tmp are empty tmpfs of its own
      ProtectHome=true       /home, /root and /run/user are empty (this machine's Python, if it lives under
                             /root, is put back read-only: on a VM it is /usr/bin/python3)
      ProcSubset=pid         /proc shows processes only (no /proc/meminfo), and ProtectProc=invisible hides
      ProtectProc=invisible  other users' processes
      User=, NoNewPrivileges=, CapabilityBoundingSet=
                             an unprivileged user, no new privileges, no capabilities (setpriv)

    and a clean environment (the unit's, HOME, PATH), in /. Not reproduced: the system-call filter, the
    address-family and socket-bind rules, PrivateDevices, PrivateUsers, MemoryDenyWriteExecute (they need
    systemd or seccomp); tests/test_systemd.py checks those lines with systemd-analyze."""
    settings = dict(directives(unit))  # the last of each key; the multi-valued ones are read below
    rw = [installation.path(path.replace("%i", instance)) for value in values(unit, "ReadWritePaths")
          for path in value.split()]
    keep = {"/tmp", "/var/tmp", *rw}
    lines = ["set -e"]
    if settings.get("PrivateTmp") == "true":
        lines += [f"exec 3<{shlex.quote(str(installation.root))}",  # reached again below, through the fd
                  "mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /var/tmp",
                  f"mkdir -p {shlex.quote(str(installation.root))}",
                  f"mount --no-canonicalize --bind /proc/self/fd/3 {shlex.quote(str(installation.root))}",
                  "exec 3<&-"]
    lines += [f"mount --bind {shlex.quote(path)} {shlex.quote(path)}" for path in rw]
    if settings.get("ProtectSystem") == "strict":
        skip = " | ".join(["/proc", "/proc/*", "/dev", "/dev/*", *(shlex.quote(path) for path in sorted(keep))])
        lines.append("for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do "
                     f"case $m in {skip}) continue;; esac; mount -o remount,bind,ro \"$m\"; done")
    if settings.get("ProtectHome") == "true":
        python = Path(sys.base_prefix)
        for home in ("/home", "/root", "/run/user"):
            if not Path(home).is_dir():
                continue
            if python.is_relative_to(home):
                lines += [f"exec 4<{shlex.quote(str(python))}", f"mount -t tmpfs -o mode=755 tmpfs {home}",
                          f"mkdir -p {shlex.quote(str(python))}",
                          f"mount --no-canonicalize --bind -o ro /proc/self/fd/4 {shlex.quote(str(python))}",
                          "exec 4<&-"]
            else:
                lines.append(f"mount -t tmpfs -o ro,mode=000 tmpfs {home}")
    proc = [option for option, wanted in (("subset=pid", settings.get("ProcSubset") == "pid"),
                                          ("hidepid=invisible", settings.get("ProtectProc") == "invisible")) if wanted]
    if proc:
        lines.append(f"mount -t proc -o {','.join(proc)} proc /proc")
    privileges = [f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups"]
    if settings.get("NoNewPrivileges") == "true":
        privileges.append("--no-new-privs")
    if "CapabilityBoundingSet" in settings and not settings["CapabilityBoundingSet"]:
        privileges += ["--inh-caps=-all", "--bounding-set=-all"]
    home = installation.root / "var/lib/retail-pulse"
    clean_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", **env}
    lines.append("cd /")
    lines.append(shlex.join(["exec", "setpriv", *privileges, "--", "env", "-i",
                             *(f"{key}={value}" for key, value in clean_env.items()), *argv]))
    return ["unshare", "--mount", "sh", "-c", "\n".join(lines)]
