"""``python -m ctl``: the same as ``retailpulse-ctl``."""
import sys

from ctl.cli import main

sys.exit(main())
