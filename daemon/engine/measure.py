"""Image measurement. Pure: bytes in, a size or a clear error out; no HTTP, no files.

A body is read as it downloads (``BodyReader.feed``, from libcurl's write callback), never held whole: each
format's parser (headers.py, isobmff.py) keeps only what says the image's size and follows the body to where
its primary image ends. So memory per image in flight stays small whatever the image's size or its metadata's, and
"truncated" means exactly that the primary image stops before its end: bytes after it (a motion photo's
video, a maker trailer, a second image) are allowed and never read. Pixels are never decoded.

Why not a library's open(): each needs more than the header, which is what made the service refuse valid
photos. Pillow's WebP plugin hands libwebp the whole file; its JPEG plugin reads every metadata segment
before the frame header; libheif (pillow-heif) reads a HEIC's Exif item, which an iPhone puts in mdat after
the tiles; libavif (Pillow's AVIF) reads the primary item's coded data. Feeding them would mean keeping
whole images per download. A size is a few bytes at a known place in each format's header; the tests check
ours against Pillow, libheif and libavif decoding every variant of the photo corpus whole.

The size is the primary image's as a viewer shows it: JPEG's frame, PNG's IHDR, WebP's canvas (animated
ones too), HEIF's and AVIF's primary item (for an iPhone's grid of tiles, the whole canvas) with its clean
aperture applied. EXIF orientation, or a HEIF rotation, swaps width and height at most, which leaves the
perimeter 2 * (width + height) as it is. The decompression-bomb limit is Pillow's (Image.MAX_IMAGE_PIXELS).
"""
from __future__ import annotations

import struct

from PIL import Image

from daemon.engine import headers, isobmff
from daemon.engine.headers import NEXT_MARKER, ImageError, JPEG_MARKER, Read, Skip
from daemon.engine.outcome import ErrorKind
from daemon.engine.settings import DEFAULT_FORMATS, DEFAULT_MAX_HEADER_BYTES, Format

__all__ = ["BodyReader", "ImageError", "image_size", "perimeter"]

_SNIFF_BYTES = 12

#: Magic numbers of formats we name when we refuse them. Checked before any parser sees a byte.
_OTHER_MAGIC = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"\xff\x0a", "JPEG XL"),
                (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"))


def perimeter(width: int, height: int) -> int:
    return 2 * (width + height)


def _sniff(head: bytes, allowed: tuple[str, ...]):
    """The parser for a body that starts with ``head``; ImageError for anything else, named when we know it."""
    if not head:
        raise ImageError("empty body")
    if head.startswith(b"\xff\xd8\xff"):
        parser, fmt = headers.jpeg, Format.JPEG
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        parser, fmt = headers.png, Format.PNG
    elif head[:4] == b"RIFF" and (head[8:12] == b"WEBP" or len(head) < _SNIFF_BYTES and b"WEBP".startswith(head[8:])):
        parser, fmt = headers.webp, Format.WEBP
    elif head[4:8] == b"ftyp" or (len(head) < _SNIFF_BYTES and 4 < len(head) and b"ftyp".startswith(head[4:8])):
        return isobmff.iso_media  # HEIF or AVIF or neither: its ftyp box says, and the parser checks
    else:
        for magic, name in _OTHER_MAGIC:
            if head.startswith(magic):
                raise ImageError(f"format not allowed: {name} ({headers.allowed_phrase(allowed)})",
                                 ErrorKind.FORMAT)
        raise ImageError("not an image: " + ("looks like HTML" if head.lstrip()[:1] == b"<" else "unknown bytes"))
    if fmt.value not in allowed:
        raise ImageError(f"format not allowed: {fmt.value} ({headers.allowed_phrase(allowed)})", ErrorKind.FORMAT)
    return parser


class BodyReader:
    """One body, fed as it downloads; ``finish()`` then gives (width, height) or raises ImageError.

    Keeps the parser's pending request and at most the bytes it asked to read (a few, or a HEIF meta box);
    once the primary image is complete, or the body is known to be no image, the rest is only counted."""

    __slots__ = ("size", "_found", "_parser", "_want", "_buf", "_left", "_ff", "_early", "_error", "_done",
                 "_sized")

    def __init__(self, formats: tuple[str, ...] = DEFAULT_FORMATS, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.size = 0  # bytes fed: the body's length so far
        self._found = headers.Found(max_header_bytes=max_header_bytes, allowed=tuple(str(f) for f in formats))
        self._parser = None  # the format's generator, once the first bytes have said which
        self._want = None  # what it asked for: Read, Skip or NEXT_MARKER
        self._buf = bytearray()  # a Read's bytes, while they arrive
        self._left = 0  # a Skip's bytes still to go by
        self._ff = False  # looking for a marker, the last chunk ended with 0xFF
        self._early = bytearray()  # the first bytes, until there are enough to tell the format
        self._error: ImageError | None = None
        self._done = False  # the primary image is complete, or the body failed: the rest is not looked at
        self._sized = False  # the header's size has been judged (size_verdict), the moment it was read

    def feed(self, data: bytes) -> None:
        start = self.size
        self.size += len(data)
        if self._done:
            return
        try:
            if self._parser is None:
                self._early += data
                if len(self._early) < _SNIFF_BYTES:
                    return
                data, start, self._early = bytes(self._early), 0, None
                self._parser = _sniff(data[:_SNIFF_BYTES], self._found.allowed)(self._found)
                self._advance(None, 0)
            self._consume(data, start)
        except ImageError as exc:
            self._fail(exc)
        except (struct.error, IndexError, ValueError):  # a structure too short for what it says it holds
            self._fail(ImageError(f"not an image: starts like {self._found.fmt or 'an image'} but its header "
                                  f"does not parse"))

    @property
    def failed(self) -> bool:
        """The body can no longer be measured, whatever follows (no image, too many pixels, ...): the download
        may stop here (transfer.py), and finish() says why."""
        return self._error is not None

    def _fail(self, exc: ImageError) -> None:
        self._error, self._done, self._parser, self._buf = exc, True, None, bytearray()

    def _consume(self, data: bytes, start: int) -> None:
        pos, end = 0, len(data)
        while pos < end and not self._done:
            want = self._want
            if want is NEXT_MARKER:
                if self._ff:  # a 0xFF ended the last chunk: this chunk's first byte may complete a marker
                    code = data[pos]
                    pos += 1
                    if code == 0xFF:
                        continue
                    self._ff = False
                    if code != 0 and not 0xD0 <= code <= 0xD7:
                        self._advance(code, start + pos)
                    continue
                match = JPEG_MARKER.search(data, pos)
                if match is None:
                    self._ff = data[-1] == 0xFF
                    return
                pos = match.end()
                self._advance(data[pos - 1], start + pos)
            elif type(want) is Skip:
                step = min(self._left, end - pos)
                pos += step
                self._left -= step
                if not self._left:
                    self._advance(None, start + pos)
            else:
                step = min(want.n - len(self._buf), end - pos)
                if not self._buf and step == want.n:
                    value = data[pos:pos + step]  # all in this chunk: no copy into the buffer
                else:
                    self._buf += data[pos:pos + step]
                    value = None
                    if len(self._buf) == want.n:
                        value, self._buf = bytes(self._buf), bytearray()
                pos += step
                if value is not None:
                    self._advance(value, start + pos)

    def _advance(self, value, offset: int) -> None:
        """Hand the parser what it asked for; take its next request (an empty one is answered at once)."""
        self._found.offset = offset
        try:
            want = self._parser.send(value)
            while type(want) in (Read, Skip) and want.n <= 0:
                if want.n < 0:
                    raise ImageError(f"not an image: {self._found.fmt} structure of negative length")
                want = self._parser.send(b"" if type(want) is Read else None)
        except StopIteration:
            self._done, self._parser = True, None  # the primary image is complete
            return
        finally:
            if not self._sized and self._found.size is not None:  # judged when the header says it, not at the end
                self._sized = True
                size_verdict(*self._found.size)
        if type(want) is Skip:
            self._left = want.n
        self._want = want

    def finish(self) -> tuple[int, int]:
        """(width, height) of a complete body, or ImageError saying why not."""
        if self._error is not None:
            raise self._error
        found = self._found
        if self._parser is None and not self._done:  # fewer bytes than it takes to tell the format
            parser = _sniff(bytes(self._early), found.allowed)
            name = {headers.jpeg: "JPEG", headers.png: "PNG", headers.webp: "WebP"}.get(parser, "HEIF or AVIF")
            raise ImageError(f"truncated image: {name} stops after {self.size} bytes, before its header",
                             ErrorKind.TRUNCATED)
        if not self._done:
            raise ImageError(f"truncated image: {found.fmt} stops after {self.size:,} bytes, before "
                             f"{found.lacking}", ErrorKind.TRUNCATED)
        return size_verdict(*found.size)


def size_verdict(width: int, height: int) -> tuple[int, int]:
    """(width, height) if an image of that size may be measured; else ImageError. Judged as soon as the header
    says the size, so a 100,000 x 100,000 PNG is refused after its first 24 bytes, not its last."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no area: {width}x{height}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageError(f"image too large in pixels: {width}x{height} is {width * height:,} pixels, more "
                         f"than {limit:,} (the decompression bomb limit)", ErrorKind.TOO_LARGE)
    return width, height


def image_size(data: bytes, formats: tuple[str, ...] = DEFAULT_FORMATS,
               max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> tuple[int, int]:
    """(width, height) of a whole body in memory (the engine feeds a BodyReader as the body arrives)."""
    reader = BodyReader(formats, max_header_bytes)
    reader.feed(data)
    return reader.finish()
