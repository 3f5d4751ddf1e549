"""Fixtures for access-control tests: archives with authentication on, tokens per role, JWT issuers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from access import tokens
from access.clock import Clock
from access.service import AccessControl
from dicomweb.config import Settings
from storage import LocalBlobStore
from tests.fixtures.postgres import fresh_database as fresh_database  # for module-scoped archives
from tests.fixtures.server import RunningArchive, ServerThread, start_archive

ISSUER = "https://idp.example.org"
AUDIENCE = "dicomweb-test"
SECRET = "test-shared-secret-0123456789abcdef"


@dataclass
class SecureArchive:
    running: RunningArchive
    thread: ServerThread

    @property
    def access(self) -> AccessControl:
        return self.thread.config.app.state.access  # type: ignore[union-attr]

    @property
    def clock(self) -> Clock:
        return self.access.clock

    async def flush_audit(self) -> None:
        """Wait until the server's audit buffer is written (its writer runs on the server's loop)."""
        loop = self.thread.loop
        assert loop is not None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.access.audit.flush(), loop))


def start_secure(database_url: str, tmp_path: Path, **settings: object) -> SecureArchive:
    base = Settings(data_dir=tmp_path, max_instance_size=64 << 20)
    config = replace(base, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_secret=SECRET, **settings)
    thread, running = start_archive(
        config,
        database_url,
        LocalBlobStore(tmp_path / "blobs"),
        LocalBlobStore(tmp_path / "blobs"),
        secure=True,
    )
    return SecureArchive(running, thread)


async def make_token(
    database_url: str, role: str, partition: str | None = None, **kwargs: object
) -> tuple[str, tokens.StoredToken]:
    conn = await asyncpg.connect(database_url)
    try:
        return await tokens.create(conn, role, now=Clock().now(), partition=partition, **kwargs)  # type: ignore[arg-type]
    finally:
        await conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs256(claims: dict[str, object] | None = None, *, secret: str = SECRET, **overrides: object) -> str:
    now = int(time.time())
    body: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600}
    body.update(claims or {})
    body.update(overrides)
    return jwt.encode(body, secret, algorithm="HS256")


class JWKSServer:
    """A real HTTP server publishing a JWKS with one RSA and one EC key, as an identity provider does."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        keys = []
        for kid, alg, key in (("rsa-1", "RS256", self.rsa), ("ec-1", "ES256", self.ec)):
            algorithm = jwt.get_algorithm_by_name(alg)
            jwk = json.loads(algorithm.to_jwk(key.public_key()))
            jwk.update({"kid": kid, "alg": alg, "use": "sig"})
            keys.append(jwk)
        body = json.dumps({"keys": keys}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def sign(self, alg: str, *, sub: str = "carol", roles: list[str] | None = None, **claims: object) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": now + 600, "roles": roles or ["reader"]}
        body.update(claims)
        key, kid = (self.rsa, "rsa-1") if alg == "RS256" else (self.ec, "ec-1")
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def __enter__(self) -> JWKSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def jwks_server() -> Iterator[JWKSServer]:
    with JWKSServer() as server:
        yield server
