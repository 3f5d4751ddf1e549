"""Liveness and readiness probes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from dicomweb.context import context
from storage.s3 import StoreUnusableError


async def live(request: Request) -> JSONResponse:
    return JSONResponse({"status": "live"})


async def ready(request: Request) -> JSONResponse:
    """Ready when the database answers and the blob store is reachable."""
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
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )
