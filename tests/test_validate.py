"""Submission rules: every bad body is refused with a message that names the field."""
import json

import pytest

from spool.records import Visit

from webapi.validate import InvalidSubmission, SubmitLimits, parse_submission

LIMITS = SubmitLimits()
URL = "http://images.example/a.jpg"


def visit(**overrides):
    return {"store_id": "RP00001", "image_url": [URL], "visit_time": "2024-03-11T10:00:00Z", **overrides}


def body(doc) -> bytes:
    return json.dumps(doc).encode()


def error_for(raw: bytes, limits=LIMITS) -> str:
    with pytest.raises(InvalidSubmission) as info:
        parse_submission(raw, limits)
    return str(info.value)


def test_valid_submission_is_kept_with_only_known_fields():
    count, visits = parse_submission(body({"count": 1, "visits": [visit(extra="x")], "note": "n"}), LIMITS)
    assert count == 1
    assert visits == [Visit("RP00001", "2024-03-11T10:00:00Z", [URL])]


@pytest.mark.parametrize("doc, names", [
    ({"visits": [visit()]}, "count: missing"),
    ({"count": 1}, "visits: missing"),
    ({"count": "1", "visits": [visit()]}, "count: must be an integer"),
    ({"count": True, "visits": [visit()]}, "count: must be an integer"),
    ({"count": 1, "visits": visit()}, "visits: must be a list"),
    ({"count": 0, "visits": []}, "visits: must not be empty"),
    ({"count": 2, "visits": [visit()]}, "count: is 2 but visits has 1 entries"),
    ({"count": 1, "visits": ["RP00001"]}, "visits[0]: must be an object"),
    ({"count": 1, "visits": [{"image_url": [URL], "visit_time": "t"}]}, "visits[0].store_id: missing"),
    ({"count": 1, "visits": [{"store_id": "RP1", "visit_time": "t"}]}, "visits[0].image_url: missing"),
    ({"count": 1, "visits": [{"store_id": "RP1", "image_url": [URL]}]}, "visits[0].visit_time: missing"),
    ({"count": 1, "visits": [visit(store_id="")]}, "visits[0].store_id: must not be empty"),
    ({"count": 1, "visits": [visit(store_id=7)]}, "visits[0].store_id: must be a string"),
    ({"count": 1, "visits": [visit(visit_time=None)]}, "visits[0].visit_time: must be a string"),
    ({"count": 1, "visits": [visit(image_url=URL)]}, "visits[0].image_url: must be a list of URLs"),
    ({"count": 1, "visits": [visit(image_url=[])]}, "visits[0].image_url: must not be empty"),
    ({"count": 1, "visits": [visit(image_url=[URL, 5])]}, "visits[0].image_url[1]: must be a string"),
    ({"count": 1, "visits": [visit(image_url=["ftp://h/a.jpg"])]}, "visits[0].image_url[0]: not an http(s) URL"),
    ({"count": 1, "visits": [visit(image_url=["/a.jpg"])]}, "visits[0].image_url[0]: not an http(s) URL"),
    ({"count": 1, "visits": [visit(image_url=["http:///a.jpg"])]}, "visits[0].image_url[0]: not an http(s) URL"),
    ({"count": 1, "visits": [visit(image_url=["http://u:p@h/a.jpg"])]}, "credentials"),
    ({"count": 1, "visits": [visit(image_url=["http://h/a b.jpg"])]}, "spaces or control characters"),
    ({"count": 1, "visits": [visit(image_url=["http://h:99999/a.jpg"])]}, "visits[0].image_url[0]: not a valid URL"),
    ({"count": 1, "visits": [visit(image_url=["http://h/" + "a" * 2048])]}, "longer than 2048 characters"),
    ([{"count": 1}], "must be a JSON object"),
])
def test_bad_field_is_named(doc, names):
    assert names in error_for(body(doc))


@pytest.mark.parametrize("raw, names", [
    (b"", "not valid JSON"),
    (b"{count: 1}", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"count": NaN, "visits": []}', "NaN is not allowed"),
    (b'{"count": Infinity, "visits": []}', "Infinity is not allowed"),
    (b'{"count": 1, "count": 2, "visits": []}', "duplicate key 'count'"),
    (b'{"count": 1, "visits": [], "x": ' + b"[" * 50000 + b"]" * 50000 + b"}", "x[0][0][0]"),
    (b'{"count": 1, "visits": [], "x": ' + b"[" * 50000 + b"]" * 50000 + b"}", "nested too deeply"),
    (b"[" * 50000 + b"]" * 50000, "body must be a JSON object"),  # refused at its first byte
])
def test_malformed_body_is_refused(raw, names):
    assert names in error_for(raw)


def test_too_many_images_in_one_job():
    limits = SubmitLimits(max_images_per_job=3)
    doc = {"count": 2, "visits": [visit(image_url=[URL, URL]), visit(image_url=[URL, URL])]}
    assert "too many images: more than 3" in error_for(body(doc), limits)
