"""Research data requests end to end: submit, review, de-identified export into a research partition that
only the requesting researcher reads, expiry on the archive's clock, revocation, every transition recorded."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from bench.synthetic import instance_variants, make_study, multipart_body
from dicomweb.routes.extended_query_tags import iso_time
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
    request_id = r.json()["id"]
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
    research = f"/v2/partitions/{request['researchPartition']}"
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
    r1 = await client.get(f"/datarequests/{request['id']}", headers=SAM)
    r2 = await client.get("/datarequests/00000000-0000-0000-0000-000000000000", headers=SAM)
    assert (r1.status_code, r1.json()) == (r2.status_code, r2.json()) == (403, DENIED)
    assert (await client.get("/datarequests", headers=SAM)).json() == []
    # the grant runs out on the archive's clock: the next request is refused, and the state follows
    archive.clock.advance(timedelta(days=30, seconds=1))
    r = await client.get(f"{research}/studies", headers=RITA)
    assert (r.status_code, r.json()) == (403, DENIED)
    final = (await client.get(f"/datarequests/{request['id']}", headers=REVIEWER)).json()
    assert final["state"] == "expired"
    assert [(e["fromState"], e["toState"], e["actor"]) for e in final["events"]] == [
        (None, "submitted", "rita"), ("submitted", "approved", "rev"), ("approved", "active", "system"),
        ("active", "expired", "system"),
    ]  # fmt: skip


async def test_revocation_mid_download(setup: tuple[SecureArchive, httpx.AsyncClient, dict]) -> None:
    _, client, owner = setup
    request = await submit_and_activate(client, [await stow(client, owner, 3)])
    research = f"/v2/partitions/{request['researchPartition']}"
    copy_uid = (await client.get(f"{research}/studies", headers=RITA)).json()[0]["0020000D"]["Value"][0]
    async with client.stream(
        "GET", f"{research}/studies/{copy_uid}", headers={**RITA, **ANY_SYNTAX}
    ) as download:
        assert download.status_code == 200
        chunks = download.aiter_bytes()
        first = await chunks.__anext__()
        revoke = f"/datarequests/{request['id']}/revoke"
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
    rid = (await client.post("/datarequests", json=submission([uid]), headers=RITA)).json()["id"]
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
    assert (r.status_code, r.json()["state"], r.json()["decisionComment"]) == (
        200,
        "rejected",
        "no ethics approval",
    )
    r = await client.post(f"/datarequests/{rid}/approve", headers=REVIEWER)
    assert r.status_code == 409 and "rejected" in r.json()["error"]["message"]
    r = await client.post(f"/datarequests/{rid}/revoke", headers=REVIEWER)
    assert r.status_code == 409
    listed = (await client.get("/datarequests", params={"state": "rejected"}, headers=REVIEWER)).json()
    assert [x["id"] for x in listed] == [rid]
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
        # a name no partition can have was accepted (201), to fail only at approval
        ({"partition": "../x"}, "partition must name a data partition"),
        ({"partition": "a" * 65}, "partition must name a data partition"),
        # a query that can never run was accepted (201) and refused only at approval (409)
        ({"cohort": {"query": "bogus=1"}}, "cohort.query: bogus: unknown query parameter"),
        ({"cohort": {"query": "StudyDate=notadate"}}, "cohort.query: StudyDate: 'notadate' is not a date"),
        (
            {"cohort": {"query": "ModalitiesInStudy=CT&limit=5"}},
            "cohort.query: limit, offset and includefield",
        ),
    ],
)
async def test_bad_submissions(
    setup: tuple[SecureArchive, httpx.AsyncClient, dict], change: dict, message: str
) -> None:
    _, client, _ = setup
    r = await client.post("/datarequests", json=submission(["1.2.3"]) | change, headers=RITA)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


async def test_request_json_is_camel_case_and_old_names_are_accepted(
    setup: tuple[SecureArchive, httpx.AsyncClient, dict],
) -> None:
    """One convention with the other JSON APIs (id, camelCase, ...Time); the first release's snake_case
    input names still work until the next one."""
    archive, client, owner = setup
    uid = await stow(client, owner, 5)
    old_names = {
        "title": "Lung nodules", "purpose": "Train a detector", "source_partition": "Microsoft.Default",
        "cohort": {"studies": [uid]}, "deid_options": ["retainLongModifiedDates"], "duration_days": 7,
    }  # fmt: skip
    r = await client.post("/datarequests", json=old_names, headers=RITA)
    assert r.status_code == 201, r.text
    created = r.json()
    conn = await asyncpg.connect(archive.running.database_url)
    try:
        created_at = await conn.fetchval(
            "SELECT created_at FROM data_request WHERE request_id = $1", created["id"]
        )
    finally:
        await conn.close()
    submitted = {
        "id": created["id"], "state": "submitted", "researcher": "rita", "title": "Lung nodules",
        "purpose": "Train a detector", "partition": "Microsoft.Default", "cohort": {"studies": [uid]},
        "deidentification": {"options": ["retainLongModifiedDates"]}, "durationDays": 7,
        "researchPartition": None, "operation": None, "createdTime": iso_time(created_at), "decidedBy": None,
        "decidedTime": None, "decisionComment": None, "activatedTime": None, "expirationTime": None,
    }  # fmt: skip
    assert created == submitted and created["createdTime"].endswith("Z")
    r = await client.get(f"/datarequests/{created['id']}", headers=REVIEWER)
    event = {"eventTime": iso_time(created_at), "actor": "rita", "fromState": None, "toState": "submitted",
             "comment": None}  # fmt: skip
    assert (r.status_code, r.json()) == (200, submitted | {"events": [event]})
    assert (await client.get("/datarequests", headers=RITA)).json() == [submitted]
    both = old_names | {"durationDays": 7}
    r = await client.post("/datarequests", json=both, headers=RITA)
    assert (r.status_code, r.json()["error"]["message"]) == (
        400, "give durationDays only (duration_days is its deprecated name)"
    )  # fmt: skip
    # a decision with the old comment name; the export is an operation reference like Azure's
    r = await client.post(
        f"/datarequests/{created['id']}/approve", json={"decision_comment": "fine"}, headers=REVIEWER
    )
    assert r.status_code == 200, r.text
    approved = r.json()
    operation = approved["operation"]
    assert operation == {
        "id": operation["id"],
        "href": f"{archive.running.base}/v2/operations/{operation['id']}",
    }
    assert approved["researchPartition"] == "research-" + created["id"].replace("-", "")[:16]
    assert approved["decidedTime"].endswith("Z")
    assert approved == submitted | {
        "state": "approved", "researchPartition": approved["researchPartition"], "operation": operation,
        "decidedBy": "rev", "decidedTime": approved["decidedTime"], "decisionComment": "fine",
    }  # fmt: skip
    r = await client.get(operation["href"], headers=owner)
    assert r.status_code in (200, 202) and r.json()["type"] == "export"


async def test_a_decision_after_the_grant_ran_out_sees_it_expired(
    setup: tuple[SecureArchive, httpx.AsyncClient, dict],
) -> None:
    """A revoke after the grant's expiry, before anything read the request, moved it active -> revoked: the
    history then said a reviewer ended a grant that had already run out, and no expiry was recorded.
    Decisions now write what time implies first, as reads do: the revoke is 409, the state expired."""
    archive, client, owner = setup
    request = await submit_and_activate(client, [await stow(client, owner, 6)])
    archive.clock.advance(timedelta(days=30, seconds=1))
    r = await client.post(f"/datarequests/{request['id']}/revoke", json={"comment": "late"}, headers=REVIEWER)
    assert (r.status_code, r.json()["error"]["message"]) == (
        409,
        "the request is expired; this needs approved or active",
    )
    final = (await client.get(f"/datarequests/{request['id']}", headers=REVIEWER)).json()
    assert final["state"] == "expired"
    assert [(e["fromState"], e["toState"]) for e in final["events"]][-2:] == [
        ("approved", "active"),
        ("active", "expired"),
    ]
