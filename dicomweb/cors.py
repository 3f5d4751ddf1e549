"""CORS (Fetch standard) for viewers served from another origin, e.g. OHIF at its own host.

Off unless DICOMWEB_CORS_ORIGINS names origins: patient data should not be readable by arbitrary pages.
Starlette's CORSMiddleware answers preflights; the headers a viewer must read from responses are exposed.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from dicomweb.config import Settings

# Response headers a DICOMweb client reads (multipart boundary, STOW warnings, caching, ranges, paging, and
# Azure's erroneous-dicom-attributes: a search that used an extended query tag with indexing errors).
EXPOSED_HEADERS = [
    "Content-Type",
    "Content-Length",
    "Content-Location",
    "Content-Range",
    "Accept-Ranges",
    "Cache-Control",
    "ETag",
    "Location",
    "Warning",
    "erroneous-dicom-attributes",
]
ALLOWED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def parse_origins(value: str | None) -> list[str]:
    """Comma- or space-separated origins; '*' allows any (without credentials, as the Fetch standard
    requires). A trailing '/' is dropped: browsers send origins without one."""
    if not value:
        return []
    origins = [o.strip().rstrip("/") for o in value.replace(" ", ",").split(",") if o.strip()]
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(
                f"DICOMWEB_CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port]) or '*'"
            )
    return origins


def cors_middleware(settings: Settings) -> list[Middleware]:
    origins = parse_origins(settings.cors_origins)
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=ALLOWED_METHODS,
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            allow_credentials="*" not in origins,
            max_age=600,
        )
    ]
