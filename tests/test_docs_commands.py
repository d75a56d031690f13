"""Every command block of the README and docs/ is run by a test, as written. The README's quick start is run by
tests/test_checkout.py; the API's examples (Idempotency-Key, Prefer: wait) against the real API and daemon here;
docs/operations.md's VM steps, its front-door steps, its first look of the runbook and its retailpulse-ctl
transcript, one after the other as an operator types them, in a stand-in Debian VM (tests/vm_standin.py: namespaces
of their own, the real commands; systemd, apt, journald and the reader's editor stood in for); and the scale-out
pages (scale-out.md's certificates, scheduler.md, worker.md, service-vm.md), each host's steps in a stand-in VM
of its own, the VMs on one network, in the order scale-out.md gives. A block no test runs fails
test_every_command_block_is_run_by_a_test, so a new one cannot be left out.

What the tests change in a block, and only that: the placeholders a reader fills in (`<this repository>`:
this checkout; `/path/to/StoreMasterAssignment.csv`: the sample store master; `min_workers = 24`: the 8 workers
the test runs), the API's address in the API's examples and the ports of the quick start (the tests' own)."""
from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_STORE_MASTER, wait_until

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
WHEELHOUSE = REPO / ".venv" / "wheelhouse"

#: Each command block (its file, the start of its first line) and the test that runs it.
RUN_BY = {
    ("README.md", "make run "): ["tests/test_checkout.py::test_the_readme_first_job_completes_and_make_ctl_sees_it_on_"
                                 "the_same_spool", ".ci/run"],  # make test: the suite itself, which CI runs
    ("README.md", "curl -s -X POST http://127.0.0.1:8080/api/submit/"):
        ["tests/test_checkout.py::test_the_readme_curl_commands_print_what_the_readme_says"],
    ("README.md", "$ ls var/spool/incoming"):
        ["tests/test_checkout.py::test_the_readme_first_job_completes_and_make_ctl_sees_it_on_the_same_spool"],
    ("docs/api.md", "curl -s -X POST http://127.0.0.1:8080/api/submit/"):
        ["tests/test_docs_commands.py::test_the_idempotency_key_example_replays_the_first_job"],
    ("docs/operations.md", "apt-get install -y python3-venv git"):
        ["tests/test_docs_commands.py::test_the_operations_guide_on_a_stand_in_vm"],
    ("docs/operations.md", "apt-get install -y nginx"):
        ["tests/test_docs_commands.py::test_the_operations_guide_on_a_stand_in_vm"],
    ("docs/operations.md", "$ runuser -u retailpulse -- /opt/retail-pulse/.venv/bin/retailpulse-ctl list"):
        ["tests/test_docs_commands.py::test_the_operations_guide_on_a_stand_in_vm"],
    ("docs/operations.md", "curl -s http://127.0.0.1:8080/healthz | jq ."):
        ["tests/test_docs_commands.py::test_the_operations_guide_on_a_stand_in_vm"],
    ("docs/api.md", "curl -s -H 'Prefer: wait=30'"):
        ["tests/test_docs_commands.py::test_the_prefer_wait_example_is_answered_when_the_job_is_finished"],
    **{(page, start): ["tests/test_docs_commands.py::test_the_scale_out_pages_on_stand_in_vms"] for page, start in (
        ("docs/scale-out.md", "git clone <this repository> /opt/retail-pulse"),
        ("docs/scheduler.md", "apt-get install -y python3-venv git nftables"),
        ("docs/scheduler.md", "chown retailpulse:"),
        ("docs/scheduler.md", "echo 'RETAILPULSE_DASK_HOST=10.0.0.5'"),
        ("docs/scheduler.md", "mkdir -p /etc/nftables.d"),
        ("docs/scheduler.md", "cp /opt/retail-pulse/systemd/retail-pulse-dask-scheduler.service"),
        ("docs/worker.md", "apt-get install -y python3-venv git nftables"),
        ("docs/worker.md", "chown retailpulse:"),
        ("docs/worker.md", "cat > /etc/retail-pulse/dask.env"),
        ("docs/worker.md", "mkdir -p /etc/nftables.d"),
        ("docs/worker.md", "cp '/opt/retail-pulse/systemd/retail-pulse-dask-worker@.service'"),
        ("docs/service-vm.md", "/opt/retail-pulse/.venv/bin/pip install"),
        ("docs/service-vm.md", "runuser -u retailpulse -- /opt/retail-pulse/.venv/bin/retailpulse-ctl"))},
}


def command_blocks() -> list[tuple[str, str]]:
    """(file, text) of every shell block (sh, console, or text that starts with a prompt) of the README and docs/,
    those indented in a list item too (their text without the item's indent)."""
    found = []
    for path in DOCS:
        for indent, lang, body in re.findall(r"^( *)```(\w*)\n(.*?)^\1```", path.read_text(), re.S | re.M):
            body = "".join(line.removeprefix(indent) for line in body.splitlines(keepends=True))
            if lang in ("sh", "console") or (lang == "text" and body.startswith("$ ")):
                found.append((str(path.relative_to(REPO)), body))
    return found


def block(file: str, start: str) -> str:
    (text,) = [body for name, body in command_blocks() if name == file and body.startswith(start)]
    return text


def test_every_command_block_is_run_by_a_test():
    unclaimed = [f"{name}: {body.splitlines()[0]}" for name, body in command_blocks()
                 if not any(name == file and body.startswith(start) for file, start in RUN_BY)]
    assert not unclaimed, "command blocks no test runs (add a test, and a line to RUN_BY):\n" + "\n".join(unclaimed)
    for runners in RUN_BY.values():
        for runner in runners:
            if runner == ".ci/run":
                assert "make test" in (REPO / ".ci" / "run").read_text()
                continue
            module, _, function = runner.partition("::")
            assert hasattr(importlib.import_module(module[:-3].replace("/", ".")), function), runner
    stale = [key for key in RUN_BY if not any(name == key[0] and body.startswith(key[1])
                                              for name, body in command_blocks())]
    assert not stale, f"RUN_BY names blocks the documentation no longer has: {stale}"


# ------------------------------------------------------------------ docs/api.md
def test_the_idempotency_key_example_replays_the_first_job(start_service, image_server, tmp_path):
    """The example as written, twice, with job.json the README's first job: one job, the second answer a replay."""
    from tests.test_checkout import readme_first_job
    if shutil.which("curl") is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("the example needs curl")
    (image_server.folder / "shelf-1.jpg").write_bytes((REPO / "data/images/shelf-1.jpg").read_bytes())
    (image_server.folder / "shelf-2.png").write_bytes((REPO / "data/images/shelf-2.png").read_bytes())
    job = json.dumps(readme_first_job()).replace("http://127.0.0.1:8081", image_server.base)
    (tmp_path / "job.json").write_text(job)
    service = start_service()
    command = block("docs/api.md", "curl -s -X POST").replace("http://127.0.0.1:8080", service.base)
    answers = []
    for _ in range(2):
        done = subprocess.run(["bash", "-c", command.replace("curl -s ", "curl -s -i ", 1)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
        answers.append((head.split()[1], "idempotent-replayed: true" in head.lower(), json.loads(body)))
    assert answers[0][:2] == ("201", False) and answers[1][:2] == ("201", True), answers
    assert answers[0][2] == answers[1][2] == {"job_id": 1}
    assert service.wait(1)["status"] == "completed"


def read_by_the_server(client_pid: int, port: int) -> bool:
    """Whether the server on 127.0.0.1:``port`` has read all the process ``client_pid`` sent it over its connection
    (ss: the server's side received bytes and holds none unread)."""
    ss = ["ss", "-Htinp", "state", "established"]
    clients = subprocess.run([*ss, f"( dport = :{port} )"], capture_output=True, text=True, timeout=10).stdout
    ports = re.findall(rf"\S+:(\d+) +\S+:{port} .*pid={client_pid},", clients)
    if not ports:
        return False
    server = subprocess.run([*ss, f"( sport = :{port} and dport = :{ports[0]} )"], capture_output=True, text=True,
                            timeout=10).stdout.split()
    return bool(server) and server[0] == "0" and any(re.fullmatch(r"bytes_received:[1-9]\d*", w) for w in server)


def test_the_prefer_wait_example_is_answered_when_the_job_is_finished(start_service, image_server):
    """The example as written, asked while job 1 runs (one of its images held until the API has read the request):
    its answer is job 1 completed, and says it waited (Preference-Applied), as the page says."""
    from tests.test_checkout import readme_first_job
    if shutil.which("curl") is None or shutil.which("ss") is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("the example needs curl (and the test ss)")
    (image_server.folder / "shelf-2.png").write_bytes((REPO / "data/images/shelf-2.png").read_bytes())
    held = (REPO / "data/images/shelf-1.jpg").read_bytes()
    release = threading.Event()

    def serve_when_released(handler):
        release.wait(60)
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(held)))
        handler.end_headers()
        handler.wfile.write(held)
    image_server.on("/shelf-1.jpg", serve_when_released)
    service = start_service("--gpu-sleep-min-s", "0.2", "--gpu-sleep-max-s", "0.2")
    job = json.loads(json.dumps(readme_first_job()).replace("http://127.0.0.1:8081", image_server.base))
    assert service.submit(job["visits"]) == 1
    wait_until(lambda: image_server.hits["/shelf-1.jpg"], what="job 1's download of shelf-1.jpg")
    command = block("docs/api.md", "curl -s -H 'Prefer: wait=30'").replace("http://127.0.0.1:8080", service.base)
    curl = subprocess.Popen(["bash", "-c", command.replace("curl -s ", "curl -s -i ", 1)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(service.base.rsplit(":", 1)[1])
        wait_until(lambda: curl.poll() is not None or any(read_by_the_server(pid, port) for pid in [curl.pid, *(
            int(child) for child in Path(f"/proc/{curl.pid}/task/{curl.pid}/children").read_text().split())]),
            what="the API to have read the example's request", interval_s=0.005)
    finally:
        release.set()
    out, err = curl.communicate(timeout=60)
    assert curl.returncode == 0, err
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    assert head.split()[1] == "200", head
    assert "preference-applied: wait=30" in head.lower(), head  # it waited: the job was running when asked
    assert json.loads(body)["status"] == "completed", body


# ------------------------------------------------------------------ docs/operations.md, on a stand-in VM
def vm_available() -> None:
    tools = ["unshare", "nsenter", "setpriv", "runuser", "useradd", "git", "openssl", "nginx", "curl", "jq", "ip"]
    missing = [tool for tool in tools if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    why = None
    if os.geteuid() != 0:
        why = "needs root (namespaces, useradd in the stand-in VM)"
    elif missing:
        why = f"needs {', '.join(missing)}"
    elif not list(WHEELHOUSE.glob("setuptools-*.whl")):
        why = f"{WHEELHOUSE} has no setuptools wheel: `rm .venv/bin/.installed && make .venv/bin/.installed`"
    if why:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)


def shown_as(pattern_lines: list[str], printed: list[str]) -> bool:
    from tests.test_checkout import printed_as_shown
    return printed_as_shown(pattern_lines, printed)


def run_in(vm, script: str, what: str) -> str:
    done = vm.run(script)
    if done.returncode != 0:
        journals = vm.run("tail -n 12 /var/log/standin-journal/*.log").stdout
        pytest.fail(f"{what}: exit {done.returncode}\n{done.stderr[-4000:]}\nthe units' last lines:\n{journals}")
    return done.stdout


@pytest.fixture(scope="module")
def service_vm(tmp_path_factory):
    """A stand-in VM after docs/operations.md's "Running under systemd" steps, run as written."""
    from tests.vm_standin import StandInVM
    vm_available()
    vm = StandInVM(tmp_path_factory.mktemp("vm") / "vm", WHEELHOUSE)
    try:
        steps = block("docs/operations.md", "apt-get install -y python3-venv git")
        steps = steps.replace("<this repository>", str(REPO)).replace("/path/to/StoreMasterAssignment.csv",
                                                                    str(SAMPLE_STORE_MASTER))
        printed = run_in(vm, steps, "docs/operations.md, Running under systemd")
        assert 'Status: "0 jobs, 0 images in flight"' in printed and "daemon ready" in printed, printed[-2000:]
        wait_until(lambda: '"ok": true' in vm.run("curl -s http://127.0.0.1:8080/healthz | jq .").stdout,
                   timeout_s=60, what="the installed service healthy", interval_s=0.2)
        yield vm
    finally:
        vm.close()


@pytest.mark.slow  # installs the package into a fresh venv and starts its programs, on purpose
@pytest.mark.nginx
@pytest.mark.install
def test_the_operations_guide_on_a_stand_in_vm(service_vm):
    """Installed, the service VM holds the two units of the service (the Dask ones belong on the cluster's
    hosts); then the front door, the runbook's first look and the retailpulse-ctl transcript, as written."""
    vm = service_vm
    units = run_in(vm, "ls /etc/systemd/system/", "the units installed").split()
    assert sorted(u for u in units if u.startswith("retail-pulse")) == \
        ["retail-pulse-api.service", "retail-pulse-daemon.service"], units

    front = run_in(vm, block("docs/operations.md", "apt-get install -y nginx"), "docs/operations.md, the front door")
    assert '"checks"' in front, front
    page = run_in(vm, "curl -sk https://localhost/", "the page through nginx")
    assert page.startswith("<!doctype html>"), page[:200]  # nginx's own, from the checkout the package came from

    first_look = run_in(vm, block("docs/operations.md", "curl -s http://127.0.0.1:8080/healthz | jq ."),
                        "the runbook's first look")
    assert '"ok": true' in first_look and "Active: active (running)" in first_look
    assert "daemon ready" in first_look and first_look.rstrip().endswith("-- 0 jobs"), first_look[-2000:]

    # The transcript of retailpulse-ctl list, with a job of an unknown store (its images are not downloaded).
    run_in(vm, """curl -s -X POST http://127.0.0.1:8080/api/submit/ -H 'Content-Type: application/json' -d '{"count":
        1, "visits": [{"store_id": "RP99999", "visit_time": "t", "image_url": ["https://example.com/a.jpg"]}]}'""",
           "a job that fails")
    wait_until(lambda: '"failed"' in vm.run("curl -s 'http://127.0.0.1:8080/api/status?jobid=1'").stdout,
               what="the job to fail", interval_s=0.1)
    transcript = block("docs/operations.md", "$ runuser -u retailpulse").splitlines()
    command, shown = transcript[0][2:], transcript[1:]
    printed = run_in(vm, command, "the retailpulse-ctl transcript").splitlines()
    failed_line = next(line for line in shown if "RP99999" in line)
    expected = [shown[0], re.sub(r"^ +2 ", "       1 ", failed_line).replace("    1s  ", "...  "), "-- 1 job"]
    assert shown_as(expected, printed), "\n".join(["shown:", *shown, "printed:", *printed])


# ------------------------------------------------------------------ the scale-out pages, on stand-in VMs
#: The hosts of the scale-out pages on the test's network: the operator's own machine (which keeps the CA) and
#: the service VM, scheduler and worker host at the pages' addresses.
HOSTS = {"operator": "10.0.0.3", "service": "10.0.0.4", "scheduler": "10.0.0.5", "worker": "10.0.0.7"}


def copy_in(source, folder: str, target, names: dict[str, str]) -> None:
    """Files of one VM's ``folder`` into another's /etc/retail-pulse/dask/, renamed as a page says: what the pages'
    prose calls copying them there (scp, a USB stick)."""
    for name, as_name in names.items():
        shutil.copyfile(source.path(f"{folder}/{name}"), target.path(f"/etc/retail-pulse/dask/{as_name}"))


def connects(vm, address: str, port: int) -> str:
    """From ``vm``: "open", or why not (TimeoutError: dropped on the way; ConnectionRefusedError: nothing there)."""
    probe = (f"import socket\ntry:\n    socket.create_connection(({address!r}, {port}), timeout=1).close()\n"
             "    print('open')\nexcept OSError as e:\n    print(type(e).__name__)")
    return run_in(vm, f"python3 -c {shlex.quote(probe)}", f"a connection to {address}:{port}").split()[-1]


def firewall_steps(page: str, rules: str, vm) -> None:
    """The page's firewall block, its editor line done as its comment says: the shipped rule must hold the
    comment's addresses already (the stand-in editor changes nothing); the rule is loaded in the VM."""
    steps = block(page, "mkdir -p /etc/nftables.d")
    run_in(vm, steps, f"{page}: the firewall")
    told = re.search(r"^editor .*# sources4: (.+)$", steps, re.M)[1].split(", ")
    text = vm.path(f"/etc/nftables.d/{rules}.nft").read_text()
    assert re.search(r"set sources4 \{.*?elements = \{ ([^}]*) \}", text, re.S)[1].split(", ") == told
    table = run_in(vm, f"nft list table inet retail_pulse_{rules.replace('-', '_')}", "the rule loaded")
    assert f"elements = {{ {', '.join(told)} }}" in table, table


def as_the_units_read_it(vm, unit: str, instance: str = "") -> list[str]:
    """The unit's command line as tests/units.py makes it (systemd's Environment=, EnvironmentFile=, %i) from the
    unit file copied into the VM and the VM's dask.env; and the running process's, which the stand-in started."""
    from tests.units import VENV_BIN, Installation
    root, name = vm.path(""), unit.replace("@", f"@{instance}") if instance else unit
    installation, unit_file = Installation(root), vm.path(f"/etc/systemd/system/{unit}")
    argv = installation.command(unit_file, installation.environment(unit_file, instance=instance), instance=instance)
    argv = [word.replace(f"{VENV_BIN}/", "/opt/retail-pulse/.venv/bin/").replace(f"{root}/", "/") for word in argv]
    running = run_in(vm, f"tr '\\0' '\\n' < /proc/$(cat /run/standin-systemd/{name}.pid)/cmdline", "its command line")
    assert running.splitlines()[1:] == argv, (running, argv)  # [0]: the venv's python, of the script's #! line
    return argv


def journal_says(vm, page: str, unit: str, line: str, count: int = 1) -> None:
    """The page's journalctl command, until the units' log has ``line`` (the page's words) ``count`` times."""
    command = re.search(rf"^(journalctl -u '?{re.escape(unit)}'?) ", block(page, "cp "), re.M)[1]
    wait_until(lambda: " ".join(vm.run(command).stdout.split()).count(line) >= count, timeout_s=60,
               what=f"{command}: {line!r} x{count}", interval_s=0.2)


@pytest.mark.slow
@pytest.mark.dask
@pytest.mark.install
def test_the_scale_out_pages_on_stand_in_vms(service_vm, tmp_path):
    """Each host of scale-out.md on a stand-in VM of its own, the four on one network at the pages' addresses,
    in its order: the certificates on the operator's machine, then the scheduler host, the worker host and the
    service VM, each page's blocks as written and its prose (copy these files) done as it says. Then what the
    pages promise: the units run with dask.env's settings, the rules let in only the hosts they name (also as
    loaded at boot, from /etc/nftables.conf), the daemon sees the 8 workers and says so where the page
    says, and retailpulse-ctl health is content."""
    from tests.vm_standin import StandInLan, StandInVM
    lan = StandInLan()
    vms = {"service": service_vm}
    try:
        for name in ("operator", "scheduler", "worker"):
            vms[name] = StandInVM(tmp_path / name, WHEELHOUSE)
        for name, address in HOSTS.items():
            lan.join(vms[name], address)
        operator, scheduler, worker, service = (vms[name] for name in ("operator", "scheduler", "worker", "service"))

        run_in(operator, block("docs/scale-out.md", "git clone").replace("<this repository>", str(REPO)),
               "docs/scale-out.md: the certificates")

        page = "docs/scheduler.md"
        run_in(scheduler, block(page, "apt-get").replace("<this repository>", str(REPO)), f"{page}: the install")
        copy_in(operator, "/root/dask-ca", scheduler, {n: n for n in ("ca.pem", "scheduler.pem", "scheduler.key")})
        run_in(scheduler, block(page, "chown"), f"{page}: the certificates")
        run_in(scheduler, block(page, "echo 'RETAILPULSE_DASK_HOST"), f"{page}: its address")
        firewall_steps(page, "dask-scheduler", scheduler)
        printed = run_in(scheduler, block(page, "cp "), f"{page}: the unit")
        assert printed.startswith("ok"), printed[:500]  # the health check's answer
        journal_says(scheduler, page, "retail-pulse-dask-scheduler", "Scheduler at: tls://10.0.0.5:8786")
        argv = as_the_units_read_it(scheduler, "retail-pulse-dask-scheduler.service")
        assert argv[argv.index("--host") + 1] == "10.0.0.5", argv

        page = "docs/worker.md"
        run_in(worker, block(page, "apt-get").replace("<this repository>", str(REPO)), f"{page}: the install")
        copy_in(operator, "/root/dask-ca", worker, {"ca.pem": "ca.pem", "worker-10.0.0.7.pem": "worker.pem",
                                                    "worker-10.0.0.7.key": "worker.key"})
        run_in(worker, block(page, "chown"), f"{page}: the certificates")
        run_in(worker, block(page, "cat > /etc/retail-pulse/dask.env"), f"{page}: its settings")
        firewall_steps(page, "dask-worker", worker)
        run_in(worker, block(page, "cp "), f"{page}: the units")
        journal_says(worker, page, "retail-pulse-dask-worker@*", "Registered to: tls://10.0.0.5:8786", count=8)
        argv = as_the_units_read_it(worker, "retail-pulse-dask-worker@.service", instance="3")
        assert argv[2] == "tls://10.0.0.5:8786" and argv[argv.index("--name") + 1] == "10.0.0.7-3", argv
        assert argv[argv.index("--host") + 1] == "10.0.0.7" and "--worker-port" in argv, argv
        assert argv[argv.index("--worker-port") + 1] == "8790:8799", argv

        for vm in (scheduler, worker):  # as the nftables unit loads them at boot: the include the pages add
            run_in(vm, "nft -f /etc/nftables.conf", "the firewall as at boot")
        assert connects(service, "10.0.0.5", 8786) == "open" and connects(worker, "10.0.0.5", 8786) == "open"
        assert connects(operator, "10.0.0.5", 8786) == "TimeoutError"  # a host the rule does not name
        assert connects(operator, "10.0.0.5", 9) == "ConnectionRefusedError"  # that port only
        assert connects(scheduler, "10.0.0.7", 8790) == "open"
        assert connects(service, "10.0.0.7", 8790) == "TimeoutError"  # the daemon goes through the scheduler
        assert connects(service, "10.0.0.7", 9) == "ConnectionRefusedError"

        page = "docs/service-vm.md"
        run_in(service, block(page, "/opt/retail-pulse/.venv/bin/pip install"), f"{page}: the Dask extra")
        copy_in(operator, "/root/dask-ca", service, {"ca.pem": "ca.pem", "daemon.pem": "client.pem",
                                                     "daemon.key": "client.key"})
        text = (REPO / page).read_text()
        run_in(service, re.search(r"then\s+`(chown [^`]+)`", text)[1], f"{page}: the certificates")
        ini = re.search(r"```ini\n *\[daemon\]\n(.*?) *```", text, re.S)[1]
        ini = "".join(line.strip() + "\n" for line in ini.splitlines())
        assert "min_workers = 24\n" in ini, ini
        (service.folder / "dask.ini").write_text(ini.replace("min_workers = 24", "min_workers = 8"))
        restart = re.search(r"\(`(systemctl restart retail-pulse-daemon)`\)", text)[1]
        run_in(service, f"sed -i '/^\\[daemon\\]$/r {service.folder}/dask.ini' /etc/retail-pulse/retail-pulse.ini"
                        f" && {restart}", f"{page}: the settings")
        health = wait_until(lambda: (doc := json.loads(service.run("curl -s http://127.0.0.1:8080/healthz").stdout
                                                       or "{}")).get("workers") == 8 and doc,
                            timeout_s=60, what="the daemon to see the 8 workers", interval_s=0.2)
        assert health["ok"] and health["executor"] == "dask", health
        log = " ".join(run_in(service, "journalctl -u retail-pulse-daemon", "the daemon's log").split())
        assert re.search(r"executor dask: Dask scheduler tls://10\.0\.0\.5:8786, 8 workers: tls://10\.0\.0\.7:879\d",
                         log), log[-2000:]
        said = run_in(service, block(page, "runuser -u retailpulse"), f"{page}: the check").splitlines()
        assert said[0] == "executor: dask, 8 workers (scheduler tls://10.0.0.5:8786)", said
        assert all(line.endswith(": ok") for line in said[1:]) and "daemon: ok" in said, said
    finally:
        for name in ("operator", "scheduler", "worker"):
            if name in vms:
                vms[name].close()
        lan.close()
