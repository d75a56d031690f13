"""Where a HEIF or AVIF file says its size and where its primary image ends, read as a stream: the ISO base
media file format's boxes (ISO/IEC 14496-12; HEIF, ISO/IEC 23008-12; AVIF builds on HEIF). One parser,
``iso_media``, in the manner of headers.py's (measure.py drives it).

ftyp (the first box) says which of the two the file is, by its brands. The boxes before meta are skipped;
meta is kept while it is read (at most MAX_META_BYTES and max_header_bytes): the primary item's properties
give the size (ispe, cropped by clap, turned by irot), the item locations (iloc) and derivations (iref dimg:
a grid's tiles) where its data ends. Whatever follows (mdat's other items, a motion photo's video) is skipped.
"""
from __future__ import annotations

import struct

from daemon.engine.headers import Found, ImageError, Read, Skip, allowed_phrase
from daemon.engine.outcome import ErrorKind

#: The largest HEIF or AVIF meta box kept to read it. A camera's is 1-50 KB (a grid of 192 tiles included);
#: a bigger one is refused, not kept.
MAX_META_BYTES = 1024 * 1024
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
