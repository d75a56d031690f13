"""Photos as phones write them (tests/photo_corpus.py): each measured right through the real service, each
cut short refused naming the truncation, whatever follows the primary image ignored, memory flat."""
import io
import re
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from daemon.engine.loop import measure
from daemon.engine.measure import BodyReader, ImageError, image_size
from daemon.engine.outcome import ErrorKind
from tests.conftest import image_bytes, visit
from tests.photo_corpus import Photo, box, corpus, full_box, mp4_video
from tests.test_engine import NO_WAIT, ok, server  # noqa: F401 (server: a fixture)

PHOTOS = corpus()
BY_NAME = {photo.name: photo for photo in PHOTOS}
#: The issue's table, by variant: what the service answered before.
REFUSED_BEFORE = ("webp-large-lossy.webp", "webp-icc-exif.webp", "portrait-depth-map.jpg", "big-icc-profile.jpg",
                  "motion-photo.jpg", "maker-trailer.jpg", "bytes-after-iend.png", "iphone-grid.heic", "single.heic",
                  "photo.avif")


def library_size(photo: Photo) -> tuple[int, int]:
    """The size the reference decoder gives once it has decoded the whole file: libheif for HEIF, Pillow
    (libjpeg, libpng, libwebp, libavif) for the rest."""
    if photo.name.endswith(".heic"):
        import pillow_heif
        return pillow_heif.open_heif(io.BytesIO(photo.data)).to_pillow().size
    with Image.open(io.BytesIO(photo.data)) as img:
        img.load()
        return img.size


def test_the_corpus_has_every_class_the_issue_names():
    assert set(REFUSED_BEFORE) <= set(BY_NAME)
    assert len(BY_NAME["webp-large-lossy.webp"].data) > 256 * 1024
    assert len(BY_NAME["webp-icc-exif.webp"].data) > 256 * 1024
    for name in ("portrait-depth-map.jpg", "big-icc-profile.jpg"):  # metadata before the frame header
        with Image.open(io.BytesIO(BY_NAME[name].data)) as img:
            assert sum(len(payload) for _, payload in img.applist) > 256 * 1024
    for name in ("motion-photo.jpg", "maker-trailer.jpg", "bytes-after-iend.png", "samsung-motion.heic"):
        assert BY_NAME[name].primary_bytes < len(BY_NAME[name].data)


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_each_variant_has_the_size_its_decoder_shows(photo):
    assert image_size(photo.data) == (photo.width, photo.height) == library_size(photo)


def test_every_variant_has_its_exact_perimeter_through_the_service(start_service, image_server):
    base, folder = image_server
    for photo in PHOTOS:
        (folder / photo.name).write_bytes(photo.data)
    service = start_service()
    urls = [f"{base}/{photo.name}" for photo in PHOTOS]
    job_id = service.submit([visit("RP00001", urls[:12]), visit("RP00002", urls[12:])])
    status = service.wait(job_id)
    results = service.results(job_id)["results"]
    got = {r["image_url"].rsplit("/", 1)[1]: (r["width"], r["height"], r["perimeter"], r["error"]) for r in results}
    assert got == {p.name: (p.width, p.height, p.perimeter, None) for p in PHOTOS}
    assert status["status"] == "completed"


def test_cut_photos_fail_through_the_service_naming_the_truncation(start_service, image_server):
    base, folder = image_server
    cuts = {"motion-photo.jpg": 0.9, "iphone-grid.heic": 0.5, "webp-large-lossy.webp": 0.99, "photo.avif": 0.7}
    for name, share in cuts.items():
        photo = BY_NAME[name]
        (folder / f"cut-{name}").write_bytes(photo.data[:int(photo.primary_bytes * share)])
    service = start_service()
    job_id = service.submit([visit("RP00003", [f"{base}/cut-{name}" for name in cuts])])
    status = service.wait(job_id)
    results = service.results(job_id)["results"]
    assert status["status"] == "failed"
    assert all(r["perimeter"] is None and r["error"].startswith("truncated image: ") for r in results), results
    assert status["error"][0]["store_id"] == "RP00003" and status["error"][0]["images_failed"] == len(cuts)


# ---------------------------------------------------------------- cut short, at any point
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PHOTOS), st.data())
def test_a_photo_cut_before_its_primary_image_ends_is_never_given_a_size(photo, data):
    # 8 bytes: the fewest that say a format (PNG's signature; a HEIF's ftyp box type)
    cut = data.draw(st.integers(8, photo.primary_bytes - 1), label="cut")
    with pytest.raises(ImageError, match="^truncated image: ") as refused:
        image_size(photo.data[:cut])
    assert refused.value.kind == ErrorKind.TRUNCATED


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([p for p in PHOTOS if p.primary_bytes < len(p.data)]), st.data())
def test_a_photo_cut_in_what_follows_its_primary_image_is_measured(photo, data):
    cut = data.draw(st.integers(photo.primary_bytes, len(photo.data)), label="cut")
    assert image_size(photo.data[:cut]) == (photo.width, photo.height)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PHOTOS), st.data())
def test_any_split_into_chunks_reads_the_same_as_the_whole(photo, data):
    """libcurl hands a body over in chunks of any size: a marker, a box header or a chunk length may straddle
    two of them."""
    ends = sorted(data.draw(st.lists(st.integers(1, len(photo.data) - 1), max_size=40, unique=True), label="splits"))
    reader = BodyReader()
    for start, end in zip([0, *ends], [*ends, len(photo.data)]):
        reader.feed(photo.data[start:end])
    assert reader.finish() == (photo.width, photo.height)
    assert reader.size == len(photo.data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(PHOTOS), st.data())
def test_damaged_headers_give_a_size_or_a_reason_never_a_crash(photo, data):
    """Bytes of the first KiB (where the structures are) replaced by anything: ImageError or a size."""
    damaged = bytearray(photo.data)
    for _ in range(data.draw(st.integers(1, 8), label="bytes changed")):
        damaged[data.draw(st.integers(0, min(1023, len(damaged) - 1)))] = data.draw(st.integers(0, 255))
    try:
        width, height = image_size(bytes(damaged))
    except ImageError as exc:
        assert str(exc) and exc.kind in ErrorKind
    else:
        assert width > 0 and height > 0


# ---------------------------------------------------------------- memory, bounds, formats
def test_memory_per_image_stays_flat_whatever_its_size_or_metadata():
    """A 20 MB motion photo with 3 MB of metadata before its frame: what the reader keeps is bytes, not MB."""
    photo = BY_NAME["portrait-depth-map.jpg"]
    xmp_segments = photo.data[2:photo.data.index(b"\xff\xdb")]
    body = photo.data[:2] + xmp_segments * 8 + photo.data[2:] + mp4_video(300, seed=1)
    chunks = [body[i:i + 16384] for i in range(0, len(body), 16384)]
    assert len(body) > 20_000_000
    tracemalloc.start()
    reader = BodyReader()
    for chunk in chunks:
        reader.feed(chunk)
    size = reader.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size == (photo.width, photo.height)
    assert peak < 64 * 1024


def test_metadata_beyond_max_header_bytes_is_refused_by_name():
    photo = BY_NAME["portrait-depth-map.jpg"]
    with pytest.raises(ImageError, match=r"^header too large: no JPEG frame header in the first 65,536 bytes "
                                         r"\(max_header_bytes\)$"):
        image_size(photo.data, max_header_bytes=65536)
    assert image_size(photo.data, max_header_bytes=len(photo.data)) == (photo.width, photo.height)


def test_a_body_of_countless_empty_chunks_is_refused_before_it_costs_seconds():
    signature_and_header = image_bytes("PNG", 1, 1)[:33]
    text_chunk = struct.pack(">I4sI", 0, b"tEXt", 0)  # an empty chunk: 12 bytes, one parser turn each
    with pytest.raises(ImageError, match="^not an image: more than 100,000 PNG chunks$"):
        image_size(signature_and_header + text_chunk * 150_000)


def test_a_heif_meta_box_over_a_mebibyte_is_refused_not_kept():
    photo = BY_NAME["single.heic"]
    ftyp_end = struct.unpack(">I", photo.data[:4])[0]
    huge_meta = full_box(b"meta", 0, 0, box(b"free", bytes(1_100_000)))
    with pytest.raises(ImageError, match="^header too large: HEIF meta box of"):
        image_size(photo.data[:ftyp_end] + huge_meta)


def test_a_heif_claiming_a_gigapixel_canvas_is_refused_from_its_header():
    photo = BY_NAME["iphone-grid.heic"]
    canvas = struct.pack(">II", photo.width, photo.height)
    assert photo.data.count(canvas) == 1  # the grid's ispe
    bomb = photo.data.replace(canvas, struct.pack(">II", 40_000, 30_000))
    with pytest.raises(ImageError, match="^image too large in pixels: 40000x30000") as refused:
        image_size(bomb)
    assert refused.value.kind == ErrorKind.TOO_LARGE


@pytest.mark.parametrize("formats, photo, message", [
    (("JPEG", "PNG"), "single.heic", "format not allowed: HEIF (JPEG and PNG are)"),
    (("JPEG",), "photo.avif", "format not allowed: AVIF (only JPEG is)"),
    (("HEIF",), "lossless.webp", "format not allowed: WebP (only HEIF is)"),
])
def test_formats_not_chosen_are_refused_by_name(formats, photo, message):
    with pytest.raises(ImageError, match=f"^{re.escape(message)}$"):
        image_size(BY_NAME[photo].data, formats=formats)


@pytest.mark.parametrize("data, message", [
    (image_bytes("GIF", 10, 10), "format not allowed: GIF (JPEG, PNG, WebP, HEIF and AVIF are)"),
    (box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2mp41") + box(b"mdat", bytes(100)),
     "format not allowed: ISO media of brand 'isom', a video or another kind of file"),
    (b"\xff\x0a" + bytes(30), "format not allowed: JPEG XL"),
])
def test_other_formats_are_refused_by_name(data, message):
    with pytest.raises(ImageError, match=f"^{re.escape(message)}"):
        image_size(data)


def test_image_formats_setting_reaches_the_daemon(start_service, image_server):
    base, folder = image_server
    (folder / "single.heic").write_bytes(BY_NAME["single.heic"].data)
    (folder / "a.jpg").write_bytes(image_bytes("JPEG", 30, 20))
    service = start_service("--image-formats", "jpeg, png")
    job_id = service.submit([visit("RP00001", [f"{base}/single.heic", f"{base}/a.jpg"])])
    assert service.wait(job_id)["status"] == "failed"
    heic, jpeg = service.results(job_id)["results"]
    assert heic["error"] == "format not allowed: HEIF (JPEG and PNG are)" and jpeg["perimeter"] == 100


# ---------------------------------------------------------------- what the transport knows


def _chunked_then_hang_up(body: bytes):
    def route(conn, srv):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(b"%x\r\n" % len(body) + body + b"\r\n")  # and never the last, empty chunk
    return route


def _close_delimited(body: bytes):
    return lambda conn, srv: conn.sendall(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n" + body)


def test_a_chunked_body_that_stops_before_its_end_is_a_truncated_download(server):
    photo = BY_NAME["maker-trailer.jpg"]
    server.routes["/x.jpg"] = _chunked_then_hang_up(photo.data)  # the whole photo, but the body never ended
    outcome = measure([(0, f"{server.base}/x.jpg")], NO_WAIT)[0]
    assert outcome.perimeter is None and outcome.kind == ErrorKind.TRUNCATED
    assert outcome.error.startswith("truncated download: ")


def test_a_body_without_length_cut_inside_the_image_is_truncated_and_after_it_is_measured(server):
    photo = BY_NAME["motion-photo.jpg"]
    server.routes["/cut.jpg"] = _close_delimited(photo.data[:photo.primary_bytes - 100])
    server.routes["/video-cut.jpg"] = _close_delimited(photo.data[:photo.primary_bytes + 5000])
    cut, video_cut = measure([(0, f"{server.base}/cut.jpg"), (1, f"{server.base}/video-cut.jpg")], NO_WAIT)
    assert cut.kind == ErrorKind.TRUNCATED and cut.perimeter is None
    assert cut.error == f"truncated image: JPEG stops after {photo.primary_bytes - 100:,} bytes, before its " \
                        "end-of-image marker"
    assert (video_cut.width, video_cut.height, video_cut.error) == (photo.width, photo.height, None)


def test_each_variant_through_the_engine_as_served(server):
    for photo in PHOTOS:
        server.routes[f"/{photo.name}"] = ok(photo.data)
    outcomes = measure([(i, f"{server.base}/{p.name}") for i, p in enumerate(PHOTOS)], NO_WAIT)
    assert [(o.width, o.height, o.bytes, o.error) for o in outcomes] == \
        [(p.width, p.height, len(p.data), None) for p in PHOTOS]
