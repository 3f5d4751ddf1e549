"""Media types (RFC 9110 §8.3.1, §12.5.1) and DICOMweb content negotiation (PS3.18 §8.7).

Parsing is strict where a mistake would change meaning (type/subtype tokens, quoted-string escapes,
q-values) and lenient where real clients deviate harmlessly: unquoted parameter values containing ``/``
(``type=application/dicom``, seen from several DICOMweb clients) and empty parameters (``a/b;``).

DICOMweb rules encoded here (PS3.18 2024 editions):

* §8.7.8.1 Selected Media Type: Accept ranges are prioritised per RFC 9110 (q-value, then
  specificity); a wildcard range selects the server's default (first) representation; nothing
  acceptable -> 406.
* §8.7.8.2 Selected Transfer Syntax: the ``transfer-syntax`` parameter of the selected range if any,
  otherwise the default for the media type (Tables 8.7.3-2/-4/-5, :data:`DEFAULT_TRANSFER_SYNTAXES`):
  Explicit VR Little Endian for ``application/dicom`` and ``application/octet-stream``.
* ``transfer-syntax=*`` means the user agent accepts any transfer syntax: against an open-ended offer
  (one listing ``*``) the selection is ``*`` and the handler sends what is stored, without
  transcoding; against an explicit list it resolves to the offer's default (or first) syntax.
* §8.7.3.4: when only lossy (or too-large-for-native) pixel data is available the server may answer in
  the stored syntax instead of the default; a handler expresses that by giving the :class:`Offer` a
  ``default_transfer_syntax`` override.
* §8.7.8.1 also gives an ``accept`` query parameter priority over the header: :func:`select` takes the
  query parameter's values first and falls back to the header's when none of them selects anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NamedTuple

from dicomweb.errors import HTTPProblem
from dicomweb.multipart import MultipartError, check_boundary

__all__ = [
    "ANY_TRANSFER_SYNTAX",
    "COMPRESSED_MEDIA_TYPES",
    "DEFAULT_TRANSFER_SYNTAXES",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "MediaType",
    "NegotiationError",
    "Offer",
    "Selection",
    "StowContentType",
    "UnsupportedMediaTypeError",
    "compressed_media_type",
    "default_transfer_syntax",
    "describe",
    "negotiate",
    "parse_accept",
    "parse_boundary",
    "parse_media_type",
    "parse_stow_content_type",
    "rank",
    "select",
]


class NegotiationError(ValueError):
    """A malformed Accept or Content-Type value: the request is bad (400)."""


class UnsupportedMediaTypeError(ValueError):
    """A well-formed request body type this server does not take (415); deliberately not a
    NegotiationError so a handler cannot map it to 400 by catching the broader type."""


EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
ANY_TRANSFER_SYNTAX: Final = "*"

# Default transfer syntax per (part) media type when the client names none: PS3.18 Table 8.7.3-2
# (application/dicom), 8.7.3-4 (uncompressed bulk data) and 8.7.3-5 (compressed bulk data, "D" rows).
# Note image/jpeg defaults to JPEG Lossless SV1 (.70), not Baseline (.50).
DEFAULT_TRANSFER_SYNTAXES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "application/dicom": EXPLICIT_VR_LITTLE_ENDIAN,
        "application/octet-stream": EXPLICIT_VR_LITTLE_ENDIAN,
        "image/jpeg": "1.2.840.10008.1.2.4.70",
        "image/dicom-rle": "1.2.840.10008.1.2.5",
        "image/x-dicom-rle": "1.2.840.10008.1.2.5",  # the name before PS3.18 2019
        "image/jls": "1.2.840.10008.1.2.4.80",
        "image/jp2": "1.2.840.10008.1.2.4.90",
        "image/jpx": "1.2.840.10008.1.2.4.92",
        "image/jphc": "1.2.840.10008.1.2.4.201",
        "image/jxl": "1.2.840.10008.1.2.4.110",
        "video/mpeg": "1.2.840.10008.1.2.4.100",
        "video/mp4": "1.2.840.10008.1.2.4.102",
    }
)

# PS3.18 Table 8.7.3-5: the transfer syntaxes each compressed pixel data media type may carry, its
# default (the DEFAULT_TRANSFER_SYNTAXES entry) first.
COMPRESSED_MEDIA_TYPES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "image/jpeg": (
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.57",
        ),
        "image/dicom-rle": ("1.2.840.10008.1.2.5",),
        "image/x-dicom-rle": ("1.2.840.10008.1.2.5",),
        "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
        "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
        "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
        "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
        "image/jxl": ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112"),
        "video/mpeg": ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101"),
        "video/mp4": tuple(f"1.2.840.10008.1.2.4.{n}" for n in (102, 103, 104, 105, 106, 107, 108)),
    }
)


def compressed_media_type(transfer_syntax: str) -> str | None:
    """The PS3.18 media type of compressed pixel data in this transfer syntax (current names), or None."""
    for media_type, syntaxes in COMPRESSED_MEDIA_TYPES.items():
        if transfer_syntax in syntaxes and media_type != "image/x-dicom-rle":
            return media_type
    return None


_TCHAR: Final = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN_RE: Final = re.compile(f"[{_TCHAR}]+")
_TYPE_RE: Final = re.compile(rf"[ \t]*([{_TCHAR}]+)/([{_TCHAR}]+)")
_PARAM_SEP_RE: Final = re.compile(r"[ \t]*;[ \t]*")
_PARAM_NAME_RE: Final = re.compile(rf"([{_TCHAR}]+)[ \t]*=[ \t]*")
_QUOTED_RE: Final = re.compile(r'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"')
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)", re.S)
# Unquoted values: RFC 9110 wants a token, clients send e.g. type=application/dicom; take any visible
# run up to the next delimiter. In an Accept list a comma ends the element, in a Content-Type it may not.
_BARE_IN_LIST_RE: Final = re.compile(r'[^\s;,"\\]+')
_BARE_SINGLE_RE: Final = re.compile(r'[^\s;"\\]+')
_OWS_RE: Final = re.compile(r"[ \t]*")
_LIST_SEP_RE: Final = re.compile(r"[ \t,]*")
_QVALUE_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_QUOTABLE_RE: Final = re.compile(r"[\t \x21-\x7e\x80-\xff]*")


def default_transfer_syntax(media_type: str) -> str | None:
    """PS3.18 default transfer syntax for a (part) media type essence, None if it has none."""
    return DEFAULT_TRANSFER_SYNTAXES.get(media_type.lower())


def _quote(value: str) -> str:
    if _TOKEN_RE.fullmatch(value):
        return value
    if _QUOTABLE_RE.fullmatch(value) is None:
        raise ValueError(f"parameter value {value!r} cannot be represented in a header")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_q(q: float) -> str:
    return f"{q:.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class MediaType:
    """A parsed media type or media range: lower-cased type, subtype and parameter names; parameter
    values unquoted but otherwise as sent; ``q`` the Accept weight (1.0 when absent)."""

    type: str
    subtype: str
    params: Mapping[str, str] = field(default_factory=dict)
    q: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", self.type.lower())
        object.__setattr__(self, "subtype", self.subtype.lower())
        object.__setattr__(self, "params", {k.lower(): v for k, v in self.params.items()})

    def __hash__(self) -> int:
        return hash((self.type, self.subtype, tuple(sorted(self.params.items())), self.q))

    @property
    def essence(self) -> str:
        """``type/subtype`` without parameters."""
        return f"{self.type}/{self.subtype}"

    @property
    def specificity(self) -> tuple[int, int]:
        """(0 for */*, 1 for type/*, 2 for type/subtype; number of parameters): RFC 9110 precedence."""
        level = 0 if self.type == "*" else 1 if self.subtype == "*" else 2
        return level, len(self.params)

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name.lower(), default)

    def covers(self, essence: str) -> bool:
        """Whether this range's type/subtype (wildcards included) matches a concrete essence."""
        t, _, s = essence.lower().partition("/")
        return self.type == "*" or (self.type == t and self.subtype in ("*", s))

    def __str__(self) -> str:
        out = [self.essence]
        out.extend(f"{k}={_quote(v)}" for k, v in self.params.items())
        if self.q != 1.0:
            out.append(f"q={_format_q(self.q)}")
        return "; ".join(out)


def _parse_q(value: str, text: str) -> float:
    q = float(value) if _QVALUE_RE.fullmatch(value) else math.nan
    if not 0.0 <= q <= 1.0:
        raise NegotiationError(f"invalid q-value {value!r} in {text!r}")
    return q


def _parse_at(text: str, pos: int, in_list: bool) -> tuple[MediaType, int]:
    """Parse one media type starting at ``pos``; return it and the position after trailing spaces."""
    m = _TYPE_RE.match(text, pos)
    if m is None:
        raise NegotiationError(f"malformed media type in {text!r}")
    mtype, subtype = m.group(1).lower(), m.group(2).lower()
    if mtype == "*" and subtype != "*":
        raise NegotiationError(f"'*/{subtype}' is not a valid media range in {text!r}")
    pos = m.end()
    bare = _BARE_IN_LIST_RE if in_list else _BARE_SINGLE_RE
    params: dict[str, str] = {}
    q = 1.0
    while (sep := _PARAM_SEP_RE.match(text, pos)) is not None:
        pos = sep.end()
        name_m = _PARAM_NAME_RE.match(text, pos)
        if name_m is None:
            continue  # empty parameter ("a/b;" or "a/b;;c=d") is allowed by RFC 9110
        name = name_m.group(1).lower()
        pos = name_m.end()
        if (qm := _QUOTED_RE.match(text, pos)) is not None:
            value = _QUOTED_PAIR_RE.sub(r"\1", qm.group(1))
            pos = qm.end()
        elif (bm := bare.match(text, pos)) is not None:
            value = bm.group(0)
            pos = bm.end()
        else:
            raise NegotiationError(f"parameter {name!r} has no valid value in {text!r}")
        if name == "q":
            q = _parse_q(value, text)
        elif name in params:
            raise NegotiationError(f"duplicate parameter {name!r} in {text!r}")
        else:
            params[name] = value
    pos = _OWS_RE.match(text, pos).end()  # type: ignore[union-attr]
    return MediaType(mtype, subtype, params, q), pos


def parse_media_type(text: str) -> MediaType:
    """Parse a single media type (e.g. a Content-Type value); raises NegotiationError if malformed."""
    mt, pos = _parse_at(text, 0, in_list=False)
    if pos != len(text):
        raise NegotiationError(f"unexpected {text[pos:]!r} after media type in {text!r}")
    return mt


def _accept_order(ranges: Sequence[MediaType]) -> list[MediaType]:
    """Highest q first, then most specific; otherwise header order (the sort is stable)."""
    return sorted(ranges, key=lambda r: (-r.q, *(-s for s in r.specificity)))


def parse_accept(header: str | None) -> list[MediaType]:
    """Parse an Accept value (or an ``accept`` query parameter) into ranges, best first.

    A missing or blank header means ``*/*``. Ranges with q=0 are kept: they mark types as not
    acceptable and :func:`negotiate` honours them. Raises NegotiationError for malformed input.
    """
    if header is None or not header.strip(" \t"):
        return [MediaType("*", "*")]
    ranges: list[MediaType] = []
    pos, n = 0, len(header)
    while True:
        pos = _LIST_SEP_RE.match(header, pos).end()  # type: ignore[union-attr]
        if pos >= n:
            break
        mt, pos = _parse_at(header, pos, in_list=True)
        if pos < n and header[pos] != ",":
            raise NegotiationError(f"unexpected {header[pos:]!r} in Accept value {header!r}")
        ranges.append(mt)
    return _accept_order(ranges) if ranges else [MediaType("*", "*")]


@dataclass(frozen=True, slots=True)
class Offer:
    """One representation the server can produce for the requested resource.

    * ``media_type``: the essence sent, e.g. ``multipart/related``, ``application/dicom``, ``image/png``.
    * ``part_type``: for ``multipart/related``, the essence of each part (the ``type`` parameter), e.g.
      ``application/dicom``, ``application/octet-stream``, ``image/jpeg``; None for single-part offers.
    * ``transfer_syntaxes``: transfer syntax UIDs this server can produce. Listing ``"*"`` makes the
      offer open-ended: any requested syntax is accepted here and the handler decides per instance
      (send as stored, transcode, or answer 406), because the stored syntaxes of a study are not known
      at negotiation time. None when transfer syntax does not apply (metadata, rendered images); a
      ``transfer-syntax`` parameter in Accept is then ignored.
    * ``default_transfer_syntax``: used when the client names none; defaults to the PS3.18 default for
      the part (or single-part) media type, else the first listed syntax. Override it to apply
      §8.7.3.4 (lossy-only data served in its stored syntax).
    * ``params``: other fixed parameters (e.g. ``charset``); an Accept range naming one of them with a
      different value does not match; parameters the offer does not declare are ignored.
    * ``named_only``: only a range naming this type exactly selects it, never ``type/*`` or ``*/*``. For
      unregistered names that clients send (Azure's ``application/jpeg`` for rendered images), so that a
      wildcard never picks them.

    List offers in server preference order: the first is the default for wildcard ranges.
    """

    media_type: str
    part_type: str | None = None
    transfer_syntaxes: tuple[str, ...] | None = None
    default_transfer_syntax: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    named_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "media_type", self.media_type.lower())
        if self.part_type is not None:
            object.__setattr__(self, "part_type", self.part_type.lower())
        if self.transfer_syntaxes is not None:
            object.__setattr__(self, "transfer_syntaxes", tuple(self.transfer_syntaxes))
        object.__setattr__(self, "params", {k.lower(): v for k, v in self.params.items()})

    @property
    def payload_type(self) -> str:
        """Essence the transfer syntax applies to: the part type for multipart, else the media type."""
        return self.part_type or self.media_type

    @property
    def effective_default_transfer_syntax(self) -> str | None:
        if self.transfer_syntaxes is None:
            return None
        if self.default_transfer_syntax is not None:
            return self.default_transfer_syntax
        default = default_transfer_syntax(self.payload_type)
        if default is not None:
            return default
        listed = [ts for ts in self.transfer_syntaxes if ts != ANY_TRANSFER_SYNTAX]
        return listed[0] if listed else None


@dataclass(frozen=True, slots=True)
class Selection:
    """The outcome of :func:`negotiate`.

    ``transfer_syntax`` is a UID, ``"*"`` (send each instance as stored) or None (not applicable).
    ``media_range`` is the Accept range that selected the offer, ``q`` its effective weight.
    """

    offer: Offer
    transfer_syntax: str | None
    q: float
    media_range: MediaType

    @property
    def media_type(self) -> str:
        return self.offer.media_type

    @property
    def part_type(self) -> str | None:
        return self.offer.part_type

    def _ts_param(self, transfer_syntax: str | None) -> dict[str, str]:
        ts = transfer_syntax or self.transfer_syntax
        return {} if ts is None or ts == ANY_TRANSFER_SYNTAX else {"transfer-syntax": ts}

    def content_type(self, boundary: str | None = None, transfer_syntax: str | None = None) -> str:
        """Response Content-Type. Multipart: ``type`` and ``boundary`` (transfer syntax goes in each part's
        headers, see :meth:`part_content_type`); single part: the essence with its transfer syntax
        (pass the actual one when the selection was ``"*"``)."""
        offer = self.offer
        t, _, s = offer.media_type.partition("/")
        params = dict(offer.params)
        if offer.part_type is not None:
            params["type"] = offer.part_type
        else:
            params.update(self._ts_param(transfer_syntax))
        if boundary is not None:
            params["boundary"] = boundary
        return str(MediaType(t, s, params))

    def part_content_type(self, transfer_syntax: str | None = None) -> str:
        """Content-Type header for one part of a multipart response, e.g.
        ``application/dicom; transfer-syntax=1.2.840.10008.1.2.1``; pass the part's actual syntax
        when the selection was ``"*"``."""
        t, _, s = self.offer.payload_type.partition("/")
        return str(MediaType(t, s, self._ts_param(transfer_syntax)))


_NO_MATCH: Final = object()


def _type_param_matches(value: str, part_type: str) -> bool:
    try:
        return parse_media_type(value).covers(part_type)
    except NegotiationError:
        return False


def _match(r: MediaType, offer: Offer) -> tuple[int, int] | None:
    """Specificity with which range ``r`` matches ``offer`` (ignoring transfer syntax), None if not."""
    t, _, s = offer.media_type.partition("/")
    if r.type == "*":
        level = 0
    elif r.type != t:
        return None
    elif r.subtype == "*":
        level = 1
    elif r.subtype != s:
        return None
    else:
        level = 2
    if offer.named_only and level < 2:
        return None
    extra = 0
    for name, value in r.params.items():
        if name == "transfer-syntax" and offer.transfer_syntaxes is not None:
            if value != ANY_TRANSFER_SYNTAX:
                extra += 1
            continue
        if name == "type" and offer.part_type is not None:
            if not _type_param_matches(value, offer.part_type):
                return None
            extra += 1
            continue
        own = offer.params.get(name)
        if own is not None:
            if own.lower() != value.lower():
                return None
            extra += 1
    return level, extra


def _resolve_transfer_syntax(r: MediaType, offer: Offer) -> str | object | None:
    """The transfer syntax range ``r`` asks of ``offer`` (PS3.18 §8.7.8.2), or _NO_MATCH.

    No parameter means the media type's default; ``*`` means anything. An offer listing ``*`` takes
    whatever is asked and leaves it to the handler (per instance: as stored, transcode, or refuse);
    otherwise the asked syntax must be listed, and ``*`` resolves to the default (or first) listed one.
    """
    supported = offer.transfer_syntaxes
    if supported is None:
        return None
    asked = r.params.get("transfer-syntax")
    default = offer.effective_default_transfer_syntax
    open_ended = ANY_TRANSFER_SYNTAX in supported
    if asked is None:
        if default is not None and (open_ended or default in supported):
            return default
        return _NO_MATCH
    if asked == ANY_TRANSFER_SYNTAX:
        if open_ended:
            return ANY_TRANSFER_SYNTAX
        if default is not None and default in supported:
            return default
        return supported[0] if supported else _NO_MATCH
    return asked if open_ended or asked in supported else _NO_MATCH


def _covers_transfer_syntax(r: MediaType, offer: Offer, ts: str | None) -> bool:
    if offer.transfer_syntaxes is None:
        return True
    asked = r.params.get("transfer-syntax")
    if asked == ANY_TRANSFER_SYNTAX:
        return True
    if asked is None:
        return ts == offer.effective_default_transfer_syntax
    return ts == asked


def rank(accept: Sequence[MediaType] | str | None, offers: Sequence[Offer]) -> list[Selection]:
    """Every acceptable (offer, transfer syntax) pair, best first, each once; [] means 406.

    The order is :func:`negotiate`'s: a candidate's weight is the q of the most specific range covering it
    (RFC 9110 §12.5.1), so ``image/*, image/png;q=0`` excludes PNG. Among candidates with weight > 0 the
    better has the higher weight, then was proposed by the more specific range, then by the range listed
    first, then is the earlier offer (server preference, which also makes ``*/*`` select the default
    representation, PS3.18 §8.7.8.1 step 4). Handlers that may fail to produce the first choice for a
    given instance (transcoding) walk this list to the next acceptable one before answering 406.

    Specificity counts ``type/subtype`` over ``type/*`` over ``*/*``, then the matched parameters
    (multipart ``type``, a concrete ``transfer-syntax``, declared offer parameters).
    """
    ranges = parse_accept(accept) if accept is None or isinstance(accept, str) else _accept_order(accept)
    matches = [[(_match(r, offer), offer) for offer in offers] for r in ranges]

    def weight(offer_index: int, ts: str | None) -> float:
        best_spec: tuple[int, int] | None = None
        best_q = 0.0
        offer = offers[offer_index]
        for r, row in zip(ranges, matches, strict=True):
            spec = row[offer_index][0]
            if spec is None or not _covers_transfer_syntax(r, offer, ts):
                continue
            if best_spec is None or spec > best_spec:
                best_spec, best_q = spec, r.q
            elif spec == best_spec:
                best_q = max(best_q, r.q)
        return best_q

    best: dict[tuple[int, str | None], tuple[tuple[float, tuple[int, int], int, int], Selection]] = {}
    for ri, (r, row) in enumerate(zip(ranges, matches, strict=True)):
        if r.q <= 0.0:
            continue
        for oi, (spec, offer) in enumerate(row):
            if spec is None:
                continue
            ts = _resolve_transfer_syntax(r, offer)
            if ts is _NO_MATCH:
                continue
            assert ts is None or isinstance(ts, str)
            q = weight(oi, ts)
            if q <= 0.0:
                continue
            key = (q, spec, -ri, -oi)
            known = best.get((oi, ts))
            if known is None or key > known[0]:
                best[(oi, ts)] = (key, Selection(offer, ts, q, r))
    return [selection for _, selection in sorted(best.values(), key=lambda kv: kv[0], reverse=True)]


def negotiate(accept: Sequence[MediaType] | str | None, offers: Sequence[Offer]) -> Selection | None:
    """Pick the best offer for the Accept ranges (the first of :func:`rank`), or None: answer 406."""
    ranked = rank(accept, offers)
    return ranked[0] if ranked else None


def describe(offers: Sequence[Offer]) -> str:
    """The offers as a 406 message lists them, e.g. ``multipart/related; type="image/jpeg", image/png``;
    unregistered aliases (``named_only``) are left out."""
    return ", ".join(
        o.media_type + (f'; type="{o.part_type}"' if o.part_type else "") for o in offers if not o.named_only
    )


def select(
    offers: Sequence[Offer],
    header: str | None,
    params: Sequence[str] = (),
    *,
    available: str | None = None,
) -> list[Selection]:
    """A request's :func:`rank` of `offers`: by the first of its ``accept`` query parameter values that
    selects anything (`params`), else by its Accept `header` (PS3.18 §8.7.8.1).

    Raises HTTPProblem 400 for a malformed value and 406 when nothing is acceptable; the 406 message names
    what is `available` (by default :func:`describe` of the offers).
    """
    for value in params:
        try:
            ranked = _ranked(value, offers)
        except NegotiationError as exc:
            raise HTTPProblem(400, f"malformed accept query parameter: {exc}") from exc
        if ranked:
            return ranked
    try:
        ranked = _ranked(header, offers)
    except NegotiationError as exc:
        raise HTTPProblem(400, f"malformed Accept header: {exc}") from exc
    if not ranked:
        raise HTTPProblem(
            406,
            "cannot produce any media type the Accept header allows; "
            f"available: {describe(offers) if available is None else available}",
        )
    return ranked


def _ranked(accept: str | None, offers: Sequence[Offer]) -> list[Selection]:
    """rank, remembered: a client sends the same Accept header with every request, and ranking it against a
    route's dozens of offers was a tenth of a rendered request. Offers are told apart by identity (they hold
    dicts, so no hash), and each entry keeps its offers alive so that no other object takes their id."""
    key = (accept, id(offers))
    hit = _RANKED.get(key)
    if hit is not None and hit[0] is offers:
        return list(hit[1])
    ranked = rank(accept, offers)
    if len(_RANKED) >= _RANKED_MAX:
        _RANKED.clear()
    _RANKED[key] = (offers, tuple(ranked))
    return ranked


_RANKED: dict[tuple[str | None, int], tuple[Sequence[Offer], tuple[Selection, ...]]] = {}
_RANKED_MAX = 1024


class StowContentType(NamedTuple):
    """What a STOW-RS request body is: ``boundary`` is None for a single-part body."""

    boundary: bytes | None
    part_type: str


def parse_boundary(content_type: str | MediaType) -> bytes:
    """The validated boundary of a multipart Content-Type; MultipartError if absent or malformed."""
    try:
        mt = parse_media_type(content_type) if isinstance(content_type, str) else content_type
    except NegotiationError as exc:
        raise MultipartError(str(exc)) from exc
    if mt.type != "multipart":
        raise MultipartError(f"{mt.essence} is not a multipart media type")
    boundary = mt.params.get("boundary")
    if boundary is None:
        raise MultipartError(f"{mt.essence} Content-Type has no boundary parameter")
    return check_boundary(boundary)


def parse_stow_content_type(
    header: str | None, *, part_types: Sequence[str] = ("application/dicom",)
) -> StowContentType:
    """Classify a STOW-RS request Content-Type.

    * ``multipart/related; type="application/dicom"; boundary=B`` -> (B, "application/dicom").
    * ``multipart/related; boundary=B`` without ``type``: PS3.18 requires the parameter, but several
      clients omit it; we assume the first of ``part_types`` and the handler still checks each part's
      own Content-Type.
    * a single-part body of one of ``part_types`` (``application/dicom``) -> (None, that type).

    Raises UnsupportedMediaTypeError (415) for a missing header or any other type, NegotiationError
    (400) for a malformed header, MultipartError (400) for a missing or invalid boundary.
    """
    if header is None or not header.strip():
        raise UnsupportedMediaTypeError("request has no Content-Type")
    mt = parse_media_type(header)
    accepted = [p.lower() for p in part_types]
    if mt.essence == "multipart/related":
        declared = mt.params.get("type")
        if declared is None:
            part_type = accepted[0]
        else:
            try:
                part_type = parse_media_type(declared).essence
            except NegotiationError as exc:
                raise UnsupportedMediaTypeError(f"unsupported multipart type {declared!r}") from exc
            if part_type not in accepted:
                raise UnsupportedMediaTypeError(f"unsupported multipart type {declared!r}")
        return StowContentType(parse_boundary(mt), part_type)
    if mt.essence in accepted:
        return StowContentType(None, mt.essence)
    raise UnsupportedMediaTypeError(f"unsupported Content-Type {mt.essence!r}")
