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
