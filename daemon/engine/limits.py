"""The limits every download obeys, whatever runs it (daemon/transfer.py turns them into libcurl options)."""
from __future__ import annotations

from dataclasses import dataclass

from daemon.engine.measure import DEFAULT_FORMATS, DEFAULT_MAX_HEADER_BYTES, Format


@dataclass(frozen=True)
class DownloadLimits:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # longest silence while downloading
    total_timeout_s: float = 30.0  # one whole attempt: connect, headers and body
    max_image_bytes: int = 50 * 1024 * 1024
    max_redirects: int = 3
    attempts: int = 3  # tries for transient failures; permanent ones are tried once
    backoff_s: float = 0.5  # wait before the 2nd try, doubled before each later one, with jitter
    max_backoff_s: float = 10.0  # longest wait between two tries, whatever Retry-After or the doubling say
    image_formats: tuple[Format, ...] = DEFAULT_FORMATS  # what is measured; any other format is refused by name
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # how far into a body its size may be
