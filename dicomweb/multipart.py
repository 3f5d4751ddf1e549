"""Streaming multipart/related (RFC 2046, RFC 2387) reader and writer for STOW-RS and WADO-RS.

The reader sits on python-multipart's callback parser, which scans for the delimiter with ``bytes.find``
and hands back ``(data, start, end)`` slices; each slice goes straight into the part's spool, so a
multi-gigabyte STOW body is never held whole: at most one part in memory (parts above the spool
threshold live in an anonymous temporary file) plus one network chunk.

Content-Type header parsing (``parse_boundary``, ``parse_stow_content_type``) lives in
:mod:`dicomweb.negotiation` with the rest of the media-type grammar; this module only validates the
boundary itself (:func:`check_boundary`) so the two layers do not import each other in a cycle.
"""

from __future__ import annotations

import io
import re
import secrets
import tempfile
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Final, TypeAlias

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState

__all__ = [
    "MultipartError",
    "Part",
    "PartTooLargeError",
    "SpooledBody",
    "check_boundary",
    "closing",
    "iter_parts",
    "multipart_length",
    "new_boundary",
    "part_head",
    "write_multipart",
]

DEFAULT_SPOOL_THRESHOLD: Final = 1 << 20
# RFC 2046 caps boundaries at 70 characters; python-multipart accepts 256, and we accept what it
# accepts because some clients overshoot and rejecting their uploads helps nobody.
MAX_BOUNDARY_LENGTH: Final = 256
# Real preambles are a sentence ("This is a multi-part message in MIME format."); a body that shows no
# delimiter within this many bytes is not multipart, and failing early beats draining gigabytes.
MAX_PREAMBLE: Final = 1 << 20
# Transport padding (whitespace between the boundary and its CRLF) longer than this is not padding.
_MAX_PADDING: Final = 1024
# DICOMweb parts carry a handful of headers (Content-Type, Content-Location, Content-ID, Content-Length,
# Content-Description ...); python-multipart's default of 8 is tight for that.
MAX_PART_HEADERS: Final = 32
# Writer: a part body up to this size is sent in the same chunk as its headers (one ASGI send instead
# of two); larger bodies are yielded as-is so they are never copied.
_COALESCE_LIMIT: Final = 64 * 1024

BytesLike: TypeAlias = bytes | bytearray | memoryview

_BOUNDARY_RE: Final = re.compile(rb"[\x20-\x7e]*[\x21-\x7e]")
_HEADER_NAME_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class MultipartError(ValueError):
    """The body is not well-formed multipart: no/unterminated boundary, bad part headers, truncation."""


class PartTooLargeError(MultipartError):
    """A part exceeded ``max_part_size``; a distinct type so the STOW handler can answer 413."""

    def __init__(self, limit: int, part_index: int) -> None:
        super().__init__(f"part {part_index} exceeds the maximum part size of {limit} bytes")
        self.limit = limit
        self.part_index = part_index


def check_boundary(boundary: bytes | str) -> bytes:
    """Validate a boundary and return it as bytes (one rule for the reader, writer and header parser).

    Accepts 1..256 printable ASCII characters not ending in a space (RFC 2046 bchars are a subset; the
    length limit is python-multipart's rather than RFC 2046's 70 so that over-long client boundaries
    still work).
    """
    raw = boundary.encode("latin-1") if isinstance(boundary, str) else bytes(boundary)
    if not 1 <= len(raw) <= MAX_BOUNDARY_LENGTH or _BOUNDARY_RE.fullmatch(raw) is None:
        raise MultipartError(f"invalid multipart boundary {raw!r}")
    return raw


def new_boundary() -> str:
    """A random boundary (32 hex digits): 128 bits make a collision with body bytes negligible."""
    return secrets.token_hex(16)


class SpooledBody:
    """The bytes of one part: in memory up to ``threshold`` bytes, in an anonymous temp file beyond.

    Behaves like a read-only binary file (``read``/``readinto``/``seek``/``tell``) positioned at 0 once
    the part is complete, so ``pydicom.dcmread(body)`` works on it directly. The consumer owns it after
    :func:`iter_parts` yields it and should ``close()`` it (or use ``with``) to release the temp file.
    """

    __slots__ = ("_file", "_size", "_spool_dir", "_spooled", "_threshold")

    def __init__(self, threshold: int = DEFAULT_SPOOL_THRESHOLD, *, spool_dir: str | None = None) -> None:
        self._file: BinaryIO = io.BytesIO()
        self._threshold = threshold
        self._spool_dir = spool_dir
        self._size = 0
        self._spooled = False

    # -- writing (used by the reader) -------------------------------------------------------------
    def write(self, data: BytesLike) -> int:
        """Append bytes, moving to disk first if they would take the in-memory copy past the threshold."""
        n = len(data)
        if not self._spooled and self._size + n > self._threshold:
            self._rollover()
        self._file.write(data)
        self._size += n
        return n

    def _rollover(self) -> None:
        disk = tempfile.TemporaryFile(dir=self._spool_dir)  # closed by close()
        mem = self._file
        assert isinstance(mem, io.BytesIO)
        with mem.getbuffer() as view:
            disk.write(view)
        mem.close()
        self._file = disk
        self._spooled = True

    def rewind(self) -> None:
        """Position at the first byte (done by the reader when the part is complete)."""
        self._file.seek(0)

    # -- inspection ----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Length of the part body in bytes."""
        return self._size

    @property
    def in_memory(self) -> bool:
        """False once the body has been spooled to a temporary file."""
        return not self._spooled

    @property
    def closed(self) -> bool:
        return self._file.closed

    # -- file-like reading ---------------------------------------------------------------------------
    def read(self, size: int | None = -1) -> bytes:
        return self._file.read(-1 if size is None else size)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        return self._file.readinto(buffer)  # type: ignore[attr-defined,no-any-return]

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def getvalue(self) -> bytes:
        """The whole body as bytes (no copy-back for in-memory parts; reads the file for spooled ones)."""
        if isinstance(self._file, io.BytesIO):
            return self._file.getvalue()
        pos = self._file.tell()
        self._file.seek(0)
        try:
            return self._file.read()
        finally:
            self._file.seek(pos)

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Iterate over the body from the start in pieces of at most ``chunk_size`` (e.g. for upload)."""
        self._file.seek(0)
        while piece := self._file.read(chunk_size):
            yield piece

    def close(self) -> None:
        """Release the memory or temporary file; idempotent."""
        self._file.close()

    def __enter__(self) -> SpooledBody:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else "disk"
        return f"<SpooledBody {self._size} bytes in {where}>"


@dataclass(slots=True)
class Part:
    """Headers of one body part, in message order (``index`` from 0)."""

    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    content_type: str | None  # raw Content-Type value, None if the part has none
    index: int
    size: int = 0  # body length in bytes, final once the part is yielded

    @property
    def content_location(self) -> str | None:
        return self.headers.get("content-location")


class _Reader:
    """Push-style parser state: ``feed`` chunks, collect completed parts in ``ready``."""

    def __init__(
        self, boundary: bytes, max_part_size: int | None, spool_threshold: int, spool_dir: str | None
    ) -> None:
        self._dash_boundary = b"--" + boundary
        self._crlf_dash_boundary = b"\r\n" + self._dash_boundary
        self._max_part_size = max_part_size
        self._spool_threshold = spool_threshold
        self._spool_dir = spool_dir
        self.ready: deque[tuple[Part, SpooledBody]] = deque()
        # Preamble scanning state (python-multipart wants the body to start at the first delimiter).
        self._preamble = bytearray()
        self._at_body_start = True
        self._skipped = 0
        self._parser: MultipartParser | None = None
        # Per-part state.
        self._field: list[bytes] = []
        self._value: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._part: Part | None = None
        self._body: SpooledBody | None = None
        self._count = 0
        self.done = False

    def _new_parser(self) -> MultipartParser:
        return MultipartParser(
            self._dash_boundary[2:],
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=MAX_PART_HEADERS,
        )

    # -- feeding --------------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self.done:
            return  # epilogue: ignored (RFC 2046 5.1.1)
        if self._parser is None:
            start = self._scan_preamble(chunk)
            if start is None:
                return
            self._parser = self._new_parser()
            chunk = start
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise MultipartError(str(exc)) from exc

    def _scan_preamble(self, chunk: bytes) -> bytes | None:
        """Buffer until the first delimiter line; return the body from it (padding normalised) or None.

        RFC 2046 lets a preamble precede the first ``--boundary`` (which then starts a line) and lets
        transport padding follow it; python-multipart supports neither, so both are stripped here.
        """
        buf = self._preamble
        buf += chunk
        dash = self._dash_boundary
        pos = 0
        while True:
            if pos == 0 and self._at_body_start and buf.startswith(dash):
                i = 0
            else:
                i = buf.find(self._crlf_dash_boundary, pos)
                if i < 0:
                    # Keep just enough tail for a delimiter straddling the next chunk.
                    self._trim(max(0, len(buf) - len(self._crlf_dash_boundary) + 1))
                    return None
                i += 2
            j = i + len(dash)
            k = j
            n = len(buf)
            while k < n and k - j <= _MAX_PADDING and buf[k] in b" \t":
                k += 1
            if k - j > _MAX_PADDING:
                pos = j
                continue
            if k + 2 > n:
                self._trim(max(0, i - 2))  # undecided: wait for more bytes
                return None
            if buf[k : k + 2] == b"\r\n":
                rest = dash + b"\r\n" + buf[k + 2 :]
            elif k == j and buf[j : j + 2] == b"--":
                rest = bytes(buf[i:])
            else:
                pos = j  # "--boundaryX...": a preamble line that merely starts like the boundary
                continue
            self._preamble = bytearray()
            return bytes(rest)

    def _trim(self, keep_from: int) -> None:
        if keep_from:
            del self._preamble[:keep_from]
            self._at_body_start = False
            self._skipped += keep_from
            if self._skipped > MAX_PREAMBLE:
                raise MultipartError(f"no multipart boundary within the first {MAX_PREAMBLE} bytes")

    def finish(self) -> None:
        """Called at end of input: anything short of the closing delimiter is an error."""
        if self._parser is None:
            raise MultipartError("multipart boundary not found in body")
        if not self.done or self._parser.state != MultipartState.END:
            raise MultipartError("multipart body truncated before the closing boundary")

    def close(self) -> None:
        """Release bodies that will never be handed out (error, or consumer stopped early)."""
        if self._body is not None:
            self._body.close()
            self._body = None
        while self.ready:
            self.ready.popleft()[1].close()

    # -- python-multipart callbacks --------------------------------------------------------------------
    def _on_part_begin(self) -> None:
        self._headers = {}
        self._field = []
        self._value = []

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field.append(data[start:end])

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.append(data[start:end])

    def _on_header_end(self) -> None:
        name = b"".join(self._field).decode("ascii").lower()  # python-multipart checked token chars
        value = b"".join(self._value).decode("latin-1").strip(" \t")
        self._field = []
        self._value = []
        old = self._headers.get(name)
        self._headers[name] = value if old is None else f"{old}, {value}"

    def _on_headers_finished(self) -> None:
        self._part = Part(self._headers, self._headers.get("content-type"), self._count)
        self._body = SpooledBody(self._spool_threshold, spool_dir=self._spool_dir)
        self._count += 1

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        body = self._body
        if body is None:  # pragma: no cover - python-multipart emits data only after headers
            raise MultipartError("part data before part headers")
        limit = self._max_part_size
        if limit is not None and body.size + (end - start) > limit:
            raise PartTooLargeError(limit, self._count - 1)
        body.write(memoryview(data)[start:end])

    def _on_part_end(self) -> None:
        part, body = self._part, self._body
        if part is None or body is None:  # pragma: no cover - defensive
            raise MultipartError("part ended before its headers")
        body.rewind()
        part.size = body.size
        self.ready.append((part, body))
        self._part = None
        self._body = None

    def _on_end(self) -> None:
        self.done = True


async def iter_parts(
    chunks: AsyncIterable[bytes],
    boundary: bytes | str,
    *,
    max_part_size: int | None = None,
    spool_threshold: int = DEFAULT_SPOOL_THRESHOLD,
    spool_dir: str | None = None,
) -> AsyncIterator[tuple[Part, SpooledBody]]:
    """Parse a streaming multipart body, yielding each part once its closing delimiter has been seen.

    Every part completed before an error is yielded before the error is raised, whatever the chunking,
    so behaviour does not depend on how the network split the body. Raises :class:`MultipartError` if
    the boundary never appears, the body is malformed or ends before the closing delimiter, and
    :class:`PartTooLargeError` as soon as a part grows past ``max_part_size``. Preamble and epilogue are
    ignored. Yielded bodies belong to the caller (close them); bodies not yet yielded when the
    generator is closed or fails are released here.
    """
    reader = _Reader(check_boundary(boundary), max_part_size, spool_threshold, spool_dir)
    ready = reader.ready
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            try:
                reader.feed(chunk if type(chunk) is bytes else bytes(chunk))
            except MultipartError:
                while ready:
                    yield ready.popleft()
                raise
            while ready:
                yield ready.popleft()
        reader.finish()
    finally:
        reader.close()


def _encode_headers(headers: dict[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if _HEADER_NAME_RE.fullmatch(name) is None:
            raise ValueError(f"invalid part header name {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"part header {name!r} contains a line break")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


def part_head(headers: dict[str, str], boundary: bytes, *, first: bool) -> bytes:
    """What goes before a part's body: the delimiter line (after the CRLF that ends the previous part's
    body, unless it is the first part) and the part's headers. Callers that frame parts themselves (series
    retrieval reads a batch of bodies into one buffer behind their heads) use it with `closing`."""
    return (b"--" if first else b"\r\n--") + boundary + b"\r\n" + _encode_headers(headers) + b"\r\n"


def closing(boundary: bytes, *, empty: bool = False) -> bytes:
    """The close delimiter that ends a multipart body (`empty`: no part came before it)."""
    return (b"--" if empty else b"\r\n--") + boundary + b"--\r\n"


def multipart_length(parts: Iterable[tuple[dict[str, str], int]], boundary: str) -> int:
    """The exact length of what write_multipart makes of parts with these headers and body lengths, so a
    response whose parts are all known in advance can declare it (Content-Length: no chunked framing,
    which costs a copy of every byte in the server, and a client sees its progress)."""
    raw = check_boundary(boundary)
    total = 0
    for n, (headers, length) in enumerate(parts):
        total += len(part_head(headers, raw, first=n == 0)) + length
    return total + len(closing(raw, empty=total == 0))


async def write_multipart(
    parts: AsyncIterable[tuple[dict[str, str], AsyncIterable[bytes] | bytes]],
    boundary: str,
    *,
    flush_at: int = _COALESCE_LIMIT,
) -> AsyncIterator[bytes]:
    """Encode parts as a multipart body, streaming: one part's headers/bytes at a time, never the whole.

    Output is ``--B CRLF headers CRLF body (CRLF --B CRLF headers CRLF body)* CRLF --B-- CRLF``. Part
    bodies are not scanned for the boundary (a :func:`new_boundary` value will not occur by chance).
    With no parts the output is just the closing delimiter, which RFC 2046 does not strictly allow, so
    callers should answer an empty result some other way (e.g. 404/204).

    Small bodies (up to 64 KiB) are joined with their headers and with the following parts into chunks of
    about `flush_at` bytes: every chunk is one ASGI send through the middleware and one socket write, which
    cost more than copying a small body. A caller whose parts come quickly (a series read in batches)
    raises it; one that makes each part slowly keeps it small so that bytes leave as they are made.
    Larger bodies are yielded as they are, never copied.
    """
    raw = check_boundary(boundary)
    first = True
    pending: list[bytes] = []
    pending_size = 0
    async for headers, body in parts:
        pending.append(part_head(headers, raw, first=first))
        first = False
        if isinstance(body, bytes | bytearray | memoryview) and len(body) <= _COALESCE_LIMIT:
            pending.append(bytes(body) if not isinstance(body, bytes) else body)
            pending_size += len(body) + 100
            if pending_size >= flush_at:
                yield b"".join(pending)
                pending, pending_size = [], 0
            continue
        yield b"".join(pending)
        pending, pending_size = [], 0
        if isinstance(body, bytes | bytearray | memoryview):
            yield body if isinstance(body, bytes) else bytes(body)
        else:
            async for piece in body:
                if piece:
                    yield piece
    pending.append(closing(raw, empty=first))
    yield b"".join(pending)
