"""Rooms import downward (daemon/__init__.py; STYLE.md habit 12), checked here, one test per rule: by what a
module's import statements name (an ast walk, no import), or by what importing it really loads (in a fresh
interpreter, so nothing this test process holds already counts)."""
import ast
import subprocess
import sys

import pytest

from tests.service import REPO

#: What a cheap program must not load at start-up: libcurl, Pillow, the engine's event loop.
HEAVY = ("pycurl", "PIL", "daemon.engine.loop")


def imported_by(folder: str) -> dict[str, set[str]]:
    """File (relative to the repository) -> the modules its import statements name, for every file under
    ``folder``, relative imports resolved."""
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                names.add(".".join(filter(None, (base, node.module))))
        found[str(path.relative_to(REPO))] = names
    return found


def loaded_by(module: str) -> set[str]:
    """The modules importing ``module`` loads, in an interpreter of its own."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_config_imports_no_room():
    rooms = ("daemon", "webapi", "ctl")
    wrong = {path: sorted(name for name in names if name.split(".")[0] in rooms)
             for path, names in imported_by("config").items()}
    assert not any(wrong.values()), wrong


@pytest.mark.parametrize("module", ["ctl.cli", "config", "config.startup", "webapi.settings", "daemon.settings",
                                    "daemon.engine.settings", "daemon.engine.outcome"])
def test_start_up_and_settings_load_neither_libcurl_nor_pillow_nor_the_engine_loop(module):
    heavy = sorted(loaded_by(module) & set(HEAVY))
    assert not heavy, f"importing {module} loads {', '.join(heavy)}"
