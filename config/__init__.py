"""Every setting of both programs, defined once: name (with its unit), INI section, default, meaning.

Where a value comes from, highest first:
    1. the command-line option           --download-total-timeout-s 20
    2. the environment variable          RETAILPULSE_DOWNLOAD_TOTAL_TIMEOUT_S=20
    3. the configuration file (INI)      [download] download_total_timeout_s = 20
    4. the default in SETTINGS below
The file is /etc/retail-pulse/retail-pulse.ini if it exists, or the one named by --config or
RETAILPULSE_CONFIG (which must then exist). A value that does not parse or is out of range stops start-up
with a message naming the setting and where the value came from.
"""
from __future__ import annotations

import argparse
import configparser
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.engine.settings import DownloadLimits, EngineSettings, parse_formats
from daemon.supervisor.settings import SupervisorSettings, WebhookSettings
from spool import Executor
from webapi.validate import SubmitLimits

ENV_PREFIX = "RETAILPULSE_"
#: Defaults are facts of an installation on a VM (the paths the README's steps and the systemd units use),
#: never paths inside the source tree: an installed package has no source tree. A development checkout
#: names its own folders (``make run`` passes the local spool and the bundled sample store master).
DEFAULT_SPOOL_DIR = Path("/var/lib/retail-pulse/spool")
DEFAULT_STORE_MASTER = Path("/etc/retail-pulse/stores.csv")
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


def _executor(text: str) -> str:
    executor = text.strip().lower()
    if executor not in tuple(Executor):
        raise ValueError(f"not one of {', '.join(Executor)}")
    return executor


def _formats(text: str) -> tuple:
    return parse_formats(text)


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("not one of DEBUG, INFO, WARNING, ERROR")
    return level


@dataclass(frozen=True)
class Setting:
    name: str
    section: str  # INI section; also says which program reads it ("common" = both)
    parse: Callable[[str], object]  # int, float, str, Path or _bool
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


# The defaults of the code's own settings objects are the table's defaults: one place for each number.
_ENGINE, _DOWNLOAD, _SUPERVISOR, _SUBMIT = EngineSettings, DownloadLimits(), SupervisorSettings, SubmitLimits
_WEBHOOK = WebhookSettings

SETTINGS: tuple[Setting, ...] = (
    # --- common
    Setting("spool_dir", "common", Path, DEFAULT_SPOOL_DIR, "the spool folder both programs share"),
    Setting("log_level", "common", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    # --- daemon
    Setting("store_master", "daemon", Path, DEFAULT_STORE_MASTER, "CSV with AreaCode,StoreName,StoreID"),
    Setting("executor", "daemon", _executor, Executor.LOCAL.value,
            "where images are measured: local (a process pool on this machine) or dask (the Dask cluster at "
            "dask_scheduler; needs retail-pulse[dask])"),
    Setting("processes", "daemon", int, 0, "local pool processes; 0 means one per core", 0, 256),
    Setting("images_per_process", "daemon", int, 4096, "images in flight at once per pool process or Dask "
            "worker (waiting for a download slot, downloading, or in their GPU wait), on one libcurl event loop; "
            "also the most a crash makes it download again", 1, 65536),
    Setting("downloads_per_process", "daemon", int, _ENGINE.max_transfers,
            "of those, downloads running at once (the others wait for one to end, or are in their GPU wait); bounds "
            "memory: a download keeps only what says its image's size (a few bytes; a HEIF or AVIF meta box, at most "
            "1 MiB)", 1, 65536),
    Setting("dask_scheduler", "daemon", str, "", "the Dask scheduler's address, e.g. tls://10.0.0.5:8786 "
            "(executor = dask)"),
    Setting("dask_tls_ca_file", "daemon", str, "", "CA certificate that signed the scheduler's and workers' "
            "certificates (PEM); with the two below, the daemon talks TLS to the cluster"),
    Setting("dask_tls_cert_file", "daemon", str, "", "the daemon's own certificate for the cluster (PEM)"),
    Setting("dask_tls_key_file", "daemon", str, "", "the key of dask_tls_cert_file (PEM)"),
    Setting("chunk_images", "daemon", int, _SUPERVISOR.chunk_images,
            "images per chunk: the unit of fairness between jobs, of results files and of work redone after a crash",
            1, 100_000),
    Setting("max_active_jobs", "daemon", int, _SUPERVISOR.max_active_jobs,
            "jobs progressing at once (their images share the pool chunk by chunk); more wait in incoming/, except "
            "small ones", 1, 100_000),
    Setting("small_job_images", "daemon", int, _SUPERVISOR.small_job_images,
            "a job of at most this many images starts at once, however many jobs run: it never waits behind a crowd "
            "of big ones", 0, 1_000_000),
    Setting("gpu_sleep_min_s", "daemon", float, _ENGINE.gpu_sleep_min_s,
            "simulated GPU work per image, lower bound", 0, 60),
    Setting("gpu_sleep_max_s", "daemon", float, _ENGINE.gpu_sleep_max_s,
            "simulated GPU work per image, upper bound", 0, 60),
    Setting("drain_timeout_s", "daemon", float, _SUPERVISOR.drain_timeout_s,
            "on SIGTERM, how long in-flight images may take to finish; the rest is redone after the restart",
            0, 3600),
    Setting("max_worker_deaths", "daemon", int, _SUPERVISOR.max_worker_deaths,
            "an image whose process dies this many times is failed (a poison image); also the tries of a task that "
            "cannot run on a Dask worker before its images fail", 1, 100),
    Setting("stall_timeout_s", "daemon", float, _SUPERVISOR.stall_timeout_s, "a pool process or Dask worker that "
            "holds tasks and finishes none for this long is stalled: /healthz answers 503 naming it, and a pool "
            "process is replaced (its images are redone)", 1, 86400),
    Setting("retention_days", "daemon", float, _SUPERVISOR.retention_days,
            "finished jobs (files, status, results) older than this are deleted, checked every 10 minutes; 0 keeps "
            "them forever", 0),
    # --- download (read by the daemon)
    Setting("download_connect_timeout_s", "download", float, _DOWNLOAD.connect_timeout_s,
            "TCP+TLS connect timeout per attempt", 0.01),
    Setting("download_read_timeout_s", "download", float, _DOWNLOAD.read_timeout_s,
            "longest silence while reading", 0.01),
    Setting("download_total_timeout_s", "download", float, _DOWNLOAD.total_timeout_s,
            "whole download of one attempt, even if the server trickles", 0.01),
    Setting("max_image_bytes", "download", int, _DOWNLOAD.max_image_bytes,
            "largest image body, enforced while streaming", 1),
    Setting("download_attempts", "download", int, _DOWNLOAD.attempts,
            "tries per image for transient failures (connection refused or reset, timeout, HTTP 429 and 5xx)", 1, 20),
    Setting("download_backoff_s", "download", float, _DOWNLOAD.backoff_s,
            "wait before the 2nd try; doubles each try, with jitter", 0, 60),
    Setting("image_formats", "download", _formats, ",".join(_DOWNLOAD.image_formats), "the image formats measured, "
            "comma-separated (JPEG, PNG, WebP, HEIF, AVIF; HEIC is HEIF); any other format fails its image, named"),
    Setting("max_header_bytes", "download", int, _DOWNLOAD.max_header_bytes, "how far into a body its size may "
            "be: the metadata before a JPEG's frame header, a HEIF or AVIF file's boxes up to its meta box; "
            "beyond it the image fails (header too large). Read as it streams, not kept", 64),
    Setting("max_redirects", "download", int, _DOWNLOAD.max_redirects,
            "redirects followed per image; each hop is checked", 0, 20),
    Setting("allow_private_addresses", "download", _bool, False, "let downloads reach loopback, private, "
            "link-local and other non-public addresses: for development and tests only"),
    Setting("download_allowed_networks", "download", str, "", "comma-separated networks downloads may reach "
            "although not public, e.g. an internal image store: 10.20.0.0/16"),
    # --- webhook (the secrets file is read by both programs; the rest by the daemon)
    Setting("webhook_secrets_file", "webhook", str, "", "file of '<token name> whsec_<base64>' lines ('*' for "
            "jobs submitted with tokens off): the secret each job's completion webhook is signed with. Empty: "
            "no webhooks, and a callback_url is refused (make a line: python -m config.webhook_secrets NAME)"),
    Setting("webhook_retry_for_s", "webhook", float, _WEBHOOK.retry_for_s, "how long a completion webhook is "
            "retried after its job finished (timeouts, refused connections, HTTP 429 and 5xx) before it is "
            "given up", 0, 30 * 86400),
    Setting("webhook_backoff_s", "webhook", float, _WEBHOOK.backoff_s, "wait before a webhook's 2nd attempt; "
            "doubles each attempt, with jitter, up to 10 minutes", 0.01, 3600),
    Setting("webhook_allowed_networks", "webhook", str, "", "comma-separated networks webhooks may reach "
            "although not public (an internal receiver); apart from download_allowed_networks on purpose, "
            "since a webhook is a POST"),
    # --- api
    Setting("host", "api", str, "127.0.0.1", "address the API listens on"),
    Setting("port", "api", int, 8080, "port the API listens on; 0 picks a free one", 0, 65535),
    Setting("api_workers", "api", int, 2, "gunicorn worker processes", 1, 64),
    Setting("api_threads", "api", int, 8, "threads per gunicorn worker", 1, 256),
    Setting("max_body_bytes", "api", int, _SUBMIT.max_body_bytes, "largest submit body (413 above it)", 1),
    Setting("max_images_per_job", "api", int, _SUBMIT.max_images_per_job, "most image URLs in one job (400 "
            "above it, naming the limit)", 1),
    Setting("max_url_chars", "api", int, _SUBMIT.max_url_chars, "longest image URL (400 above it)", 16, 65536),
    Setting("max_queued_images", "api", int, 1_000_000, "images waiting or in progress above which submit "
            "answers 503 with Retry-After; 0 turns the check off", 0),
    Setting("api_tokens_file", "api", str, "", "file of '<name> <sha256 of token>' lines; when set, every "
            "route but /healthz needs 'Authorization: Bearer <token>'. Empty: no tokens (local use)"),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


class Config:
    """Resolved settings, read-only, with attribute access: ``config.download_total_timeout_s``."""

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


def settings_for(sections: Iterable[str]) -> list[Setting]:
    wanted = set(sections) | {"common"}
    return [s for s in SETTINGS if s.section in wanted]


def add_options(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """One option per setting, default None so that "not given" can fall through to env, file, default."""
    parser.add_argument("--config", help=f"INI file [{DEFAULT_CONFIG_FILE} if it exists; env {ENV_PREFIX}CONFIG]")
    for s in settings:
        parser.add_argument(s.option, dest=s.name, default=None, metavar=s.parse.__name__.strip("_").upper(),
                            help=f"{s.help} [{s.default}]")


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


def resolve(settings: Iterable[Setting], options: argparse.Namespace,
            environ: Mapping[str, str] | None = None) -> Config:
    """Apply the precedence (option > environment > file > default) and check every value."""
    environ = os.environ if environ is None else environ
    settings = list(settings)
    named = options.config or environ.get(ENV_PREFIX + "CONFIG")
    path = Path(named) if named else DEFAULT_CONFIG_FILE
    ini = read_config_file(path, required=bool(named))
    known = {(s.section, s.name) for s in SETTINGS}
    for section in ini.sections():
        for key in ini[section]:
            if (section, key) not in known:
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


def load(prog: str, description: str | None, sections: Iterable[str], argv: list[str] | None) -> Config:
    """A program's settings from its command line, the environment, the INI file and the defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_options(parser, settings_for(sections))
    return resolve(settings_for(sections), parser.parse_args(argv))


def markdown_table(sections: Iterable[str] = ("common", "daemon", "download", "webhook", "api")) -> str:
    """The settings as the README documents them (a test keeps the README in step with this table)."""
    rows = ["| setting (INI section) | option / environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        if s.section in sections:
            rows.append(f"| `{s.name}` ({s.section}) | `{s.option}` / `{s.env}` | `{s.default}` | {s.help} |")
    return "\n".join(rows)
