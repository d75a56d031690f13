"""``python -m tests.settings_table``: the settings table the docs hold: every program's settings, in the
docs' order. It lives here because it is the one place that knows every program: config imports no room,
and neither program imports the other's settings (tests/test_imports.py).
"""
from config import Setting, markdown_table, settings_for
from daemon.settings import CLASSES as DAEMON
from webapi.settings import CLASSES as API

#: The order the docs present the settings in: by INI section, then by topic. Every setting is here once
#: (table() refuses a list that misses one or names one that does not exist).
ORDER = (
    "spool_dir", "log_level",
    "store_master", "executor", "processes", "images_per_process", "downloads_per_process", "dask_scheduler",
    "dask_tls_ca_file", "dask_tls_cert_file", "dask_tls_key_file", "min_workers", "chunk_images", "max_active_jobs",
    "small_job_images", "poll_interval_s", "gpu_sleep_min_s", "gpu_sleep_max_s", "drain_timeout_s",
    "max_worker_deaths",
    "stall_timeout_s", "retention_days",
    "download_connect_timeout_s", "download_read_timeout_s", "download_total_timeout_s", "max_image_bytes",
    "download_attempts", "download_backoff_s", "image_formats", "max_header_bytes", "max_redirects",
    "allow_private_addresses", "download_allowed_networks",
    "webhook_secrets_file", "webhook_retry_for_s", "webhook_backoff_s", "webhook_allowed_networks",
    "host", "port", "api_workers", "api_threads", "max_body_bytes", "max_images_per_job", "max_url_chars",
    "max_queued_images", "metrics_tokens", "max_body_bytes_in_flight", "api_tokens_file",
)


def every_setting() -> dict[str, Setting]:
    """Name -> setting, of the daemon and of the API (those both read, once)."""
    return {s.name: s for s in [*settings_for(DAEMON), *settings_for(API)]}


def table() -> str:
    settings = every_setting()
    missing, unknown = set(settings) - set(ORDER), set(ORDER) - set(settings)
    if missing or unknown or len(ORDER) != len(set(ORDER)):
        raise ValueError(f"ORDER misses {sorted(missing)}, names unknown {sorted(unknown)}, or repeats one")
    return markdown_table(settings[name] for name in ORDER)


if __name__ == "__main__":
    print(table())
