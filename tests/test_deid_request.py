"""Validation of POST /export bodies (deid/export_request.py), without a server."""

from __future__ import annotations

import pytest

from deid.export_request import ExportRequestError, normalize_identifiers, parse_export_request

BASE = {
    "source": {"type": "identifiers", "settings": {"values": ["1.2.3"]}},
    "destination": {"type": "directory", "settings": {"path": "cohort/a"}},
    "deidentification": {"project": "p-1"},
}


def test_identifiers_are_deduplicated_and_nested_ones_dropped() -> None:
    values = [
        "1.2.3/4.5",
        "1.2.3",
        "1.2.3/4.5/6.7",
        "9.8",
        "9.8/7.6",
        "1.2.4/5.6/7.8",
        "1.2.3",
        "1.2.4/5.6/7.8",
    ]
    assert normalize_identifiers(values) == ["1.2.3", "9.8", "1.2.4/5.6/7.8"]
    with pytest.raises(ExportRequestError, match="is not study"):
        normalize_identifiers(["1.2.3/4.5/6.7/8.9"])


def test_azure_shape_is_read_case_insensitively() -> None:
    body = {
        "Source": {"Type": "identifiers", "Settings": {"Values": ["1.2.3/4.5"]}},
        "Destination": {"Type": "s3", "Settings": {"Bucket": "bkt", "Prefix": "/x/y/"}},
        "Deidentification": {"Project": "p", "Options": ["retainUids", "clean_graphics"],
                             "PixelRules": [{"model": "M", "rectangles": [[0, 0, 5, 5]]}]},
    }  # fmt: skip
    req = parse_export_request(body)
    assert req.identifiers == ["1.2.3/4.5"]
    assert req.destination == {"type": "s3", "settings": {"bucket": "bkt", "prefix": "x/y"}}
    assert (req.project, req.options) == ("p", ["retain_uids", "clean_graphics"])
    assert req.pixel_rules == [{"model": "M", "rectangles": [[0, 0, 5, 5]]}]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": {"type": "blobs", "settings": {}}}, "source.type must be"),
        ({"source": {"type": "identifiers", "settings": {"values": []}}}, "non-empty list"),
        ({"destination": {"type": "azureblob", "settings": {}}}, "destination.type must be"),
        ({"destination": {"type": "directory", "settings": {"path": "/etc"}}}, "relative"),
        ({"destination": {"type": "directory", "settings": {"path": "a/../../b"}}}, "relative"),
        ({"destination": {"type": "s3", "settings": {"prefix": "x"}}}, "settings.bucket"),
        ({"destination": {"type": "partition", "settings": {"name": "a b"}}}, "settings.name"),
        ({"deidentification": {"project": ""}}, "deidentification.project"),
        ({"deidentification": {"project": "p", "options": "retainUids"}}, "list of option names"),
        (
            {"deidentification": {"project": "p", "pixelRules": [{"rectangles": []}]}},
            "non-empty 'rectangles'",
        ),
        ({"deidentification": None}, "deidentification is required"),
    ],
)
def test_invalid_bodies(change: dict, message: str) -> None:
    body = {**BASE, **change}
    if body["deidentification"] is None:
        del body["deidentification"]
    with pytest.raises(ExportRequestError, match=message):
        parse_export_request(body)
    with pytest.raises(ExportRequestError):
        parse_export_request([BASE])
