"""Authentication, authorization and the audit record of every request, as one ASGI middleware.

It decides before routing, from the method and path alone (access.policy), so that a refusal never depends
on whether the addressed resource exists. Health probes are neither authenticated nor audited (they carry
no data and would flood the log); everything else gets exactly one audit record, refusals included.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from access.audit import AuditEvent, outcome_of
from access.authn import OPEN, AuthError, JWTConfig, Principal
from access.policy import Family, Grant, Role, Target, allows, classify
from access.service import AccessControl, client_address
from dicomweb.config import Settings
from dicomweb.errors import problem_response

_MAX_TEXT = 2048
REALM = 'Bearer realm="dicomweb"'


def principal_of(scope: Scope) -> Principal | None:
    """The authenticated caller of a request (handlers that filter by caller, e.g. data requests)."""
    return scope.get("state", {}).get("principal")


def grants_of(scope: Scope) -> tuple[Grant, ...]:
    """The grants the request was authorized with: the caller's, plus a researcher's research partitions
    where they count (handlers that filter by partition, e.g. GET /partitions)."""
    state = scope.get("state", {})
    principal: Principal | None = state.get("principal")
    return state.get("grants", principal.grants if principal else ())


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _has_token_parameter(query: bytes) -> bool:
    if b"token" not in query.lower() and b"%" not in query:
        return False
    return any(k.lower() == "access_token" for k, _ in parse_qsl(query.decode("latin-1"), True))


async def still_allowed(scope: Scope) -> bool:
    """Whether the credential a long-lived connection (the UPS-RS WebSocket) was admitted with still admits
    it: a token revoked or expired since, or a JWT past its exp, does not, and the connection is closed."""
    access: AccessControl = scope["app"].state.access
    if access.insecure_open:
        return True
    try:
        principal = await access.authenticator.authenticate(_header(scope, b"authorization"))
    except AuthError:
        return False
    return allows(principal.grants, classify("GET", scope["path"]), access.clock.now())


class AccessMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = classify(scope["method"], scope["path"])
        if target.family is Family.HEALTH:
            await self.app(scope, receive, send)
            return
        access: AccessControl = scope["app"].state.access
        started, when = time.perf_counter(), access.clock.now()
        principal: Principal | None = None
        detail: str | None = None
        status = 500
        try:
            refusal = await self._check(access, scope, target)
            if isinstance(refusal, tuple):
                status, detail, headers = refusal
                await problem_response(status, detail, headers)(scope, receive, send)
                return
            principal = refusal
            scope.setdefault("state", {})["principal"] = principal

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app(scope, receive, send_status)
        finally:
            self._audit(access, scope, target, principal, status, detail, when, started)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """UPS-RS notification channels: the same decision as a GET of the path; refused before accepting
        (the server then answers the upgrade with 403). One audit record per connection."""
        access: AccessControl = scope["app"].state.access
        target = classify("GET", scope["path"])
        started, when = time.perf_counter(), access.clock.now()
        refusal = await self._check(access, scope, target)
        if isinstance(refusal, tuple):
            await send({"type": "websocket.close", "code": 1008})
            self._audit(access, scope, target, None, refusal[0], refusal[1], when, started)
            return
        scope.setdefault("state", {})["principal"] = refusal
        try:
            await self.app(scope, receive, send)
        finally:
            self._audit(access, scope, target, refusal, 101, None, when, started)

    async def _check(
        self, access: AccessControl, scope: Scope, target: Target
    ) -> Principal | tuple[int, str, dict[str, str] | None]:
        """The caller, or the refusal (status, message, headers) to answer instead."""
        if _has_token_parameter(scope.get("query_string", b"")):
            return 400, "tokens are not accepted in URLs (they end up in logs): use Authorization", None
        if access.insecure_open:
            return OPEN
        if target.family is Family.PAGE:
            return Principal("anonymous", "none")
        try:
            principal = await access.authenticator.authenticate(_header(scope, b"authorization"))
        except AuthError as exc:
            challenge = f'{REALM}, error="invalid_token", error_description="{exc}"' if exc.invalid else REALM
            return 401, str(exc), {"WWW-Authenticate": challenge}
        grants = principal.grants
        research = (Family.WADO, Family.QIDO, Family.PARTITIONS)
        if target.family in research and principal.has_role(Role.RESEARCHER):
            grants = grants + await access.authenticator.research_grants(principal.subject)
        if not allows(grants, target, access.clock.now()):
            scope.setdefault("state", {})["principal"] = principal
            return 403, "not permitted", None
        scope.setdefault("state", {})["grants"] = grants
        return principal

    def _audit(
        self,
        access: AccessControl,
        scope: Scope,
        target: Target,
        principal: Principal | None,
        status: int,
        detail: str | None,
        when: object,
        started: float,
    ) -> None:
        who = principal or scope.get("state", {}).get("principal")
        auth = who.auth if who else ("none" if _header(scope, b"authorization") is None else "invalid")
        peer = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")
        if _has_token_parameter(scope.get("query_string", b"")):
            query = "(withheld: carried a token)"
        access.audit.record(
            AuditEvent(
                event_time=when,  # type: ignore[arg-type]
                subject=who.subject if who else "anonymous",
                auth=auth,
                token_id=who.token_id if who else None,
                token_name=who.token_name if who else None,
                roles=who.roles if who and who.auth not in ("open", "none") else [],
                client_address=client_address(
                    peer[0] if peer else None, _header(scope, b"x-forwarded-for"), access.trusted_proxies
                ),
                user_agent=(_header(scope, b"user-agent") or "")[:256] or None,
                method=scope.get("method", "WEBSOCKET"),
                path=scope["path"][:_MAX_TEXT],
                query=query[:_MAX_TEXT] or None,
                action=target.family.value,
                action_code=target.action_code,
                partition_name=target.partition[:_MAX_TEXT] if target.partition is not None else None,
                study_uid=(target.study or "")[:_MAX_TEXT] or None,
                series_uid=(target.series or "")[:_MAX_TEXT] or None,
                instance_uid=(target.instance or "")[:_MAX_TEXT] or None,
                status=status,
                outcome=outcome_of(status),
                # a refusal's reason, or what a handler says it did (retention routes: request.state)
                detail=detail or scope.get("state", {}).get("audit_detail"),
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )


def jwt_config(settings: Settings) -> JWTConfig | None:
    """The JWT settings, or None when JWTs are not configured; a half-configured issuer is an error (a
    token must never be accepted without both its issuer and its audience checked)."""
    if not (settings.jwt_secret or settings.jwt_jwks_url):
        return None
    if not (settings.jwt_issuer and settings.jwt_audience):
        raise RuntimeError("DICOMWEB_JWT_ISSUER and DICOMWEB_JWT_AUDIENCE must be set to accept JWTs")
    return JWTConfig(
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        secret=settings.jwt_secret,
        jwks_url=settings.jwt_jwks_url,
        roles_claim=settings.jwt_roles_claim,
    )
