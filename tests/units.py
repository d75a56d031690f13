"""The shipped systemd units as the tests run them: a unit's directives, and the command line and environment
its ExecStart runs, with this test machine's folders and ports put in place of the installation's.

A VM keeps settings in /etc/retail-pulse, state in /var/lib, the program in /opt/retail-pulse/.venv. A test
has a folder standing for the VM's root (``Installation.root``), this checkout's venv, and free ports; every
path or port of the unit is rewritten to those, nothing else. So the tests start the scheduler, the workers,
the API and the daemon with exactly the unit's options, and a change to a unit's ExecStart reaches them.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.service import REPO, free_port

UNITS = REPO / "systemd"
VENV_BIN = Path(sys.executable).parent
DASK_CERT = UNITS / "dask-cert"


def directives(unit: str | Path, section: str = "[Service]") -> list[tuple[str, str]]:
    """A section's (key, value) pairs in order; continuation lines joined, comments dropped."""
    text = (unit if isinstance(unit, Path) else UNITS / unit).read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    pairs, section, wanted = [], None, section
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == wanted and "=" in line:
            key, value = line.split("=", 1)
            pairs.append((key.strip(), value.strip()))
    return pairs


def values(unit: str | Path, key: str, section: str = "[Service]") -> list[str]:
    return [value for k, value in directives(unit, section) if k == key]


def specifiers(text: str, instance: str = "", hostname: str | None = None) -> str:
    """systemd's %i (the instance), %H (the host name) and %% in a unit's value."""
    text = text.replace("%%", "\0").replace("%i", instance).replace("%H", hostname or socket.gethostname())
    return text.replace("\0", "%")



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
    hostname: str | None = None  # %H: this machine's, unless a test says (VMs cloned from one image share one)

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

    def make_certificates(self, *roles: tuple[str, str], san: str = "IP:127.0.0.1,DNS:localhost",
                          env: dict | None = None) -> Path:
        """Run systemd/dask-cert as docs/scale-out.md says: a CA, then each (role, name) with ``san``, into
        etc/retail-pulse/dask (the CA's key included: a test machine is its own CA's keeper)."""
        folder = self.etc / "dask"
        run_env = {**os.environ, **(env or {})}
        if not (folder / "ca.key").exists():
            subprocess.run([str(DASK_CERT), str(folder), "ca"], check=True, capture_output=True, timeout=60,
                           env=run_env)
        for role, name in roles:
            subprocess.run([str(DASK_CERT), str(folder), role, name, san], check=True, capture_output=True,
                           timeout=60, env=run_env)
        return folder

    def environment(self, unit: str, extra: dict[str, str] | None = None, instance: str = "") -> dict[str, str]:
        """The unit's Environment= and EnvironmentFile= settings (files read from this installation)."""
        env: dict[str, str] = {}
        for key, value in directives(unit):
            if key == "Environment":
                for word in shlex.split(value):
                    name, _, setting = word.partition("=")
                    env[name] = self.path(specifiers(setting, instance, self.hostname))
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
        exec_start = specifiers(exec_start, instance, self.hostname)
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


def _under_tmp(*paths: Path) -> list[Path]:
    """Those of ``paths`` inside /tmp or /var/tmp, none inside another (a private /tmp would hide them)."""
    found = sorted({path.resolve() for path in paths
                    if path.resolve().is_relative_to("/tmp") or path.resolve().is_relative_to("/var/tmp")})
    return [path for path in found if not any(path != other and path.is_relative_to(other) for other in found)]


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
        # The installation's folders, and this checkout with its venv when it lives in /tmp (a CI clone),
        # are reached again below through file descriptors opened before the empty tmpfs hides them.
        kept = [(installation.root, "")] + [(path, "ro") for path in _under_tmp(REPO, Path(sys.prefix))]
        for fd, (path, _) in enumerate(kept, start=3):
            lines.append(f"exec {fd}<{shlex.quote(str(path))}")
        lines += ["mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /var/tmp"]
        for fd, (path, mode) in enumerate(kept, start=3):
            lines += [f"mkdir -p {shlex.quote(str(path))}",
                      f"mount --no-canonicalize --bind {'-o ro ' if mode else ''}/proc/self/fd/{fd} "
                      f"{shlex.quote(str(path))}", f"exec {fd}<&-"]
    lines += [f"mount --bind {shlex.quote(path)} {shlex.quote(path)}" for path in rw]
    if settings.get("ProtectSystem") == "strict":
        skip = " | ".join(["/proc", "/proc/*", "/dev", "/dev/*", *(shlex.quote(path) for path in sorted(keep))])
        # A mount the private /tmp hides (one under the host's /tmp) is listed still, but is no mount point
        # here any more, and its path may not exist: remounting it would fail the sandbox. Pass over it.
        lines.append("for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do "
                     f"case $m in {skip}) continue;; esac; mountpoint -q \"$m\" || continue; "
                     "mount -o remount,bind,ro \"$m\"; done")
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


# ------------------------------------------------------------------ a Dask cluster from the units
SCHEDULER_UNIT, WORKER_UNIT = "retail-pulse-dask-scheduler.service", "retail-pulse-dask-worker@.service"


def start_limits(unit: str) -> tuple[float, int]:
    """The unit's StartLimitIntervalSec= and StartLimitBurst= ([Unit]; systemd's defaults 10 s and 5)."""
    interval = (values(unit, "StartLimitIntervalSec", "[Unit]") or ["10"])[-1]
    burst = (values(unit, "StartLimitBurst", "[Unit]") or ["5"])[-1]
    return float(interval.rstrip("s")), int(burst)


@dataclass
class WorkerHost:
    """A worker host: its installation (dask.env, its certificate) and the command its processes run under."""
    name: str
    installation: Installation
    prefix: list[str]  # ["ip", "netns", "exec", NS] for a VM of tests/netns.py; [] on this machine


class DaskCluster:
    """`dask scheduler` and `dask worker` processes, each started with its unit's ExecStart and environment,
    TLS with a certificate per role (systemd/dask-cert), as production runs them; for the tests and the
    benchmark. ``host``: the address dask.env names (RETAILPULSE_DASK_HOST). ``restart_workers``: a worker
    that exits is started again after RESTART_S, as systemd does (Restart=always, RestartSec=2), within the
    unit's start limits (past them it stays down, as systemd leaves a unit "failed").

    ``lan`` (tests/netns.py): the scheduler runs in the VM ``scheduler_vm`` on the unit's own ports, and
    ``start_worker(vm=...)`` runs a worker in that VM, each VM a worker host with its own installation and
    certificate, every VM sharing this machine's host name (as VMs cloned from one image do)."""

    RESTART_S = 2.0

    def __init__(self, folder: Path, host: str = "127.0.0.1", workers: int = 0, restart_workers: bool = False,
                 lan=None, scheduler_vm: str = "sched", env: dict | None = None, certificate_days: int = 365):
        import threading
        self.folder, self.lan, self.env = folder, lan, dict(env or {})
        self.vm = Installation(folder / "vm")
        self.hosts: dict[str, WorkerHost] = {}
        self.days = {"DAYS": str(certificate_days)}  # dask-cert's validity
        if lan is None:
            self.host = host
            self.certs = self.vm.make_certificates(("scheduler", "scheduler"), ("worker", "worker"),
                                                   ("client", "client"), san=f"IP:{host},IP:127.0.0.1,DNS:localhost",
                                                   env=self.days)
            self.port = free_port()
            self.vm.ports.update({"--port 8786": f"--port {self.port}", "127.0.0.1:8787": "127.0.0.1:0"})
            first, last = free_port_range(max(10, workers + 2))
            self.scheduler_prefix: list[str] = []
        else:  # a fresh namespace per VM: the units' own ports are free
            self.host, self.port, (first, last) = lan.vms[scheduler_vm].address, 8786, (8790, 8799)
            self.keeper = Installation(folder / "ca-keeper")  # the operator's machine, which holds ca.key
            self.certs = self.keeper.make_certificates(("scheduler", "scheduler"), ("client", "client"),
                                                       san=f"IP:{self.host}", env=self.days)
            self._copy_certificates(self.vm, "scheduler", "client")
            self.scheduler_prefix = ["ip", "netns", "exec", lan.vms[scheduler_vm].ns]
        self.address = f"tls://{self.host}:{self.port}"
        self.worker_ports = range(first, last + 1)
        (self.vm.etc / "dask.env").write_text(f"RETAILPULSE_DASK_SCHEDULER={self.address}\nRETAILPULSE_DASK_HOST={self.host}\n"
                                              f"RETAILPULSE_DASK_WORKER_PORTS={first}:{last}\n")
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.worker_of: list[tuple[WorkerHost, str]] = []  # per worker: its host and instance
        self.exits: list[tuple[int, float]] = []  # (worker number, monotonic time) of each worker exit seen
        self.failed: set[int] = set()  # workers past the unit's start limits: systemd would leave them failed
        self._starts: dict[int, list[float]] = {}
        self._closing = threading.Event()
        self.start_scheduler()
        for _ in range(workers):
            self.start_worker()
        if restart_workers:
            threading.Thread(target=self._restart_forever, daemon=True).start()

    def _copy_certificates(self, installation: Installation, *names: str) -> None:
        import shutil
        target = installation.etc / "dask"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.certs / "ca.pem", target / "ca.pem")
        for name in names:
            role = name.split("-")[0]
            for suffix in ("pem", "key"):
                shutil.copy(self.certs / f"{name}.{suffix}", target / f"{role}.{suffix}")

    def worker_host(self, vm: str) -> WorkerHost:
        """The worker host in VM ``vm``, installed as docs/worker.md says on first use."""
        if vm not in self.hosts:
            address = self.lan.vms[vm].address
            installation = Installation(self.folder / vm)
            self.keeper.make_certificates(("worker", f"worker-{vm}"), san=f"IP:{address}", env=self.days)
            self._copy_certificates(installation, f"worker-{vm}")
            (installation.etc / "dask.env").write_text(f"RETAILPULSE_DASK_SCHEDULER={self.address}\n"
                                                       f"RETAILPULSE_DASK_HOST={address}\n"
                                                       "RETAILPULSE_DASK_WORKER_PORTS=8790:8799\n")
            self.hosts[vm] = WorkerHost(vm, installation, ["ip", "netns", "exec", self.lan.vms[vm].ns])
        return self.hosts[vm]

    def _start(self, unit: str, name: str, installation: Installation, prefix: list[str], instance: str = "",
               env: dict | None = None, args: list[str] = ()) -> subprocess.Popen:
        installation.state_directories(unit, instance)
        unit_env = installation.environment(unit, instance=instance)
        with (self.folder / f"{name}.log").open("ab") as log:
            return subprocess.Popen([*prefix, *installation.command(unit, unit_env, instance), *args],
                                    cwd=self.folder, env={**os.environ, **unit_env, **self.env, **(env or {})},
                                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def start_scheduler(self) -> None:
        log_path = self.folder / "scheduler.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.scheduler = self._start(SCHEDULER_UNIT, "scheduler", self.vm, self.scheduler_prefix)
        deadline = time.monotonic() + 60
        while b"Scheduler at:" not in log_path.read_bytes()[offset:]:
            if time.monotonic() > deadline or self.scheduler.poll() is not None:
                raise RuntimeError(f"the scheduler did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def start_worker(self, env: dict | None = None, args: list[str] = (), vm: str | None = None) -> subprocess.Popen:
        """The next instance of the worker unit (on ``vm``'s host, with a LAN); ``env`` and ``args`` (a preload)
        only where a test adds them."""
        host = self.worker_host(vm) if vm is not None else WorkerHost("", self.vm, [])
        instance = str(1 + sum(1 for other, _ in self.worker_of if other.name == host.name))
        number = len(self.workers) + 1
        self.workers.append(self._start(WORKER_UNIT, f"worker{number}", host.installation, host.prefix, instance,
                                        env, args))
        self.worker_of.append((host, instance))
        self._starts[number] = [time.monotonic()]
        return self.workers[-1]

    def _restart_forever(self) -> None:
        import threading
        interval, burst = start_limits(WORKER_UNIT)
        pending: set[int] = set()  # workers whose restart is due
        while not self._closing.wait(0.05):
            for i, worker in enumerate(self.workers):
                if i not in pending and i + 1 not in self.failed and worker.poll() is not None:
                    self.exits.append((i + 1, time.monotonic()))
                    starts = [t for t in self._starts[i + 1] if interval == 0 or t > time.monotonic() - interval]
                    if interval and len(starts) >= burst:
                        self.failed.add(i + 1)  # systemd: "Start request repeated too quickly", failed
                        continue
                    pending.add(i)
                    threading.Timer(self.RESTART_S, self._restart, (i, pending)).start()

    def _restart(self, i: int, pending: set[int]) -> None:
        if not self._closing.is_set():
            host, instance = self.worker_of[i]
            self.workers[i] = self._start(WORKER_UNIT, f"worker{i + 1}", host.installation, host.prefix, instance)
            self._starts[i + 1].append(time.monotonic())
        pending.discard(i)

    def daemon_args(self, *extra: str) -> list[str]:
        """The daemon's settings for this cluster, with the client certificate (the daemon's role)."""
        return ["--executor", "dask", "--dask-scheduler", self.address, "--dask-tls-ca-file", str(self.certs / "ca.pem"),
                "--dask-tls-cert-file", str(self.certs / "client.pem"),
                "--dask-tls-key-file", str(self.certs / "client.key"), *extra]

    def client(self):
        """A client of the caller's own (with the daemon's certificate), to look inside the workers (with a LAN:
        from inside the service VM, ``lan.inside("svc")``)."""
        import distributed
        security = distributed.Security(tls_ca_file=str(self.certs / "ca.pem"),
                                        tls_client_cert=str(self.certs / "client.pem"),
                                        tls_client_key=str(self.certs / "client.key"), require_encryption=True)
        return distributed.Client(self.address, security=security, timeout=30, set_as_default=False)

    def threads_waiting(self) -> int:
        """Worker threads inside a task (measure_task) now, summed over the workers: left waiting, if idle."""
        def waiting(dask_worker=None):  # defined here, so it travels by value
            import sys
            count = 0
            for frame in sys._current_frames().values():
                while frame is not None and frame.f_code.co_name != "measure_task":
                    frame = frame.f_back
                count += frame is not None
            return count

        with self.client() as client:
            return sum(client.run(waiting).values())

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def pids(self) -> list[int]:
        return [self.scheduler.pid, *(worker.pid for worker in self.workers)]

    def stop(self) -> None:
        """SIGKILL to each process group (a worker's isolated tasks too), then wait."""
        self._closing.set()
        for proc in [*self.workers, self.scheduler]:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
        for proc in [*self.workers, self.scheduler]:
            if proc is not None:
                proc.wait()
