"""Where each format says its size and where its primary image ends, read as a stream (measure.py drives).

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
    HEIF   ISO base media boxes (HEIC, AVIF): ftyp says which; meta is kept while it is read: the primary
    AVIF   item's properties give the size (ispe, clap, irot), the item locations (iloc) and derivations
           (iref dimg: a grid's tiles) where its data ends. Boxes before meta and after it are skipped.
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
#: The largest HEIF or AVIF meta box kept to read it. A camera's is 1-50 KB (a grid of 192 tiles included);
#: a bigger one is refused, not kept.
MAX_META_BYTES = 1024 * 1024


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


# ------------------------------------------------------------------ HEIF and AVIF (ISO/IEC 14496-12, 23008-12)
_HEIF_BRANDS = frozenset((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"miaf"))
_AVIF_BRANDS = frozenset((b"avif", b"avis"))


def _box_header():
    """(type, payload length), the length None for a box that runs to the end of the file."""
    size, kind = struct.unpack(">I4s", (yield Read(8)))
    if size == 1:
        size = struct.unpack(">Q", (yield Read(8)))[0]
        return kind, _payload(kind, size, 16)
    if size == 0:
        return kind, None
    return kind, _payload(kind, size, 8)


def _payload(kind: bytes, size: int, header: int) -> int:
    if size < header:
        raise ImageError(f"not an image: box {kind!r} of size {size}")
    return size - header


def iso_media(found: Found):
    found.fmt = "HEIF"
    kind, length = yield from _box_header()
    if kind != b"ftyp" or length is None or not 8 <= length <= 4096:
        raise ImageError("not an image: ISO media file without a proper ftyp box")
    ftyp_payload = yield Read(length)
    brands = {ftyp_payload[:4]} | {ftyp_payload[i:i + 4] for i in range(8, len(ftyp_payload) - 3, 4)}
    if brands & _AVIF_BRANDS:
        found.fmt = "AVIF"
    elif not brands & _HEIF_BRANDS:
        name = ftyp_payload[:4].decode("latin-1").strip()
        raise ImageError(f"format not allowed: ISO media of brand {name!r}, a video or another kind of file "
                         f"({allowed_phrase(found.allowed)})", ErrorKind.FORMAT)
    if found.fmt not in found.allowed:
        raise ImageError(f"format not allowed: {found.fmt} ({allowed_phrase(found.allowed)})", ErrorKind.FORMAT)
    found.lacking = "its meta box"
    while True:  # top-level boxes until meta; the image data (mdat) usually comes after it
        found.header_bound(f"{found.fmt} meta box")
        kind, length = yield from _box_header()
        found.count("boxes")
        if kind == b"meta":
            break
        if length is None:
            raise ImageError(f"not an image: {found.fmt} without a meta box")
        yield Skip(length)
    if length is None or length > MAX_META_BYTES:
        raise ImageError(f"header too large: {found.fmt} meta box of {length or 0:,} bytes (at most "
                         f"{MAX_META_BYTES:,} are kept)", ErrorKind.TOO_LARGE)
    if found.offset + length > found.max_header_bytes:
        raise ImageError(f"header too large: {found.fmt} meta box ends after the first "
                         f"{found.max_header_bytes:,} bytes (max_header_bytes)", ErrorKind.TOO_LARGE)
    meta = yield Read(length)
    found.size = primary_size(meta)
    end = primary_end(meta)
    del meta  # not held while the image data streams by
    found.lacking = f"the end of its primary image (byte {end:,})" if end else ""
    if end and end > found.offset:
        yield Skip(end - found.offset)


def allowed_phrase(allowed: tuple[str, ...]) -> str:
    """("JPEG", "PNG", "WebP") -> "JPEG, PNG and WebP are"; ("JPEG",) -> "only JPEG is"."""
    if len(allowed) == 1:
        return f"only {allowed[0]} is"
    return " and ".join(", ".join(allowed).rsplit(", ", 1)) + " are"


def _children(data: bytes, start: int = 0):
    """(type, payload) of the boxes in ``data`` from ``start``."""
    pos = start
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1 and pos + 16 <= len(data):
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = len(data) - pos
        if size < header or pos + size > len(data):
            raise ImageError(f"not an image: box {kind!r} overruns its meta box")
        yield kind, data[pos + header:pos + size]
        pos += size


def _primary_item(boxes: dict) -> int:
    pitm = boxes[b"pitm"]
    return struct.unpack_from(">H" if pitm[0] == 0 else ">I", pitm, 4)[0]


def primary_size(meta: bytes) -> tuple[int, int]:
    """The primary item's size as a viewer shows it: its ispe (image spatial extents: for a grid, the whole
    canvas), cropped by its clean aperture (clap), turned by its rotation (irot)."""
    boxes = dict(_children(meta, 4))
    if b"pitm" not in boxes or b"iprp" not in boxes:
        raise ImageError("not an image: HEIF meta box without its primary item or item properties")
    primary = _primary_item(boxes)
    iprp = list(_children(boxes[b"iprp"]))
    properties = [None] + [child for kind, payload in iprp if kind == b"ipco" for child in _children(payload)]
    size, turns = None, 0
    for index in _associations(iprp).get(primary, ()):
        if not 0 < index < len(properties):
            raise ImageError(f"not an image: HEIF property {index} does not exist")
        kind, payload = properties[index]
        if kind == b"ispe" and len(payload) >= 12:
            size = struct.unpack_from(">II", payload, 4)
        elif kind == b"clap" and len(payload) >= 16 and size is not None:
            width_n, width_d, height_n, height_d = struct.unpack_from(">IIII", payload)
            if not width_d or not height_d:
                raise ImageError("not an image: HEIF clean aperture with a zero denominator")
            size = (round(width_n / width_d), round(height_n / height_d))
        elif kind == b"irot" and payload:
            turns = payload[0] & 3
    if size is None:
        raise ImageError("not an image: HEIF primary item without its size (ispe)")
    return (size[1], size[0]) if turns % 2 else size


def _associations(iprp: list) -> dict[int, list[int]]:
    """item -> its property indices (1-based into ipco), in order, from the ipma boxes."""
    found: dict[int, list[int]] = {}
    for kind, ipma in iprp:
        if kind != b"ipma":
            continue
        try:
            version, wide_index = ipma[0], ipma[3] & 1
            count = struct.unpack_from(">I", ipma, 4)[0]
            pos = 8
            for _ in range(count):
                item, pos = _uint(ipma, pos, 2 if version < 1 else 4)
                n, pos = _uint(ipma, pos, 1)
                for _ in range(n):
                    value, pos = _uint(ipma, pos, 2 if wide_index else 1)
                    found.setdefault(item, []).append(value & (0x7FFF if wide_index else 0x7F))
        except (IndexError, struct.error):
            raise ImageError("not an image: HEIF property associations (ipma) cut short") from None
    return found


def primary_end(meta: bytes) -> int | None:
    """Where the data of the primary item, and of the items it is made of (a grid's tiles), ends in the
    file; None when its data is all inside meta (idat) or runs to the end of the file (extent length 0)."""
    boxes = dict(_children(meta, 4))  # meta is a full box: version and flags first
    if b"pitm" not in boxes or b"iloc" not in boxes:
        raise ImageError("not an image: HEIF meta box without its primary item or item locations")
    needed, todo = set(), [_primary_item(boxes)]
    refs = _derivations(boxes.get(b"iref", b""))
    while todo:  # the primary item and what it derives from (dimg: a grid's tiles, an overlay's layers)
        item = todo.pop()
        if item not in needed:
            needed.add(item)
            todo.extend(refs.get(item, ()))
    ends = []
    for item, method, extents in _locations(boxes[b"iloc"]):
        if item in needed and method == 0:
            for offset, length in extents:
                if length == 0:
                    return None
                ends.append(offset + length)
    return max(ends, default=None)


def _derivations(iref: bytes) -> dict[int, list[int]]:
    """from item -> to items, of the iref box's dimg references."""
    if not iref:
        return {}
    wide = iref[0] == 1
    refs: dict[int, list[int]] = {}
    for kind, payload in _children(iref, 4):
        if kind != b"dimg":
            continue
        fmt = ">I" if wide else ">H"
        step = 4 if wide else 2
        source = struct.unpack_from(fmt, payload, 0)[0]
        count = struct.unpack_from(">H", payload, step)[0]
        refs.setdefault(source, []).extend(
            struct.unpack_from(fmt, payload, step + 2 + i * step)[0] for i in range(count))
    return refs


def _locations(iloc: bytes):
    """(item id, construction method, [(file offset, length)]) for each item of an iloc box."""
    try:
        version = iloc[0]
        sizes = iloc[4] << 8 | iloc[5]
        offset_size, length_size, base_size = sizes >> 12, (sizes >> 8) & 15, (sizes >> 4) & 15
        index_size = sizes & 15 if version in (1, 2) else 0
        pos = 6
        count, pos = _uint(iloc, pos, 2 if version < 2 else 4)
        for _ in range(count):
            item, pos = _uint(iloc, pos, 2 if version < 2 else 4)
            method = 0
            if version in (1, 2):
                method, pos = _uint(iloc, pos, 2)
                method &= 15
            pos += 2  # data reference index
            base, pos = _uint(iloc, pos, base_size)
            extent_count, pos = _uint(iloc, pos, 2)
            extents = []
            for _ in range(extent_count):
                pos += index_size
                offset, pos = _uint(iloc, pos, offset_size)
                length, pos = _uint(iloc, pos, length_size)
                extents.append((base + offset, length))
            yield item, method, extents
    except (IndexError, struct.error):
        raise ImageError("not an image: HEIF item locations (iloc) cut short") from None


def _uint(data: bytes, pos: int, size: int) -> tuple[int, int]:
    if size == 0:
        return 0, pos
    if pos + size > len(data):
        raise IndexError
    return int.from_bytes(data[pos:pos + size], "big"), pos + size
