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


OURS = ("spool", "config", "daemon", "webapi", "ctl")
#: Room -> what its modules may import of ours (daemon/__init__.py writes the same rules down for people).
RULES = {
    "daemon/engine": ("daemon.engine",),
    "daemon/runners": ("daemon.runners", "daemon.engine"),
    "daemon/notifications": ("daemon.notifications", "daemon.engine", "spool", "config"),
    "daemon/supervisor": ("daemon.supervisor", "daemon.notifications", "daemon.runners", "daemon.engine", "spool",
                          "config"),
    "spool": ("spool",),
    "config": ("config", "spool"),
    "webapi": ("webapi", "spool", "config"),
    "ctl": ("ctl", "spool", "config"),
}
#: The cross-room imports that remain, each with its reason (daemon/__init__.py).
EXCEPTIONS = {("webapi/validate.py", "daemon.engine.urls"): "a URL is checked at submit in the engine's own form"}


def ours(name: str) -> bool:
    return name.split(".")[0] in OURS


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("room", sorted(RULES))
def test_each_room_imports_only_the_rooms_below_it(room):
    wrong = {path: sorted(name for name in names if ours(name) and not allowed(name, RULES[room])
                          and (path, name) not in EXCEPTIONS)
             for path, names in imported_by(room).items()}
    assert not any(wrong.values()), {path: names for path, names in wrong.items() if names}


def test_every_module_of_ours_is_in_a_room_with_rules():
    """A new package or room must say what it may import: nothing falls outside the rules."""
    covered = [path for room in RULES for path in imported_by(room)]
    wiring = ["daemon/__init__.py", "daemon/__main__.py", "daemon/settings.py"]
    every = [str(path.relative_to(REPO)) for name in OURS for path in (REPO / name).rglob("*.py")]
    assert sorted(set(every) - set(covered) - set(wiring)) == []


def test_the_written_exceptions_are_still_needed():
    for (path, name), why in EXCEPTIONS.items():
        assert name in imported_by(path.rsplit("/", 1)[0])[path], f"{path} no longer imports {name} ({why}): drop it"


@pytest.mark.parametrize("module", ["ctl.cli", "config", "config.startup", "webapi.settings", "daemon.settings",
                                    "daemon.engine.settings", "daemon.engine.outcome"])
def test_start_up_and_settings_load_neither_libcurl_nor_pillow_nor_the_engine_loop(module):
    heavy = sorted(loaded_by(module) & set(HEAVY))
    assert not heavy, f"importing {module} loads {', '.join(heavy)}"
