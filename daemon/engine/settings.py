"""The engine's settings: the numbers every download obeys, whatever runs it (transfer.py turns them into
libcurl options), the formats measured, the GPU wait, how many downloads run at once. Light on purpose: no
libcurl, no Pillow, so the daemon's start-up and the settings table read them without loading either.

Each field that an operator sets says so in its metadata: its INI section, its setting's name when not the
field's, its meaning and bounds (config/__init__.py reads them; the engine imports nothing of config's). The
default on the field is the setting's default.
"""
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
    connect_timeout_s: float = field(default=5.0, metadata={
        "setting": "download_connect_timeout_s", "section": "download", "min": 0.01,
        "help": "TCP+TLS connect timeout per attempt"})
    read_timeout_s: float = field(default=10.0, metadata={
        "setting": "download_read_timeout_s", "section": "download", "min": 0.01,
        "help": "longest silence while reading"})
    total_timeout_s: float = field(default=30.0, metadata={  # one whole attempt: connect, headers and body
        "setting": "download_total_timeout_s", "section": "download", "min": 0.01,
        "help": "whole download of one attempt, even if the server trickles"})
    max_image_bytes: int = field(default=50 * 1024 * 1024, metadata={
        "section": "download", "min": 1, "help": "largest image body, enforced while streaming"})
    max_redirects: int = field(default=3, metadata={
        "section": "download", "min": 0, "max": 20, "help": "redirects followed per image; each hop is checked"})
    attempts: int = field(default=3, metadata={  # permanent failures are tried once
        "setting": "download_attempts", "section": "download", "min": 1, "max": 20,
        "help": "tries per image for transient failures (connection refused or reset, timeout, HTTP 429 and 5xx)"})
    backoff_s: float = field(default=0.5, metadata={
        "setting": "download_backoff_s", "section": "download", "min": 0, "max": 60,
        "help": "wait before the 2nd try; doubles each try, with jitter"})
    max_backoff_s: float = 10.0  # longest wait between two tries, whatever Retry-After or the doubling say
    image_formats: tuple[Format, ...] = field(default=DEFAULT_FORMATS, metadata={
        "section": "download", "parse": parse_formats,
        "help": "the image formats measured, comma-separated (JPEG, PNG, WebP, HEIF, AVIF; HEIC is HEIF); any "
                "other format fails its image, named"})
    max_header_bytes: int = field(default=DEFAULT_MAX_HEADER_BYTES, metadata={
        "section": "download", "min": 64,
        "help": "how far into a body its size may be: the metadata before a JPEG's frame header, a HEIF or AVIF "
                "file's boxes up to its meta box; beyond it the image fails (header too large). Read as it "
                "streams, not kept"})


@dataclass(frozen=True)
class EngineSettings:
    # Downloads at once (images in their GPU wait, or waiting for a slot, do not count). The daemon lowers it
    # to what the open-file limit and images_per_process allow.
    max_transfers: int = field(default=256, metadata={
        "setting": "downloads_per_process", "section": "daemon", "min": 1, "max": 65536,
        "help": "of those, downloads running at once (the others wait for one to end, or are in their GPU wait); "
                "bounds memory: a download keeps only what says its image's size (a few bytes; a HEIF or AVIF "
                "meta box, at most 1 MiB)"})
    gpu_sleep_min_s: float = field(default=0.1, metadata={
        "section": "daemon", "min": 0, "max": 60, "help": "simulated GPU work per image, lower bound"})
    gpu_sleep_max_s: float = field(default=0.4, metadata={
        "section": "daemon", "min": 0, "max": 60, "help": "simulated GPU work per image, upper bound"})
    limits: DownloadLimits = field(default_factory=DownloadLimits)
    addresses: AddressPolicy = field(default_factory=AddressPolicy)  # public addresses only, by default
