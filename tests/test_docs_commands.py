"""Every command block of the README and docs/ is run by a test, as written. The README's quick start is run by
tests/test_checkout.py; the API's Idempotency-Key example against the real API here; docs/operations.md's VM
steps, its front-door steps, its first look of the runbook and its retailpulse-ctl transcript, one after the
other as an operator types them, in a stand-in Debian VM (tests/vm_standin.py: namespaces of their own, the
real commands; systemd, apt and journald stood in for). A block no test runs fails
test_every_command_block_is_run_by_a_test, so a new one cannot be left out.

What the tests change in a block, and only that: the placeholders a reader fills in (`<this repository>`:
this checkout; `/path/to/StoreMasterAssignment.csv`: the sample store master), and the ports of the quick
start (make run's are the tests' own)."""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
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
    **{("docs/scale-out.md", start): ["tests/test_docs_commands.py::test_the_scale_out_guide_on_the_stand_in_vm"]
       for start in ("/opt/retail-pulse/.venv/bin/pip install", "dask_cert=", "# on the scheduler host",
                     "cp /opt/retail-pulse/systemd/retail-pulse-dask-scheduler.service",
                     "cp '/opt/retail-pulse/systemd/retail-pulse-dask-worker@.service'")},
}


def command_blocks() -> list[tuple[str, str]]:
    """(file, text) of every shell block (sh, console, or text that starts with a prompt) of the README and docs/."""
    found = []
    for path in DOCS:
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M):
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


@pytest.mark.slow
@pytest.mark.dask
@pytest.mark.install
def test_the_scale_out_guide_on_the_stand_in_vm(service_vm):
    """docs/scale-out.md's steps, as written, with the scheduler host (10.0.0.5) and a worker host (10.0.0.7)
    on the service VM (10.0.0.4): its blocks in order, each host's part of the dask.env block before that
    host's units, and the prose between them (copy each host's certificates) done as it says."""
    vm = service_vm
    run_in(vm, "for address in 10.0.0.4 10.0.0.5 10.0.0.7; do ip addr add $address/32 dev lo; done", "the hosts")
    run_in(vm, block("docs/scale-out.md", "/opt/retail-pulse/.venv/bin/pip install"), "the Dask extra")
    run_in(vm, block("docs/scale-out.md", "dask_cert="), "the certificates")
    run_in(vm, """mkdir -p /etc/retail-pulse/dask && cd /root/dask-ca
        cp ca.pem scheduler.pem scheduler.key /etc/retail-pulse/dask/
        cp worker-10.0.0.7.pem /etc/retail-pulse/dask/worker.pem
        cp worker-10.0.0.7.key /etc/retail-pulse/dask/worker.key
        cp daemon.pem /etc/retail-pulse/dask/client.pem && cp daemon.key /etc/retail-pulse/dask/client.key
        chown retailpulse: /etc/retail-pulse/dask/* && chmod 600 /etc/retail-pulse/dask/*.key""",
           "the prose: each host's certificates")
    scheduler_env, worker_env = block("docs/scale-out.md", "# on the scheduler host").split("# on a worker host")
    run_in(vm, scheduler_env, "the scheduler host's dask.env")
    run_in(vm, block("docs/scale-out.md", "cp /opt/retail-pulse/systemd/retail-pulse-dask-scheduler.service"),
           "the scheduler's unit")
    run_in(vm, worker_env, "the worker host's dask.env")
    run_in(vm, block("docs/scale-out.md", "cp '/opt/retail-pulse/systemd/retail-pulse-dask-worker@.service'"),
           "the workers' units")
    assert run_in(vm, "curl -s http://127.0.0.1:8787/health", "the scheduler's health check") == "ok"
    ini = re.search(r"`\[daemon\]` section of `/etc/retail-pulse/retail-pulse.ini`.*?```ini\n\[daemon\]\n(.*?)```",
                    (REPO / "docs/scale-out.md").read_text(), re.S)[1]
    (Path(vm.folder) / "dask.ini").write_text(ini)  # what the prose says: these lines, in the [daemon] section
    run_in(vm, f"sed -i '/^\\[daemon\\]$/r {vm.folder}/dask.ini' /etc/retail-pulse/retail-pulse.ini && "
               "systemctl restart retail-pulse-daemon", "the daemon on the cluster")
    health = wait_until(lambda: (doc := json.loads(vm.run("curl -s http://127.0.0.1:8080/healthz").stdout or "{}"))
                        .get("workers") == 8 and doc, timeout_s=60, what="the daemon to see the 8 workers",
                        interval_s=0.2)
    assert health["ok"] and health["executor"] == "dask", health
    log = run_in(vm, "journalctl -u retail-pulse-daemon", "the daemon's log")
    assert re.search(r"executor dask: Dask scheduler tls://10\.0\.0\.5:8786, \d+ workers: tls://10\.0\.0\.7:879\d", log)
