"""Naming attributes the way DICOMweb query strings do: by keyword or by 8 hex digits."""

from __future__ import annotations

from functools import cache

from pydicom.datadict import dictionary_keyword, dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword


class UnknownAttributeError(ValueError):
    """The name is neither a dictionary keyword nor a GGGGEEEE tag."""


@cache
def _keywords_by_lower_case() -> dict[str, str]:
    return {keyword.lower(): keyword for keyword in keyword_dict}


def did_you_mean(name: str) -> str:
    """' (did you mean 'PatientID'?)' when `name` is a keyword in the wrong case, as Azure's guides write
    PatientId; otherwise ''. Keywords stay case-sensitive: the hint only makes the 400 say why."""
    keyword = _keywords_by_lower_case().get(name.lower())
    return f" (did you mean {keyword!r}?)" if keyword is not None and keyword != name else ""


def parse_tag(name: str) -> int:
    """Tag number for a keyword (PatientName) or hex tag (00100010)."""
    if len(name) == 8:
        try:
            return int(name, 16)
        except ValueError:
            pass
    tag = tag_for_keyword(name)
    if tag is None:
        raise UnknownAttributeError(
            f"unknown attribute {name!r}: not a DICOM keyword or GGGGEEEE tag{did_you_mean(name)}"
        )
    return tag


def tag_hex(tag: int) -> str:
    """The DICOM JSON key of a tag: 8 upper-case hex digits."""
    return f"{tag:08X}"


def keyword(tag: int) -> str:
    """Keyword for a tag, or its hex form for private/unknown tags."""
    return keyword_for_tag(tag) or tag_hex(tag)


def dictionary_vr(tag: int) -> str | None:
    """VR from the data dictionary; None for private and unknown tags."""
    try:
        dictionary_keyword(tag)
        return dictionary_VR(tag)
    except KeyError:
        return None
