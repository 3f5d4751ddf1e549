"""Retention and expiry over real HTTP: policies, minimum retention at its boundary, legal holds, delayed
deletion with its restore window (both stores), the expiry sweep through the archive's own operation runner,
and the audit records of each."""

from __future__ import annotations

import asyncio
import getpass
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

from archive.backup import backup, read_object_list, restore
from archive.maintenance import sweep_orphans
from bench.synthetic import multipart_body
from dicomweb.cli import main
from dicomweb.config import Settings
from indexer.operations import schedule_operation
from retention.hold import place_hold
from retention.policy import MAX_DAYS, PolicyError, RetentionPolicy, parse_policy
from retention.sweep import RETENTION_SWEEP, SCHEDULE_LOCK
from storage import LocalBlobStore
from tests.access_support import bearer, hs256, start_secure
from tests.fixtures.postgres import fresh_database
from tests.fixtures.server import RunningArchive, start_archive
from tests.test_metrics import sample
from tests.test_stow_wado_delete import ANY_SYNTAX, parts_of, stow, study_files

DEFAULT = {"minimumRetentionDays": None, "expireAfterDays": None, "deleteDelayDays": 0}


@pytest.fixture
async def db(archive: RunningArchive) -> asyncpg.Pool:
    async with asyncpg.create_pool(archive.database_url, min_size=1, max_size=4) as pool:
        yield pool


@pytest.fixture
async def client(archive: RunningArchive) -> httpx.AsyncClient:
    async with httpx.AsyncClient(base_url=archive.url, timeout=30) as c:
        yield c


async def put_policy(client: httpx.AsyncClient, policy: dict[str, object], root: str = "") -> None:
    response = await client.put(root + "/retention", json=policy)
    assert response.status_code == 200, response.text


async def stored_study(client: httpx.AsyncClient, seed: int, count: int = 3) -> tuple[str, list[bytes]]:
    spec, files = study_files(seed, count)
    assert (await stow(client, files)).status_code == 200
    return spec.study_uid, files


async def set_first_ingest(db: asyncpg.Pool, study: str, when: datetime) -> datetime:
    """The study's first ingest time as the database keeps it (microseconds)."""
    return await db.fetchval(
        "UPDATE study SET created_at = $2 WHERE study_instance_uid = $1 RETURNING created_at", study, when
    )


async def audit_rows(db: asyncpg.Pool, action: str, wanted: int) -> list[asyncpg.Record]:
    """The audit records of `action`, once `wanted` of them are written (the log flushes every 0.1 s)."""
    for _ in range(100):
        rows = await db.fetch(
            "SELECT method, path, status, detail, study_uid, subject FROM audit_event WHERE action = $1"
            " ORDER BY event_id",
            action,
        )
        if len(rows) >= wanted:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(rows)} audit records of {action}, wanted {wanted}")


async def feed_actions(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    feed = (await client.get("/changefeed", params={"includemetadata": "false", "limit": 100})).json()
    return [(entry["Action"], entry["SopInstanceUid"]) for entry in feed]


async def run_sweep(client: httpx.AsyncClient, db: asyncpg.Pool) -> dict[str, object]:
    """Queue a sweep as the schedule does; the archive's own operation runner claims and runs it."""
    operation = await schedule_operation(db, RETENTION_SWEEP, timedelta(0), {}, lock=SCHEDULE_LOCK)
    assert operation is not None
    for _ in range(200):
        body = (await client.get(f"/operations/{operation.hex}")).json()
        if body["status"] in ("succeeded", "failed"):
            assert body["status"] == "succeeded", body
            return body["results"]
        await asyncio.sleep(0.05)
    raise AssertionError("the sweep did not finish")


async def stored_keys(archive: RunningArchive) -> set[str]:
    return {info.key async for info in archive.store.list("")}


async def wait_for_keys(archive: RunningArchive, expected: set[str]) -> None:
    for _ in range(200):
        if await stored_keys(archive) == expected:
            return
        await asyncio.sleep(0.05)
    assert await stored_keys(archive) == expected


# -- the policy resource ------------------------------------------------------------------------------


@given(
    low=st.one_of(st.none(), st.integers(1, MAX_DAYS)),
    high=st.one_of(st.none(), st.integers(1, MAX_DAYS)),
    delay=st.integers(0, MAX_DAYS),
)
def test_parse_policy_accepts_every_valid_policy(low: int | None, high: int | None, delay: int) -> None:
    body = {"minimumRetentionDays": low, "expireAfterDays": high, "deleteDelayDays": delay}
    if low is not None and high is not None and high < low:
        with pytest.raises(PolicyError, match=f"expireAfterDays \\({high}\\) is shorter than"):
            parse_policy(body)
    else:
        assert parse_policy(body).as_json() == body


@given(
    field=st.sampled_from(["minimumRetentionDays", "expireAfterDays", "deleteDelayDays"]),
    value=st.one_of(
        st.booleans(),
        st.floats(allow_nan=False),
        st.text(max_size=5),
        st.integers(max_value=-1),
        st.integers(min_value=MAX_DAYS + 1),
        st.lists(st.integers(), max_size=2),
    ),
)
def test_parse_policy_refuses_anything_but_days(field: str, value: object) -> None:
    with pytest.raises(PolicyError, match=f"^{field} must be "):
        parse_policy({field: value})


def test_parse_policy_shapes() -> None:
    assert parse_policy({}) == RetentionPolicy()
    assert parse_policy({"deleteDelayDays": None}) == RetentionPolicy()
    with pytest.raises(
        PolicyError, match=r"^minimumRetentionDays must be null or an integer from 1 to 36500, not 0$"
    ):
        parse_policy({"minimumRetentionDays": 0})
    with pytest.raises(PolicyError, match=r"^unknown fields \['years'\]"):
        parse_policy({"years": 7})
    with pytest.raises(PolicyError, match=r"^the body must be a JSON object$"):
        parse_policy([1])


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_policy_routes(client: httpx.AsyncClient, archive: RunningArchive) -> None:
    assert (await client.get("/retention")).json() == DEFAULT
    assert (await client.delete("/retention")).status_code == 404
    policy = {"minimumRetentionDays": 3650, "expireAfterDays": 3660, "deleteDelayDays": 30}
    response = await client.put("/retention", json=policy)
    assert (response.status_code, response.json()) == (200, policy)
    assert (await client.get("/retention")).json() == policy
    # a partition has its own; PUT creates a partition that has no store yet, GET does not
    research = f"{archive.base}/v2/partitions/trial-7"
    assert (await client.get(research + "/retention")).status_code == 404
    await put_policy(client, {"expireAfterDays": 90}, research)
    assert (await client.get(research + "/retention")).json() == {**DEFAULT, "expireAfterDays": 90}
    assert (await client.get(f"{archive.base}/v1/retention")).json() == policy  # v1 root: same partition
    # refusals say why
    bad = await client.put("/retention", json={"minimumRetentionDays": 30, "expireAfterDays": 10})
    assert bad.status_code == 400
    assert bad.json() == {
        "error": {"code": 400, "message": "expireAfterDays (10) is shorter than minimumRetentionDays (30)"}
    }
    wrong_type = await client.put("/retention", content=b"{}", headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    assert (
        await client.put("/retention", content=b"{", headers={"Content-Type": "application/json"})
    ).status_code == 400
    assert (await client.get("/retention")).json() == policy  # unchanged by the refusals
    assert (await client.delete("/retention")).status_code == 204
    assert (await client.get("/retention")).json() == DEFAULT


# -- minimum retention and legal hold -------------------------------------------------------------------


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_minimum_retention_refuses_deletion_until_its_date(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    study, files = await stored_study(client, 1)
    first = pydicom.dcmread(io.BytesIO(files[0]))
    await put_policy(client, {"minimumRetentionDays": 30})
    now = datetime.now(UTC)
    ingested = await set_first_ingest(db, study, now - timedelta(days=30) + timedelta(minutes=5))
    until = ingested + timedelta(days=30)
    message = (
        f"study {study} is under minimum retention of 30 days from its first ingest "
        f"({ingested.isoformat()}): it may be deleted from {until.isoformat()}"
    )
    urls = [
        f"/studies/{study}",
        f"/studies/{study}/series/{first.SeriesInstanceUID}",
        f"/studies/{study}/series/{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}",
    ]
    for url in urls:
        response = await client.delete(url)
        assert (response.status_code, response.json()) == (409, {"error": {"code": 409, "message": message}})
    status = (await client.get(f"/studies/{study}/retention")).json()
    assert (
        status["minimumRetentionUntil"] == until.isoformat()
        and status["firstIngestedAt"] == ingested.isoformat()
    )
    assert len((await client.get(f"/studies/{study}/instances")).json()) == 3  # nothing was removed
    refusals = await audit_rows(db, "delete", 3)
    assert [(r["status"], r["detail"], r["study_uid"]) for r in refusals] == [(409, message, study)] * 3
    # one second past the date: the instance, then the rest
    await set_first_ingest(db, study, now - timedelta(days=30, seconds=1))
    assert (await client.delete(urls[2])).status_code == 204
    assert (await client.delete(urls[0])).status_code == 204
    assert (await client.get(f"/studies/{study}/retention")).status_code == 404


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_legal_hold_blocks_deletion_until_removed(
    client: httpx.AsyncClient, db: asyncpg.Pool, archive: RunningArchive
) -> None:
    assert (await client.put("/studies/1.2.3/legalhold")).status_code == 404  # nothing to hold
    study, _ = await stored_study(client, 2)
    placed = await client.put(f"/studies/{study}/legalhold", json={"reason": "case 2026-117"})
    assert placed.status_code == 201
    held = placed.json()
    since = datetime.fromisoformat(held["heldSince"])
    assert abs(since - datetime.now(UTC)) < timedelta(minutes=1)
    assert held == {
        "studyInstanceUID": study, "legalHold": True, "heldSince": held["heldSince"],
        "heldBy": "anonymous", "holdReason": "case 2026-117", "firstIngestedAt": held["firstIngestedAt"],
        "minimumRetentionUntil": None, "expiresAt": None, "deletionScheduledAt": None,
        "deletedInstances": 0, "policy": DEFAULT,
    }  # fmt: skip
    again = await client.put(f"/studies/{study}/legalhold")
    assert (again.status_code, again.json()["heldSince"]) == (200, held["heldSince"])  # the first hold stays
    bad = await client.put(f"/studies/{study}/legalhold", json={"why": 1})
    assert bad.status_code == 400
    refused = await client.delete(f"/studies/{study}")
    message = f"study {study} is under legal hold since {since.isoformat()}: remove the hold to delete it"
    assert (refused.status_code, refused.json()["error"]["message"]) == (409, message)
    # the hold is per partition
    other = f"{archive.base}/v2/partitions/other"
    await put_policy(client, {}, other)
    assert (await client.put(f"{other}/studies/{study}/legalhold")).status_code == 404

    assert (await client.delete(f"/studies/{study}/legalhold")).status_code == 204
    assert (await client.delete(f"/studies/{study}/legalhold")).status_code == 404
    assert (await client.get(f"/studies/{study}/retention")).json()["legalHold"] is False
    assert (await client.delete(f"/studies/{study}")).status_code == 204
    records = [(r["method"], r["status"], r["detail"]) for r in await audit_rows(db, "retention", 8)]
    assert records[:6] == [
        ("PUT", 404, "study 1.2.3 not found"),
        ("PUT", 201, "legal hold placed (reason: case 2026-117)"),
        ("PUT", 200, f"already held since {since.isoformat()}"),
        ("PUT", 400, 'the body must be empty or {"reason": "..."}'),
        (
            "PUT",
            200,
            "retention policy set: "
            + '{"minimumRetentionDays":null,"expireAfterDays":null,"deleteDelayDays":0}',
        ),
        ("PUT", 404, f"study {study} not found"),
    ]
    assert records[6:] == [
        ("DELETE", 204, "legal hold removed"),
        ("DELETE", 404, f"study {study} is not under legal hold"),
    ]
    assert [(r["status"], r["detail"]) for r in await audit_rows(db, "delete", 2)] == [
        (409, message),
        (204, None),
    ]


# -- delayed deletion and its restore window ----------------------------------------------------------


async def test_delayed_delete_is_restorable_within_the_window(
    client: httpx.AsyncClient, db: asyncpg.Pool, archive: RunningArchive
) -> None:
    await put_policy(client, {"deleteDelayDays": 7})
    study, files = await stored_study(client, 3)
    sops = [pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files]
    keys = await stored_keys(archive)
    ingested = await db.fetchval("SELECT created_at FROM study WHERE study_instance_uid = $1", study)
    first = pydicom.dcmread(io.BytesIO(files[0]))
    # one instance first, then the rest of the study
    one = f"/studies/{study}/series/{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}"
    assert (await client.delete(one)).status_code == 204
    assert (await client.delete(f"/studies/{study}")).status_code == 204
    # gone for every reader, as after any delete; the change feed says so
    assert (await client.get(f"/studies/{study}", headers={"Accept": ANY_SYNTAX})).status_code == 404
    assert (await client.get("/studies", params={"StudyInstanceUID": study})).json() == []
    deletes = await feed_actions(client)
    assert deletes[3:] == [("delete", first.SOPInstanceUID)] + [("delete", s) for s in sops[1:]]
    # the objects stay (the deletion queue has none of them)
    await asyncio.sleep(0.3)
    assert await stored_keys(archive) == keys
    assert await db.fetchval("SELECT count(*) FROM blob_deletion") == 0
    status = (await client.get(f"/studies/{study}/retention")).json()
    deleted_at = await db.fetchval("SELECT min(deleted_at) FROM deleted_object")
    assert status["deletionScheduledAt"] == (deleted_at + timedelta(days=7)).isoformat()
    deletes = [(r["status"], r["detail"]) for r in await audit_rows(db, "delete", 2)]
    assert deletes[0] == (204, f"restorable until {(deleted_at + timedelta(days=7)).isoformat()}")
    assert (status["deletedInstances"], status["firstIngestedAt"], status["legalHold"]) == (3, None, False)
    # and the orphan sweep does not take them for orphans
    assert await sweep_orphans(db, archive.store, grace=timedelta(0)) == 0

    restored = await client.post(f"/studies/{study}/$restore")
    assert (restored.status_code, restored.json()) == (200, {"restoredInstances": 3, "supersededObjects": 0})
    parts = await parts_of(await client.get(f"/studies/{study}", headers={"Accept": ANY_SYNTAX}))
    assert sorted(body for _, body in parts) == sorted(files)
    feed = await feed_actions(client)
    assert sorted(feed[6:]) == sorted(("create", s) for s in sops)
    assert len(feed) == 9
    status = (await client.get(f"/studies/{study}/retention")).json()
    assert (status["firstIngestedAt"], status["deletedInstances"]) == (ingested.isoformat(), 0)
    assert (await client.post(f"/studies/{study}/$restore")).status_code == 404  # nothing left to restore
    audit = [(r["status"], r["detail"]) for r in await audit_rows(db, "restore", 2)]
    assert audit == [
        (200, "restored 3 instances, 0 superseded objects queued"),
        (404, f"study {study} has no deleted instances within their restore window"),
    ]


async def test_restore_keeps_an_instance_stored_again_meanwhile(
    client: httpx.AsyncClient, db: asyncpg.Pool, archive: RunningArchive
) -> None:
    await put_policy(client, {"deleteDelayDays": 1})
    study, files = await stored_study(client, 4)
    kept = await stored_keys(archive)
    assert (await client.delete(f"/studies/{study}")).status_code == 204
    assert (await stow(client, files[:1])).status_code == 200  # the first instance comes again
    again = await stored_keys(archive) - kept
    restored = await client.post(f"/studies/{study}/$restore")
    assert restored.json() == {"restoredInstances": 2, "supersededObjects": 1}
    assert len((await client.get(f"/studies/{study}/instances")).json()) == 3
    # the first instance is the one stored again; its kept copy leaves storage
    first_sop = pydicom.dcmread(io.BytesIO(files[0])).SOPInstanceUID
    assert again == {
        await db.fetchval("SELECT storage_key FROM instance WHERE sop_instance_uid = $1", first_sop)
    }
    await wait_for_keys(archive, {k for k in kept if f"/{first_sop}." not in k} | again)


async def test_window_end_purges_through_the_sweep_except_held_studies(
    client: httpx.AsyncClient, db: asyncpg.Pool, archive: RunningArchive
) -> None:
    await put_policy(client, {"deleteDelayDays": 2})
    study, _ = await stored_study(client, 5)
    held, _ = await stored_study(client, 6, count=2)
    held_keys = {k async for k in _keys_of(db, held)}
    assert (await client.delete(f"/studies/{study}")).status_code == 204
    assert (await client.delete(f"/studies/{held}")).status_code == 204
    assert (await client.put(f"/studies/{held}/legalhold")).status_code == 201  # in its window: holdable
    # still inside the window: nothing purged
    assert await run_sweep(client, db) == {"purgedObjects": 0, "expiredStudies": 0, "skippedStudies": 0}
    # the window ends (one second ago)
    await db.execute("UPDATE deleted_object SET purge_after = now() - interval '1 second'")
    assert (await client.post(f"/studies/{study}/$restore")).status_code == 404  # too late
    assert await run_sweep(client, db) == {"purgedObjects": 3, "expiredStudies": 0, "skippedStudies": 0}
    await wait_for_keys(archive, held_keys)  # the held study's objects stay
    status = (await client.get(f"/studies/{held}/retention")).json()
    assert (status["legalHold"], status["deletedInstances"]) == (True, 2)
    metrics = (await client.get(f"{archive.base}/metrics")).text
    assert sample(metrics, "dicomweb_retention_restorable_objects") == 2
    assert sample(metrics, "dicomweb_retention_legal_holds") == 1
    assert (await client.get(f"/studies/{study}/retention")).status_code == 404
    system = await audit_rows(db, "retention", 3)
    purges = [
        (r["method"], r["path"], r["status"], r["detail"], r["subject"])
        for r in system
        if r["subject"] == "system"
    ]
    assert purges == [
        ("DELETE", f"/studies/{study}", 200, "restore window ended: 3 objects queued for deletion", "system")
    ]
    # the hold lifted, the next sweep purges it too
    assert (await client.delete(f"/studies/{held}/legalhold")).status_code == 204
    assert (await run_sweep(client, db))["purgedObjects"] == 2
    await wait_for_keys(archive, set())


async def _keys_of(db: asyncpg.Pool, study: str):
    for row in await db.fetch(
        "SELECT storage_key FROM instance i JOIN study s USING (study_key) WHERE s.study_instance_uid = $1",
        study,
    ):
        yield row[0]


# -- expiry -------------------------------------------------------------------------------------------


async def test_expiry_deletes_old_studies_through_the_normal_path(
    client: httpx.AsyncClient, db: asyncpg.Pool, archive: RunningArchive
) -> None:
    await put_policy(client, {"minimumRetentionDays": 10, "expireAfterDays": 10})
    now = datetime.now(UTC)
    old, old_files = await stored_study(client, 7, count=2)
    young, _ = await stored_study(client, 8, count=2)
    held, _ = await stored_study(client, 9, count=2)
    first_ingest = await set_first_ingest(db, old, now - timedelta(days=10, seconds=1))
    await set_first_ingest(db, young, now - timedelta(days=10) + timedelta(minutes=5))
    await set_first_ingest(db, held, now - timedelta(days=400))
    assert (await client.put(f"/studies/{held}/legalhold")).status_code == 201
    status = (await client.get(f"/studies/{young}/retention")).json()
    assert status["expiresAt"] == status["minimumRetentionUntil"]
    before = len(await feed_actions(client))

    assert await run_sweep(client, db) == {"purgedObjects": 0, "expiredStudies": 1, "skippedStudies": 0}
    remaining = {s["0020000D"]["Value"][0] for s in (await client.get("/studies")).json()}
    assert remaining == {young, held}
    sops = sorted(pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in old_files)
    feed = await feed_actions(client)
    assert sorted(feed[before:]) == [("delete", s) for s in sops]
    system = [r for r in await audit_rows(db, "retention", 3) if r["subject"] == "system"]
    assert [(r["path"], r["status"], r["detail"]) for r in system] == [
        (
            f"/studies/{old}",
            204,
            f"expired: first ingest {first_ingest.isoformat()}, expireAfterDays 10; 2 instances deleted",
        )
    ]
    # the objects go through the normal deletion queue
    await wait_for_keys(
        archive, {k async for k in _keys_of(db, young)} | {k async for k in _keys_of(db, held)}
    )


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_expiry_with_a_delay_is_restorable(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    await put_policy(client, {"expireAfterDays": 1, "deleteDelayDays": 3})
    study, _ = await stored_study(client, 10, count=2)
    await set_first_ingest(db, study, datetime.now(UTC) - timedelta(days=2))
    assert (await run_sweep(client, db))["expiredStudies"] == 1
    assert (await client.get(f"/studies/{study}/instances")).json() == []
    detail = [r["detail"] for r in await audit_rows(db, "retention", 2) if r["subject"] == "system"]
    until = await db.fetchval("SELECT purge_after FROM deleted_object LIMIT 1")
    assert detail[0].endswith(f"; 2 instances deleted, restorable until {until.isoformat()}")
    assert (await client.post(f"/studies/{study}/$restore")).json()["restoredInstances"] == 2
    assert len((await client.get(f"/studies/{study}/instances")).json()) == 2


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_restore_brings_back_both_versions_of_updated_instances(
    client: httpx.AsyncClient, db: asyncpg.Pool, archive: RunningArchive
) -> None:
    study, files = await stored_study(client, 11, count=2)
    original_name = str(pydicom.dcmread(io.BytesIO(files[0])).PatientName)
    update = await client.post(
        "/studies/$bulkUpdate",
        json={
            "studyInstanceUids": [study],
            "changeDataset": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Kept^Patient"}]}},
        },
    )
    assert update.status_code == 202, update.text
    for _ in range(200):
        if (await client.get(update.json()["href"])).json()["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    keys = await stored_keys(archive)
    assert len(keys) == 4  # two versions of two instances
    await put_policy(client, {"deleteDelayDays": 1})
    assert (await client.delete(f"/studies/{study}")).status_code == 204
    assert await db.fetchval("SELECT count(*) FROM deleted_object WHERE original") == 2
    assert (await client.post(f"/studies/{study}/$restore")).json() == {
        "restoredInstances": 2,
        "supersededObjects": 0,
    }

    def names(metadata: list[dict]) -> set[str]:
        return {m["00100010"]["Value"][0]["Alphabetic"] for m in metadata}

    assert names((await client.get(f"/studies/{study}/metadata")).json()) == {"Kept^Patient"}
    original = {"msdicom-request-original": "true"}
    assert names((await client.get(f"/studies/{study}/metadata", headers=original)).json()) == {original_name}
    await asyncio.sleep(0.3)
    assert await stored_keys(archive) == keys


# -- the command line, partitions, concurrency, a long sweep ----------------------------------------------


async def test_cli_show_set_clear(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def cli(*args: str) -> int:
        return main(["retention", *args, "--database-url", database_url])

    assert await asyncio.to_thread(cli, "show") == 0
    assert (
        capsys.readouterr().out
        == '{"minimumRetentionDays":null,"expireAfterDays":null,"deleteDelayDays":0}\n'
    )
    assert await asyncio.to_thread(cli, "set", "--minimum-days", "30", "--expire-after-days", "20") == 2
    assert (
        capsys.readouterr().err == "error: expireAfterDays (20) is shorter than minimumRetentionDays (30)\n"
    )
    assert await asyncio.to_thread(cli, "set", "--expire-after-days", "20", "--partition", "trial-9") == 0
    set_line = 'retention policy set: {"minimumRetentionDays":null,"expireAfterDays":20,"deleteDelayDays":0}'
    assert capsys.readouterr().out == set_line + "\n"
    assert await asyncio.to_thread(cli, "clear") == 1  # the default partition has none
    assert await asyncio.to_thread(cli, "clear", "--partition", "trial-9") == 0
    assert await asyncio.to_thread(cli, "show", "--partition", "nowhere") == 1
    rows = await pool.fetch(
        "SELECT subject, auth, method, partition_name, detail FROM audit_event ORDER BY event_id"
    )
    login = f"cli:{getpass.getuser()}"
    assert [tuple(r) for r in rows] == [
        (login, "cli", "PUT", "trial-9", set_line),
        (login, "cli", "DELETE", "trial-9", "retention policy removed"),
    ]


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_policies_are_per_partition(client: httpx.AsyncClient, archive: RunningArchive) -> None:
    trial = f"{archive.base}/v2/partitions/trial-1"
    await put_policy(client, {"minimumRetentionDays": 365}, trial)
    study, files = study_files(12, 2)
    assert (await stow(client, files)).status_code == 200
    assert (await stow(client, files, f"{trial}/studies")).status_code == 200
    assert (await client.delete(f"{trial}/studies/{study.study_uid}")).status_code == 409
    assert (await client.delete(f"/studies/{study.study_uid}")).status_code == 204  # the default: no minimum
    status = (await client.get(f"{trial}/studies/{study.study_uid}/retention")).json()
    assert status["policy"] == {**DEFAULT, "minimumRetentionDays": 365}


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_a_hold_placed_while_a_delete_waits_wins(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    """A hold and a delete of one study serialise on the study's lock: the delete that comes second sees the
    hold committed before it."""
    study, _ = await stored_study(client, 13, count=1)
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await place_hold(conn, 1, study, datetime.now(UTC), "test", None)  # holds the lock until commit
        delete = asyncio.create_task(client.delete(f"/studies/{study}"))
        await asyncio.sleep(0.5)
        assert not delete.done()  # waiting for the study's lock
        await transaction.commit()
    response = await delete
    assert response.status_code == 409
    assert "is under legal hold since" in response.json()["error"]["message"]


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_sweep_pages_through_partitions(
    client: httpx.AsyncClient, db: asyncpg.Pool, archive: RunningArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("retention.sweep.STUDIES_PER_STEP", 3)  # the server runs in this process
    monkeypatch.setattr("retention.sweep.INSTANCES_PER_STEP", 2)  # and ends a step after 2 instances
    old = datetime.now(UTC) - timedelta(days=40)
    roots = ["", f"{archive.base}/v2/partitions/a", f"{archive.base}/v2/partitions/b"]
    for n, root in enumerate(roots):
        await put_policy(client, {"expireAfterDays": 30}, root)
        for seed in range(3):
            spec, files = study_files(100 + 10 * n + seed, 1)
            assert (await stow(client, files, f"{root}/studies")).status_code == 200
            await db.execute(
                "UPDATE study SET created_at = $2 WHERE study_instance_uid = $1", spec.study_uid, old
            )
    young, _ = await stored_study(client, 130, count=1)
    operation = await schedule_operation(db, RETENTION_SWEEP, timedelta(0), {}, lock=SCHEDULE_LOCK)
    assert operation is not None
    body = {}
    for _ in range(200):
        body = (await client.get(f"/operations/{operation.hex}")).json()
        if body["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert body["results"] == {"purgedObjects": 0, "expiredStudies": 9, "skippedStudies": 0}
    assert [r[0] for r in await db.fetch("SELECT study_instance_uid FROM study")] == [young]
    attempts = await db.fetchval("SELECT attempts FROM operation WHERE operation_id = $1", operation)
    assert attempts == 1  # one claim ran every step


@pytest.mark.parametrize("archive", ["local"], indirect=True)
async def test_a_backup_keeps_the_restore_window(
    client: httpx.AsyncClient, archive: RunningArchive, postgres_server: str, tmp_path: Path
) -> None:
    await put_policy(client, {"deleteDelayDays": 5})
    study, files = await stored_study(client, 14, count=2)
    kept = await stored_keys(archive)
    assert (await client.delete(f"/studies/{study}")).status_code == 204
    dest = tmp_path / "backup"
    await backup(archive.database_url, archive.store, dest)
    assert {entry.key for entry in read_object_list(dest)} == kept
    async with fresh_database(postgres_server) as target_url:
        await restore(dest, target_url, LocalBlobStore(tmp_path / "restored"))
        settings = Settings(data_dir=tmp_path / "target", max_instance_size=64 << 20)
        thread, target = start_archive(
            settings, target_url, LocalBlobStore(tmp_path / "restored"), LocalBlobStore(tmp_path / "restored")
        )
        try:
            async with httpx.AsyncClient(base_url=target.url, timeout=30) as other:
                restored = await other.post(f"/studies/{study}/$restore")
                assert restored.json() == {"restoredInstances": 2, "supersededObjects": 0}
                parts = await parts_of(await other.get(f"/studies/{study}", headers={"Accept": ANY_SYNTAX}))
                assert sorted(body for _, body in parts) == sorted(files)
        finally:
            thread.stop()


async def test_hold_records_who_placed_it_and_roles_are_enforced(database_url: str, tmp_path: Path) -> None:
    """With authentication on: the hold names its owner's subject; a partition-scoped owner holds only in
    its partition; a reader sees the status but cannot hold; a writer's restore is allowed."""
    secure = start_secure(database_url, tmp_path)
    try:
        owner = bearer(hs256(sub="alice", roles=["owner"]))
        trial_owner = bearer(hs256(sub="bob", roles=["owner:trial-3"]))
        reader = bearer(hs256(sub="carol", roles=["reader"]))
        async with httpx.AsyncClient(base_url=secure.running.url, timeout=30) as client:
            spec, files = study_files(15, 1)
            body, content_type = multipart_body(files)
            stored = await client.post(
                "/studies", content=body, headers={**owner, "Content-Type": content_type}
            )
            assert stored.status_code == 200
            study = spec.study_uid
            placed = await client.put(f"/studies/{study}/legalhold", headers=owner)
            assert (placed.status_code, placed.json()["heldBy"]) == (201, "alice")
            assert (await client.put(f"/studies/{study}/legalhold", headers=trial_owner)).status_code == 403
            assert (await client.delete(f"/studies/{study}/legalhold", headers=reader)).status_code == 403
            status = await client.get(f"/studies/{study}/retention", headers=reader)
            assert (status.status_code, status.json()["heldBy"]) == (200, "alice")
            trial = f"{secure.running.base}/v2/partitions/trial-3"
            assert (await client.put(f"{trial}/retention", json={}, headers=trial_owner)).status_code == 200
        await secure.flush_audit()
        rows = await _audit_of(database_url, "retention")
        assert [(r["subject"], r["method"], r["status"]) for r in rows] == [
            ("alice", "PUT", 201), ("bob", "PUT", 403), ("carol", "DELETE", 403), ("bob", "PUT", 200)
        ]  # fmt: skip
    finally:
        secure.thread.stop()


async def _audit_of(database_url: str, action: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT subject, method, status FROM audit_event WHERE action = $1 ORDER BY event_id", action
        )
    finally:
        await conn.close()


async def test_cli_refuses_a_partition_name_the_routes_refuse(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`retention set --partition 'bad name!'` died with asyncpg's CheckViolationError traceback; the route
    answers 400 for such a name, and so does the command now (exit 2, the same reason), for every verb."""
    for verb in ("show", "set", "clear"):
        args = ["retention", verb, "--partition", "bad name!", "--database-url", database_url]
        assert await asyncio.to_thread(main, args) == 2
        assert capsys.readouterr().err == (
            "error: invalid partition name 'bad name!': use 1-64 letters, digits, '_', '.', '-'\n"
        )
    assert await pool.fetchval("SELECT count(*) FROM partition WHERE name = 'bad name!'") == 0
    assert await pool.fetchval("SELECT count(*) FROM audit_event") == 0
