"""Settings: how a program gets them. Each room declares its own, beside the code that reads them; this
package is the mechanism only, and imports no room (a test says so, tests/test_imports.py).

A setting is a field of a frozen dataclass (a "settings class") whose ``metadata`` says what an operator sees:

    section   its INI section: common, daemon, download, webhook or api (SECTIONS). Marks the field a setting.
    help      what it means, for --help and the settings table in the docs
    setting   its name, when not the field's (DownloadLimits.attempts is the setting download_attempts)
    min, max  bounds, checked whichever source the value came from
    parse     text -> value, when the field's type does not say (int, float, str, bool, Path and enums do)

The default is the field's own, so each number has one place. A field whose default_factory is a settings
class (EngineSettings.limits, a DownloadLimits) is built from that class's settings, recursively; other
fields keep their defaults. A program hands ``load`` the classes it uses (daemon/settings.py,
webapi/settings.py) and builds each settings object with ``Config.build``. CommonSettings, below, are every
program's.

Where a value comes from, highest first:
    1. the command-line option           --download-total-timeout-s 20
    2. the environment variable          RETAILPULSE_DOWNLOAD_TOTAL_TIMEOUT_S=20
    3. the configuration file (INI)      [download] download_total_timeout_s = 20
    4. the default on the field
The file is /etc/retail-pulse/retail-pulse.ini if it exists, or the one named by --config or
RETAILPULSE_CONFIG (which must then exist). Both programs read the one file: each refuses a key it does not
know in the sections it owns (``sections``; an unknown section, every program), and leaves the other
program's sections to it. A value that does not parse or is out of range stops start-up with a message
naming the setting and where the value came from.
"""
from __future__ import annotations

import argparse
import configparser
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

ENV_PREFIX = "RETAILPULSE_"
#: The sections of the INI file. Which program reads which: daemon, download: the daemon; api: the API;
#: webhook: the daemon, and the API its webhook_secrets_file; common: every program.
SECTIONS = ("common", "daemon", "download", "webhook", "api")
#: Defaults are facts of an installation on a VM (the paths docs/operations.md's steps and the systemd units use),
#: never paths inside the source tree: an installed package has no source tree. A development checkout
#: names its own folders (``make run`` passes the local spool and the bundled sample store master).
DEFAULT_CONFIG_FILE = Path("/etc/retail-pulse/retail-pulse.ini")


class SettingError(Exception):
    """A setting that cannot be used; the message names it and where its value came from."""


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _choice(enum: type[Enum]) -> Callable[[str], Enum]:
    """A parser for an enum's values, case aside."""
    def parse(text: str) -> Enum:
        wanted = text.strip().lower()
        for member in enum:
            if str(member.value).lower() == wanted:
                return member
        raise ValueError(f"not one of {', '.join(str(member.value) for member in enum)}")

    parse.__name__ = enum.__name__.lower()  # the option's metavar
    return parse


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("not one of DEBUG, INFO, WARNING, ERROR")
    return level


@dataclass(frozen=True)
class CommonSettings:
    """What every program reads."""

    spool_dir: Path = field(default=Path("/var/lib/retail-pulse/spool"), metadata={
        "section": "common", "help": "the spool folder both programs share"})
    log_level: str = field(default="INFO", metadata={
        "section": "common", "help": "DEBUG, INFO, WARNING or ERROR", "parse": _log_level})


#: The parsers a field's type implies (annotations are strings here: ``from __future__ import annotations``).
_PARSERS: dict[object, Callable[[str], object]] = {
    "int": int, "float": float, "str": str, "bool": _bool, "Path": Path,
    int: int, float: float, str: str, bool: _bool, Path: Path,
}


def text_of(value: object) -> str:
    """A value as an operator writes it: a tuple comma-separated (``JPEG,PNG``), an enum by its value."""
    if isinstance(value, tuple):
        return ",".join(text_of(item) for item in value)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


@dataclass(frozen=True)
class Setting:
    name: str
    section: str  # its INI section
    parse: Callable[[str], object]
    default: object
    help: str
    minimum: float | None = None
    maximum: float | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def metavar(self) -> str:
        return self.parse.__name__.strip("_").removeprefix("parse_").upper()

    def convert(self, raw: object, source: str) -> object:
        try:
            value = self.parse(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise SettingError(f"{self.name} ({source}): {exc}") from None
        if self.minimum is not None and value < self.minimum:
            raise SettingError(f"{self.name} ({source}): must be at least {self.minimum:g}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise SettingError(f"{self.name} ({source}): must be at most {self.maximum:g}, got {value}")
        return value


def _nested(f: dataclasses.Field) -> type | None:
    """The settings class a field is built from (its default_factory), or None."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _setting(owner: type, f: dataclasses.Field) -> Setting:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    parse = meta.get("parse") or _PARSERS.get(f.type) or (_choice(type(default)) if isinstance(default, Enum)
                                                          else None)
    if parse is None or meta["section"] not in SECTIONS or "help" not in meta:
        raise TypeError(f"{owner.__name__}.{f.name}: a setting needs a section of {SECTIONS}, a help text, and "
                        f"a parse function unless its type is int, float, str, bool, Path or an enum")
    return Setting(meta.get("setting", f.name), meta["section"], parse, default, meta["help"],
                   meta.get("min"), meta.get("max"))


def settings_of(cls: type) -> list[Setting]:
    """The settings a settings class declares, those of the classes it is built from included, in order."""
    found: list[Setting] = []
    for f in dataclasses.fields(cls):
        nested = _nested(f)
        if nested is not None:
            found += settings_of(nested)
        elif "section" in f.metadata:
            found.append(_setting(cls, f))
    return found


def settings_for(classes: Iterable[type] = ()) -> list[Setting]:
    """CommonSettings' settings and those of ``classes``: a program's. Each name is declared once."""
    found: dict[str, Setting] = {}
    for cls in (CommonSettings, *classes):
        for s in settings_of(cls):
            if s.name in found:
                raise TypeError(f"{cls.__name__}: the setting {s.name} is declared twice")
            found[s.name] = s
    return list(found.values())


class Config:
    """Resolved settings, read-only: ``config.build(DownloadLimits)``, or one by name,
    ``config.download_total_timeout_s``, with where it came from, ``config.source(name)``."""

    def __init__(self, values: Mapping[str, object], sources: Mapping[str, str]):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))

    def __getattr__(self, name: str):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("settings are read-only")

    def source(self, name: str) -> str:
        return self._sources[name]

    def items(self):
        return self._values.items()

    def build(self, cls: type):
        """A settings object of ``cls`` from these values: each setting field set, each nested settings class
        built the same way, every other field left at its default."""
        given = {}
        for f in dataclasses.fields(cls):
            nested = _nested(f)
            if nested is not None:
                given[f.name] = self.build(nested)
            elif "section" in f.metadata:
                name = f.metadata.get("setting", f.name)
                if name not in self._values:
                    raise LookupError(f"{cls.__name__}.{f.name}: the setting {name} was not loaded")
                given[f.name] = self._values[name]
        return cls(**given)


def add_options(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """One option per setting, default None so that "not given" can fall through to env, file, default."""
    parser.add_argument("--config", help=f"INI file [{DEFAULT_CONFIG_FILE} if it exists; env {ENV_PREFIX}CONFIG]")
    for s in settings:
        parser.add_argument(s.option, dest=s.name, default=None, metavar=s.metavar,
                            help=f"{s.help} [{text_of(s.default)}]")


def read_config_file(path: Path, required: bool) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        if required:
            raise SettingError(f"config: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise SettingError(f"config: {path}: {exc}") from None
    return parser


def resolve(settings: Iterable[Setting], options: argparse.Namespace, environ: Mapping[str, str] | None = None,
            sections: Iterable[str] | None = None) -> Config:
    """Apply the precedence (option > environment > file > default) and check every value.

    ``sections``: the INI sections this program owns, whose every key it knows, so refuses one it does not
    (by default, those its settings are in); a section that is no program's is refused too."""
    environ = os.environ if environ is None else environ
    settings = list(settings)
    owned = set(sections) if sections is not None else {s.section for s in settings}
    named = options.config or environ.get(ENV_PREFIX + "CONFIG")
    path = Path(named) if named else DEFAULT_CONFIG_FILE
    ini = read_config_file(path, required=bool(named))
    known = {(s.section, s.name) for s in settings}
    for section in ini.sections():
        for key in ini[section]:
            if section not in SECTIONS or (section in owned and (section, key) not in known):
                raise SettingError(f"config: {path}: [{section}] {key} is not a setting")
    values, sources = {}, {}
    for s in settings:
        if getattr(options, s.name, None) is not None:
            raw, source = getattr(options, s.name), s.option
        elif s.env in environ:
            raw, source = environ[s.env], s.env
        elif ini.has_option(s.section, s.name):
            raw, source = ini.get(s.section, s.name), f"{path} [{s.section}]"
        else:
            raw, source = s.default, "default"
        values[s.name], sources[s.name] = s.convert(raw, source), source
    return Config(values, sources)


def load(prog: str, description: str | None, classes: Iterable[type], sections: Iterable[str] | None,
         argv: list[str] | None) -> Config:
    """A program's settings (CommonSettings and ``classes``') from its command line, the environment, the
    INI file and the defaults; ``sections``: the INI sections it owns (resolve)."""
    settings = settings_for(classes)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, settings)
    return resolve(settings, parser.parse_args(argv), sections=sections)


def markdown_table(settings: Iterable[Setting]) -> str:
    """The settings as the docs show them, in the order given (a test keeps the docs in step with it)."""
    rows = ["| setting (INI section) | option / environment | default | meaning |", "|---|---|---|---|"]
    for s in settings:
        rows.append(f"| `{s.name}` ({s.section}) | `{s.option}` / `{s.env}` | `{text_of(s.default)}` | {s.help} |")
    return "\n".join(rows)
