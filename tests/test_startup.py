"""A bad setting stops start-up with a message naming it and exit code 2, never a traceback."""
import pytest

from daemon.__main__ import main as daemon_main
from webapi.__main__ import main as api_main


def exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusals
        return exc.code


@pytest.mark.parametrize("argv, env, names", [
    (["--processes", "-1"], {}, "processes (--processes): must be at least 0"),
    (["--gpu-sleep-min-s", "0.5", "--gpu-sleep-max-s", "0.1"], {}, "gpu_sleep_min_s (--gpu-sleep-min-s)"),
    (["--download-read-timeout-s", "0"], {}, "download_read_timeout_s (--download-read-timeout-s): must be at least"),
    (["--store-master", "/no/such/stores.csv"], {}, "store_master (--store-master): /no/such/stores.csv"),
    ([], {"RETAILPULSE_PROCESSES": "many"}, "processes (RETAILPULSE_PROCESSES): invalid literal for int()"),
    ([], {"RETAILPULSE_LOG_LEVEL": "LOUD"}, "log_level (RETAILPULSE_LOG_LEVEL): not one of"),
    (["--executor", "cluster"], {}, "executor (--executor): not one of local, dask"),
    (["--executor", "dask"], {}, "dask_scheduler (default): must be set when executor is dask"),
    (["--webhook-allowed-networks", "10.0.0.0/33"], {}, "webhook_allowed_networks (--webhook-allowed-networks): "),
    ([], {"RETAILPULSE_IMAGE_FORMATS": "jpeg, gif"}, "image_formats (RETAILPULSE_IMAGE_FORMATS): 'gif' is not one of"),
])
def test_daemon_refuses_bad_settings(tmp_path, monkeypatch, capsys, argv, env, names):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert exit_code(daemon_main, ["--spool-dir", str(tmp_path / "spool"), *argv]) == 2
    assert names in capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["--port", "70000"], "port (--port): must be at most 65535"),
    (["--api-workers", "0"], "api_workers (--api-workers): must be at least 1"),
    (["--max-body-bytes", "lots"], "max_body_bytes (--max-body-bytes): invalid literal for int()"),
    (["--webhook-secrets-file", "/no/such/secrets"], "webhook_secrets_file (--webhook-secrets-file): /no/such/secrets"),
])
def test_api_refuses_bad_settings(tmp_path, capsys, argv, names):
    assert exit_code(api_main, ["--spool-dir", str(tmp_path / "spool"), *argv]) == 2
    assert names in capsys.readouterr().err
