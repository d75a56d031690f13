"""The one table of settings: precedence, errors that name the setting, and a README that is true."""
import argparse
from pathlib import Path

import pytest

from config import SettingError, add_options, markdown_table, resolve, settings_for


def resolve_with(argv=(), environ=None, ini=None, tmp_path=None, sections=("daemon", "download")):
    parser = argparse.ArgumentParser()
    add_options(parser, settings_for(sections))
    environ = dict(environ or {})
    if ini is not None:
        path = tmp_path / "retail-pulse.ini"
        path.write_text(ini)
        environ["RETAILPULSE_CONFIG"] = str(path)
    return resolve(settings_for(sections), parser.parse_args(list(argv)), environ)


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
    ("no section header\n", "config: "),
])
def test_bad_file_value_names_the_setting_and_the_file(tmp_path, ini, message):
    with pytest.raises(SettingError, match=None) as info:
        resolve_with(ini=ini, tmp_path=tmp_path)
    assert message in str(info.value)


def test_named_config_file_must_exist(tmp_path):
    with pytest.raises(SettingError, match="does not exist"):
        resolve_with(environ={"RETAILPULSE_CONFIG": str(tmp_path / "missing.ini")})


def test_readme_lists_every_setting_as_the_code_defines_it():
    assert markdown_table() in (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
