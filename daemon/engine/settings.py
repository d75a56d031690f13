"""The engine's settings: the numbers every download obeys, whatever runs it (transfer.py turns them into
libcurl options), and the formats measured. Light on purpose: no libcurl, no Pillow, so the daemon's start-up
and the settings table read them without loading either."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from daemon.engine.netguard import AddressPolicy


class Format(StrEnum):
    """The formats the service can measure; the values are the names the ``image_formats`` setting and the
    error messages use."""

    JPEG = "JPEG"
    PNG = "PNG"
    WEBP = "WebP"
    HEIF = "HEIF"  # HEIC included: HEIF with HEVC inside, the iPhone camera's default
    AVIF = "AVIF"


DEFAULT_FORMATS: tuple[Format, ...] = tuple(Format)
#: How far into a body its size may be: a JPEG's metadata before its frame header (XMP extensions carrying a
#: depth map run to megabytes), a HEIF file's boxes up to its meta box. Scanned, not kept.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024


def parse_formats(text: str) -> tuple[Format, ...]:
    """``"jpeg, png, heic"`` -> the formats named (case does not matter; HEIC is HEIF). ValueError names a
    name that is not one."""
    by_name = {f.value.lower(): f for f in Format} | {"heic": Format.HEIF, "jpg": Format.JPEG}
    chosen = []
    for name in filter(None, (part.strip().lower() for part in text.split(","))):
        if name not in by_name:
            raise ValueError(f"{name!r} is not one of {', '.join(Format)}")
        chosen.append(by_name[name])
    if not chosen:
        raise ValueError(f"name at least one of {', '.join(Format)}")
    return tuple(dict.fromkeys(chosen))


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


@dataclass(frozen=True)
class EngineSettings:
    max_transfers: int = 256  # downloads at once (images in their GPU wait, or waiting for a slot, do not count)
    gpu_sleep_min_s: float = 0.1
    gpu_sleep_max_s: float = 0.4
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)  # public addresses only, by default
