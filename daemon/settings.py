"""The daemon's settings: the classes config builds for it, each declared in its room beside the code that
reads it, and the INI sections it owns. Light: no libcurl, no Pillow, no Dask (tests/test_imports.py).
"""
from __future__ import annotations

from config.webhook_secrets import SecretsSettings
from daemon.engine.settings import EngineSettings
from daemon.runners.settings import RunnerSettings
from daemon.notifications.settings import WebhookSettings
from daemon.supervisor.settings import SupervisorSettings

#: What config builds for the daemon (CommonSettings come with every program).
CLASSES = (SupervisorSettings, RunnerSettings, EngineSettings, WebhookSettings, SecretsSettings)
#: The INI sections whose every key the daemon knows, and so refuses one it does not; [api] is the API's.
SECTIONS = ("common", "daemon", "download", "webhook")
