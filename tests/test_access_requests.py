"""Research data requests end to end: submit, review, de-identified export into a research partition that
only the requesting researcher reads, expiry on the archive's clock, revocation, every transition recorded."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from bench.synthetic import instance_variants, make_study, multipart_body
from tests.access_support import SecureArchive, bearer, hs256, make_token, start_secure

DENIED = {"error": {"code": 403, "message": "not permitted"}}
RITA = bearer(hs256(sub="rita", roles=["researcher"]))
SAM = bearer(hs256(sub="sam", roles=["researcher"]))
REVIEWER = bearer(hs256(sub="rev", roles=["reviewer"]))
READER = bearer(hs256(sub="reader", roles=["reader"]))
ANY_SYNTAX = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


@pytest.fixture
async def setup(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[SecureArchive, httpx.AsyncClient, dict]]:
    archive = start_secure(database_url, tmp_path)
    owner = bearer((await make_token(database_url, "owner"))[0])
    try:
        async with httpx.AsyncClient(base_url=archive.running.base, timeout=60) as client:
            yield archive, client, owner
    finally:
        archive.thread.stop()


async def stow(client: httpx.AsyncClient, owner: dict, seed: int) -> str:
    spec = make_study(random.Random(seed), series_count=1)
    body, content_type = multipart_body(instance_variants(spec, 0, 2, start=seed * 10))
    r = await client.post("/v2/studies", content=body, headers={"Content-Type": content_type, **owner})
    assert r.status_code == 200, r.text
    return spec.study_uid


def submission(studies: list[str], days: int = 30) -> dict:
    return {
        "title": "Lung nodules",
        "purpose": "Train a detector",
        "cohort": {"studies": studies},
        "deidentification": {"options": ["retainLongModifiedDates"]},
        "durationDays": days,
    }


async def submit_and_activate(client: httpx.AsyncClient, studies: list[str]) -> dict:
    r = await client.post("/datarequests", json=submission(studies), headers=RITA)
    assert r.status_code == 201, r.text
    request_id = r.json()["request_id"]
    r = await client.post(f"/datarequests/{request_id}/approve", json={"comment": "ok"}, headers=REVIEWER)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "approved"
    for _ in range(300):
        r = await client.get(f"/datarequests/{request_id}", headers=RITA)
        if r.json()["state"] == "active":
            return r.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"never became active: {r.json()}")


async def test_request_lifecycle_until_expiry(setup: tuple[SecureArchive, httpx.AsyncClient, dict]) -> None:
    archive, client, owner = setup
    wanted, other = await stow(client, owner, 1), await stow(client, owner, 2)
    assert (await client.get("/v2/studies", headers=RITA)).json() == DENIED  # nothing before a grant
    request = await submit_and_activate(client, [wanted])
    research = f"/v2/partitions/{request['research_partition']}"
    found = (await client.get(f"{research}/studies", headers=RITA)).json()
    assert len(found) == 1  # only the requested study, de-identified (new UIDs)
    copy_uid = found[0]["0020000D"]["Value"][0]
    assert copy_uid not in (wanted, other)
    r = await client.get(f"{research}/studies/{copy_uid}", headers={**RITA, **ANY_SYNTAX})
    assert r.status_code == 200
    # nobody else reads it: another researcher, an all-partition reader; the source stays closed to Rita
    for headers, path in [(SAM, f"{research}/studies"), (READER, f"{research}/studies"),
                          (RITA, "/v2/studies"), (RITA, f"/v2/studies/{wanted}")]:  # fmt: skip
        r = await client.get(path, headers=headers)
        assert (r.status_code, r.json()) == (403, DENIED), path
    assert (await client.get(f"{research}/studies", headers=owner)).status_code == 200
    # another researcher cannot see the request either: the same 403 as for one that does not exist
    r1 = await client.get(f"/datarequests/{request['request_id']}", headers=SAM)
    r2 = await client.get("/datarequests/00000000-0000-0000-0000-000000000000", headers=SAM)
    assert (r1.status_code, r1.json()) == (r2.status_code, r2.json()) == (403, DENIED)
    assert (await client.get("/datarequests", headers=SAM)).json() == []
    # the grant runs out on the archive's clock: the next request is refused, and the state follows
    archive.clock.advance(timedelta(days=30, seconds=1))
    r = await client.get(f"{research}/studies", headers=RITA)
    assert (r.status_code, r.json()) == (403, DENIED)
    final = (await client.get(f"/datarequests/{request['request_id']}", headers=REVIEWER)).json()
    assert final["state"] == "expired"
    assert [(e["from_state"], e["to_state"], e["actor"]) for e in final["events"]] == [
        (None, "submitted", "rita"), ("submitted", "approved", "rev"), ("approved", "active", "system"),
        ("active", "expired", "system"),
    ]  # fmt: skip


async def test_revocation_mid_download(setup: tuple[SecureArchive, httpx.AsyncClient, dict]) -> None:
    _, client, owner = setup
    request = await submit_and_activate(client, [await stow(client, owner, 3)])
    research = f"/v2/partitions/{request['research_partition']}"
    copy_uid = (await client.get(f"{research}/studies", headers=RITA)).json()[0]["0020000D"]["Value"][0]
    async with client.stream(
        "GET", f"{research}/studies/{copy_uid}", headers={**RITA, **ANY_SYNTAX}
    ) as download:
        assert download.status_code == 200
        chunks = download.aiter_bytes()
        first = await chunks.__anext__()
        revoke = f"/datarequests/{request['request_id']}/revoke"
        r = await client.post(revoke, json={"comment": "consent withdrawn"}, headers=REVIEWER)
        assert (r.status_code, r.json()["state"]) == (200, "revoked")
        rest = b"".join([chunk async for chunk in chunks])  # a response already authorized completes
    assert len(first) + len(rest) > 0
    for path in (f"{research}/studies", f"{research}/studies/{copy_uid}"):
        r = await client.get(path, headers=RITA)
        assert (r.status_code, r.json()) == (403, DENIED)


async def test_reviews(setup: tuple[SecureArchive, httpx.AsyncClient, dict]) -> None:
    _, client, owner = setup
    uid = await stow(client, owner, 4)
    rid = (await client.post("/datarequests", json=submission([uid]), headers=RITA)).json()["request_id"]
    # researchers do not review, reviewers do not review their own requests
    assert (await client.post(f"/datarequests/{rid}/approve", headers=RITA)).status_code == 403
    both = bearer(hs256(sub="rita", roles=["researcher", "reviewer"]))
    r = await client.post(f"/datarequests/{rid}/approve", headers=both)
    assert (r.status_code, r.json()) == (403, DENIED)
    r = await client.post(f"/datarequests/{rid}/reject", json={}, headers=REVIEWER)
    assert r.status_code == 400 and "comment" in r.json()["error"]["message"]
    r = await client.post(
        f"/datarequests/{rid}/reject", json={"comment": "no ethics approval"}, headers=REVIEWER
    )
    assert (r.status_code, r.json()["state"], r.json()["decision_comment"]) == (
        200,
        "rejected",
        "no ethics approval",
    )
    r = await client.post(f"/datarequests/{rid}/approve", headers=REVIEWER)
    assert r.status_code == 409 and "rejected" in r.json()["error"]["message"]
    r = await client.post(f"/datarequests/{rid}/revoke", headers=REVIEWER)
    assert r.status_code == 409
    listed = (await client.get("/datarequests", params={"state": "rejected"}, headers=REVIEWER)).json()
    assert [x["request_id"] for x in listed] == [rid]
    assert (await client.get("/datarequests", headers=RITA)).json()[0]["state"] == "rejected"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"title": ""}, "title"),
        ({"cohort": {}}, "cohort"),
        ({"cohort": {"studies": ["not-a-uid"]}}, "not-a-uid"),
        ({"cohort": {"studies": ["1.2.3"], "query": "x=1"}}, "cohort"),
        ({"deidentification": {"options": ["keepEverything"]}}, "keepEverything"),
        ({"durationDays": 0}, "durationDays"),
        ({"durationDays": 400}, "durationDays"),
        ({"partition": "research-0123456789abcdef"}, "research partition"),
    ],
)
async def test_bad_submissions(
    setup: tuple[SecureArchive, httpx.AsyncClient, dict], change: dict, message: str
) -> None:
    _, client, _ = setup
    r = await client.post("/datarequests", json=submission(["1.2.3"]) | change, headers=RITA)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
