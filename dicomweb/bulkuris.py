"""Turning the relative BulkDataURIs kept in stored metadata into URLs a client can fetch."""

from __future__ import annotations

# How dicomcore.dicomjson writes a bulk data reference into stored metadata: relative to the instance URL.
_RELATIVE = b'"BulkDataURI":"bulkdata/'


def instance_url(root: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"{root}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def absolute_bulk_uris(metadata: bytes, instance: str) -> bytes:
    """Stored DICOM JSON with each BulkDataURI prefixed by the instance's URL (a byte replace, no parse)."""
    if _RELATIVE not in metadata:
        return metadata
    return metadata.replace(_RELATIVE, b'"BulkDataURI":"%s/bulkdata/' % instance.encode())
