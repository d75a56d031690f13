"""Where JPEG, PNG and WebP say their size and where their primary image ends, read as a stream (measure.py
drives).

Each parser is a generator over one body. It asks for bytes with the requests below and gets them back as
they arrive, chunk by chunk, so nothing is kept but what it asks to read; it returns once the primary image
is complete, and whatever follows (a motion photo's video, a maker trailer, a second image) is never looked
at. It tells the reader what it found through ``found`` (a Found): the size, and what the body still lacks,
for the error when it stops short.

    JPEG   markers from SOI; metadata segments (APPn: EXIF, XMP and its extensions, ICC, MPF) skipped by
           their lengths; the size from the frame header (SOFn); then scans until the end-of-image marker
           (EOI): entropy-coded data is searched for markers at C speed (re), never walked byte by byte.
    PNG    chunks by their lengths: IHDR (first) has the size; the image ends with IEND.
    WebP   RIFF: its size field says where the file ends; the first chunk (VP8, VP8L or VP8X) the size.

HEIF and AVIF (ISO base media boxes) have a parser of the same kind in isobmff.py; this module holds what
every parser shares: the requests (Read, Skip, NEXT_MARKER), Found and ImageError.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from daemon.engine.outcome import ErrorKind


class ImageError(Exception):
    """This image cannot be measured; the message says why, for the job's error list, and ``kind`` names the
    reason for the metrics."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.NOT_AN_IMAGE):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Read:
    """Ask for the next ``n`` bytes (they are kept until the parser has them)."""
    n: int


@dataclass(frozen=True, slots=True)
class Skip:
    """Let the next ``n`` bytes go by, unkept."""
    n: int


#: Let bytes go by until the next JPEG marker; the reader answers with the marker's code (the byte after 0xFF).
NEXT_MARKER = object()
#: A marker: 0xFF, then anything but 0x00 (a stuffed 0xFF in entropy-coded data), RST0-7 (restart markers inside
#: a scan) or 0xFF (fill). Searched by re in C, so a scan's megabytes cost no Python loop.
JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

#: Structures (JPEG segments, PNG chunks, top-level boxes) one body may have: real photos have tens to a few
#: thousand; a hostile body of empty chunks would otherwise cost a Python turn every 12 bytes.
MAX_STRUCTURES = 100_000


@dataclass
class Found:
    """What a parser has learnt so far about its body, and the bounds it reads within."""

    fmt: str = ""
    size: tuple[int, int] | None = None  # width, height, when the format's own header says it
    lacking: str = "its header"  # what is still to come, for "truncated image: ... before <lacking>"
    offset: int = 0  # bytes consumed so far (the reader keeps it current)
    structures: int = 0  # JPEG segments, PNG chunks or boxes seen
    max_header_bytes: int = 0
    allowed: tuple[str, ...] = ()  # Format values

    def count(self, what: str) -> None:
        self.structures += 1
        if self.structures > MAX_STRUCTURES:
            raise ImageError(f"not an image: more than {MAX_STRUCTURES:,} {what}")

    def header_bound(self, what: str) -> None:
        """Refuse a body whose size is not known within max_header_bytes."""
        if self.offset > self.max_header_bytes:
            raise ImageError(f"header too large: no {what} in the first {self.max_header_bytes:,} bytes "
                             f"(max_header_bytes)", ErrorKind.TOO_LARGE)


def allowed_phrase(allowed: tuple[str, ...]) -> str:
    """("JPEG", "PNG", "WebP") -> "JPEG, PNG and WebP are"; ("JPEG",) -> "only JPEG is"."""
    if len(allowed) == 1:
        return f"only {allowed[0]} is"
    return " and ".join(", ".join(allowed).rsplit(", ", 1)) + " are"


# ------------------------------------------------------------------ JPEG (ISO/IEC 10918-1, annex B)
#: Frame header markers (SOF0-3, 5-7, 9-11, 13-15); C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_SOI, _EOI, _SOS, _TEM = 0xD8, 0xD9, 0xDA, 0x01


def jpeg(found: Found):
    found.fmt = "JPEG"
    yield Skip(2)  # SOI
    scans = 0
    found.lacking = "its frame header"
    while True:
        if found.size is None:
            found.header_bound("JPEG frame header")
        marker = yield NEXT_MARKER
        found.count("JPEG segments")
        if marker == _EOI:
            if found.size is None or not scans:
                raise ImageError("not an image: JPEG ends before its " + ("frame header" if found.size is None
                                                                          else "image data"))
            return
        if marker == _SOI:
            raise ImageError("not an image: JPEG has a second start-of-image marker inside it")
        if marker == _TEM:
            continue  # the one standalone marker besides RSTn, which the search never stops at
        if marker < 0xC0:  # reserved: no encoder writes them; bytes that are no JPEG do
            raise ImageError(f"not an image: starts like JPEG but has no valid marker at byte {found.offset - 2:,}")
        length = struct.unpack(">H", (yield Read(2)))[0]
        if length < 2:
            raise ImageError(f"not an image: JPEG segment of length {length}")
        if marker in _SOF and found.size is None:
            frame = yield Read(length - 2)
            if len(frame) < 5:
                raise ImageError("not an image: JPEG frame header too short")
            height, width = struct.unpack(">HH", frame[1:5])
            found.size = (width, height)
            found.lacking = "its image data"
            continue
        yield Skip(length - 2)
        if marker == _SOS:
            if found.size is None:
                raise ImageError("not an image: JPEG scan before its frame header")
            scans += 1
            found.lacking = "its end-of-image marker"


# ------------------------------------------------------------------ PNG (ISO/IEC 15948)
def png(found: Found):
    found.fmt = "PNG"
    yield Skip(8)  # the signature
    length, kind = struct.unpack(">I4s", (yield Read(8)))
    if kind != b"IHDR" or length < 8:
        raise ImageError("not an image: PNG does not start with its IHDR chunk")
    width, height = struct.unpack(">II", (yield Read(8)))
    found.size = (width, height)
    found.lacking = "its IEND chunk"
    yield Skip(length - 8 + 4)  # the rest of IHDR, and its CRC
    while True:
        length, kind = struct.unpack(">I4s", (yield Read(8)))
        found.count("PNG chunks")
        if length > 0x7FFFFFFF:
            raise ImageError(f"not an image: PNG chunk {kind!r} of length {length}")
        yield Skip(length + 4)  # data and CRC
        if kind == b"IEND":
            return


# ------------------------------------------------------------------ WebP (RFC 9649)
def webp(found: Found):
    found.fmt = "WebP"
    head = yield Read(12)  # RIFF header
    end = 8 + struct.unpack("<I", head[4:8])[0]
    head += yield Read(min(18, max(0, end - 12)))  # the first chunk's header (8) and up to 10 bytes of it
    chunk = head[12:16]
    if len(head) < 25:
        raise ImageError(f"not an image: WebP of {end} bytes")
    if chunk == b"VP8X" and len(head) == 30:  # extended: the canvas (animated, alpha, ICC, EXIF) is what a viewer shows
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
    elif chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a" and len(head) == 30:  # lossy key frame
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", head[26:30]))
    elif chunk == b"VP8L" and head[20] == 0x2F:  # lossless
        bits = struct.unpack("<I", head[21:25])[0]
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        raise ImageError(f"not an image: WebP whose first chunk is {chunk!r}")
    found.size = (width, height)
    found.lacking = f"its end (the RIFF header says {end:,} bytes)"
    yield Skip(end - len(head))

