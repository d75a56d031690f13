"""The settings: precedence, errors that name the setting, objects built from them, one shared INI file, a
table that keeps every setting operators know, and docs that are true."""
import argparse
import ipaddress
from pathlib import Path

import pytest

from config import CommonSettings, SettingError, add_options, resolve, settings_for, text_of
from daemon import settings as daemon_settings
from daemon.engine.settings import DownloadLimits, EngineSettings, Format
from daemon.runners.settings import RunnerSettings
from daemon.notifications.settings import WebhookSettings
from daemon.supervisor.settings import SupervisorSettings
from spool import Executor
from tests.settings_table import every_setting, table
from webapi import settings as api_settings

DAEMON = (daemon_settings.CLASSES, daemon_settings.SECTIONS)
API = (api_settings.CLASSES, api_settings.SECTIONS)


def resolve_with(argv=(), environ=None, ini=None, tmp_path=None, program=DAEMON):
    classes, sections = program
    parser = argparse.ArgumentParser()
    add_options(parser, settings_for(classes))
    environ = dict(environ or {})
    if ini is not None:
        path = tmp_path / "retail-pulse.ini"
        path.write_text(ini)
        environ["RETAILPULSE_CONFIG"] = str(path)
    return resolve(settings_for(classes), parser.parse_args(list(argv)), environ, sections)


def test_option_beats_environment_beats_file_beats_default(tmp_path):
    ini = "[daemon]\nchunk_images = 64\nprocesses = 3\n[download]\ndownload_attempts = 5\n"
    env = {"RETAILPULSE_PROCESSES": "4", "RETAILPULSE_CHUNK_IMAGES": "32"}
    config = resolve_with(["--chunk-images", "16"], env, ini, tmp_path)
    assert config.chunk_images == 16 and config.source("chunk_images") == "--chunk-images"
    assert config.processes == 4 and config.source("processes") == "RETAILPULSE_PROCESSES"
    assert config.download_attempts == 5 and "[download]" in config.source("download_attempts")
    assert config.max_worker_deaths == 3 and config.source("max_worker_deaths") == "default"


@pytest.mark.parametrize("ini, message", [
    ("[daemon]\nchunk_images = lots\n", "chunk_images ("),
    ("[daemon]\nchunk_images = 0\n", "chunk_images ("),
    ("[daemon]\nchunk_size = 5\n", "[daemon] chunk_size is not a setting"),
    ("[webhook]\nwebhook_secret_file = /etc/x\n", "[webhook] webhook_secret_file is not a setting"),
    ("[dameon]\nchunk_images = 5\n", "[dameon] chunk_images is not a setting"),
    ("[download]\ndownload_allowed_networks = 10.0.0.0/33\n", "download_allowed_networks ("),
    ("no section header\n", "config: "),
])
def test_bad_file_value_names_the_setting_and_the_file(tmp_path, ini, message):
    with pytest.raises(SettingError) as info:
        resolve_with(ini=ini, tmp_path=tmp_path)
    assert message in str(info.value)


def test_named_config_file_must_exist(tmp_path):
    with pytest.raises(SettingError, match="does not exist"):
        resolve_with(environ={"RETAILPULSE_CONFIG": str(tmp_path / "missing.ini")})


def test_the_settings_objects_are_built_from_the_values_and_their_defaults_are_the_settings_defaults(tmp_path):
    assert all(resolve_with(program=program).build(cls) == cls()
               for program in (DAEMON, API) for cls in (CommonSettings, *program[0]))
    config = resolve_with(["--download-attempts", "5", "--allow-private-addresses", "yes", "--image-formats",
                           "jpg, heic", "--download-allowed-networks", "10.20.0.0/16", "--executor", "DASK",
                           "--webhook-allowed-networks", "192.0.2.7"])
    engine = config.build(EngineSettings)
    assert engine.limits == DownloadLimits(attempts=5, image_formats=(Format.JPEG, Format.HEIF))
    assert engine.addresses.allow_private and engine.addresses.allowed_networks == (
        ipaddress.ip_network("10.20.0.0/16"),)
    assert config.build(SupervisorSettings).executor is Executor.DASK
    assert config.build(WebhookSettings).allowed_networks == (ipaddress.ip_network("192.0.2.7/32"),)
    assert config.build(RunnerSettings).stall_timeout_s == 180.0


def test_one_file_serves_both_programs_each_checking_the_sections_it_owns(tmp_path):
    """Every setting of both programs, in its section, as the table shows its default: both programs take
    the file (so each default's text parses back to it), and each refuses a stray key only where it owns
    the section; the other's is left to the other program."""
    every = every_setting()

    def ini(**stray: str) -> str:
        sections = {}
        for s in every.values():
            sections.setdefault(s.section, []).append(f"{s.name} = {text_of(s.default)}")
        for section, line in stray.items():
            sections[section].append(line)
        return "".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items())

    for program in (DAEMON, API):
        config = resolve_with(ini=ini(), tmp_path=tmp_path, program=program)
        assert all(config.source(name).endswith(f"[{every[name].section}]") for name, _ in config.items())
        assert all(config.build(cls) == cls() for cls in program[0])
    with pytest.raises(SettingError, match=r"\[api\] prot is not a setting"):
        resolve_with(ini=ini(api="prot = 80"), tmp_path=tmp_path, program=API)
    resolve_with(ini=ini(api="prot = 80"), tmp_path=tmp_path, program=DAEMON)  # the API's to refuse
    resolve_with(ini=ini(daemon="chunk_size = 5"), tmp_path=tmp_path, program=API)  # the daemon's
    resolve_with(ini=ini(webhook="webhook_retry_s = 5"), tmp_path=tmp_path, program=API)  # the daemon's


#: Every setting as operators know it (python -m config on main at 9ce1eab): name, INI section, default as
#: written, bounds. Option (--name-with-dashes) and environment (RETAILPULSE_NAME) follow from the name.
SETTINGS_OPERATORS_KNOW = (
    ("spool_dir", "common", "/var/lib/retail-pulse/spool", None, None),
    ("log_level", "common", "INFO", None, None),
    ("store_master", "daemon", "/etc/retail-pulse/stores.csv", None, None),
    ("executor", "daemon", "local", None, None),
    ("processes", "daemon", "0", 0, 256),
    ("images_per_process", "daemon", "4096", 1, 65536),
    ("downloads_per_process", "daemon", "256", 1, 65536),
    ("dask_scheduler", "daemon", "", None, None),
    ("dask_tls_ca_file", "daemon", "", None, None),
    ("dask_tls_cert_file", "daemon", "", None, None),
    ("dask_tls_key_file", "daemon", "", None, None),
    ("min_workers", "daemon", "0", 0, 100000),
    ("chunk_images", "daemon", "64", 1, 100000),
    ("max_active_jobs", "daemon", "32", 1, 100000),
    ("small_job_images", "daemon", "1000", 0, 1000000),
    ("gpu_sleep_min_s", "daemon", "0.1", 0, 60),
    ("gpu_sleep_max_s", "daemon", "0.4", 0, 60),
    ("drain_timeout_s", "daemon", "60.0", 0, 3600),
    ("max_worker_deaths", "daemon", "3", 1, 100),
    ("stall_timeout_s", "daemon", "180.0", 1, 86400),
    ("retention_days", "daemon", "7.0", 0, None),
    ("download_connect_timeout_s", "download", "5.0", 0.01, None),
    ("download_read_timeout_s", "download", "10.0", 0.01, None),
    ("download_total_timeout_s", "download", "30.0", 0.01, None),
    ("max_image_bytes", "download", "52428800", 1, None),
    ("download_attempts", "download", "3", 1, 20),
    ("download_backoff_s", "download", "0.5", 0, 60),
    ("image_formats", "download", "JPEG,PNG,WebP,HEIF,AVIF", None, None),
    ("max_header_bytes", "download", "16777216", 64, None),
    ("max_redirects", "download", "3", 0, 20),
    ("allow_private_addresses", "download", "False", None, None),
    ("download_allowed_networks", "download", "", None, None),
    ("webhook_secrets_file", "webhook", "", None, None),
    ("webhook_retry_for_s", "webhook", "86400.0", 0, 2592000),
    ("webhook_backoff_s", "webhook", "1.0", 0.01, 3600),
    ("webhook_allowed_networks", "webhook", "", None, None),
    ("host", "api", "127.0.0.1", None, None),
    ("port", "api", "8080", 0, 65535),
    ("api_workers", "api", "2", 1, 64),
    ("api_threads", "api", "8", 1, 256),
    ("max_body_bytes", "api", "67108864", 1, None),
    ("max_images_per_job", "api", "200000", 1, None),
    ("max_url_chars", "api", "2048", 16, 65536),
    ("max_queued_images", "api", "1000000", 0, None),
    # New since 9ce1eab (issue 28): incoming/ and control/ were looked at every 0.1 s, fixed; now the kernel
    # wakes the daemon, and this is the fallback.
    ("poll_interval_s", "daemon", "1.0", 0.001, 86400),
    ("metrics_tokens", "api", "", None, None),
    ("max_body_bytes_in_flight", "api", "67108864", 1, None),
    ("api_tokens_file", "api", "", None, None),
)


def test_every_setting_operators_know_keeps_its_name_section_default_and_bounds():
    declared = {(s.name, s.section, text_of(s.default), s.minimum, s.maximum) for s in every_setting().values()}
    assert declared == set(SETTINGS_OPERATORS_KNOW)


def test_readme_lists_every_setting_as_the_code_defines_it():
    assert table() in (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
