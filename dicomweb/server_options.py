"""uvicorn options every server of the archive runs with (`dicomweb serve` and the test servers alike)."""

from __future__ import annotations

from typing import Any

UVICORN_OPTIONS: dict[str, Any] = {
    # uvicorn would otherwise believe X-Forwarded-For and X-Forwarded-Proto from 127.0.0.1 (its default
    # FORWARDED_ALLOW_IPS) and rewrite the client address before the access middleware sees it: any local
    # process could name another caller in the audit log. DICOMWEB_TRUSTED_PROXIES alone decides
    # (access.service.client_address), and DICOMWEB_PUBLIC_URL sets the scheme and host of response URLs.
    "proxy_headers": False,
    "access_log": False,  # every request is in the audit log already
}
