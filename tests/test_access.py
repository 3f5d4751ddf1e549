"""Authentication (API tokens, JWTs), partition scopes, refusals that reveal nothing, and the audit log."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from access import tokens
from access.clock import Clock
from bench.synthetic import instance_variants, make_study, multipart_body
from dicomweb.cli import main
from tests.access_support import (
    AUDIENCE,
    ISSUER,
    JWKSServer,
    SecureArchive,
    bearer,
    hs256,
    make_token,
    start_secure,
)

DENIED = {"error": {"code": 403, "message": "not permitted"}}
SUBJECT_REFUSED = "token subject must be 1-255 characters without control characters"


@pytest.fixture
def jwks() -> Iterator[JWKSServer]:
    with JWKSServer() as server:
        yield server


@pytest.fixture
async def secure(database_url: str, tmp_path: Path, jwks: JWKSServer) -> AsyncIterator[SecureArchive]:
    archive = start_secure(database_url, tmp_path, jwt_jwks_url=jwks.url, trusted_proxies="127.0.0.1")
    try:
        yield archive
    finally:
        archive.thread.stop()


@pytest.fixture
async def client(secure: SecureArchive) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=secure.running.base, timeout=30) as c:
        yield c


async def stow_study(client: httpx.AsyncClient, token: str, path: str = "/v2/studies", seed: int = 3) -> str:
    spec = make_study(random.Random(seed), series_count=1)
    body, content_type = multipart_body(instance_variants(spec, 0, 2))
    r = await client.post(path, content=body, headers={"Content-Type": content_type, **bearer(token)})
    assert r.status_code == 200, r.text
    return spec.study_uid


async def audit_rows(secure: SecureArchive) -> list[asyncpg.Record]:
    await secure.flush_audit()
    conn = await asyncpg.connect(secure.running.database_url)
    try:
        return await conn.fetch("SELECT * FROM audit_event ORDER BY event_id")
    finally:
        await conn.close()


# --- API tokens --------------------------------------------------------------------------------------


async def test_api_token_reads_and_wrong_secret_is_refused(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    token, stored = await make_token(secure.running.database_url, "reader")
    assert token.startswith(f"dwa_{stored.token_id}_")
    assert (await client.get("/v2/studies", headers=bearer(token))).status_code == 200
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    r = await client.get("/v2/studies", headers=bearer(forged))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == (
        'Bearer realm="dicomweb", error="invalid_token", error_description="invalid token"'
    )
    # the secret is stored only as its SHA-256
    conn = await asyncpg.connect(secure.running.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM access_token WHERE token_id = $1", stored.token_id)
    finally:
        await conn.close()
    assert token.split("_", 2)[2] not in str(dict(row))
    assert bytes(row["secret_sha256"]) == tokens.digest(token.split("_", 2)[2])


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Basic dXNlcjpwdw==", "Bearer dwa_", "Bearer dwa_0123456789abcdef_short",
     "Bearer not-a-token", "Bearer a.b.c", "Bearer ....", "Token abc"],
)  # fmt: skip
async def test_malformed_credentials_get_401(client: httpx.AsyncClient, header: str) -> None:
    r = await client.get("/v2/studies", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith('Bearer realm="dicomweb", error="invalid_token"')


async def test_revocation_takes_effect_on_the_next_request(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    owner, _ = await make_token(secure.running.database_url, "owner")
    token, _ = await make_token(secure.running.database_url, "reader", name="scanner-7")
    for _ in range(3):  # now cached
        assert (await client.get("/v2/studies", headers=bearer(token))).status_code == 200
    assert (await client.delete("/tokens/scanner-7", headers=bearer(owner))).status_code == 204
    r = await client.get("/v2/studies", headers=bearer(token))
    assert (r.status_code, r.json()["error"]["message"]) == (401, "token revoked")


async def test_revocation_from_another_process(secure: SecureArchive, client: httpx.AsyncClient) -> None:
    """As `dicomweb token revoke` does: straight in the database; the server hears of it by NOTIFY."""
    token, _ = await make_token(secure.running.database_url, "reader", name="scanner-8")
    for _ in range(3):  # now cached
        assert (await client.get("/v2/studies", headers=bearer(token))).status_code == 200
    conn = await asyncpg.connect(secure.running.database_url)
    try:
        assert await tokens.revoke(conn, "scanner-8", now=Clock().now())
    finally:
        await conn.close()
    revoked = asyncio.get_running_loop().time()
    statuses = []
    while not statuses or statuses[-1] == 200:  # the notification travels in milliseconds, not at a TTL
        statuses.append((await client.get("/v2/studies", headers=bearer(token))).status_code)
        assert asyncio.get_running_loop().time() - revoked < 1.0, statuses
    assert statuses[-1] == 401


async def test_tokens_over_http(secure: SecureArchive, client: httpx.AsyncClient) -> None:
    owner, _ = await make_token(secure.running.database_url, "owner")
    wanted = {"role": "reader", "partition": "alpha", "name": "viewer", "expires": "2h"}
    r = await client.post("/tokens", json=wanted, headers=bearer(owner))
    assert r.status_code == 201
    created = r.json()
    assert (created["role"], created["partition"], created["name"]) == ("reader", "alpha", "viewer")
    reader = created["token"]
    assert (await client.get("/v2/partitions/alpha/studies", headers=bearer(reader))).status_code in (
        200,
        404,
    )
    listing = (await client.get("/tokens", headers=bearer(owner))).json()
    assert [t["name"] for t in listing if t["id"] == created["id"]] == ["viewer"]
    assert "token" not in listing[0] and reader.split("_", 2)[2] not in str(listing)
    bad = [({"role": "king"}, "unknown role"), ({"role": "reader", "partition": "a/b"}, "partition"),
           ({"role": "reader", "expires": "soon"}, "--expires"),
           # past the year 9999 (OverflowError): a 500
           ({"role": "reader", "expires": "99999999d"}, "later than the year 9999"),
           ({"role": "reader", "expires": "9999999999999d"}, "later than the year 9999"),
           # a misspelt field was ignored: "partiton" made an all-partition token, "expiry" one that never
           # expires
           ({"role": "reader", "partiton": "alpha"},
            "unknown field 'partiton': use expires, name, partition, role"),
           ({"role": "reader", "expiry": "1h"}, "unknown field 'expiry'"),
           # a token born expired (201, then every use 401 "token expired")
           ({"role": "reader", "expires": "0d"}, "--expires '0d' is not in the future"),
           ({"role": "reader", "expires": "2000-01-01T00:00:00Z"}, "is not in the future")]  # fmt: skip
    for body, message in bad:
        r = await client.post("/tokens", json=body, headers=bearer(owner))
        assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert (await client.delete("/tokens/viewer", headers=bearer(owner))).status_code == 204
    assert (await client.delete("/tokens/viewer", headers=bearer(owner))).status_code == 404
    r = await client.get("/v2/partitions/alpha/studies", headers=bearer(reader))
    assert (r.status_code, r.json()["error"]["message"]) == (401, "token revoked")
    # the token text never reaches the audit log
    rows = await audit_rows(secure)
    assert reader not in str([dict(row) for row in rows])


async def test_token_expiry_follows_the_archive_clock(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    token, _ = await make_token(
        secure.running.database_url, "reader", expires_at=Clock().now() + timedelta(hours=1)
    )
    assert (await client.get("/v2/studies", headers=bearer(token))).status_code == 200
    secure.clock.advance(timedelta(hours=2))
    r = await client.get("/v2/studies", headers=bearer(token))
    assert (r.status_code, r.json()["error"]["message"]) == (401, "token expired")


# --- JWTs --------------------------------------------------------------------------------------------


async def test_hs256_jwt_with_roles_claim(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/studies", headers=bearer(hs256(roles=["reader"])))).status_code == 200
    # roles it does not know are ignored; with none left, every data route is refused
    r = await client.get("/v2/studies", headers=bearer(hs256(roles=["DicomDataOwner", "admin"])))
    assert (r.status_code, r.json()) == (403, DENIED)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda: hs256(roles=["reader"], exp=1_000_000), "token expired"),
        (lambda: hs256(roles=["reader"], aud="another-service"), "token audience is not this archive"),
        (lambda: hs256(roles=["reader"], iss="https://evil.example"), "token issuer is not trusted"),
        (lambda: hs256(roles=["reader"], secret="the-wrong-secret-0123456789abcdef"), "invalid token"),
        (lambda: hs256(roles=["reader"], nbf=2_000_000_000), "token not yet valid"),
        (lambda: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": 2_000_000_000,
                             "roles": ["owner"]}, None, algorithm="none"),
         "token algorithm 'none' is not accepted"),
        (lambda: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": 2_000_000_000, "roles": ["owner"]},
                            "test-shared-secret-0123456789abcdef", algorithm="HS256"), "invalid token"),
        (lambda: hs256(roles=["reader"]) + "x", "invalid token"),
        # a subject PostgreSQL cannot store (NUL: a data request submitted with it was a 500), one that
        # breaks the audit log's lines, or one longer than OpenID Connect allows (255)
        (lambda: hs256(sub="a\u0000b", roles=["researcher"]), SUBJECT_REFUSED),
        (lambda: hs256(sub="rita\n", roles=["researcher"]), SUBJECT_REFUSED),
        (lambda: hs256(sub="x" * 256, roles=["researcher"]), SUBJECT_REFUSED),
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "wrongly-signed", "not-yet-valid", "alg-none", "no-sub",
         "tampered", "sub-nul", "sub-newline", "sub-too-long"],
)  # fmt: skip
async def test_bad_jwts_are_refused(client: httpx.AsyncClient, token: object, message: str) -> None:
    credential = bearer(token())  # type: ignore[operator]
    r = await client.get("/v2/studies", headers=credential)
    assert r.status_code == 401
    assert r.json() == {"error": {"code": 401, "message": message}}
    r = await client.post("/datarequests", json={"title": "t"}, headers=credential)
    assert r.json() == {"error": {"code": 401, "message": message}}


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_jwks_signed_jwts(client: httpx.AsyncClient, jwks: JWKSServer, alg: str) -> None:
    assert (await client.get("/v2/studies", headers=bearer(jwks.sign(alg)))).status_code == 200
    r = await client.get("/v2/studies", headers=bearer(jwks.sign(alg, aud="someone-else")))
    assert r.status_code == 401
    # algorithm confusion: an HS256 token "signed" with the RSA public key is not an RS256 token
    other = JWKSServer()
    r = await client.get("/v2/studies", headers=bearer(other.sign(alg)))
    assert (r.status_code, r.json()["error"]["message"]) == (401, "invalid token")


async def test_jwt_partition_roles(client: httpx.AsyncClient) -> None:
    token = hs256(roles=["writer:alpha", "reader:alpha"])
    uid = await stow_study(client, token, "/v2/partitions/alpha/studies")
    assert (await client.get("/v2/partitions/alpha/studies", headers=bearer(token))).status_code == 200
    for path in ("/v2/studies", "/v2/partitions/beta/studies", f"/v2/partitions/beta/studies/{uid}"):
        r = await client.get(path, headers=bearer(token))
        assert (r.status_code, r.json()) == (403, DENIED), path


async def test_a_jwt_cannot_take_an_api_tokens_subject(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    """API tokens act as `token:<id>`, and a researcher's research grants and data requests are keyed by
    subject: a JWT whose sub was `token:<id>` of a researcher token read that token's research partition
    and requests. Subjects of the archive's own forms (`token:...`, `system`, `anonymous`) are refused."""
    token, row = await make_token(secure.running.database_url, "researcher", name="lab-script")
    r = await client.post(
        "/datarequests",
        json={"title": "t", "purpose": "p", "cohort": {"studies": ["1.2.3"]}, "durationDays": 1},
        headers=bearer(token),
    )
    assert r.status_code == 201
    for sub in (f"token:{row.token_id}", "system", "anonymous"):
        r = await client.get("/datarequests", headers=bearer(hs256(sub=sub, roles=["researcher"])))
        assert (r.status_code, r.json()) == (
            401,
            {
                "error": {
                    "code": 401,
                    "message": f"token subject {sub!r} is one the archive gives its own callers",
                }
            },
        )


async def test_a_jwt_role_with_an_empty_partition_reaches_nothing(client: httpx.AsyncClient) -> None:
    token = hs256(roles=["owner:"])  # was read as owner of every partition: 200 and every route
    for path in ("/v2/studies", "/tokens", "/audit"):
        r = await client.get(path, headers=bearer(token))
        assert (r.status_code, r.json()) == (403, DENIED), path


# --- partitions, refusals that reveal nothing, path tricks ---------------------------------------------


async def test_refusal_is_the_same_for_known_and_unknown_studies(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    owner, _ = await make_token(secure.running.database_url, "owner")
    uid = await stow_study(client, owner, "/v2/partitions/secret/studies")
    reader, _ = await make_token(secure.running.database_url, "reader", "public")
    known = await client.get(f"/v2/partitions/secret/studies/{uid}/metadata", headers=bearer(reader))
    unknown = await client.get("/v2/partitions/secret/studies/1.2.3.999/metadata", headers=bearer(reader))
    missing_partition = await client.get(
        "/v2/partitions/nowhere/studies/1.2.3/metadata", headers=bearer(reader)
    )
    assert known.status_code == unknown.status_code == missing_partition.status_code == 403
    assert known.content == unknown.content == missing_partition.content
    assert dict(known.headers) | {"date": ""} == dict(unknown.headers) | {"date": ""}


@pytest.mark.parametrize(
    "path",
    [
        "/v2/partitions/alpha%2F..%2Fbeta/studies",
        "/v2/partitions/alpha/..%2Fbeta/studies",
        "/v2/partitions/ALPHA/studies",
        "/v2/partitions/alpha%00/studies",
        "/v2/partitions/alpha /studies",
        "/v2/partitions//studies",
        "/v2/partitions/alpha/partitions/beta/studies",
        "/v2//partitions/alpha/studies",
        "/v2/partitions/%61lpha/../beta/studies",
    ],
)
async def test_path_tricks_in_partition_names(
    secure: SecureArchive, client: httpx.AsyncClient, path: str
) -> None:
    reader, _ = await make_token(secure.running.database_url, "reader", "alpha")
    # raw_path: no client-side normalisation, the server sees exactly this
    request = client.build_request("GET", "/")
    request.url = request.url.copy_with(raw_path=path.encode())
    request.headers.update(bearer(reader))
    r = await client.send(request)
    assert (r.status_code, r.json()) == (403, DENIED), path


async def test_head_is_authorized_as_get(secure: SecureArchive, client: httpx.AsyncClient) -> None:
    reader, _ = await make_token(secure.running.database_url, "reader")
    writer, _ = await make_token(secure.running.database_url, "writer")
    assert (await client.head("/v2/studies", headers=bearer(reader))).status_code == 200
    assert (await client.head("/v2/studies", headers=bearer(writer))).status_code == 403


async def test_researcher_reads_nothing_without_a_grant(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    researcher, _ = await make_token(secure.running.database_url, "researcher")
    for path in ("/v2/studies", "/v2/partitions/research-x/studies", "/v2/changefeed"):
        r = await client.get(path, headers=bearer(researcher))
        assert (r.status_code, r.json()) == (403, DENIED), path


async def test_tokens_in_urls_are_refused_and_not_logged(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    reader, _ = await make_token(secure.running.database_url, "reader")
    for query in (f"access_token={reader}", f"ACCESS_TOKEN={reader}&PatientID=1", f"%61ccess_token={reader}"):
        r = await client.get(f"/v2/studies?{query}", headers=bearer(reader))
        assert r.status_code == 400
        assert "Authorization" in r.json()["error"]["message"]
    rows = await audit_rows(secure)
    assert [(r["status"], r["query"]) for r in rows] == [(400, "(withheld: carried a token)")] * 3
    assert reader not in json.dumps([dict(r) for r in rows], default=str)


# --- audit -------------------------------------------------------------------------------------------


async def test_audit_holds_exactly_one_record_per_request(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    owner, owner_row = await make_token(secure.running.database_url, "owner", name="ops")
    reader, _ = await make_token(secure.running.database_url, "reader", "alpha")
    uid = await stow_study(client, owner)
    sent = [("POST", "/v2/studies", 200)]
    for method, path, token, status in [
        ("GET", f"/v2/studies/{uid}/metadata", owner, 200),
        ("GET", "/v2/studies", reader, 403),
        ("GET", "/v2/studies", None, 401),
        ("GET", "/v2/studies", "dwa_0123456789abcdef_" + "x" * 43, 401),
        ("DELETE", f"/v2/studies/{uid}", owner, 204),
        ("GET", f"/v2/studies/{uid}", owner, 404),
        ("GET", "/health/live", None, 200),  # probes are not audited
    ]:
        r = await client.request(method, path, headers=bearer(token) if token else {})
        assert r.status_code == status, (path, r.text)
        if not path.startswith("/health"):
            sent.append((method, path, status))
    rows = await audit_rows(secure)
    await asyncio.sleep(0.3)  # nothing more arrives later
    assert [(r["method"], r["path"], r["status"]) for r in await audit_rows(secure)] == sent
    first = rows[0]
    assert (first["subject"], first["auth"], first["token_id"], first["token_name"], first["roles"]) == (
        f"token:{owner_row.token_id}",
        "token",
        owner_row.token_id,
        "ops",
        ["owner"],
    )
    assert (first["action"], first["action_code"], first["partition_name"], first["outcome"]) == (
        "stow",
        "C",
        "Microsoft.Default",
        0,
    )
    assert [(r["action"], r["study_uid"], r["outcome"]) for r in rows[1:]] == [
        ("wado", uid, 0), ("qido", None, 4), ("qido", None, 4), ("qido", None, 4),
        ("delete", uid, 0), ("wado", uid, 4),
    ]  # fmt: skip
    assert [r["auth"] for r in rows[2:5]] == ["token", "none", "invalid"]
    assert rows[2]["roles"] == ["reader@alpha"] and rows[2]["detail"] == "not permitted"
    assert all(r["client_address"] == "127.0.0.1" for r in rows)


async def test_reidentification_is_for_owners_and_audited(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    from deid.mapping import Mapping, project_secret, record

    conn = await asyncpg.connect(secure.running.database_url)
    try:
        await project_secret(conn, "cohort-1")  # the project exists once an export has used it
        await record(conn, "cohort-1", [Mapping("patient", "PSEUDO-7", "MRN-12345", "HOSP")])
    finally:
        await conn.close()
    owner, _ = await make_token(secure.running.database_url, "owner", name="dpo")
    auditor, _ = await make_token(secure.running.database_url, "auditor")
    url = "/reidentify/cohort-1/patient/PSEUDO-7"
    r = await client.get(url, headers=bearer(owner))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert r.json() == {
        "project": "cohort-1", "kind": "patient", "pseudonym": "PSEUDO-7", "original": "MRN-12345",
        "issuer": "HOSP",
    }  # fmt: skip
    assert (await client.get(url, headers=bearer(auditor))).json() == DENIED
    assert (await client.get("/reidentify/cohort-1/patient/NOPE", headers=bearer(owner))).status_code == 404
    assert (await client.get("/reidentify/cohort-1/nurse/PSEUDO-7", headers=bearer(owner))).status_code == 400
    # a NUL in the pseudonym was a 500 with a traceback (PostgreSQL text holds none): no pseudonym has one
    r = await client.get("/reidentify/cohort-1/patient/PSEUDO%007", headers=bearer(owner))
    assert (r.status_code, r.json()["error"]["message"]) == (
        404, "project 'cohort-1' has no patient pseudonym 'PSEUDO\\x007'"
    )  # fmt: skip
    rows = await audit_rows(secure)
    assert [(r["action"], r["action_code"], r["path"], r["status"]) for r in rows] == [
        ("reidentify", "E", url, 200),
        ("reidentify", "E", url, 403),
        ("reidentify", "E", "/reidentify/cohort-1/patient/NOPE", 404),
        ("reidentify", "E", "/reidentify/cohort-1/nurse/PSEUDO-7", 400),
        ("reidentify", "E", "/reidentify/cohort-1/patient/PSEUDO\ufffd7", 404),
    ]
    # who looked up which pseudonym is recorded; the original never is
    assert "MRN-12345" not in json.dumps([dict(r) for r in rows], default=str)


async def test_audit_is_append_only(secure: SecureArchive, client: httpx.AsyncClient) -> None:
    await client.get("/v2/studies")
    assert len(await audit_rows(secure)) == 1
    conn = await asyncpg.connect(secure.running.database_url)
    try:
        for sql in ("UPDATE audit_event SET status = 200", "DELETE FROM audit_event", "TRUNCATE audit_event"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="audit_event is append-only"):
                await conn.execute(sql)
    finally:
        await conn.close()


async def test_forwarded_for_only_from_trusted_proxies(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    # the fixture trusts 127.0.0.1 (the test client's address) as a proxy
    await client.get("/v2/studies", headers={"X-Forwarded-For": "203.0.113.9, 10.1.1.1"})
    await client.get("/v2/studies", headers={"X-Forwarded-For": "127.0.0.1"})
    rows = await audit_rows(secure)
    assert [r["client_address"] for r in rows] == ["10.1.1.1", "127.0.0.1"]


async def test_forwarded_for_is_ignored_without_trusted_proxies(database_url: str, tmp_path: Path) -> None:
    """No proxy configured: a local client cannot name another address in the audit log. (uvicorn's own
    proxy header handling, which believes 127.0.0.1 by default, is off: DICOMWEB_TRUSTED_PROXIES decides.)"""
    archive = start_secure(database_url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=archive.running.base, timeout=30) as c:
            r = await c.get("/v2/studies", headers={"X-Forwarded-For": "203.0.113.9"})
            assert r.status_code == 401
        rows = await audit_rows(archive)
        assert [(r["client_address"], r["status"]) for r in rows] == [("127.0.0.1", 401)]
    finally:
        archive.thread.stop()


async def test_audit_query_and_export(secure: SecureArchive, client: httpx.AsyncClient) -> None:
    auditor, auditor_row = await make_token(secure.running.database_url, "auditor")
    reader, reader_row = await make_token(secure.running.database_url, "reader")
    for _ in range(3):
        await client.get("/v2/studies", headers=bearer(reader))
    await client.get("/v2/changefeed", headers=bearer(reader))
    await secure.flush_audit()
    subject = f"token:{reader_row.token_id}"
    r = await client.get("/audit", params={"subject": subject}, headers=bearer(auditor))
    assert r.status_code == 200
    assert [(e["action"], e["status"]) for e in r.json()] == [("qido", 200)] * 3 + [("changefeed", 200)]
    ids = [e["event_id"] for e in r.json()]
    r = await client.get("/audit", params={"subject": subject, "action": "qido", "offset": "1", "limit": "1"},
                         headers=bearer(auditor))  # fmt: skip
    assert [e["event_id"] for e in r.json()] == [ids[1]]
    times = [e["event_time"] for e in (await client.get("/audit", headers=bearer(auditor))).json()]
    r = await client.get("/audit", params={"from": times[1], "to": times[3]}, headers=bearer(auditor))
    assert [e["event_time"] for e in r.json()] == times[1:3]
    await secure.flush_audit()
    export = await client.get("/audit", headers={"Accept": "application/x-ndjson", **bearer(auditor)})
    assert export.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [e["subject"] for e in lines[:4]] == [subject] * 4
    assert lines[4]["subject"] == f"token:{auditor_row.token_id}" and lines[4]["action"] == "audit"
    bad = [({"limit": "0"}, "limit"), ({"from": "yesterday"}, "from"), ({"action": "steal"}, "action"),
           ({"user": "x"}, "unknown parameter")]  # fmt: skip
    for params, message in bad:
        r = await client.get("/audit", params=params, headers=bearer(auditor))
        assert r.status_code == 400 and message in r.json()["error"]["message"]
    # a NUL in the subject was a 500 with a traceback (PostgreSQL text holds none); records are stored with
    # each NUL as U+FFFD, and the subject is looked up the same way
    for accept in ("application/json", "application/x-ndjson"):
        r = await client.get(
            "/audit", params={"subject": "a\x00b"}, headers={"Accept": accept, **bearer(auditor)}
        )
        assert (r.status_code, r.text.strip()) == (200, "[]" if accept == "application/json" else "")


# --- operators' commands -----------------------------------------------------------------------------


def test_token_commands(database_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    common = ["--database-url", database_url]
    assert main(["migrate", *common]) == 0
    capsys.readouterr()
    assert main(["token", "create", "--role", "reader", "--partition", "alpha", "--name", "pacs", "--expires",
                 "30d", *common]) == 0  # fmt: skip
    out = capsys.readouterr()
    token = out.out.strip()
    assert tokens.split(token) is not None and "reader in alpha" in out.err
    assert main(["token", "list", *common]) == 0
    listing = capsys.readouterr().out
    assert "\tpacs\treader\talpha\t" in listing and token.split("_", 2)[2] not in listing
    assert main(["token", "revoke", "pacs", *common]) == 0
    assert main(["token", "revoke", "pacs", *common]) == 1  # already revoked
    assert main(["token", "create", "--role", "reader", "--partition", "../x", *common]) == 2
    capsys.readouterr()
    assert main(["audit", "export", *common]) == 0
    assert capsys.readouterr().out == ""  # no requests were made


BAD_NAMES = [("", "must not be empty"), ("   ", "must not be empty"), ("a\tb", "control character"),
             ("a\nb", "control character"), ("x" * 129, "at most 128 characters")]  # fmt: skip


@pytest.mark.parametrize(("name", "message"), BAD_NAMES)
async def test_bad_token_names_are_refused_alike_over_http_and_by_the_cli(
    secure: SecureArchive,
    client: httpx.AsyncClient,
    capsys: pytest.CaptureFixture[str],
    name: str,
    message: str,
) -> None:
    """An empty name (the CLI's --name "" and the route's "name": "") was accepted and silently replaced by
    token-<id>; a tab or newline broke `token list`'s columns. Both refuse it now, with the same reason;
    leaving the name out still names it token-<id>."""
    owner, _ = await make_token(secure.running.database_url, "owner")
    r = await client.post("/tokens", json={"role": "reader", "name": name}, headers=bearer(owner))
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    database = ["--database-url", secure.running.database_url]
    capsys.readouterr()
    assert (
        await asyncio.to_thread(main, ["token", "create", "--role", "reader", "--name", name, *database]) == 2
    )
    out = capsys.readouterr()
    assert out.out == "" and message in out.err
    listed = (await client.get("/tokens", headers=bearer(owner))).json()
    assert [t["role"] for t in listed] == ["owner"]
    r = await client.post("/tokens", json={"role": "reader", "name": None}, headers=bearer(owner))
    assert r.status_code == 201 and r.json()["name"] == "token-" + r.json()["id"][:6]


async def test_revoking_by_id_revokes_only_that_token(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    """DELETE /tokens/{id} also revoked a token whose name was that id (revoke matched id OR name); an id
    now names its own token only, and a name is looked up only when no token has that id. A NUL in the
    path was a 500 (PostgreSQL text holds none): it names no token, 404."""
    owner, _ = await make_token(secure.running.database_url, "owner")
    first = (await client.post("/tokens", json={"role": "reader"}, headers=bearer(owner))).json()
    r = await client.post("/tokens", json={"role": "reader", "name": first["id"]}, headers=bearer(owner))
    namesake = r.json()
    assert (await client.delete(f"/tokens/{first['id']}", headers=bearer(owner))).status_code == 204
    listed = {t["id"]: t for t in (await client.get("/tokens", headers=bearer(owner))).json()}
    assert listed[first["id"]]["revokedAt"] is not None
    assert listed[namesake["id"]]["revokedAt"] is None
    assert (await client.get("/v2/studies", headers=bearer(namesake["token"]))).status_code == 200
    # once no active token has that id, the text names the active tokens of that name
    assert (await client.delete(f"/tokens/{first['id']}", headers=bearer(owner))).status_code == 204
    r = await client.get("/v2/studies", headers=bearer(namesake["token"]))
    assert (r.status_code, r.json()["error"]["message"]) == (401, "token revoked")
    r = await client.delete("/tokens/a%00b", headers=bearer(owner))
    assert (r.status_code, r.json()) == (
        404,
        {"error": {"code": 404, "message": "no active token with that id or name"}},
    )


async def test_worklist_websocket_needs_the_worklist_role(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url = secure.running.base.replace("http://", "ws://") + "/v2/ws/subscribers/AE1"
    reader, _ = await make_token(secure.running.database_url, "reader")
    worklist, _ = await make_token(secure.running.database_url, "worklist")
    for headers in ({}, bearer(reader)):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    async with connect(url, additional_headers=bearer(worklist)) as ws:
        await ws.close()
    for _ in range(50):  # a connection's record is written when the server side has finished with it
        rows = await audit_rows(secure)
        if len(rows) == 3:
            break
        await asyncio.sleep(0.1)
    assert [(r["method"], r["action"], r["status"]) for r in rows] == [
        ("WEBSOCKET", "workitems", 401),
        ("WEBSOCKET", "workitems", 403),
        ("WEBSOCKET", "workitems", 101),
    ]


async def test_a_revoked_token_loses_its_open_worklist_websocket(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    """A UPS-RS WebSocket was authorized once, at the upgrade: after its token was revoked (or expired) it
    went on receiving work item events (patient names among them) for as long as it stayed open. The
    channel now re-checks its credential before each read of events and closes with 1008 once it is no
    longer valid (within the channel's 5 s re-read when idle)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    url = secure.running.base.replace("http://", "ws://") + "/v2/ws/subscribers/AE2"
    owner, _ = await make_token(secure.running.database_url, "owner")
    worklist, row = await make_token(secure.running.database_url, "worklist", name="ris-feed")
    async with connect(url, additional_headers=bearer(worklist)) as ws:
        assert (await client.delete(f"/tokens/{row.token_id}", headers=bearer(owner))).status_code == 204
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), timeout=15)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            1008,
            "the credential was revoked or has expired",
        )


async def test_graceful_stop_writes_the_audit_buffer(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    secure.access.audit.interval = 3600  # from the writer's next round on, only the stop writes
    await asyncio.sleep(0.3)
    for _ in range(5):
        await client.get("/v2/studies")
    secure.thread.stop()  # no flush from the test: the server's shutdown must write what it buffered
    conn = await asyncpg.connect(secure.running.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM audit_event") == 5
    finally:
        await conn.close()


async def test_an_export_reaches_only_partitions_the_caller_may_write(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    """An owner of partition alpha exported alpha into partition beta (202), or into a research partition,
    writing where its grant cannot STOW; a partition destination now needs what a STOW there needs (else
    the same 403 as every refusal), and research partitions are made by approved data requests only."""
    db = secure.running.database_url
    owner_all, _ = await make_token(db, "owner")
    owner_alpha, _ = await make_token(db, "owner", partition="alpha")
    uid = await stow_study(client, owner_alpha, "/v2/partitions/alpha/studies", seed=7)

    def body(partition: str) -> dict[str, object]:
        return {"source": {"type": "identifiers", "settings": {"values": [uid]}},
                "destination": {"type": "partition", "settings": {"name": partition}},
                "deidentification": {"project": "p"}}  # fmt: skip

    r = await client.post("/v2/partitions/alpha/export", json=body("beta"), headers=bearer(owner_alpha))
    assert (r.status_code, r.json()) == (403, DENIED)
    for token in (owner_alpha, owner_all):
        r = await client.post(
            "/v2/partitions/alpha/export", json=body("research-0123456789abcdef"), headers=bearer(token)
        )
        assert (r.status_code, r.json()["error"]["message"]) == (
            400,
            "a research partition is made by an approved data request, not named by an export",
        )
    # nor can it borrow a data request's pseudonym project: its secret would link the researcher's
    # pseudonyms to the originals this owner reads
    borrowed = {**body("gamma"), "destination": {"type": "directory", "settings": {"path": "mine"}},
                "deidentification": {"project": "research-0123456789abcdef"}}  # fmt: skip
    r = await client.post("/v2/partitions/alpha/export", json=borrowed, headers=bearer(owner_alpha))
    assert (r.status_code, r.json()["error"]["message"]) == (
        400,
        "a research-* project belongs to a data request; name another project",
    )
    conn = await asyncpg.connect(db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM operation WHERE type = 'export'") == 0
        names = {r[0] for r in await conn.fetch("SELECT name FROM partition")}
        assert "beta" not in names and "research-0123456789abcdef" not in names
    finally:
        await conn.close()
    r = await client.post("/v2/partitions/alpha/export", json=body("beta"), headers=bearer(owner_all))
    assert r.status_code == 202, r.text


async def test_a_partition_owner_follows_its_own_operations(
    secure: SecureArchive, client: httpx.AsyncClient
) -> None:
    """An owner of partition alpha got 202 for an export from alpha, and then 403 for the operation it was
    given to follow (operations needed an all-partition grant). Under alpha's root the operations started
    there are readable with alpha's grant; another partition's root does not show them (404), and the plain
    route, which shows every partition's operations, still needs an all-partition grant."""
    db = secure.running.database_url
    owner_alpha, _ = await make_token(db, "owner", partition="alpha")
    writer_alpha, _ = await make_token(db, "writer", partition="alpha")
    owner_beta, _ = await make_token(db, "owner", partition="beta")
    owner_all, _ = await make_token(db, "owner")
    uid = await stow_study(client, owner_alpha, "/v2/partitions/alpha/studies", seed=8)
    await stow_study(client, owner_beta, "/v2/partitions/beta/studies", seed=9)
    body = {"source": {"type": "identifiers", "settings": {"values": [uid]}},
            "destination": {"type": "partition", "settings": {"name": "alpha-copy"}},
            "deidentification": {"project": "p"}}  # fmt: skip
    owner_alpha_copy, _ = await make_token(db, "owner", partition="alpha-copy")
    r = await client.post("/v2/partitions/alpha/export", json=body, headers=bearer(owner_all))
    assert r.status_code == 202, r.text
    href = r.json()["href"]
    op_id = r.json()["id"]
    assert href.endswith(f"/v2/partitions/alpha/operations/{op_id}")
    for token in (owner_alpha, writer_alpha, owner_all):
        r = await client.get(f"/v2/partitions/alpha/operations/{op_id}", headers=bearer(token))
        assert r.status_code in (200, 202), r.text
        assert r.json()["id"] == op_id
    for token in (owner_beta, owner_alpha_copy):
        r = await client.get(f"/v2/partitions/alpha/operations/{op_id}", headers=bearer(token))
        assert (r.status_code, r.json()) == (403, DENIED)
    # beta's root shows only beta's operations: to beta's owner and to an all-partition owner alike
    for token in (owner_beta, owner_all):
        r = await client.get(f"/v2/partitions/beta/operations/{op_id}", headers=bearer(token))
        assert r.status_code == 404, r.text
    r = await client.get(f"/v2/operations/{op_id}", headers=bearer(owner_alpha))
    assert (r.status_code, r.json()) == (403, DENIED)
    r = await client.get(f"/v2/operations/{op_id}", headers=bearer(owner_all))
    assert r.status_code in (200, 202), r.text
