"""Settings both programs share: where the spool is by default, and how environment variables are named."""
from __future__ import annotations

import os
from pathlib import Path

ENV_PREFIX = "RETAILPULSE_"
#: The embedded default: a spool folder inside the source tree, for running it locally.
DEFAULT_SPOOL_DIR = Path(__file__).resolve().parent.parent / "var" / "spool"


def env_default(name: str, default):
    """The value of RETAILPULSE_<name> if set, else ``default``: the environment below the command line."""
    return os.environ.get(ENV_PREFIX + name, default)
