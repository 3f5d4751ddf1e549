"""Liveness and readiness probes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from dicomweb.context import context
from storage.s3 import StoreUnusableError


async def live(request: Request) -> JSONResponse:
    return JSONResponse({"status": "live"})


async def _checks(request: Request) -> dict[str, str]:
    """Whether the database answers and the blob store is reachable: "ok", or the error's class."""
    ctx = context(request)
    checks: dict[str, str] = {}
    try:
        await ctx.pool.fetchval("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        await ctx.store.check_ready()
        checks["storage"] = "ok"
    except StoreUnusableError as exc:  # its one-line reason: a missing bucket, refused credentials
        checks["storage"] = f"error: {exc}"
    except Exception as exc:
        checks["storage"] = f"error: {exc.__class__.__name__}"
    return checks


async def ready(request: Request) -> JSONResponse:
    """Ready when the database answers and the blob store is reachable."""
    checks = await _checks(request)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


_AZURE_CHECKS = {
    "database": ("DatabaseHealthCheck", "the database"),
    "storage": ("BlobStoreHealthCheck", "the blob store"),
}


async def check(request: Request) -> JSONResponse:
    """Azure's Health Check API (GET /health/check): the readiness checks in Azure's shape, for monitors
    configured for Azure's DICOM service; 200 Healthy, or 503 Unhealthy when one fails."""
    checks = await _checks(request)
    details = []
    for key, outcome in checks.items():
        name, what = _AZURE_CHECKS[key]
        healthy = outcome == "ok"
        description = (
            f"Successfully connected to {what}." if healthy else f"Failed to connect to {what} ({outcome})."
        )
        details.append(
            {"name": name, "status": "Healthy" if healthy else "Unhealthy", "description": description}
        )
    ok = all(d["status"] == "Healthy" for d in details)
    return JSONResponse(
        {"overallStatus": "Healthy" if ok else "Unhealthy", "details": details},
        status_code=200 if ok else 503,
    )
