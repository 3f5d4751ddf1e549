"""Media-type parsing, Accept negotiation (PS3.18 §8.7.8) and STOW Content-Type classification."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomweb.multipart import MultipartError
from dicomweb.negotiation import (
    ANY_TRANSFER_SYNTAX,
    COMPRESSED_MEDIA_TYPES,
    EXPLICIT_VR_LITTLE_ENDIAN,
    MediaType,
    NegotiationError,
    Offer,
    StowContentType,
    UnsupportedMediaTypeError,
    compressed_media_type,
    default_transfer_syntax,
    describe,
    negotiate,
    parse_accept,
    parse_boundary,
    parse_media_type,
    parse_stow_content_type,
    rank,
)

ELE = EXPLICIT_VR_LITTLE_ENDIAN
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
J2K = "1.2.840.10008.1.2.4.90"

# ---------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("text", "essence", "params", "q"),
    [
        ("application/dicom", "application/dicom", {}, 1.0),
        ("Application/DICOM", "application/dicom", {}, 1.0),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=*',
            "multipart/related",
            {"type": "application/dicom", "transfer-syntax": "*"},
            1.0,
        ),
        (
            "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50",
            "application/dicom",
            {"transfer-syntax": JPEG_BASELINE},
            1.0,
        ),
        (
            'multipart/related; type="application/octet-stream"',
            "multipart/related",
            {"type": "application/octet-stream"},
            1.0,
        ),
        # unquoted slash in a value, as Orthanc and others send it
        (
            "multipart/related;type=application/dicom;transfer-syntax=*",
            "multipart/related",
            {"type": "application/dicom", "transfer-syntax": "*"},
            1.0,
        ),
        ("text/plain;CHARSET=utf-8;Q=0.5", "text/plain", {"charset": "utf-8"}, 0.5),
        ("a/b ; x = 1 ;", "a/b", {"x": "1"}, 1.0),
        ("a/b;;x=1", "a/b", {"x": "1"}, 1.0),
        ('a/b; x="q\\"uo\\\\te; ,"', "a/b", {"x": 'q"uo\\te; ,'}, 1.0),
        ('a/b; x=""', "a/b", {"x": ""}, 1.0),
        ("*/*", "*/*", {}, 1.0),
        ("image/*; q=0", "image/*", {}, 0.0),
        ("a/b; q=1.000", "a/b", {}, 1.0),
        ("a/b; q=.5", "a/b", {}, 0.5),
        (
            'multipart/related; boundary="simple boundary"',
            "multipart/related",
            {"boundary": "simple boundary"},
            1.0,
        ),
        # a single Content-Type may carry an unquoted comma (not valid in an Accept list)
        ("multipart/related; boundary=a,b", "multipart/related", {"boundary": "a,b"}, 1.0),
    ],
)
def test_parse_media_type(text: str, essence: str, params: dict[str, str], q: float) -> None:
    mt = parse_media_type(text)
    assert (mt.essence, dict(mt.params), mt.q) == (essence, params, q)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "application",
        "application/",
        "/dicom",
        "*/dicom",
        "app lication/dicom",
        "a/b c",
        "a/b; x",
        "a/b; x=",
        'a/b; x="unterminated',
        'a/b; x="bad\x01control"',
        "a/b; q=2",
        "a/b; q=abc",
        "a/b; q=-0.5",
        "a/b; q=nan",
        "a/b; x=1; X=2",
        "a/b, c/d",
    ],
)
def test_parse_media_type_rejects(text: str) -> None:
    with pytest.raises(NegotiationError):
        parse_media_type(text)


def test_parse_accept_defaults_and_order() -> None:
    for empty in (None, "", "  ", ", ,"):
        assert parse_accept(empty) == [MediaType("*", "*")]
    ranges = parse_accept(
        '*/*; q=0.1, image/*, application/dicom; q=0.5, multipart/related; type="application/dicom"; '
        "transfer-syntax=*, image/png, image/gif; q=0"
    )
    assert [str(r) for r in ranges] == [
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        "image/png",
        "image/*",
        "application/dicom; q=0.5",
        "*/*; q=0.1",
        "image/gif; q=0",
    ]


def test_parse_accept_comma_inside_quotes() -> None:
    ranges = parse_accept('a/b; x="1, 2", c/d')
    assert [(r.essence, dict(r.params)) for r in ranges] == [("a/b", {"x": "1, 2"}), ("c/d", {})]


@pytest.mark.parametrize(
    "header", ["application/dicom; q=abc", "text/html;;;q=5", "a/b c/d", "application/dicom;", "*/json"]
)
def test_parse_accept_rejects(header: str) -> None:
    if header == "application/dicom;":  # an empty trailing parameter is fine
        assert parse_accept(header)[0].essence == "application/dicom"
        return
    with pytest.raises(NegotiationError):
        parse_accept(header)


TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
tokens = st.text(TOKEN, min_size=1, max_size=12)
values = st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]) | st.just("\t"), max_size=20)
media_types = st.builds(
    MediaType,
    tokens.filter(lambda t: t != "*"),
    tokens,
    st.dictionaries(tokens.map(str.lower).filter(lambda n: n != "q"), values, max_size=4),
    st.integers(0, 1000).map(lambda n: n / 1000),
)


@settings(max_examples=300, deadline=None)
@given(mt=media_types)
def test_media_type_format_parse_roundtrip(mt: MediaType) -> None:
    assert parse_media_type(str(mt)) == mt
    assert hash(parse_media_type(str(mt))) == hash(mt)


@settings(max_examples=150, deadline=None)
@given(mts=st.lists(media_types, min_size=1, max_size=5))
def test_accept_list_roundtrip(mts: list[MediaType]) -> None:
    parsed = parse_accept(", ".join(str(m) for m in mts))
    assert sorted(map(str, parsed)) == sorted(map(str, mts))
    qs = [m.q for m in parsed]
    assert qs == sorted(qs, reverse=True)


# ---------------------------------------------------------------------------------------------------
# negotiation

MULTI_DICOM = Offer("multipart/related", "application/dicom", (ELE, ANY_TRANSFER_SYNTAX))
SINGLE_DICOM = Offer("application/dicom", transfer_syntaxes=(ELE, ANY_TRANSFER_SYNTAX))
INSTANCE = (MULTI_DICOM, SINGLE_DICOM)
# An archive that can only produce ELE (and JPEG baseline), no "as stored".
STRICT = (Offer("multipart/related", "application/dicom", (ELE, JPEG_BASELINE)),)

METADATA = (Offer("application/dicom+json"), Offer("application/json"))

FRAME_OCTETS = Offer("multipart/related", "application/octet-stream", (ELE,))
FRAME_JPEG = Offer("multipart/related", "image/jpeg", (JPEG_BASELINE, JPEG_LOSSLESS_SV1))
FRAME_JPEG_LOSSY_ONLY = Offer(
    "multipart/related", "image/jpeg", (JPEG_BASELINE,), default_transfer_syntax=JPEG_BASELINE
)
FRAME_J2K = Offer("multipart/related", "image/jp2", (J2K,))
FRAMES = (FRAME_OCTETS, FRAME_JPEG, FRAME_J2K)

RENDERED = (Offer("image/jpeg"), Offer("image/png"), Offer("image/gif"))
JSON_UTF8 = (Offer("application/dicom+json", params={"charset": "utf-8"}),)


@pytest.mark.parametrize(
    ("accept", "offers", "expected"),
    [
        # instance retrieval
        (None, INSTANCE, (MULTI_DICOM, ELE)),
        ("*/*", INSTANCE, (MULTI_DICOM, ELE)),
        ("multipart/*", INSTANCE, (MULTI_DICOM, ELE)),
        ('multipart/related; type="application/dicom"', INSTANCE, (MULTI_DICOM, ELE)),
        ('multipart/related; type="application/dicom"; transfer-syntax=*', INSTANCE, (MULTI_DICOM, "*")),
        ("multipart/related;type=application/dicom;transfer-syntax=*", INSTANCE, (MULTI_DICOM, "*")),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
            STRICT,
            (STRICT[0], JPEG_BASELINE),
        ),
        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90', STRICT, None),
        ('multipart/related; type="application/dicom"; transfer-syntax=*', STRICT, (STRICT[0], ELE)),
        # open-ended offers take any syntax and leave it to the handler, per instance
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90',
            INSTANCE,
            (MULTI_DICOM, J2K),
        ),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90, '
            'multipart/related; type="application/dicom"; q=0.5',
            STRICT,
            (STRICT[0], ELE),
        ),
        ("application/dicom", INSTANCE, (SINGLE_DICOM, ELE)),
        (
            "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50",
            INSTANCE,
            (SINGLE_DICOM, JPEG_BASELINE),
        ),
        ("application/dicom; q=0.5, multipart/related; type=application/dicom", INSTANCE, (MULTI_DICOM, ELE)),
        ('multipart/related; type="application/octet-stream"', INSTANCE, None),
        ("text/html", INSTANCE, None),
        ("*/*; q=0", INSTANCE, None),
        ("application/dicom; q=0, */*", INSTANCE, (MULTI_DICOM, ELE)),
        ("multipart/related; q=0, */*", INSTANCE, (SINGLE_DICOM, ELE)),
        # metadata
        ("application/json", METADATA, (METADATA[1], None)),
        ("application/dicom+json", METADATA, (METADATA[0], None)),
        ("*/*", METADATA, (METADATA[0], None)),
        ("application/*", METADATA, (METADATA[0], None)),
        ("application/json, application/dicom+json", METADATA, (METADATA[1], None)),
        ("application/json; q=0.9, application/dicom+json", METADATA, (METADATA[0], None)),
        ("application/dicom+json; transfer-syntax=1.2.3", METADATA, (METADATA[0], None)),
        ("application/dicom+xml", METADATA, None),
        ("application/dicom+json; charset=UTF-8", JSON_UTF8, (JSON_UTF8[0], None)),
        ("application/dicom+json; charset=latin1", JSON_UTF8, None),
        # frames
        ('multipart/related; type="application/octet-stream"', FRAMES, (FRAME_OCTETS, ELE)),
        (
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            FRAMES,
            (FRAME_OCTETS, ELE),
        ),
        ('multipart/related; type="image/jpeg"', FRAMES, (FRAME_JPEG, JPEG_LOSSLESS_SV1)),
        (
            'multipart/related; type="image/jpeg"',
            (FRAME_JPEG_LOSSY_ONLY,),
            (FRAME_JPEG_LOSSY_ONLY, JPEG_BASELINE),
        ),
        ('multipart/related; type="image/jpeg"', (FRAME_OCTETS, FRAME_J2K), None),
        (
            'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50',
            FRAMES,
            (FRAME_JPEG, JPEG_BASELINE),
        ),
        ('multipart/related; type="image/*"', FRAMES, (FRAME_JPEG, JPEG_LOSSLESS_SV1)),
        (
            'multipart/related; type="image/jp2", multipart/related; type="image/*"; q=0.4',
            FRAMES,
            (FRAME_J2K, J2K),
        ),
        ('multipart/related; type="image/jls"', FRAMES, None),
        ("multipart/related", FRAMES, (FRAME_OCTETS, ELE)),
        # rendered
        ("image/png", RENDERED, (RENDERED[1], None)),
        ("image/*", RENDERED, (RENDERED[0], None)),
        ("image/*, image/jpeg; q=0", RENDERED, (RENDERED[1], None)),
        ("image/gif; q=0.5, image/png; q=0.8", RENDERED, (RENDERED[1], None)),
        ("*/*; q=0.1, image/gif", RENDERED, (RENDERED[2], None)),
        ("image/png, image/jpeg", RENDERED, (RENDERED[1], None)),
        ("image/*; q=0.5, */*; q=0.9", RENDERED, (RENDERED[0], None)),
        ("*/*, image/png; q=0.1, image/jpeg; q=0.2", RENDERED, (RENDERED[2], None)),
        ("image/webp", RENDERED, None),
        ("", RENDERED, (RENDERED[0], None)),
    ],
)
def test_negotiate(
    accept: str | None, offers: tuple[Offer, ...], expected: tuple[Offer, str | None] | None
) -> None:
    selection = negotiate(accept, offers)
    if expected is None:
        assert selection is None
    else:
        assert selection is not None
        assert (selection.offer, selection.transfer_syntax) == expected
        assert selection.q > 0


def test_negotiate_accepts_parsed_ranges_in_any_order() -> None:
    ranges = list(reversed(parse_accept("image/gif; q=0.5, image/png")))
    selection = negotiate(ranges, RENDERED)
    assert selection is not None and selection.offer is RENDERED[1]
    assert str(selection.media_range) == "image/png"


def test_negotiate_malformed_raises() -> None:
    with pytest.raises(NegotiationError):
        negotiate("application/dicom; q=abc", INSTANCE)


def test_selection_content_types() -> None:
    multi = negotiate('multipart/related; type="application/dicom"; transfer-syntax=*', INSTANCE)
    assert multi is not None and multi.transfer_syntax == ANY_TRANSFER_SYNTAX
    assert multi.content_type(boundary="b1") == 'multipart/related; type="application/dicom"; boundary=b1'
    assert multi.part_content_type(J2K) == f"application/dicom; transfer-syntax={J2K}"
    assert multi.part_content_type() == "application/dicom"
    single = negotiate("application/dicom", INSTANCE)
    assert single is not None
    assert single.content_type() == f"application/dicom; transfer-syntax={ELE}"
    frames = negotiate('multipart/related; type="image/jpeg"', FRAMES)
    assert frames is not None
    assert frames.content_type("x") == 'multipart/related; type="image/jpeg"; boundary=x'
    assert frames.part_content_type() == f"image/jpeg; transfer-syntax={JPEG_LOSSLESS_SV1}"
    meta = negotiate(None, JSON_UTF8)
    assert meta is not None and meta.content_type() == "application/dicom+json; charset=utf-8"


OPEN_DICOM = (
    Offer("multipart/related", "application/dicom", (ANY_TRANSFER_SYNTAX,)),
    Offer("application/dicom", transfer_syntaxes=(ANY_TRANSFER_SYNTAX,)),
)


def test_rank_orders_every_acceptable_choice() -> None:
    """rank() lists what negotiate() would pick first, then the fallbacks a transcoding handler tries."""
    accept = (
        f"application/dicom; transfer-syntax={JPEG_BASELINE}, "
        f"application/dicom; transfer-syntax={J2K}; q=0.5, "
        'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.2'
    )
    ranked = rank(accept, OPEN_DICOM)
    assert [(s.media_type, s.transfer_syntax, s.q) for s in ranked] == [
        ("application/dicom", JPEG_BASELINE, 1.0),
        ("application/dicom", J2K, 0.5),
        ("multipart/related", ANY_TRANSFER_SYNTAX, 0.2),
    ]
    assert negotiate(accept, OPEN_DICOM) == ranked[0]
    # a wildcard proposes each offer's default once; an excluded choice is not listed
    ranked = rank(f'*/*, multipart/related; type="application/dicom"; transfer-syntax={ELE}; q=0', OPEN_DICOM)
    assert [(s.media_type, s.transfer_syntax) for s in ranked] == [("application/dicom", ELE)]
    assert rank("text/html", OPEN_DICOM) == []
    with pytest.raises(NegotiationError):
        rank("application/dicom; q=2", OPEN_DICOM)


@given(st.permutations([1.0, 0.9, 0.5, 0.3, 0.1]))
def test_rank_follows_q_values(qs: list[float]) -> None:
    syntaxes = [ELE, J2K, JPEG_BASELINE, JPEG_LOSSLESS_SV1, "1.2.840.10008.1.2.5"]
    accept = ", ".join(
        f"application/dicom; transfer-syntax={ts}; q={q}" for ts, q in zip(syntaxes, qs, strict=True)
    )
    ranked = rank(accept, OPEN_DICOM)
    assert [s.q for s in ranked] == sorted(qs, reverse=True)
    by_q = dict(zip(qs, syntaxes, strict=True))
    assert [s.transfer_syntax for s in ranked] == [by_q[q] for q in sorted(qs, reverse=True)]


def test_compressed_media_types() -> None:
    assert compressed_media_type("1.2.840.10008.1.2.5") == "image/dicom-rle"
    assert compressed_media_type(JPEG_BASELINE) == "image/jpeg"
    assert compressed_media_type(J2K) == "image/jp2"
    assert compressed_media_type(ELE) is None
    # every media type's default (Table 8.7.3-5 "D" rows) is the first of its syntaxes
    for media_type, syntaxes in COMPRESSED_MEDIA_TYPES.items():
        assert default_transfer_syntax(media_type) == syntaxes[0], media_type
    assert default_transfer_syntax("image/x-dicom-rle") == "1.2.840.10008.1.2.5"


def test_default_transfer_syntaxes() -> None:
    assert default_transfer_syntax("application/dicom") == ELE
    assert default_transfer_syntax("Application/Octet-Stream") == ELE
    assert default_transfer_syntax("image/jpeg") == JPEG_LOSSLESS_SV1
    assert default_transfer_syntax("image/png") is None
    assert (
        Offer("multipart/related", "image/x-custom", ("1.2.3", "1.2.4")).effective_default_transfer_syntax
        == "1.2.3"
    )
    assert Offer("image/png").effective_default_transfer_syntax is None


# ---------------------------------------------------------------------------------------------------
# STOW Content-Type and boundaries


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'multipart/related; type="application/dicom"; boundary=abc',
            StowContentType(b"abc", "application/dicom"),
        ),
        (
            'Multipart/Related; Type="Application/DICOM"; Boundary="simple boundary"',
            StowContentType(b"simple boundary", "application/dicom"),
        ),
        ("multipart/related; boundary=abc", StowContentType(b"abc", "application/dicom")),
        (
            "multipart/related;type=application/dicom;boundary=abc",
            StowContentType(b"abc", "application/dicom"),
        ),
        (
            'multipart/related; type="application/dicom"; boundary="0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"',
            StowContentType(b"0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1", "application/dicom"),
        ),
        ("application/dicom", StowContentType(None, "application/dicom")),
        (
            "application/DICOM; transfer-syntax=1.2.840.10008.1.2.1",
            StowContentType(None, "application/dicom"),
        ),
    ],
)
def test_parse_stow_content_type(header: str, expected: StowContentType) -> None:
    assert parse_stow_content_type(header) == expected


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, UnsupportedMediaTypeError),
        ("", UnsupportedMediaTypeError),
        ("application/json", UnsupportedMediaTypeError),
        ("multipart/form-data; boundary=x", UnsupportedMediaTypeError),
        ('multipart/related; type="application/dicom+xml"; boundary=x', UnsupportedMediaTypeError),
        ('multipart/related; type="not a type"; boundary=x', UnsupportedMediaTypeError),
        ('multipart/related; type="application/dicom"', MultipartError),
        ("multipart/related", MultipartError),
        ('multipart/related; type="application/dicom"; boundary=""', MultipartError),
        ('multipart/related; type="application/dicom', NegotiationError),
        ("multipart/related; boundary=", NegotiationError),
    ],
)
def test_parse_stow_content_type_rejects(header: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_stow_content_type(header)


def test_stow_part_types_are_configurable() -> None:
    kinds = ("application/dicom", "application/dicom+json")
    header = 'multipart/related; type="application/dicom+json"; boundary=b'
    assert parse_stow_content_type(header, part_types=kinds) == (b"b", "application/dicom+json")
    assert (
        parse_stow_content_type("multipart/related; boundary=b", part_types=kinds[::-1]).part_type == kinds[1]
    )


def test_parse_boundary() -> None:
    assert parse_boundary('multipart/related; boundary="a b"') == b"a b"
    assert parse_boundary(MediaType("multipart", "mixed", {"boundary": "xyz"})) == b"xyz"
    for bad in ["application/dicom; boundary=x", "multipart/related", "multipart/related; boundary=", "x"]:
        with pytest.raises(MultipartError):
            parse_boundary(bad)


def test_named_only_offers_need_their_exact_name() -> None:
    """An alias (Offer.named_only) is chosen only by a range naming it, never by a wildcard; 406 messages
    leave it out."""
    offers = [Offer("image/jpeg"), Offer("image/png"), Offer("application/jpeg", named_only=True)]

    def chosen(accept: str) -> str | None:
        selection = negotiate(accept, offers)
        return selection.media_type if selection else None

    assert chosen("application/jpeg") == "application/jpeg"
    assert chosen("application/jpeg;q=0.5, image/png") == "image/png"
    assert chosen("*/*") == "image/jpeg"
    assert chosen("application/*") is None
    assert describe(offers) == "image/jpeg, image/png"
