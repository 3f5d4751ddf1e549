"""What authorization costs per request: QIDO and WADO metadata with access control off, with an API
token, with a JWT.

    python -m bench.auth [--studies 200] [--rounds 1000]

Two `dicomweb serve` processes share one PostgreSQL and one blob directory: one with access control
(`DICOMWEB_JWT_*` set, API tokens on), one with `--insecure-open`. Requests alternate between them
(off, token, JWT, off, ...) on keep-alive connections, so drift on a busy machine hits all three alike.
Both audit every request, so the difference is authentication and authorization alone.

It also times the decision itself in-process (the authenticator's cached paths plus the policy check),
without HTTP: that is the overhead the middleware adds to every request once a credential is cached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import jwt

from access import tokens
from access.authn import Authenticator, JWTConfig
from access.clock import Clock
from access.policy import allows, classify
from bench.common import embedded_archive, percentile
from bench.synthetic import instance_variants, make_study, multipart_body
from indexer.embedded import EmbeddedPostgres
from indexer.migrate import migrate

ISSUER, AUDIENCE, SECRET = "https://idp.bench", "dicomweb-bench", "bench-secret-0123456789abcdef0123"
QUERY = "/v2/studies?limit=10&ModalitiesInStudy=CT"


@contextlib.contextmanager
def serve(dsn: str, blobs: Path, *, open_: bool) -> Iterator[str]:
    """One `dicomweb serve` on the shared database and blobs; its base URL."""
    jwt_env = {
        "DICOMWEB_JWT_ISSUER": ISSUER,
        "DICOMWEB_JWT_AUDIENCE": AUDIENCE,
        "DICOMWEB_JWT_SECRET": SECRET,
    }
    with embedded_archive(
        workers=1,
        database_url=dsn,
        insecure_open=open_,
        extra_args=["--storage-url", blobs.as_uri()],
        env=None if open_ else jwt_env,
    ) as root:
        yield root.removesuffix("/v2")


async def prepare(dsn: str) -> tuple[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        owner, _ = await tokens.create(conn, "owner", now=Clock().now(), name="bench-owner")
        reader, _ = await tokens.create(conn, "reader", now=Clock().now(), name="bench-reader")
    finally:
        await conn.close()
    return owner, reader


def load(base: str, owner: str, studies: int) -> str:
    """Store `studies` studies of two instances; returns the last study's UID (for WADO metadata)."""
    rng = random.Random(7)
    with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {owner}"}) as client:
        for n in range(studies):
            spec = make_study(rng, series_count=1)
            body, content_type = multipart_body(instance_variants(spec, 0, 2, start=2 * n))
            r = client.post("/v2/studies", content=body, headers={"Content-Type": content_type})
            r.raise_for_status()
    return spec.study_uid


def measure(open_base: str, secure_base: str, reader: str, rounds: int, path: str) -> dict[str, list[float]]:
    token_jwt = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "exp": int(time.time()) + 3600, "roles": ["reader"]},
        SECRET, algorithm="HS256",
    )  # fmt: skip
    modes = {
        "off (--insecure-open)": (open_base, {}),
        "API token": (secure_base, {"Authorization": f"Bearer {reader}"}),
        "JWT (HS256)": (secure_base, {"Authorization": f"Bearer {token_jwt}"}),
    }
    clients = {base: httpx.Client(base_url=base, timeout=60) for base in (open_base, secure_base)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    try:
        for i in range(rounds + 50):
            for name, (base, headers) in modes.items():
                started = time.perf_counter()
                r = clients[base].get(path, headers=headers)
                elapsed = time.perf_counter() - started
                assert r.status_code == 200, r.text
                if i >= 50:  # warm-up: connections, caches, plans
                    times[name].append(elapsed * 1000)
    finally:
        for client in clients.values():
            client.close()
    return times


async def decision_cost(dsn: str, reader: str, n: int = 100_000) -> dict[str, float]:
    """Microseconds per cached authentication + policy decision, in-process."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        config = JWTConfig(issuer=ISSUER, audience=AUDIENCE, secret=SECRET)
        auth = Authenticator(pool, Clock(), config, cache_trusted=lambda: True)
        token_jwt = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "b", "exp": int(time.time()) + 3600,
                                "roles": ["reader"]}, SECRET, algorithm="HS256")  # fmt: skip
        out = {}
        for name, header in (("API token", f"Bearer {reader}"), ("JWT (HS256)", f"Bearer {token_jwt}")):
            await auth.authenticate(header)  # fill the cache
            started = time.perf_counter()
            for _ in range(n):
                principal = await auth.authenticate(header)
                target = classify("GET", "/v2/studies")
                assert allows(principal.grants, target, auth.now())
            out[name] = (time.perf_counter() - started) / n * 1e6
        # the uncached first sight of a JWT: signature and claim checks
        started = time.perf_counter()
        for i in range(2000):
            claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": f"u{i}", "exp": int(time.time()) + 3600}
            fresh = jwt.encode(claims, SECRET, algorithm="HS256")
            jwt.decode(fresh, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
        out["JWT first sight (encode + verify)"] = (time.perf_counter() - started) / 2000 * 1e6
        return out
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomweb-bench-auth-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "postgres", fast_unsafe=True)
        dsn = server.start()
        try:
            owner, reader = asyncio.run(prepare(dsn))
            blobs = Path(tmp) / "blobs"
            blobs.mkdir()
            with serve(dsn, blobs, open_=False) as secure_base, serve(dsn, blobs, open_=True) as open_base:
                study = load(secure_base, owner, args.studies)
                results = {
                    f"QIDO {QUERY}": measure(open_base, secure_base, reader, args.rounds, QUERY),
                    "WADO /v2/studies/{study}/metadata": measure(
                        open_base, secure_base, reader, args.rounds, f"/v2/studies/{study}/metadata"
                    ),
                }
            cost = asyncio.run(decision_cost(dsn, reader))
        finally:
            server.stop()
    for what, times in results.items():
        print(f"{what} over {args.studies} studies, {args.rounds} rounds, sequential, keep-alive")
        print(f"{'mode':<24}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
        for name, values in times.items():
            mean = sum(values) / len(values)
            print(f"{name:<24}{percentile(values, 50):>10.3f}{percentile(values, 95):>10.3f}{mean:>10.3f}")
    print("in-process decision (cached credential + policy), microseconds per request:")
    for name, us in cost.items():
        print(f"  {name:<36}{us:>8.1f}")


if __name__ == "__main__":
    main()
