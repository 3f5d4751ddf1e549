"""Who is calling: bearer JWTs (HS256 shared secret, RS256/ES256 from a JWKS URL) and static API tokens.

PyJWT does the JWT work (signature, exp/nbf/iss/aud claims, JWKS fetching and key caching): it is the most
used and best kept Python JWT library, it refuses `alg: none` and algorithm confusion when the accepted
algorithms are given per key, and its only native dependency is `cryptography`.

Decisions are cached so that authorization stays far below 1 ms per request:
- a verified JWT by the SHA-256 of its text, until its own `exp` (a JWT cannot be revoked; its expiry is
  the revocation, so caching it changes nothing);
- an API token's row by its id, and a researcher's active grants by subject, for at most CACHE_SECONDS,
  and only while the LISTEN connection of access.notify is up: revoking a token or a grant NOTIFYs every
  process, which drops the entry before its next request. Unknown ids are never cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import jwt

from access import requests, tokens
from access.clock import Clock
from access.policy import Grant, Role
from indexer.lookup import valid_partition_name

CACHE_SECONDS = 60.0
_MAX_ENTRIES = 10_000
MAX_SUBJECT = 255  # characters of a JWT `sub` (OpenID Connect Core 1.0, 2: at most 255 ASCII characters)


class AuthError(Exception):
    """No usable credential: answered 401 with a WWW-Authenticate challenge."""

    def __init__(self, message: str, *, invalid: bool = True) -> None:
        super().__init__(message)
        self.invalid = invalid  # False: no credential at all (no error code in the challenge, RFC 6750 3.1)


@dataclass(frozen=True, slots=True)
class JWTConfig:
    issuer: str
    audience: str
    secret: str | None = None  # HS256
    jwks_url: str | None = None  # RS256 / ES256
    roles_claim: str = "roles"
    leeway: float = 30.0


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    auth: str  # jwt, token, open
    grants: tuple[Grant, ...] = ()
    token_id: str | None = None
    token_name: str | None = None
    expires_at: float | None = None  # JWT exp (epoch seconds)

    @property
    def roles(self) -> list[str]:
        return [g.role.value + (f"@{g.partition}" if g.partition else "") for g in self.grants]

    def has_role(self, *roles: Role) -> bool:
        return any(g.role in roles for g in self.grants)


OPEN = Principal("anonymous", "open", tuple(Grant(role) for role in Role))


def parse_roles(claim: object) -> tuple[Grant, ...]:
    """Grants from a JWT roles claim: a list (or space-separated string) of `role` or `role:partition`.
    Names that are not roles are ignored (identity providers put other roles in the same claim)."""
    items = claim.split() if isinstance(claim, str) else claim if isinstance(claim, list) else []
    grants = []
    for item in items:
        if not isinstance(item, str):
            continue
        name, scoped, partition = item.partition(":")
        # `role:` with nothing after the colon is malformed, not a grant of every partition
        if name in Role.__members__.values() and (not scoped or valid_partition_name(partition)):
            grants.append(Grant(Role(name), partition or None))
    return tuple(grants)


@dataclass
class _Cache:
    entries: dict[str, tuple[float, object]] = field(default_factory=dict)

    def get(self, key: str, ttl: float) -> object | None:
        hit = self.entries.get(key)
        if hit is None or time.monotonic() - hit[0] > ttl:
            return None
        return hit[1]

    def put(self, key: str, value: object) -> None:
        if len(self.entries) >= _MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (time.monotonic(), value)


class Authenticator:
    def __init__(
        self,
        pool: asyncpg.Pool,
        clock: Clock,
        jwt_config: JWTConfig | None = None,
        *,
        cache_trusted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.jwt = jwt_config
        self._cache_trusted = cache_trusted
        self._tokens = _Cache()
        self._grants = _Cache()
        self._jwts: dict[bytes, Principal] = {}
        self._jwks = (
            jwt.PyJWKClient(jwt_config.jwks_url, cache_keys=True, lifespan=300, timeout=10)
            if jwt_config and jwt_config.jwks_url
            else None
        )

    def invalidate(self, payload: str | None) -> None:
        """A notification: `token:<id>`, `grants:<subject>`, or None (possibly missed some: drop all)."""
        if payload is None:
            self._tokens.entries.clear()
            self._grants.entries.clear()
        elif payload.startswith("token:"):
            self._tokens.entries.pop(payload.removeprefix("token:"), None)
        elif payload.startswith("grants:"):
            self._grants.entries.pop(payload.removeprefix("grants:"), None)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthError("authentication required", invalid=False)
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("use Authorization: Bearer <token>")
        if credential.startswith(tokens.PREFIX):
            return await self._api_token(credential)
        if credential.count(".") == 2 and self.jwt is not None:
            return await self._jwt(credential)
        raise AuthError("invalid token")

    async def _api_token(self, credential: str) -> Principal:
        parts = tokens.split(credential)
        if parts is None:
            raise AuthError("invalid token")
        token_id, secret = parts
        ttl = CACHE_SECONDS if self._cache_trusted() else 0.0
        stored = self._tokens.get(token_id, ttl)
        if stored is None:
            stored = await tokens.find(self.pool, token_id)
            if stored is None:
                raise AuthError("invalid token")
            self._tokens.put(token_id, stored)
        assert isinstance(stored, tokens.StoredToken)
        if not tokens.matches(secret, stored.secret_sha256):
            raise AuthError("invalid token")
        if stored.revoked_at is not None:
            raise AuthError("token revoked")
        if stored.expires_at is not None and stored.expires_at <= self.clock.now():
            raise AuthError("token expired")
        return Principal(
            f"token:{token_id}", "token", (Grant(stored.role, stored.partition),), token_id, stored.name
        )

    async def _jwt(self, credential: str) -> Principal:
        key = hashlib.sha256(credential.encode()).digest()
        cached = self._jwts.get(key)
        if cached is not None and cached.expires_at is not None and cached.expires_at > time.time():
            return cached
        assert self.jwt is not None
        try:
            header = jwt.get_unverified_header(credential)
            alg = header.get("alg")
            if alg == "HS256" and self.jwt.secret:
                signing_key: object = self.jwt.secret
            elif alg in ("RS256", "ES256") and self._jwks is not None:
                signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, credential)
            else:
                raise AuthError(f"token algorithm {alg!r} is not accepted")
            claims = jwt.decode(
                credential, signing_key, algorithms=[alg], audience=self.jwt.audience, issuer=self.jwt.issuer,
                leeway=self.jwt.leeway, options={"require": ["exp", "iss", "aud", "sub"]},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience is not this archive") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer is not trusted") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("invalid token") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise AuthError("invalid token")
        # it is stored (audit log, data requests): PostgreSQL text holds no NUL, and OpenID Connect limits
        # `sub` to 255 characters
        if len(subject) > MAX_SUBJECT or any(ord(c) < 32 or ord(c) == 127 for c in subject):
            raise AuthError(f"token subject must be 1-{MAX_SUBJECT} characters without control characters")
        # subjects the archive gives its own callers: research grants and data requests are keyed by subject
        if subject.startswith("token:") or subject in ("system", "anonymous"):
            raise AuthError(f"token subject {subject!r} is one the archive gives its own callers")
        principal = Principal(subject, "jwt", parse_roles(claims.get(self.jwt.roles_claim)),
                              expires_at=float(claims["exp"]))  # fmt: skip
        if len(self._jwts) >= _MAX_ENTRIES:
            self._jwts.clear()
        self._jwts[key] = principal
        return principal

    async def research_grants(self, subject: str) -> tuple[Grant, ...]:
        """The research partitions `subject` may read (active data requests), with their expiry. Not cached
        while an approved request waits for its export: its activation sends no notification."""
        ttl = CACHE_SECONDS if self._cache_trusted() else 0.0
        grants = self._grants.get(subject, ttl)
        if grants is None:
            async with self.pool.acquire() as conn:
                await requests.refresh(conn, self.clock.now(), subject)
                rows = await conn.fetch(
                    """SELECT research_partition, expires_at FROM data_request
                       WHERE researcher = $1 AND state = 'active'""",
                    subject,
                )
                pending = await requests.pending_activation(conn, subject)
            grants = tuple(Grant(Role.RESEARCHER, r["research_partition"], r["expires_at"]) for r in rows)
            if not pending:
                self._grants.put(subject, grants)
        assert isinstance(grants, tuple)
        return grants

    def now(self) -> datetime:
        return self.clock.now()
