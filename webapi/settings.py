"""The API's settings: where it listens, its gunicorn processes, the submit limits, the tokens file, the
backpressure bound; and which settings classes config builds for it (CLASSES). Light: no Bottle, no gunicorn,
nothing of the daemon's (tests/test_imports.py).

Each field an operator sets says so in its metadata (section, meaning, bounds; config/__init__.py reads it),
and its default is the setting's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from config.name_files import NAME
from config.webhook_secrets import SecretsSettings


def parse_names(text: str) -> tuple[str, ...]:
    """"ops, prometheus" -> ("ops", "prometheus"): token names as the tokens file has them."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if not NAME.fullmatch(name):
            raise ValueError(f"not a token name: {name!r} (letters, digits, _ . -)")
    return names


@dataclass(frozen=True)
class SubmitLimits:
    """What one submission may hold (validate.py enforces them)."""

    max_body_bytes: int = field(default=64 * 1024 * 1024, metadata={  # 200,000 URLs of ~100 characters: ~25 MB
        "section": "api", "min": 1, "help": "largest submit body (413 above it)"})
    max_images_per_job: int = field(default=200_000, metadata={
        "section": "api", "min": 1, "help": "most image URLs in one job (400 above it, naming the limit)"})
    max_url_chars: int = field(default=2048, metadata={
        "section": "api", "min": 16, "max": 65536, "help": "longest image URL (400 above it)"})
    max_field_chars: int = 256  # store_id, visit_time

    @property
    def max_commas(self) -> int:
        """Commas outside strings a body may hold: a job of max_images_per_job images, one visit each, needs
        three per image (between a visit's fields and between visits); one more per image spare."""
        return 4 * self.max_images_per_job + 10_000

    @property
    def max_strings(self) -> int:
        """Strings a body may hold: such a job has five per image (three keys, store_id, visit_time) and its
        URLs; some spare. Checked only for a body with more than max_commas commas."""
        return 8 * self.max_images_per_job + 10_000


@dataclass(frozen=True)
class ApiSettings:
    host: str = field(default="127.0.0.1", metadata={"section": "api", "help": "address the API listens on"})
    port: int = field(default=8080, metadata={
        "section": "api", "min": 0, "max": 65535, "help": "port the API listens on; 0 picks a free one"})
    api_workers: int = field(default=2, metadata={
        "section": "api", "min": 1, "max": 64, "help": "gunicorn worker processes"})
    api_threads: int = field(default=8, metadata={
        "section": "api", "min": 1, "max": 256, "help": "threads per gunicorn worker"})
    limits: SubmitLimits = field(default_factory=SubmitLimits)
    max_queued_images: int = field(default=1_000_000, metadata={
        "section": "api", "min": 0,
        "help": "images waiting or in progress above which submit answers 503 with Retry-After; 0 turns the check "
                "off"})
    metrics_tokens: tuple = field(default=(), metadata={
        "section": "api", "parse": parse_names,
        "help": "comma-separated names of the API tokens that may read /metrics, whose figures are the whole "
                "service's (every client's jobs); with tokens on, any other token gets 403. Empty: none may"})
    max_body_bytes_in_flight: int = field(default=64 * 1024 * 1024, metadata={
        "section": "api", "min": 1,
        "help": "request bodies one API process holds at once, read or being checked (a body costs up to 5 times "
                "its size while it is decoded); a submit that finds no room waits up to 10 s, then gets 503 with "
                "Retry-After"})
    api_tokens_file: str = field(default="", metadata={
        "section": "api",
        "help": "file of '<name> <sha256 of token>' lines; when set, every route but /healthz needs "
                "'Authorization: Bearer <token>'. Empty: no tokens (local use)"})


#: What config builds for the API (CommonSettings come with every program).
CLASSES = (ApiSettings, SecretsSettings)
#: The INI sections whose every key the API knows, and so refuses one it does not. It reads [webhook] for
#: webhook_secrets_file alone: the rest of that section is the daemon's to check.
SECTIONS = ("common", "api")
