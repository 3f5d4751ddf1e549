"""An HL7 v2 message as received: its character set, its header, its segments, and the acknowledgement that
answers it (HL7 v2.5 chapter 2, original acknowledgement mode).

Parsing is hl7apy's (`hl7apy.parser.parse_message`: segments, fields and repetitions, the delimiters of
MSH-1/MSH-2, the version's segment definitions); the handlers read values by position (`value`), split into
components and unescaped here. This module also decides what a message must have before anything reads it
(an MSH with a message type, a control ID, a supported version and processing ID) and turns every refusal
into an `HL7Error` that says what the ACK says: AR or AE, the error code of HL7 table 0357, the reason, and
where.

(python-hl7, the other parser the project considered, is imported as `hl7`: the name of this package.)
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from hl7apy import SUPPORTED_LIBRARIES
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

# HL7 table 0008: Application Accept, Error, Reject
AA, AE, AR = "AA", "AE", "AR"

# HL7 table 0357, message error condition codes
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_PROCESSING_ID = 202
UNSUPPORTED_VERSION_ID = 203
UNKNOWN_KEY_IDENTIFIER = 204
APPLICATION_INTERNAL_ERROR = 207

# Versions read: those hl7apy has definitions of, from 2.3 on (the segments and fields read here are the
# same in all of them; 2.5 adds TQ1, read beside ORC-7). Tested with 2.3.1, 2.4, 2.5 and 2.5.1 messages.
VERSIONS = tuple(sorted(v for v in SUPPORTED_LIBRARIES if v >= "2.3"))
_PROCESSING_IDS = frozenset({"P", "T", "D"})  # production, training, debugging (HL7 table 0103)

# MSH-18 character sets (HL7 table 0211) and their codecs. Without MSH-18 HL7 says ASCII; senders that leave
# it out often send UTF-8 or Latin-1 all the same, so an undeclared message is read as UTF-8 when it is
# valid UTF-8, otherwise as ISO 8859-1.
CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    "ISO IR192": "utf-8",
}


class HL7Error(Exception):
    """A message refused (AR) or that failed (AE): what its ACK carries."""

    def __init__(self, ack: str, code: int, text: str, location: str = "") -> None:
        super().__init__(text)
        self.ack = ack
        self.code = code
        self.text = text
        self.location = location  # ERR-2 / ERR-1: segment^sequence^field, e.g. "PID^1^3"


@dataclass(frozen=True, slots=True)
class Header:
    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_code: str  # MSH-9.1: ADT, ORM, OMI
    trigger_event: str  # MSH-9.2: A08, O01
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12
    charset: str  # MSH-18 as sent

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger_event}"


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    codec: str = "latin-1"  # of the message's text: the bytes of a \Xhh\ escape are in it


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment: its ID and each field's repetitions as sent (ER7 text, still escaped)."""

    name: str
    fields: dict[int, list[str]]
    delimiters: Delimiters


@dataclass(frozen=True, slots=True)
class Received:
    """A parsed message: its header, its segments in order, and the codec its text was read with."""

    header: Header
    segments: list[Segment]
    codec: str


def _msh_fields(text: str) -> tuple[str, list[str]] | None:
    """(field separator, MSH fields with MSH-n at index n-1) of a message's first segment; None when it does
    not start with one."""
    first = re.split(r"[\r\n]", text.lstrip("\r\n \t"), maxsplit=1)[0]
    if not first.startswith("MSH") or len(first) < 8 or first[3].isalnum() or first[3] in " \t\r\n":
        return None
    sep = first[3]
    return sep, [sep, *first.split(sep)[1:]]


def _header(text: str) -> Header | None:
    found = _msh_fields(text)
    if found is None:
        return None
    sep, fields = found
    enc = fields[1] if len(fields) > 1 and len(fields[1]) >= 4 and sep not in fields[1] else "^~\\&"

    def f(n: int, component: int = 1) -> str:
        parts = fields[n - 1].split(enc[0]) if len(fields) >= n else []
        return parts[component - 1].strip() if len(parts) >= component else ""

    encoding = fields[1] if len(fields) > 1 else ""
    return Header(sep, encoding, f(3), f(4), f(5), f(6), f(9), f(9, 2), f(10), f(11), f(12), f(18))


def header_of(raw: bytes) -> Header | None:
    """The header of a message that could not be parsed whole, for its ACK and its log row; None when even
    the MSH segment cannot be read."""
    try:
        codec = codec_for(raw)
    except HL7Error:
        codec = "latin-1"
    # without NULs: the header goes into the message's log row and audit record (PostgreSQL text)
    return _header(raw.decode(codec, "replace").replace("\x00", ""))


def codec_for(raw: bytes) -> str:
    """The codec of a message's text, from its MSH-18 (AR for a character set this archive cannot read)."""
    found = _msh_fields(raw.decode("latin-1"))
    fields = found[1] if found else []
    declared = fields[17].split("~")[0].split("^")[0].strip() if len(fields) > 17 else ""
    if not declared:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "latin-1"
        return "utf-8"
    codec = CHARSETS.get(declared.upper())
    if codec is None:
        raise HL7Error(
            AR, TABLE_VALUE_NOT_FOUND, f"character set {declared!r} (MSH-18) is not supported", "MSH^1^18"
        )
    return codec


def parse(raw: bytes, read: Callable[[Header], Collection[str] | None] | None = None) -> Received:
    """Decode and parse a message and check its header; HL7Error when it must be refused.

    With `read`, only the segments it names for the message's header (and MSH) are parsed and returned:
    hl7apy costs about 1 ms of CPU per segment, and segments nobody reads (EVN, NTE, OBX, AL1 ...) need not
    pass its checks."""
    codec = codec_for(raw)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise HL7Error(
            AR, DATA_TYPE_ERROR, f"the message is not valid {codec} text (MSH-18): {exc}", "MSH^1^18"
        ) from exc
    # segments end with CR; senders on other platforms end them with LF or CRLF
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r \t\x00")
    header = _header(text)
    if header is None:
        raise HL7Error(AR, SEGMENT_SEQUENCE_ERROR, "the message does not start with an MSH segment", "MSH")
    # a NUL is not HL7 text, and no DICOM or PostgreSQL text holds it (padding at the ends is cut above)
    if (at := text.find("\x00")) >= 0:
        name = text[text.rfind("\r", 0, at) + 1 :][:3]
        where = name if name.isalnum() else ""
        said = f"the {where} segment" if where else "the message"
        raise HL7Error(AR, DATA_TYPE_ERROR, f"{said} holds a NUL character (0x00)", where)
    _check_header(header)
    lines = [line for line in text.split("\r") if line.strip()]
    if any(line.startswith("MSH") for line in lines[1:]):  # one message per frame (batches have BHS/FHS)
        raise HL7Error(AR, SEGMENT_SEQUENCE_ERROR, "the message has an MSH segment after its first", "MSH")
    wanted = read(header) if read is not None else None
    if wanted is not None:
        lines = [line for n, line in enumerate(lines) if n == 0 or line[:3] in wanted]
    try:
        parsed = parse_message(
            "\r".join(lines), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
        )
    except (HL7apyException, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise HL7Error(AR, SEGMENT_SEQUENCE_ERROR, f"the message cannot be parsed: {exc}", "MSH") from exc
    enc = parsed.encoding_chars
    d = Delimiters(
        enc["FIELD"], enc["COMPONENT"], enc["REPETITION"], enc["ESCAPE"], enc["SUBCOMPONENT"], codec
    )
    # Fields are taken by position from each segment hl7apy accepted: its tree names fields only up to the
    # version's definition of the segment and leaves out empty ones, and handlers read fields by number.
    if [line[:3] for line in lines] != [str(seg.name) for seg in parsed.children]:
        raise HL7Error(AR, SEGMENT_SEQUENCE_ERROR, "the message's segments cannot be told apart", "MSH")
    return Received(header, [_segment(line, d) for line in lines], codec)


def _segment(line: str, d: Delimiters) -> Segment:
    name = line[:3]
    parts = line.split(d.field)
    if name == "MSH":  # MSH-1 is the field separator itself, MSH-2 the encoding characters
        numbered = {1: [d.field], 2: [parts[1]]} | {
            n + 1: parts[n].split(d.repetition) for n in range(2, len(parts))
        }
    else:
        numbered = {n: parts[n].split(d.repetition) for n in range(1, len(parts))}
    return Segment(name, {n: reps for n, reps in numbered.items() if any(reps)}, d)


def _declares_delimiters(header: Header) -> bool:
    """Whether MSH-1/MSH-2 declare a field separator and four encoding characters (five from v2.7: the
    truncation character), all distinct and none a letter, digit or space."""
    delimiters = header.field_separator + header.encoding_characters
    return (
        len(header.encoding_characters) in (4, 5)
        and len(set(delimiters)) == len(delimiters)
        and not any(c.isalnum() or c.isspace() for c in delimiters)
    )


def _check_header(header: Header) -> None:
    if not _declares_delimiters(header):
        raise HL7Error(AR, DATA_TYPE_ERROR, "MSH-2 does not declare the encoding characters", "MSH^1^2")
    for number, name, present in (
        (9, "message type", header.message_code),
        (10, "message control ID", header.control_id),
        (11, "processing ID", header.processing_id),
        (12, "version ID", header.version),
    ):
        if not present:
            raise HL7Error(AR, REQUIRED_FIELD_MISSING, f"MSH-{number} ({name}) is empty", f"MSH^1^{number}")
    if header.processing_id not in _PROCESSING_IDS:
        raise HL7Error(
            AR,
            UNSUPPORTED_PROCESSING_ID,
            f"processing ID {header.processing_id!r} (MSH-11) is not P, T or D",
            "MSH^1^11",
        )
    if header.version not in VERSIONS:
        raise HL7Error(
            AR,
            UNSUPPORTED_VERSION_ID,
            f"version {header.version!r} (MSH-12) is not one of {', '.join(VERSIONS)}",
            "MSH^1^12",
        )


# --- fields ---------------------------------------------------------------------------------------------


def unescape(text: str, d: Delimiters) -> str:
    """HL7 escape sequences (v2.5 section 2.7): delimiters, hexadecimal data; formatting ones are dropped."""
    if d.escape not in text:
        return text
    out: list[str] = []
    parts = text.split(d.escape)
    out.append(parts[0])
    n = 1
    while n < len(parts):
        if n + 1 >= len(parts):  # an escape character without its closing one: kept as sent
            out.append(d.escape + parts[n])
            break
        seq, rest = parts[n], parts[n + 1]
        known = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}
        if seq in known:
            out.append(known[seq])
        elif (
            seq.startswith("X") and len(seq) % 2 == 1 and all(c in "0123456789ABCDEFabcdef" for c in seq[1:])
        ):
            out.append(_hex_text(bytes.fromhex(seq[1:]), d.codec))
        elif seq in (".br", "H", "N"):  # a line break, highlighting on and off
            out.append("\n" if seq == ".br" else "")
        out.append(rest)
        n += 2
    return "".join(out)


def _hex_text(data: bytes, codec: str) -> str:
    r"""The text of a \Xhh\ escape: bytes in the message's character set (HL7 v2.5 2.7.3), so that a UTF-8
    message's \XC3BC\ is one character; bytes that are not valid there (an 8-bit byte in an ASCII
    message) are read as ISO 8859-1, as before."""
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        return data.decode("latin-1")


def value(segment: Segment | None, field: int, repetition: int = 1, component: int = 1, sub: int = 1) -> str:
    """One (sub)component of a segment's field, unescaped and stripped; "" when absent."""
    if segment is None:
        return ""
    reps = segment.fields.get(field)
    if not reps or len(reps) < repetition:
        return ""
    text = reps[repetition - 1]
    if segment.name == "MSH" and field in (1, 2):
        return text
    d = segment.delimiters
    components = text.split(d.component)
    if len(components) < component:
        return ""
    subs = components[component - 1].split(d.subcomponent)
    if len(subs) < sub:
        return ""
    text = unescape(subs[sub - 1], d).strip()
    if "\x00" in text:  # \X00\: no DICOM or PostgreSQL text holds a NUL
        where = f"{segment.name}^1^{field}"
        raise HL7Error(AE, DATA_TYPE_ERROR, f"{segment.name}-{field} holds a NUL character (\\X00\\)", where)
    return text


def repetitions(segment: Segment, field: int) -> int:
    """How many repetitions a field has (0 when absent)."""
    return len([r for r in segment.fields.get(field, []) if r])


def segments(received: Received, name: str) -> list[Segment]:
    """Every segment with this ID, in message order."""
    return [s for s in received.segments if s.name == name]


# --- acknowledgements --------------------------------------------------------------------------------------


def _escape(text: str, d: Delimiters) -> str:
    """Text for an ACK field: the delimiters escaped (HL7 2.7.4), line breaks flattened."""
    special = {
        d.escape: "E", d.field: "F", d.component: "S", d.repetition: "R", d.subcomponent: "T"
    }  # fmt: skip
    out = []
    for ch in " ".join(text.split()):
        seq = special.get(ch)
        out.append(f"{d.escape}{seq}{d.escape}" if seq else ch)
    return "".join(out)


def _cut(escaped: str, limit: int, d: Delimiters) -> str:
    """Escaped text cut to `limit` characters, not inside an escape sequence (escape characters come in
    pairs in escaped text: an odd count means the cut split one)."""
    cut = escaped[:limit]
    return cut[: cut.rfind(d.escape)] if cut.count(d.escape) % 2 else cut


def ack(
    header: Header | None,
    code: str,
    *,
    error: HL7Error | None = None,
    text: str = "",
    application: str = "DICOMWEB",
) -> str:
    """The ACK answering a message (MSH, MSA and, for AE/AR, ERR), as text in the message's delimiters.

    Built here rather than with python-hl7's `create_ack` because that needs a parsed message, and a
    message whose header cannot be read must be answered too (with our delimiters and an empty MSA-2).
    A message whose MSH-1/MSH-2 are not usable delimiters (it is refused for that) is answered in the
    standard ones, and one whose MSH-18 is not a character set this archive reads is answered in UTF-8,
    which its ACK's MSH-18 then says."""
    h = header
    usable = h is not None and _declares_delimiters(h)
    d = (
        Delimiters(h.field_separator, *h.encoding_characters[:4])
        if h is not None and usable
        else Delimiters()
    )
    enc = h.encoding_characters if h is not None and usable else "^~\\&"
    sep, comp, sub = d.field, d.component, d.subcomponent
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    msh = [
        "MSH",
        enc,
        _escape(application, d),
        _escape(h.receiving_facility, d) if h else "",
        _escape(h.sending_application, d) if h else "",
        _escape(h.sending_facility, d) if h else "",
        now,
        "",
        f"ACK{comp}{_escape(h.trigger_event, d)}{comp}ACK" if h and h.trigger_event else "ACK",
        uuid.uuid4().hex[:20],
        h.processing_id if h and h.processing_id in _PROCESSING_IDS else "P",
        h.version if h and h.version in VERSIONS else "2.5",
    ]
    if h and h.charset:
        # the ACK is encoded as codec_for reads MSH-18's first repetition: UTF-8 when it cannot be read
        readable = h.charset.split("~")[0].split("^")[0].strip().upper() in CHARSETS
        msh += [""] * 5 + [_escape(h.charset, d) if readable else "UNICODE UTF-8"]
    reason = error.text if error else text
    msa = ["MSA", code, _escape(h.control_id, d) if h else "", _cut(_escape(reason, d), 80, d)]
    lines = [sep.join(msh[:1]) + sep + sep.join(msh[1:]), sep.join(msa)]
    if error is not None:
        condition = _escape(_CONDITION.get(error.code, ""), d)
        place = error.location.split("^") if error.location else []
        place = [*place, "", "", ""][:3]
        # ERR-1 (v2.3/2.4: location with the code as its 4th component), ERR-2 (v2.5: location), ERR-3
        # (v2.5: the code, HL7 table 0357), ERR-4 (severity E: error), ERR-8 (the reason, for people)
        err1 = comp.join([*place, sub.join([str(error.code), condition, "HL70357"])])
        err3 = comp.join([str(error.code), condition, "HL70357"])
        err = ["ERR", err1, comp.join(place).rstrip(comp), err3, "E", "", "", "", _escape(error.text, d)]
        lines.append(sep.join(err))
    return "\r".join(lines) + "\r"


_CONDITION = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    UNSUPPORTED_VERSION_ID: "Unsupported version id",
    UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}
