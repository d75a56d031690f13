"""``python -m webapi``: serve the API with gunicorn (threaded workers), never Bottle's development server."""
from __future__ import annotations

import sys
from pathlib import Path

import bottle
from gunicorn.app.base import BaseApplication

from config.startup import StartupError, load_webhook_secrets, open_spool, run_main, start
from webapi.app import make_app
from webapi.auth import TokenFileError, Tokens
from webapi.server import Arbiter
from webapi.settings import CLASSES, SECTIONS, ApiSettings

#: Bottle's own body limit. Nothing here reads bottle.request.body/json (read_body does, against
#: max_body_bytes), so this only matters if someone adds a route that does: keep Bottle's 100 KiB, on purpose.
BOTTLE_MEMFILE_MAX = 100 * 1024


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

    def run(self):
        """gunicorn's own run, with our master (webapi/server.py: no stop signal lost by a starting process)."""
        try:
            Arbiter(self).run()
        except RuntimeError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr, flush=True)
            sys.exit(1)


def _announce(server) -> None:
    """gunicorn's when_ready hook: say where we listen (with --port 0, the port the kernel chose)."""
    for listener in server.LISTENERS:
        host, port = listener.sock.getsockname()[:2]
        print(f"Retail Pulse API listening on http://{host}:{port}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_main("retailpulse-api", lambda: serve(argv))


def serve(argv: list[str] | None) -> int:
    config = start("retailpulse-api", __doc__, CLASSES, SECTIONS, argv)
    settings = config.build(ApiSettings)
    spool = open_spool(config)
    tokens = None
    if settings.api_tokens_file:
        try:
            tokens = Tokens.load(Path(settings.api_tokens_file))
        except TokenFileError as exc:
            raise StartupError(f"api_tokens_file ({config.source('api_tokens_file')}): {exc}") from None
    secrets = load_webhook_secrets(config)
    bottle.BaseRequest.MEMFILE_MAX = BOTTLE_MEMFILE_MAX
    host, port = settings.host, settings.port
    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": settings.api_workers,
        "threads": settings.api_threads,
        # Open connections per API process: gunicorn's default (1,000), doubled so that a thousand clients
        # waiting on their jobs (Prefer: wait, at most half of these: webapi/waits.py) leave as many for the rest.
        "worker_connections": 2000,
        # gunicorn's gthread worker, whose own error answers (bad request line, 414, 431) are JSON too
        "worker_class": "webapi.server.ApiWorker",
        "when_ready": _announce,
        "graceful_timeout": 30,  # SIGTERM: requests in flight get this long to finish
        # gunicorn's own request limits, set on purpose: request line (path + query) and headers are small
        # here; the body has no gunicorn limit, read_body enforces max_body_bytes.
        "limit_request_line": 4094,
        "limit_request_fields": 50,
        "limit_request_field_size": 8190,
        "loglevel": config.log_level.lower(),
        "accesslog": None,
    }
    app = make_app(spool, settings.limits, tokens, max_queued_images=settings.max_queued_images or None,
                   webhook_secrets=secrets, metrics_readers=settings.metrics_tokens,
                   max_body_bytes_in_flight=settings.max_body_bytes_in_flight)
    _Server(app, options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
