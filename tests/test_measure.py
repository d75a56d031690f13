"""Image measurement on real image bytes."""
import re
import struct
import time
import tracemalloc
import zlib

import pytest

from daemon.engine.measure import ImageError, image_size, perimeter
from tests.conftest import image_bytes


def test_perimeter():
    assert perimeter(640, 480) == 2240
    assert perimeter(1, 1) == 4


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("width, height", [(1, 1), (641, 479), (3000, 17)])
def test_size_of_each_allowed_format(fmt, width, height):
    assert image_size(image_bytes(fmt, width, height)) == (width, height)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


JPEG, PNG, WEBP = (image_bytes(fmt, 300, 200) for fmt in ("JPEG", "PNG", "WEBP"))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty body"),
    (b"<html><body>Not found</body></html>", "not an image: looks like HTML"),
    (b"\x00" * 100, "not an image: unknown bytes"),
    (image_bytes("GIF", 10, 10), "format not allowed: GIF"),
    (image_bytes("BMP", 10, 10), "format not allowed: BMP"),
    (image_bytes("TIFF", 10, 10), "format not allowed: TIFF"),
    (_png_header_claiming(100_000, 100_000), "too large in pixels"),
    (JPEG[: len(JPEG) // 2], "truncated image: JPEG stops after"),
    (PNG[:-5], "truncated image: PNG stops after"),
    (WEBP[:-10], "truncated image: WebP stops after"),
    (JPEG[:3] + b"garbage" * 20 + b"\xff\xd9", "not an image: starts like JPEG"),
])
def test_unmeasurable_bytes_say_why(data, reason):
    with pytest.raises(ImageError, match=re.escape(reason)):
        image_size(data)


def test_decompression_bomb_fails_fast_with_memory_flat():
    bomb = _png_header_claiming(100_000, 100_000)  # 10 gigapixels; decoded it would be 30 GB
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ImageError, match="too large in pixels"):
        image_size(bomb)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1024 * 1024
