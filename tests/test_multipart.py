"""Streaming multipart reader/writer: property round-trips, truncation, limits, and third-party bodies."""

from __future__ import annotations

import asyncio
import io
import itertools
import string
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dicomweb.multipart as mp
from dicomweb.multipart import (
    MultipartError,
    Part,
    PartTooLargeError,
    SpooledBody,
    check_boundary,
    iter_parts,
    multipart_length,
    new_boundary,
    write_multipart,
)
from dicomweb.negotiation import parse_stow_content_type

T = TypeVar("T")
_RUNNER = asyncio.Runner()


@pytest.fixture(scope="module", autouse=True)
def _close_runner() -> Iterator[None]:
    yield
    _RUNNER.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine from a sync (hypothesis) test on one reused loop: fast and loop-agnostic."""
    return _RUNNER.run(coro)


async def _aiter(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


def encode(parts: list[tuple[dict[str, str], bytes]], boundary: str) -> bytes:
    async def collect() -> bytes:
        return b"".join([c async for c in write_multipart(_aiter(parts), boundary)])

    return run(collect())


def split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(body), *(c for c in cuts if 0 <= c <= len(body))})
    return [body[a:b] for a, b in itertools.pairwise(points)]


def fixed(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def decode(
    chunks: list[bytes], boundary: str | bytes, **kwargs: int | None
) -> tuple[list[tuple[Part, bytes, bool]], MultipartError | None]:
    """All parts yielded (headers, bytes, in_memory) and the error that ended parsing, if any."""

    async def go() -> tuple[list[tuple[Part, bytes, bool]], MultipartError | None]:
        out: list[tuple[Part, bytes, bool]] = []
        try:
            async for part, body in iter_parts(_aiter(chunks), boundary, **kwargs):  # type: ignore[arg-type]
                with body:
                    out.append((part, body.read(), body.in_memory))
        except MultipartError as exc:
            return out, exc
        return out, None

    return run(go())


# ---------------------------------------------------------------------------------------------------
# strategies

BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"
boundaries = st.one_of(
    # new_boundary()'s shape, drawn by hypothesis: a call to new_boundary() here would make generation
    # non-deterministic (secrets), which hypothesis reports as a flaky strategy on replay
    st.text("0123456789abcdef", min_size=32, max_size=32),
    st.text(BCHARS, min_size=1, max_size=70),
    st.sampled_from(["a", "-", "--", "b d", "simple boundary"]),
)
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
header_names = st.text(TOKEN, min_size=1, max_size=20)
header_values = st.text(string.printable.strip() + " ", max_size=40).map(lambda s: s.strip(" "))


def body_strategy(boundary: str) -> st.SearchStrategy[bytes]:
    """Binary bodies laced with CRLFs, dashes and proper prefixes of the delimiter, minus the delimiter."""
    delim = b"\r\n--" + boundary.encode()
    fragments = st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\r\n", b"\r", b"\n", b"--", b"\r\n--", b"\r\n\r\n", b"-"]),
        st.integers(1, len(delim) - 1).map(lambda k: delim[:k]),
        st.just(b"--" + boundary.encode()),  # boundary not at line start: data
    )
    return st.lists(fragments, max_size=8).map(b"".join).filter(lambda b: delim not in b)


@st.composite
def messages(draw: st.DrawFn, max_parts: int = 5) -> tuple[str, list[tuple[dict[str, str], bytes]]]:
    boundary = draw(boundaries)
    n = draw(st.integers(1, max_parts))
    parts = []
    for _ in range(n):
        names = draw(st.lists(header_names, max_size=4, unique_by=str.lower))
        headers = {name: draw(header_values) for name in names}
        parts.append((headers, draw(body_strategy(boundary))))
    return boundary, parts


def check_parts(got: list[tuple[Part, bytes, bool]], want: list[tuple[dict[str, str], bytes]]) -> None:
    assert len(got) == len(want)
    for i, ((part, data, _), (headers, body)) in enumerate(zip(got, want, strict=True)):
        assert part.index == i
        assert data == body
        assert part.size == len(body)
        assert part.headers == {k.lower(): v for k, v in headers.items()}
        assert part.content_type == part.headers.get("content-type")


# ---------------------------------------------------------------------------------------------------
# round trips


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages(), data=st.data())
def test_roundtrip_random_chunking(
    msg: tuple[str, list[tuple[dict[str, str], bytes]]], data: st.DataObject
) -> None:
    boundary, parts = msg
    body = encode(parts, boundary)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    got, err = decode(split(body, cuts), boundary)
    assert err is None
    check_parts(got, parts)


@settings(max_examples=60, deadline=None)
@given(msg=messages())
def test_roundtrip_one_byte_chunks(msg: tuple[str, list[tuple[dict[str, str], bytes]]]) -> None:
    boundary, parts = msg
    got, err = decode(fixed(encode(parts, boundary), 1), boundary)
    assert err is None
    check_parts(got, parts)


@settings(max_examples=150, deadline=None)
@given(
    msg=messages(),
    preamble=st.binary(max_size=60),
    epilogue=st.binary(max_size=60),
    lead_crlf=st.booleans(),
    data=st.data(),
)
def test_preamble_and_epilogue_ignored(
    msg: tuple[str, list[tuple[dict[str, str], bytes]]],
    preamble: bytes,
    epilogue: bytes,
    lead_crlf: bool,
    data: st.DataObject,
) -> None:
    boundary, parts = msg
    encoded = encode(parts, boundary)
    prefix = preamble + b"\r\n" if preamble or lead_crlf else b""
    full = prefix + encoded + epilogue
    # The preamble must not itself contain the first delimiter (RFC 2046 forbids it).
    first = full.find(b"\r\n--" + boundary.encode())
    assume(first == len(preamble) if prefix else not full.startswith(b"\r\n--" + boundary.encode()))
    assume(not (prefix and full.startswith(b"--" + boundary.encode())))
    cuts = data.draw(st.lists(st.integers(0, len(full)), max_size=10))
    got, err = decode(split(full, cuts), boundary)
    assert err is None
    check_parts(got, parts)


def test_transport_padding_after_boundaries() -> None:
    body = b"--bnd \t \r\n\r\nA\r\n--bnd  \r\nH: v\r\n\r\nB\r\n--bnd--"
    for size in (1, 2, 5, 100):
        got, err = decode(fixed(body, size), "bnd")
        assert err is None
        assert [(p.headers, d) for p, d, _ in got] == [({}, b"A"), ({"h": "v"}, b"B")]


def test_preamble_line_that_only_starts_like_the_boundary() -> None:
    body = b"note\r\n--bndX not a delimiter\r\n--bnd\r\n\r\nA\r\n--bnd--\r\n"
    for size in (1, 3, 100):
        got, err = decode(fixed(body, size), "bnd")
        assert err is None and [d for _, d, _ in got] == [b"A"]


def test_boundary_lookalikes_inside_a_part_are_data() -> None:
    # Not RFC-valid (the delimiter must not occur in a body) but python-multipart treats these as data.
    inner = b"A\r\n--bndX\r\n--bnd-X\r\n--bnd\rX"
    body = b"--bnd\r\n\r\n" + inner + b"\r\n--bnd--"
    for size in (1, 2, 7, 100):
        got, err = decode(fixed(body, size), "bnd")
        assert err is None and [d for _, d, _ in got] == [inner]


def test_repeated_header_is_joined() -> None:
    got, err = decode([b"--b\r\nA: 1\r\na: 2\r\n\r\nx\r\n--b--"], "b")
    assert err is None and got[0][0].headers == {"a": "1, 2"}


def test_no_parts() -> None:
    assert decode([b"--b--\r\n"], "b") == ([], None)


# ---------------------------------------------------------------------------------------------------
# errors


@settings(max_examples=25, deadline=None)
@given(msg=messages(max_parts=3), size=st.sampled_from([1, 3, 64, 1 << 16]))
def test_truncation_at_every_cut_point(
    msg: tuple[str, list[tuple[dict[str, str], bytes]]], size: int
) -> None:
    boundary, parts = msg
    body = encode(parts, boundary)
    assume(len(body) <= 600)  # quadratic in the body length; small bodies cover every state anyway
    assert body.endswith(b"--\r\n")
    for cut in range(len(body) - 2):  # the epilogue CRLF after "--B--" is optional
        got, err = decode(fixed(body[:cut], size), boundary)
        assert isinstance(err, MultipartError), cut
        # Every part completed before the cut is still delivered, intact and in order.
        assert len(got) < len(parts)
        for (part, data, _), (headers, want) in zip(got, parts, strict=False):
            assert data == want and part.headers == {k.lower(): v for k, v in headers.items()}
    for cut in (len(body) - 2, len(body) - 1, len(body)):
        got, err = decode(fixed(body[:cut], size), boundary)
        assert err is None and len(got) == len(parts)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no multipart here at all",
        b"--other\r\n\r\nA\r\n--other--",
        b"--bndX\r\n\r\nA\r\n--bndX--",  # boundary only as a prefix of a longer one
    ],
)
def test_boundary_not_found(body: bytes) -> None:
    got, err = decode([body], "bnd")
    assert got == [] and isinstance(err, MultipartError) and not isinstance(err, PartTooLargeError)
    assert "not found" in str(err)


@pytest.mark.parametrize(
    "body",
    [
        b"--bnd\r\nbad header\r\n\r\nA\r\n--bnd--",
        b"--bnd\r\n: empty-name\r\n\r\nA\r\n--bnd--",
        b"--bnd\r\nA: b\rX\r\n\r\nA\r\n--bnd--",
        b"--bnd\rX",
    ],
)
def test_malformed_part_headers(body: bytes) -> None:
    for size in (1, 100):
        _, err = decode(fixed(body, size), "bnd")
        assert isinstance(err, MultipartError)


def test_giant_preamble_fails_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mp, "MAX_PREAMBLE", 1000)
    chunks_seen = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal chunks_seen
        while True:
            chunks_seen += 1
            yield b"x" * 100

    async def go() -> None:
        async for _ in iter_parts(endless(), "bnd"):
            pass

    with pytest.raises(MultipartError, match="no multipart boundary"):
        run(go())
    assert chunks_seen < 20


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_part_too_large(size: int) -> None:
    body = encode([({}, b"x" * 10), ({}, b"y" * 11), ({}, b"z")], "bnd")
    got, err = decode(fixed(body, size), "bnd", max_part_size=10)
    assert isinstance(err, PartTooLargeError)
    assert err.limit == 10 and err.part_index == 1
    assert [d for _, d, _ in got] == [b"x" * 10]  # parts before the offending one are delivered
    got, err = decode(fixed(body, size), "bnd", max_part_size=11)
    assert err is None and [d for _, d, _ in got] == [b"x" * 10, b"y" * 11, b"z"]


def test_invalid_boundary_rejected() -> None:
    for bad in ["", "x" * 257, "trailing ", "cr\r\nlf", "tab\there"]:
        with pytest.raises(MultipartError):
            check_boundary(bad)
    assert check_boundary("simple boundary") == b"simple boundary"
    assert check_boundary(b"x" * 256) == b"x" * 256


# ---------------------------------------------------------------------------------------------------
# spooling


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=4), chunk=st.sampled_from([1, 100, 4096]))
@example(sizes=[999, 1000, 1001], chunk=100).via("threshold edges")
@example(sizes=[1000, 1001], chunk=1).via("threshold edges, byte by byte")
def test_spooling_above_threshold(sizes: list[int], chunk: int) -> None:
    threshold = 1000
    parts = [({"Content-Type": "application/dicom"}, bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    body = encode(parts, "bnd")
    if chunk == 1 and len(body) > 4000:
        chunk = 3
    got, err = decode(fixed(body, chunk), "bnd", spool_threshold=threshold)
    assert err is None
    check_parts(got, parts)
    for (_, _, in_memory), n in zip(got, sizes, strict=True):
        assert in_memory == (n <= threshold)


def test_spooled_body_file_interface(tmp_path: object) -> None:
    payload = bytes(range(256)) * 20
    for threshold in (10_000, 100):
        body = SpooledBody(threshold)
        for i in range(0, len(payload), 300):
            body.write(memoryview(payload)[i : i + 300])
        body.rewind()
        assert body.in_memory == (threshold >= len(payload)) and body.size == len(payload)
        assert body.read(10) == payload[:10] and body.tell() == 10
        buf = bytearray(5)
        assert body.readinto(buf) == 5 and bytes(buf) == payload[10:15]
        assert body.getvalue() == payload and body.tell() == 15
        assert body.seek(-3, io.SEEK_END) == len(payload) - 3 and body.read() == payload[-3:]
        assert b"".join(body.chunks(1000)) == payload
        with body:
            assert not body.closed
        assert body.closed


def _dicom_bytes(marker: str, pixel_bytes: int = 0) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = marker
    if pixel_bytes:
        ds.Rows, ds.Columns = 1, pixel_bytes
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = b"\x01" * pixel_bytes
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_pydicom_reads_parts_in_memory_and_spooled() -> None:
    blobs = [_dicom_bytes("SMALL^ONE"), _dicom_bytes("BIG^TWO", pixel_bytes=5000)]
    body = encode([({"Content-Type": "application/dicom"}, b) for b in blobs], "bnd")

    async def go() -> list[tuple[str, bool]]:
        seen = []
        async for _, part_body in iter_parts(_aiter(fixed(body, 1024)), "bnd", spool_threshold=2000):
            with part_body:
                ds = pydicom.dcmread(part_body)
                seen.append((str(ds.PatientName), part_body.in_memory))
        return seen

    assert run(go()) == [("SMALL^ONE", True), ("BIG^TWO", False)]


# ---------------------------------------------------------------------------------------------------
# interop with bodies we did not write

RFC2046_EXAMPLE = (
    b"This is the preamble.  It is to be ignored, though it\r\n"
    b"is a handy place for composition agents to include an\r\n"
    b"explanatory note to non-MIME conformant readers.\r\n"
    b"\r\n"
    b"--simple boundary\r\n"
    b"\r\n"
    b"This is implicitly typed plain US-ASCII text.\r\n"
    b"It does NOT end with a linebreak.\r\n"
    b"--simple boundary\r\n"
    b"Content-type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"This is explicitly typed plain US-ASCII text.\r\n"
    b"It DOES end with a linebreak.\r\n"
    b"\r\n"
    b"--simple boundary--\r\n"
    b"\r\n"
    b"This is the epilogue.  It is also to be ignored.\r\n"
)

RFC2387_STYLE_EXAMPLE = (
    b"--example-1\r\n"
    b"Content-Type: Application/X-FixedRecord\r\n"
    b"Content-ID: <950120.aaCC@XIson.com>\r\n"
    b"\r\n"
    b"25\r\n10\r\n34\r\n10\r\n25\r\n21\r\n26\r\n10\r\n"
    b"--example-1\r\n"
    b"Content-Type: Application/octet-stream\r\n"
    b"Content-Description: The fixed length records\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-ID: <950120.aaCB@XIson.com>\r\n"
    b"\r\n"
    b"T2xkIE1hY0RvbmFsZCBoYWQgYSBmYXJtCkUgSS\r\n"
    b"BFIEkgTwpBbmQgb24gaGlzIGZhcm0gaGUgaGFk\r\n"
    b"\r\n"
    b"--example-1--\r\n"
)


@pytest.mark.parametrize("size", [1, 5, 64, 1 << 16])
def test_rfc2046_example(size: int) -> None:
    got, err = decode(fixed(RFC2046_EXAMPLE, size), "simple boundary")
    assert err is None
    assert [(p.headers, d) for p, d, _ in got] == [
        ({}, b"This is implicitly typed plain US-ASCII text.\r\nIt does NOT end with a linebreak."),
        (
            {"content-type": "text/plain; charset=us-ascii"},
            b"This is explicitly typed plain US-ASCII text.\r\nIt DOES end with a linebreak.\r\n",
        ),
    ]


@pytest.mark.parametrize("size", [1, 5, 64, 1 << 16])
def test_rfc2387_style_example(size: int) -> None:
    got, err = decode(fixed(RFC2387_STYLE_EXAMPLE, size), "example-1")
    assert err is None
    assert [p.content_type for p, _, _ in got] == ["Application/X-FixedRecord", "Application/octet-stream"]
    assert got[0][0].headers["content-id"] == "<950120.aaCC@XIson.com>"
    assert got[0][1] == b"25\r\n10\r\n34\r\n10\r\n25\r\n21\r\n26\r\n10"
    assert got[1][1].endswith(b"aGFk\r\n")
    assert got[1][0].headers["content-transfer-encoding"] == "base64"


def test_dicomweb_client_stow_body() -> None:
    """dicomweb-client's own STOW encoder (leading CRLF, quoted boundary, no trailing CRLF)."""
    content_type = (
        'multipart/related; type="application/dicom"; boundary="0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"'
    )
    blobs = [_dicom_bytes("A^B"), b"", _dicom_bytes("C^D", pixel_bytes=3000)]
    body = DICOMwebClient._encode_multipart_message(blobs, content_type)
    assert body.startswith(b"\r\n--") and not body.endswith(b"\r\n")
    boundary, part_type = parse_stow_content_type(content_type)
    assert part_type == "application/dicom" and boundary is not None
    for size in (1, 333, 1 << 16):
        got, err = decode(fixed(body, size), boundary)
        assert err is None
        assert [d for _, d, _ in got] == blobs
        assert all(p.content_type == "application/dicom" for p, _, _ in got)


def test_writer_output_decodes_with_dicomweb_client() -> None:
    boundary = new_boundary()
    blobs = [b"first\r\n--", b"\x00" * 100_000, b"third"]
    parts = [
        ({"Content-Type": "application/dicom", "Content-Location": f"/x/{i}"}, b) for i, b in enumerate(blobs)
    ]
    response = requests.Response()
    response.status_code = 200
    response.headers["content-type"] = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response._content = encode(parts, boundary)
    client = DICOMwebClient(url="http://127.0.0.1:9/dicomweb")
    assert list(client._decode_multipart_message(response, stream=False)) == blobs


# ---------------------------------------------------------------------------------------------------
# writer


def test_writer_streams_without_copying_large_bodies() -> None:
    big = b"\xab" * (1 << 20)

    async def pieces() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"def"

    async def collect() -> list[bytes]:
        parts = _aiter([({"Content-Type": "application/dicom"}, big), ({"X-A": "1"}, pieces())])
        return [c async for c in write_multipart(parts, "bnd")]

    chunks = run(collect())
    assert any(c is big for c in chunks)  # yielded as-is, not joined
    assert max(len(c) for c in chunks if c is not big) < 200
    got, err = decode(chunks, "bnd")
    assert err is None and [d for _, d, _ in got] == [big, b"abcdef"]


@given(
    parts=st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(["Content-Type", "X-A"]), st.text("ab; =", max_size=9)),
            st.binary(max_size=300) | st.integers(65_000, 70_000).map(lambda n: b"x" * n),
        ),
        min_size=1,
        max_size=6,
    ),
    flush_at=st.sampled_from([1, 100, 1 << 20]),
)
def test_multipart_length_is_exact(parts: list[tuple[dict[str, str], bytes]], flush_at: int) -> None:
    """The declared length of a body equals what the writer makes of it, whatever it joins."""

    async def collect() -> bytes:
        chunks = write_multipart(_aiter(parts), "bnd-1", flush_at=flush_at)
        return b"".join([c async for c in chunks])

    body = run(collect())
    assert multipart_length([(h, len(b)) for h, b in parts], "bnd-1") == len(body)
    got, err = decode([body], "bnd-1")
    assert err is None and [d for _, d, _ in got] == [b for _, b in parts]


def test_writer_exact_encoding() -> None:
    body = encode([({"Content-Type": "a/b"}, b"1"), ({}, b"")], "B")
    assert body == b"--B\r\nContent-Type: a/b\r\n\r\n1\r\n--B\r\n\r\n\r\n--B--\r\n"
    assert encode([], "B") == b"--B--\r\n"


@pytest.mark.parametrize(
    "headers", [{"X": "a\r\nInjected: yes"}, {"Bad Name": "x"}, {"": "x"}, {"X": "caf\u00e9\u2603"}]
)
def test_writer_rejects_bad_headers(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode([(headers, b"x")], "bnd")


def test_writer_rejects_bad_boundary() -> None:
    with pytest.raises(MultipartError):
        encode([({}, b"x")], "bad\r\n")


def test_new_boundary_is_random_and_valid() -> None:
    seen = {new_boundary() for _ in range(100)}
    assert len(seen) == 100
    assert all(check_boundary(b) and len(b) <= 70 for b in seen)
