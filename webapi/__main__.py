"""``python -m webapi``: serve the API with gunicorn (threaded workers), never Bottle's development server."""
from __future__ import annotations

import argparse
import logging
import sys

from gunicorn.app.base import BaseApplication

from spool import Spool
from spool.settings import DEFAULT_SPOOL_DIR, env_default
from webapi.app import make_app
from webapi.validate import SubmitLimits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m webapi", description=__doc__)
    add = p.add_argument
    add("--spool-dir", default=env_default("SPOOL_DIR", DEFAULT_SPOOL_DIR), help="spool folder [%(default)s]")
    add("--host", default=env_default("HOST", "127.0.0.1"), help="address to listen on [%(default)s]")
    add("--port", type=int, default=env_default("PORT", 8080), help="port; 0 picks a free one [%(default)s]")
    add("--workers", type=int, default=env_default("API_WORKERS", 2), help="gunicorn processes [%(default)s]")
    add("--threads", type=int, default=env_default("API_THREADS", 8), help="threads per process [%(default)s]")
    add("--max-body-bytes", type=int, default=env_default("MAX_BODY_BYTES", SubmitLimits.max_body_bytes))
    add("--max-images-per-job", type=int,
        default=env_default("MAX_IMAGES_PER_JOB", SubmitLimits.max_images_per_job))
    add("--log-level", default=env_default("LOG_LEVEL", "INFO"))
    return p


class _Server(BaseApplication):
    """gunicorn configured from our options instead of its own command line."""

    def __init__(self, app, options: dict):
        self.app, self.options = app, options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25 opens one under $HOME otherwise
            self.cfg.set("control_socket_disable", True)

    def load(self):
        return self.app


def _announce(server) -> None:
    """gunicorn's when_ready hook: say where we listen (with --port 0, the port the kernel chose)."""
    for listener in server.LISTENERS:
        host, port = listener.sock.getsockname()[:2]
        print(f"Retail Pulse API listening on http://{host}:{port}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("workers", "threads", "max_body_bytes", "max_images_per_job"):
        if getattr(args, name) < 1:
            print(f"webapi: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if not 0 <= args.port <= 65535:
        print("webapi: --port must be 0..65535", file=sys.stderr)
        return 2
    spool = Spool(args.spool_dir).create()
    limits = SubmitLimits(max_body_bytes=args.max_body_bytes, max_images_per_job=args.max_images_per_job)
    options = {
        "bind": f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}",
        "workers": args.workers,
        "threads": args.threads,
        "worker_class": "gthread",
        "when_ready": _announce,
        "graceful_timeout": 30,  # SIGTERM: requests in flight get this long to finish
        "loglevel": args.log_level.lower(),
        "accesslog": None,
    }
    _Server(make_app(spool, limits), options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
