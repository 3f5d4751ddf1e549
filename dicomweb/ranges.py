"""HTTP Range requests (RFC 9110 14) on single-part bulk data and frames: one byte range, as viewers send."""

from __future__ import annotations

from dicomweb.errors import HTTPProblem


def parse_range(header: str, length: int) -> tuple[int, int] | None:
    """A single byte range (RFC 9110 14.1.2) as [start, end); 416 when unsatisfiable.

    None for a range unit other than bytes: RFC 9110 14.2 says a server MUST ignore it (the whole
    representation is sent, 200)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        raise HTTPProblem(
            416, "only a single bytes range is supported", headers={"Content-Range": f"bytes */{length}"}
        )
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            start, end = max(length - suffix, 0), length
        else:
            start = int(first)
            end = int(last) + 1 if last else length
    except ValueError as exc:
        raise HTTPProblem(400, f"malformed Range header {header!r}") from exc
    end = min(end, length)
    if start >= length or start >= end:
        raise HTTPProblem(
            416, f"range {header!r} is outside 0-{length}", headers={"Content-Range": f"bytes */{length}"}
        )
    return start, end
