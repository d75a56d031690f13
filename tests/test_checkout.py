"""The checkout explains itself: `make run` as the README's quick start runs it, the README's first job (taken
from the README itself) completing on the images `make run` serves, `make ctl` on the same spool, every command
of the quick start printing what the README says it prints, and every link of the documentation landing."""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, wait_until
from tests.service import free_port

README = REPO / "README.md"
#: The documentation a newcomer reads, whose links must land.
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "tests" / "README.md", REPO / "bench" / "README.md",
        REPO / "spool" / "README.md"]


def readme_section(title: str) -> str:
    """The text of the README's ``## title`` section, up to the next ``## ``."""
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def transcript(block: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, the lines it prints) pairs: ``$ `` starts a command."""
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"the README shows output before any command: {line!r}"
            steps[-1][1].append(line)
    return steps


def printed_as_shown(shown: list[str], printed: list[str]) -> bool:
    """Whether ``printed`` is what the README shows, where ``...`` stands for anything and ``<crc32>`` for the
    8 hex digits of a CRC-32."""
    patterns = [re.escape(line).replace(re.escape("..."), ".*").replace(re.escape("<crc32>"), "[0-9a-f]{8}")
                for line in shown]
    return len(patterns) == len(printed) and all(re.fullmatch(p, line) for p, line in zip(patterns, printed))


def run_shell(command: str, cwd: Path) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"$ {command}\nexit {done.returncode}\n{done.stderr}"
    return done.stdout


def readme_first_job() -> dict:
    """The body of the quick start's first `curl ... /api/submit/ ... -d '...'`, as the README has it."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"curl -s -X POST http://127\.0\.0\.1:8080/api/submit/.*?-d '(.*?)'", quick_start, re.S)
    assert command, "the quick start has no submit example any more: update this test"
    return json.loads(command[1])


def make(*args: str) -> list[str]:
    # -o: the venv is up to date (`make test` made it); never rebuilt in the middle of the tests
    return ["make", "--no-print-directory", "-s", "-o", ".venv/bin/.installed", *args]


@pytest.fixture
def make_run(tmp_path):
    """`make run` with its folder and ports moved out of the way; stopped as Ctrl-C stops it."""
    var, port, images_port = tmp_path / "var", free_port(), free_port()
    settings = [f"VAR={var}", f"PORT={port}", f"IMAGES_PORT={images_port}"]
    log = (tmp_path / "make-run.log").open("wb")
    proc = subprocess.Popen(make("run", *settings), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, (tmp_path / "make-run.log").read_text()
        try:
            return requests.get(f"{base}/healthz", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(healthy, timeout_s=60, what="make run's API and daemon", interval_s=0.1)
        yield base, images_port, var, settings
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_the_readme_first_job_completes_and_make_ctl_sees_it_on_the_same_spool(make_run):
    base, images_port, var, settings = make_run
    body = json.dumps(readme_first_job()).replace("127.0.0.1:8081", f"127.0.0.1:{images_port}")
    r = requests.post(f"{base}/api/submit/", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    status = wait_until(lambda: (doc := requests.get(f"{base}/api/status", params={"jobid": job_id},
                                                      timeout=30).json())["status"] != "ongoing" and doc,
                        what="the first job to finish")
    assert status["status"] == "completed", status
    results = requests.get(f"{base}/api/results", params={"jobid": job_id}, timeout=30).json()["results"]
    assert [(r["width"], r["height"], r["perimeter"]) for r in results] == [(640, 480, 2240), (800, 600, 2800)]

    listed = subprocess.run(make("ctl", *settings, "ARGS=list"), cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert f"{job_id}  done      completed" in listed.stdout and "-- 1 job" in listed.stdout
    shown = subprocess.run(make("ctl", *settings, f"ARGS=show {job_id}"), cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "perimeter 2240" in shown.stdout, shown.stderr

    # The same job on disk, as the README walks through it: each command run as written, from the folder
    # that holds make run's var/, printing what the README shows. The status turns final just before the job
    # file moves to done/.
    assert job_id == 1, "the README's walk-through names job 1, the first of a fresh var/"
    wait_until(lambda: (var / "spool" / "done" / f"{job_id}.json").exists(), what="the job file in done/")
    [walk] = fenced_blocks(readme_section("Quick start"), "console")
    steps = transcript(walk)
    assert [command.split()[0] for command, _ in steps] == ["ls", "cat", "ls"], "update this test with the README"
    for command, shown in steps:
        printed = run_shell(command, cwd=var.parent).splitlines()
        assert printed_as_shown(shown, printed), f"$ {command}\nthe README shows:\n" + "\n".join(shown) + \
            "\nit printed:\n" + "\n".join(printed)

    # Owner-only, as the README says: the spool folder, the lock files, the INI file make run wrote.
    spool = var / "spool"
    for path, mode in ((spool, 0o700), (spool / "daemon.lock", 0o600), (spool / "next_job_id", 0o600),
                       (var / "retail-pulse.ini", 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path.name}: {oct(path.stat().st_mode)}"


def test_the_readme_curl_commands_print_what_the_readme_says(make_run):
    """The quick start's three curl commands, run as written (only the ports are make run's here), against
    what the README says of them: the job id, the status, each image's size and perimeter."""
    missing = [tool for tool in ("curl", "jq") if shutil.which(tool) is None]
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the README's commands need {' and '.join(missing)}")
    base, images_port, var, _settings = make_run
    quick_start = readme_section("Quick start")
    [block] = [block for block in fenced_blocks(quick_start, "sh") if "curl " in block]
    submit, status, results = re.split(r"\n(?=curl )", block.strip())  # a command starts each `curl` line
    assert submit.startswith("curl -s -X POST") and "/api/status?" in status and "/api/results?" in results

    def run(command: str) -> str:
        here = command.replace("127.0.0.1:8080", base.removeprefix("http://")).replace(
            "127.0.0.1:8081", f"127.0.0.1:{images_port}")
        return run_shell(here, cwd=var.parent)

    assert run(submit) == re.search(r"The submit answers `(.*?)`", quick_start)[1]
    said_status = re.search(r'"status": "(\w+)"', status.split("#", 1)[1])[1]
    doc = wait_until(lambda: (doc := json.loads(run(status)))["status"] != "ongoing" and doc,
                     what="the first job to finish")
    assert doc["status"] == said_status, doc
    said_sizes = [tuple(map(int, size)) for size in re.findall(r"(\d+)x(\d+), (?:perimeter )?(\d+)",
                                                              results.split("#", 1)[1])]
    measured = json.loads(run(results))["results"]
    assert len(said_sizes) == 2 and [(r["width"], r["height"], r["perimeter"]) for r in measured] == said_sizes


def test_every_link_of_the_documentation_lands():
    """Every relative link of the README and docs/ names a file that exists and, with #anchor, one of its
    headings (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens)."""
    def anchors(path: Path) -> set[str]:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
        return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}

    broken = []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}: no such file")
            elif anchor and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(REPO)}: {target}: no such heading")
    assert not broken, "\n".join(broken)


def test_retailpulse_ctl_without_settings_says_how_to_name_the_spool(tmp_path):
    ctl = REPO / ".venv" / "bin" / "retailpulse-ctl"
    result = subprocess.run([str(ctl), "--spool-dir", str(tmp_path / "nothing"), "list"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is not a spool" in result.stderr
    assert "(spool_dir, from --spool-dir)" in result.stderr and "make ctl ARGS=list" in result.stderr


def test_make_run_serves_a_job_of_a_hundred_sample_images_at_once(make_run):
    """The sample image server takes a job's parallel downloads: its listen backlog holds them (http.server's
    5 dropped the SYNs, and 100 images took 14 s of retransmits); here they take about a second (the GPU wait)."""
    base, images_port, _var, _settings = make_run
    urls = [f"http://127.0.0.1:{images_port}/shelf-1.jpg?{i}" for i in range(100)]
    body = {"count": 1, "visits": [{"store_id": "RP00001", "visit_time": "2024-03-11T10:00:00Z", "image_url": urls}]}
    start = time.monotonic()
    job_id = requests.post(f"{base}/api/submit/", json=body, timeout=30).json()["job_id"]
    status = wait_until(lambda: (doc := requests.get(f"{base}/api/status", params={"jobid": job_id},
                                                      timeout=30).json())["status"] != "ongoing" and doc,
                        what="the job of 100 images", interval_s=0.05)
    assert status["status"] == "completed" and status["images_done"] == 100, status
    assert time.monotonic() - start < 5, f"{time.monotonic() - start:.1f} s for 100 images on make run"


def test_make_ctl_and_the_command_it_runs_exit_as_the_readme_says(tmp_path):
    """An unknown job: retailpulse-ctl's one line and its exit 1; through make, the same line, then make's own,
    and make's exit 2 (it passes no exit status through), as the README says of `make ctl`."""
    var = tmp_path / "var"
    spool = var / "spool"
    from spool import Spool
    Spool(spool).create()
    (var / "retail-pulse.ini").write_text(f"[common]\nspool_dir = {spool}\n")
    direct = subprocess.run([str(REPO / ".venv/bin/retailpulse-ctl"), "--config", str(var / "retail-pulse.ini"),
                             "show", "999"], capture_output=True, text=True, timeout=60)
    assert (direct.returncode, direct.stdout, direct.stderr) == (1, "", "retailpulse-ctl: no job 999\n")
    through = subprocess.run(make("ctl", f"VAR={var}", "ARGS=show 999"), cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert through.returncode == 2 and through.stderr.startswith("retailpulse-ctl: no job 999\n"), through.stderr
    assert re.fullmatch(r"make(\[\d+\])?: \*\*\* \[Makefile:\d+: ctl\] Error 1", through.stderr.splitlines()[1])
    readme = re.sub(r"\s+", " ", README.read_text())
    assert "(`make: *** [Makefile:NN: ctl] Error 1`, the 1 being retailpulse-ctl's exit status) and exits 2" in readme
    assert "which exits 0, 1 (the command failed: no such job, ...) or 2" in readme
