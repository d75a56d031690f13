"""``retailpulse-ctl``: the operator's command line over the spool (see ctl/cli.py)."""
