"""Photos as phones and cameras write them, made here (no binaries in git): the tests' and the benchmark's
corpus of real-world variants, each with the size a viewer shows.

    python -m tests.photo_corpus --out DIR [--scale bench]      # the files, and DIR/manifest.json

Every variant is built the way its writer builds it: Pillow and libheif encode the pixels; the containers
around them (XMP extension segments, MP4 appended after EOI, Samsung trailers, an EXIF thumbnail, an
iPhone-style HEIC grid of tiles) are assembled here byte by byte, after their specifications, because no
encoder at hand writes them. The HEIC grid in particular: pillow-heif writes single-image HEIFs only, so
each tile is encoded by libheif and the grid (ftyp, meta with iinf/iref dimg/iprp/idat/iloc, mdat) is built
around them as an iPhone lays it out, then read back by libheif to check it.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Photo:
    name: str  # file name; its extension is the one its writer gives it
    kind: str  # what it is, as a person would say it
    data: bytes
    width: int  # as a viewer shows it
    height: int
    primary_bytes: int = 0  # where the primary image ends: a body cut before it is truncated (0: at the end)

    def __post_init__(self):
        if not self.primary_bytes:
            object.__setattr__(self, "primary_bytes", len(self.data))

    @property
    def perimeter(self) -> int:
        return 2 * (self.width + self.height)

    @property
    def fmt(self) -> str:  # the shared bench kit's manifest vocabulary
        extension = self.name.rsplit(".", 1)[1]
        return {"jpg": "jpeg", "mpo": "jpeg", "heic": "heif"}.get(extension, extension)


# ------------------------------------------------------------------ pixels
def scene(width: int, height: int, seed: int, grain: int = 12) -> Image.Image:
    """A photo-like picture: smooth colour fields with sensor grain, so encoders make photo-sized files."""
    rng = random.Random(seed)
    small = Image.new("RGB", (8, 6))
    small.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(48)])
    picture = small.resize((width, height), Image.BICUBIC)
    if grain:
        noise = Image.effect_noise((width, height), grain).convert("RGB")
        picture = Image.blend(picture, noise, 0.25)
    return picture


def encode(picture: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    picture.save(out, fmt, **options)
    return out.getvalue()


# ------------------------------------------------------------------ JPEG segments
def segment(marker: int, payload: bytes) -> bytes:
    assert len(payload) <= 65533
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def insert_after_soi(jpeg: bytes, segments: bytes) -> bytes:
    """Metadata segments right after SOI (and JFIF's APP0, when there is one), where cameras put them."""
    at = 2
    if jpeg[2:4] == b"\xff\xe0":
        at += 2 + struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:at] + segments + jpeg[at:]


def xmp_with_depth_map(depth: bytes, original: bytes) -> bytes:
    """APP1 segments as Google Camera's portrait mode writes them: the main XMP packet naming an extension
    (xmpNote:HasExtendedXMP), then the extension, split over as many APP1 segments as it takes (64 KB each),
    each with the extension's GUID, full length and offset (XMP specification part 3, 1.1.3.1)."""
    extension = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                 f'<rdf:Description xmlns:GDepth="http://ns.google.com/photos/1.0/depthmap/" '
                 f'xmlns:GImage="http://ns.google.com/photos/1.0/image/" GDepth:Mime="image/png" '
                 f'GDepth:Data="{base64.b64encode(depth).decode()}" GImage:Mime="image/jpeg" '
                 f'GImage:Data="{base64.b64encode(original).decode()}"/></rdf:RDF></x:xmpmeta>').encode()
    guid = format(zlib.crc32(extension), "032X").encode()[:32]
    main = (b"http://ns.adobe.com/xap/1.0/\x00" + b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
            b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
            b'xmlns:xmpNote="http://ns.adobe.com/xmp/note/" GDepth:Format="RangeInverse" '
            b'xmlns:GDepth="http://ns.google.com/photos/1.0/depthmap/" xmpNote:HasExtendedXMP="' + guid +
            b'"/></rdf:RDF></x:xmpmeta>')
    out = [segment(0xE1, main)]
    prefix = b"http://ns.adobe.com/xmp/extension/\x00"
    step = 65533 - len(prefix) - 40
    for offset in range(0, len(extension), step):
        out.append(segment(0xE1, prefix + guid + struct.pack(">II", len(extension), offset)
                           + extension[offset:offset + step]))
    return b"".join(out)


def mp4_video(seconds: int, seed: int) -> bytes:
    """A short MP4 as a motion photo carries it: ftyp, mdat (the coded frames: random bytes here, which the
    service must never parse), moov with its movie header."""
    rng = random.Random(seed)
    frames = rng.randbytes(60_000 * seconds)
    mvhd = struct.pack(">B3xIIII", 0, 0, 0, 1000, 1000 * seconds) + b"\x00\x01\x00\x00\x01\x00" + bytes(70) + \
        struct.pack(">I", 2)
    return (box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2avc1mp41") + box(b"mdat", frames)
            + box(b"moov", box(b"mvhd", mvhd)))


def exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """An APP1 EXIF segment whose IFD1 carries a JPEG thumbnail, as every camera writes: a whole JPEG, SOI to
    EOI, inside the main image's metadata, before its frame header."""
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 1) + struct.pack("<I", 26)  # orientation
    ifd1_at = 8 + len(ifd0)
    thumb_at = ifd1_at + 2 + 2 * 12 + 4
    ifd1 = struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, thumb_at) + \
        struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0[:-4] + struct.pack("<I", ifd1_at) + ifd1 + thumbnail
    return segment(0xE1, b"Exif\x00\x00" + tiff)


def samsung_trailer(seed: int) -> bytes:
    """What Samsung's camera appends after EOI: tagged blocks of vendor data, then SEFH/SEFT directory."""
    data = random.Random(seed).randbytes(6000)
    return data + b"SEFH" + struct.pack("<II", 107, 1) + struct.pack("<HHII", 0, 0x0A01, len(data) + 8, len(data)) \
        + struct.pack("<I", 24) + b"SEFT"


# ------------------------------------------------------------------ ISO base media (HEIF)
def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", len(payload) + 8, kind) + payload


def full_box(kind: bytes, version: int, flags: int, payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", version << 24 | flags) + payload)


def heif_boxes(data: bytes) -> dict:
    """The hvcC property and the coded data of a single-image HEIF that libheif wrote."""
    def children(buf, pos=0):
        while pos + 8 <= len(buf):
            size, kind = struct.unpack_from(">I4s", buf, pos)
            yield kind, buf[pos + 8:pos + size], pos
            pos += size
    top = {kind: payload for kind, payload, _ in children(data)}
    meta = {kind: payload for kind, payload, _ in children(top[b"meta"], 4)}
    iprp = {kind: payload for kind, payload, _ in children(meta[b"iprp"])}
    ipco = {kind: payload for kind, payload, _ in children(iprp[b"ipco"])}
    iloc = meta[b"iloc"]  # libheif writes one item with one extent, offsets and lengths of 4 bytes
    version, sizes = iloc[0], iloc[5]
    base_size = sizes >> 4
    pos = 6 + 2 + 2 + (2 if version == 1 else 0) + 2  # count, item id, method (v1), data reference
    base = int.from_bytes(iloc[pos:pos + base_size], "big")
    pos += base_size + 2  # extent count
    offset, length = struct.unpack_from(">II", iloc, pos)
    assert iloc[4] == 0x44 and struct.unpack_from(">H", iloc, 6)[0] == 1, "not the layout libheif writes"
    return {"hvcC": ipco[b"hvcC"], "coded": data[base + offset:base + offset + length]}


def heic_grid(picture: Image.Image, tile: int, quality: int = 50, exif: bytes = b"",
              meta_last: bool = False) -> tuple[bytes, int]:
    """The file, and where its last tile's data ends. ``exif``: Pillow's Exif.tobytes() ("Exif\\0\\0" and
    the TIFF structure); it goes after the tiles in mdat, as an iPhone puts it."""
    """An HEIC as an iPhone writes it: the primary item is a grid (its description in idat), its tiles are
    hidden hvc1 items whose data is in mdat, the canvas is smaller than the tiles cover (4032x3024 from
    8x6 tiles of 512), and an Exif item describes the grid."""
    import pillow_heif
    width, height = picture.size
    columns, rows = -(-width // tile), -(-height // tile)
    tiles = []
    for r in range(rows):
        for c in range(columns):
            piece = Image.new("RGB", (tile, tile))
            piece.paste(picture.crop((c * tile, r * tile, min(width, (c + 1) * tile), min(height, (r + 1) * tile))))
            out = io.BytesIO()
            pillow_heif.from_pillow(piece).save(out, quality=quality)
            tiles.append(heif_boxes(out.getvalue()))
    count = len(tiles)
    grid_id, exif_id = 1, count + 2
    items = [(grid_id, b"grid", 0)] + [(2 + i, b"hvc1", 1) for i in range(count)]  # flags 1: hidden
    if exif:
        items.append((exif_id, b"Exif", 0))
    grid_data = struct.pack(">BBBBHH", 0, 0, rows - 1, columns - 1, width, height)
    exif_data = struct.pack(">I", 6) + exif if exif else b""  # HEIF's Exif item: offset of the TIFF header first

    def meta_box(mdat_start: int) -> bytes:
        iinf = full_box(b"iinf", 0, 0, struct.pack(">H", len(items)) + b"".join(
            full_box(b"infe", 2, flags, struct.pack(">HH4s", item, 0, kind) + b"\x00") for item, kind, flags in items))
        refs = box(b"dimg", struct.pack(">HH", grid_id, count) + b"".join(struct.pack(">H", 2 + i) for i in range(count)))
        if exif:
            refs += box(b"cdsc", struct.pack(">HHH", exif_id, 1, grid_id))
        hvcc = [box(b"hvcC", t["hvcC"]) for t in tiles]
        shared = len(set(hvcc)) == 1
        properties = ([hvcc[0]] if shared else hvcc) + [
            full_box(b"ispe", 0, 0, struct.pack(">II", tile, tile)),
            full_box(b"ispe", 0, 0, struct.pack(">II", width, height))]
        tile_ispe, canvas_ispe = len(properties) - 1, len(properties)
        ipma_entries = [struct.pack(">HB", grid_id, 1) + bytes([canvas_ispe])]
        for i in range(count):
            hvcc_index = 1 if shared else 1 + i
            ipma_entries.append(struct.pack(">HB", 2 + i, 2) + bytes([0x80 | hvcc_index, tile_ispe]))
        iprp = box(b"iprp", box(b"ipco", b"".join(properties))
                   + full_box(b"ipma", 0, 0, struct.pack(">I", len(ipma_entries)) + b"".join(ipma_entries)))
        locations, at = [], mdat_start
        locations.append(struct.pack(">HHHHII", grid_id, 1, 0, 1, 0, len(grid_data)))  # in idat
        for i, t in enumerate(tiles):
            locations.append(struct.pack(">HHHHII", 2 + i, 0, 0, 1, at, len(t["coded"])))
            at += len(t["coded"])
        if exif:
            locations.append(struct.pack(">HHHHII", exif_id, 0, 0, 1, at, len(exif_data)))
        iloc = full_box(b"iloc", 1, 0, struct.pack(">BBH", 0x44, 0x00, len(locations)) + b"".join(locations))
        hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, b"pict") + b"\x00")
        pitm = full_box(b"pitm", 0, 0, struct.pack(">H", grid_id))
        return full_box(b"meta", 0, 0, hdlr + pitm + iinf + box(b"iref", struct.pack(">I", 0) + refs) + iprp
                        + box(b"idat", grid_data) + iloc)

    ftyp = box(b"ftyp", b"heic\x00\x00\x00\x00mif1heicmiafMiHB")
    mdat = box(b"mdat", b"".join(t["coded"] for t in tiles) + exif_data)
    if meta_last:  # as streaming writers lay it out: the data first, the boxes that describe it after
        return ftyp + mdat + meta_box(len(ftyp) + 8), 0
    meta = meta_box(len(ftyp) + len(meta_box(0)) + 8)
    return ftyp + meta + mdat, len(ftyp + meta + mdat) - len(exif_data)


# ------------------------------------------------------------------ the corpus
def corpus(scale: str = "test") -> list[Photo]:
    """Every variant, small enough for the tests (``test``) or photo-sized for the benchmark (``bench``)."""
    import pillow_heif
    big = scale == "bench"
    photos: list[Photo] = []

    def add(name, kind, data, width, height, primary_bytes=0):
        photos.append(Photo(name, kind, data, width, height, primary_bytes))

    # --- the table: what was refused
    w, h = (2400, 1800) if big else (1200, 900)
    add("webp-large-lossy.webp", "WebP over 256 KiB (a real photo, lossy)",
        encode(scene(w, h, 1, grain=60), "WEBP", quality=90), w, h)
    exif = Image.Exif()
    exif[0x010F] = "Google"
    exif[0x0110] = "Pixel 8"
    exif[0x927C] = random.Random(2).randbytes(300_000)  # the maker note
    icc = b"\x00\x00\x0c\x48appl" + random.Random(3).randbytes(3000)
    add("webp-icc-exif.webp", "WebP whose ICC profile and EXIF make it over 256 KiB",
        encode(scene(640, 480, 2), "WEBP", quality=80, exif=exif.tobytes(), icc_profile=icc), 640, 480)
    w, h = (4032, 3024) if big else (1008, 756)
    photo = encode(scene(w, h, 4), "JPEG", quality=85)
    depth = encode(scene(w // 4, h // 4, 5, grain=0).convert("L"), "PNG")
    original = encode(scene(w, h, 6, grain=40), "JPEG", quality=90)  # the photo before the background blur
    add("portrait-depth-map.jpg", "JPEG with XMP extension segments carrying a depth map (portrait mode)",
        insert_after_soi(photo, xmp_with_depth_map(depth, original)), w, h)
    add("big-icc-profile.jpg", "JPEG with an ICC profile of 400 KB before its frame header",
        encode(scene(800, 600, 7), "JPEG", quality=85, icc_profile=b"\x00\x06\x1a\x80" + random.Random(8).randbytes(400_000)),
        800, 600)
    w, h = (4032, 3024) if big else (1000, 750)
    motion_xmp = (b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF xmlns:rdf="
                  b"\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\"><rdf:Description xmlns:GCamera=\"http://ns."
                  b"google.com/photos/1.0/camera/\" GCamera:MotionPhoto=\"1\" GCamera:MotionPhotoVersion=\"1\"/>"
                  b"</rdf:RDF></x:xmpmeta>")
    still = insert_after_soi(encode(scene(w, h, 9), "JPEG", quality=85), segment(0xE1, motion_xmp))
    add("motion-photo.jpg", "Motion Photo: the JPEG, then an MP4 video after its end-of-image marker",
        still + mp4_video(3 if big else 1, 10), w, h, len(still))
    still = encode(scene(900, 1200, 11), "JPEG", quality=85)
    add("maker-trailer.jpg", "JPEG with a maker trailer after EOI (Samsung SEFT)",
        still + samsung_trailer(12), 900, 1200, len(still))
    still = encode(scene(320, 200, 13), "PNG")
    add("bytes-after-iend.png", "PNG with a few bytes after IEND", still + b"\x00\x00\r\n", 320, 200, len(still))
    w, h = (4032, 3024) if big else (1000, 750)
    tile = 512 if big else 256
    grid, tiles_end = heic_grid(scene(w, h, 14), tile, exif=_camera_exif().tobytes())
    add("iphone-grid.heic", f"HEIC as an iPhone writes it: a grid of {tile}x{tile} tiles, canvas {w}x{h}, Exif",
        grid, w, h, tiles_end)
    grid, _ = heic_grid(scene(600, 400, 33), 256, meta_last=True)
    add("meta-after-data.heic", "HEIC whose meta box comes after its image data (mdat first)", grid, 600, 400)
    heif = io.BytesIO()
    pillow_heif.from_pillow(scene(641, 479, 15)).save(heif, quality=60)  # odd size: a clean aperture crops it
    add("single.heic", "HEIC of one image, odd size (clean aperture)", heif.getvalue(), 641, 479)
    add("samsung-motion.heic", "HEIC motion photo (Samsung): an mpvd box with the video after the image",
        heif.getvalue() + box(b"mpvd", mp4_video(1, 16)), 641, 479, len(heif.getvalue()))
    w, h = (2000, 1500) if big else (641, 479)
    add("photo.avif", "AVIF (Android 12+ cameras, image CDNs)", encode(scene(w, h, 17), "AVIF", quality=60), w, h)

    # --- what already worked, and must keep working
    add("progressive.jpg", "progressive JPEG", encode(scene(1024, 768, 18), "JPEG", quality=85, progressive=True),
        1024, 768)
    add("cmyk.jpg", "CMYK JPEG (Adobe)", encode(scene(500, 400, 19).convert("CMYK"), "JPEG", quality=85), 500, 400)
    mpo = io.BytesIO()
    scene(800, 600, 20).save(mpo, "MPO", save_all=True, append_images=[scene(800, 600, 21)], quality=85)
    add("stereo.mpo", "MPO (two images; also how Ultra HDR carries its gain map)", mpo.getvalue(), 800, 600,
        mpo.getvalue().index(b"\xff\xd8\xff", 2))  # the second image's SOI: the first one ends there
    add("lossless.webp", "lossless WebP", encode(scene(400, 300, 22), "WEBP", lossless=True), 400, 300)
    add("16-bit.png", "16-bit PNG", encode(scene(300, 200, 23).convert("L").point(lambda v: v * 256, "I")
                                          .convert("I;16"), "PNG"), 300, 200)
    frames = [scene(320, 240, 24 + i) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "WEBP", save_all=True, append_images=frames[1:], duration=100, quality=70)
    add("animated.webp", "animated WebP (the canvas size)", animated.getvalue(), 320, 240)

    # --- more found on the way
    thumb = encode(scene(160, 120, 27), "JPEG", quality=70)
    add("exif-thumbnail.jpg", "JPEG whose EXIF holds a thumbnail, a JPEG of its own (SOI to EOI) before the frame",
        insert_after_soi(encode(scene(1200, 900, 28), "JPEG", quality=85), exif_with_thumbnail(thumb)), 1200, 900)
    add("restart-markers.jpg", "JPEG with restart markers in its scan data",
        encode(scene(700, 500, 29), "JPEG", quality=85, restart_marker_blocks=4), 700, 500)
    padded = encode(scene(640, 480, 30), "JPEG", quality=85)
    add("padding-between-segments.jpg", "JPEG with fill bytes between segments (some cameras)",
        padded[:20] + b"\xff\xff\xff" + padded[20:], 640, 480)
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:], duration=100)
    add("animated.png", "APNG (animated PNG: the canvas size)", apng.getvalue(), 320, 240)
    add("interlaced.png", "interlaced PNG (Adam7)", _interlaced_png(scene(300, 300, 31)), 300, 300)
    exif_rotated = Image.Exif()
    exif_rotated[0x0112] = 6  # rotate 90: a portrait photo stored landscape
    add("exif-rotated.jpg", "JPEG stored 1200x900 with EXIF orientation 6 (shown 900x1200; same perimeter)",
        encode(scene(1200, 900, 32), "JPEG", quality=85, exif=exif_rotated.tobytes()), 1200, 900)
    return photos


def _camera_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Apple", "iPhone 15", 1
    return exif


def _interlaced_png(picture: Image.Image) -> bytes:
    """Pillow writes no interlaced PNG: IHDR with interlace 1, and the Adam7 passes compressed in IDAT."""
    width, height = picture.size
    rows = picture.tobytes()
    raw = bytearray()
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    for x0, y0, dx, dy in passes:
        xs = range(x0, width, dx)
        if not xs:
            continue
        for y in range(y0, height, dy):
            raw.append(0)
            for x in xs:
                raw += rows[(y * width + x) * 3:(y * width + x) * 3 + 3]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1))
            + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


def write(folder: Path, photos: list[Photo], prefix: str = "") -> dict:
    """The files, and their manifest entries in the shared bench kit's format (name -> w, h, perimeter...)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for photo in photos:
        (folder / photo.name).write_bytes(photo.data)
        tier = "small" if len(photo.data) <= 200 * 1024 else "medium" if len(photo.data) <= 1024 * 1024 else "large"
        manifest[prefix + photo.name] = {"w": photo.width, "h": photo.height, "perimeter": photo.perimeter,
                                         "bytes": len(photo.data), "fmt": photo.fmt, "tier": tier, "kind": photo.kind}
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.photo_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", choices=("test", "bench"), default="test")
    args = parser.parse_args(argv)
    manifest = write(args.out, corpus(args.scale))
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for name, entry in manifest.items():
        print(f"{name:32} {entry['w']:>5}x{entry['h']:<5} {entry['bytes']:>9,} B  {entry['kind']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
