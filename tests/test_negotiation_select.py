"""dicomweb.negotiation.select: a request's Accept header and `accept` query parameters to a ranking or
the standard's status (PS3.18 8.7.8.1), as every retrieve route negotiates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomweb.errors import HTTPProblem
from dicomweb.negotiation import Offer, describe, rank, select

PNG, JPEG = Offer("image/png"), Offer("image/jpeg")
MULTI = Offer("multipart/related", part_type="image/jpeg")
OFFERS = (JPEG, PNG)


def test_describe_lists_offers_with_their_part_types() -> None:
    assert describe((MULTI, PNG)) == 'multipart/related; type="image/jpeg", image/png'
    assert describe(()) == ""


def test_header_alone_ranks_like_rank() -> None:
    ranked = select(OFFERS, "image/png, image/*;q=0.5")
    assert [s.offer for s in ranked] == [PNG, JPEG]
    assert [s.q for s in ranked] == [1.0, 0.5]
    assert [s.offer for s in select(OFFERS, None)] == [JPEG, PNG]  # no header: the server's default first


def test_the_first_query_value_that_selects_anything_wins_over_the_header() -> None:
    assert select(OFFERS, "image/jpeg", ["image/png"])[0].offer == PNG
    # a value that selects nothing passes on to the next, then to the header
    assert select(OFFERS, "image/jpeg", ["application/dicom", "image/png"])[0].offer == PNG
    assert select(OFFERS, "image/png", ["application/dicom"])[0].offer == PNG
    assert select(OFFERS, "image/png", [])[0].offer == PNG


def test_malformed_values_are_400_naming_where_they_were() -> None:
    with pytest.raises(HTTPProblem) as info:
        select(OFFERS, "image/png", ["image/png;q=x"])
    assert info.value.status == 400
    assert info.value.message == "malformed accept query parameter: invalid q-value 'x' in 'image/png;q=x'"
    with pytest.raises(HTTPProblem) as info:
        select(OFFERS, "image/png;q=2")
    assert info.value.status == 400
    assert info.value.message == "malformed Accept header: invalid q-value '2' in 'image/png;q=2'"


def test_a_malformed_header_is_not_read_when_a_query_value_selects() -> None:
    assert select(OFFERS, "image/png;q=2", ["image/jpeg"])[0].offer == JPEG


def test_nothing_acceptable_is_406_listing_what_is_available() -> None:
    with pytest.raises(HTTPProblem) as info:
        select((MULTI, PNG), "application/dicom", ["text/html"])
    assert info.value.status == 406
    assert info.value.message == (
        "cannot produce any media type the Accept header allows; "
        'available: multipart/related; type="image/jpeg", image/png'
    )
    with pytest.raises(HTTPProblem) as info:
        select(OFFERS, "image/png;q=0, image/jpeg;q=0", available="PNG or JPEG")
    assert (
        info.value.message == "cannot produce any media type the Accept header allows; available: PNG or JPEG"
    )


_RANGES = st.sampled_from(["image/png", "image/jpeg", "image/*", "*/*", "text/html", "multipart/related"])
_HEADERS = st.lists(
    st.tuples(_RANGES, st.sampled_from(["", ";q=0", ";q=0.5", ";q=1"])).map(lambda p: p[0] + p[1]), max_size=4
).map(", ".join)


@given(header=_HEADERS, params=st.lists(_HEADERS, max_size=3))
def test_select_is_rank_of_the_first_value_that_selects(header: str, params: list[str]) -> None:
    offers = (MULTI, JPEG, PNG)
    expected = next((r for r in (rank(v, offers) for v in [*params, header]) if r), [])
    if expected:
        assert select(offers, header, params) == expected
    else:
        with pytest.raises(HTTPProblem) as info:
            select(offers, header, params)
        assert info.value.status == 406
