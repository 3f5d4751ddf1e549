"""indexer.writes.index_instances against the real PostgreSQL: one statement writes a batch's patient, study,
series, instance and QIDO member rows, so these check what that statement must keep from the per-row
upserts it replaced: a series stays bound to its study, duplicates (earlier, in the batch, or committed by a
concurrent batch) are refused without leaving empty studies, and every counter equals a recount."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.writes import Outcome, index_instances, refresh_counters
from tests.test_extended_query_tags import dataset, record

_partitions = itertools.count(100)


def attrs(study: str, series: str, sop: str, *, patient: str = "P1", modality: str = "CT") -> dict:
    return dataset(
        study,
        series,
        sop,
        PatientID={"vr": "LO", "Value": [patient]},
        Modality={"vr": "CS", "Value": [modality]},
    )


async def new_partition(conn: asyncpg.Connection) -> int:
    n = next(_partitions)
    return await conn.fetchval(
        "INSERT INTO partition (partition_key, name) VALUES ($1, $2) RETURNING partition_key", n, f"p{n}"
    )


async def index(pool: asyncpg.Pool, partition: int, batch: list[dict]) -> list[Outcome]:
    async with pool.acquire() as conn, conn.transaction():
        results = await index_instances(conn, partition, [record(a, partition) for a in batch])
    return [r.outcome for r in results]


async def rows(conn: asyncpg.Connection, partition: int) -> dict[str, object]:
    """Studies and series as stored, next to what a recount from the instance rows gives."""
    studies = await conn.fetch(
        """SELECT st.study_instance_uid AS uid, st.instance_count, st.series_count, st.modalities,
                  p.patient_id,
                  (SELECT count(*) FROM instance i WHERE i.study_key = st.study_key) AS instances,
                  (SELECT count(*) FROM series x WHERE x.study_key = st.study_key) AS series,
                  coalesce((SELECT array_agg(DISTINCT x.modality ORDER BY x.modality) FROM series x
                            WHERE x.study_key = st.study_key), '{}') AS recounted_modalities
           FROM study st JOIN patient p USING (patient_key) WHERE st.partition_key = $1
           ORDER BY 1""",
        partition,
    )
    series = await conn.fetch(
        """SELECT se.series_instance_uid AS uid, st.study_instance_uid AS study, se.instance_count,
                  (SELECT count(*) FROM instance i WHERE i.series_key = se.series_key) AS instances
           FROM series se JOIN study st USING (study_key) WHERE se.partition_key = $1 ORDER BY 1""",
        partition,
    )
    for s in studies:
        assert (s["instance_count"], s["series_count"]) == (s["instances"], s["series"]), dict(s)
        assert s["modalities"] == s["recounted_modalities"], dict(s)
        assert s["instances"] > 0, f"empty study left behind: {dict(s)}"
    for s in series:
        assert s["instance_count"] == s["instances"] > 0, dict(s)
    members = await conn.fetchval(
        """SELECT count(*) FROM instance i LEFT JOIN instance_qido q USING (instance_key)
           WHERE i.partition_key = $1 AND q.instance_key IS NULL""",
        partition,
    )
    assert members == 0, "instances without their stored QIDO members"
    astray = await conn.fetch(
        """SELECT i.sop_instance_uid FROM instance i JOIN series se USING (series_key)
           WHERE i.partition_key = $1 AND i.study_key <> se.study_key""",
        partition,
    )
    assert not astray, f"instances whose series belongs to another study: {astray}"
    return {
        "studies": {
            s["uid"]: (s["patient_id"], s["instances"], s["series"], list(s["modalities"])) for s in studies
        },
        "series": {s["uid"]: (s["study"], s["instances"]) for s in series},
    }


async def test_a_batch_of_several_patients_studies_and_series(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
    batch = [
        attrs("1.1", "1.1.1", "1.1.1.1", patient="A", modality="MR"),
        attrs("1.1", "1.1.2", "1.1.2.1", patient="A", modality="CT"),
        attrs("1.1", "1.1.2", "1.1.2.2", patient="A", modality="CT"),
        attrs("1.2", "1.2.1", "1.2.1.1", patient="A", modality="CT"),
        attrs("1.3", "1.3.1", "1.3.1.1", patient="B", modality="US"),
    ]
    assert await index(pool, partition, batch) == [Outcome.CREATED] * 5
    async with pool.acquire() as conn:
        got = await rows(conn, partition)
        patients = await conn.fetchval("SELECT count(*) FROM patient WHERE partition_key = $1", partition)
    assert got["studies"] == {
        "1.1": ("A", 3, 2, ["CT", "MR"]),
        "1.2": ("A", 1, 1, ["CT"]),
        "1.3": ("B", 1, 1, ["US"]),
    }
    assert patients == 2
    # a second batch adds to existing rows and creates new ones in the same statement
    more = [attrs("1.1", "1.1.3", "1.1.3.1", patient="A", modality="SR"), attrs("1.4", "1.4.1", "1.4.1.1")]
    assert await index(pool, partition, more) == [Outcome.CREATED] * 2
    async with pool.acquire() as conn:
        got = await rows(conn, partition)
    assert got["studies"]["1.1"] == ("A", 4, 3, ["CT", "MR", "SR"])
    assert got["studies"]["1.4"] == ("P1", 1, 1, ["CT"])


async def test_a_series_stays_bound_to_its_study(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
    assert await index(pool, partition, [attrs("2.1", "2.1.1", "2.1.1.1")]) == [Outcome.CREATED]
    # the same series UID under a new study: refused, and the new study is not left behind empty
    outcomes = await index(
        pool, partition, [attrs("2.2", "2.1.1", "2.2.1.1"), attrs("2.2", "2.2.2", "2.2.2.1", modality="MR")]
    )
    assert outcomes == [Outcome.CONFLICT, Outcome.CREATED]
    outcomes = await index(pool, partition, [attrs("2.3", "2.1.1", "2.3.1.1")])
    assert outcomes == [Outcome.CONFLICT]
    async with pool.acquire() as conn:
        got = await rows(conn, partition)
    assert got["studies"] == {"2.1": ("P1", 1, 1, ["CT"]), "2.2": ("P1", 1, 1, ["MR"])}
    assert got["series"] == {"2.1.1": ("2.1", 1), "2.2.2": ("2.2", 1)}


async def test_duplicates_earlier_and_within_a_batch(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
    first = attrs("3.1", "3.1.1", "3.1.1.1")
    assert await index(pool, partition, [first]) == [Outcome.CREATED]
    again = [first, attrs("3.1", "3.1.1", "3.1.1.2"), attrs("3.1", "3.1.1", "3.1.1.2")]
    assert await index(pool, partition, again) == [
        Outcome.ALREADY_STORED,
        Outcome.CREATED,
        Outcome.ALREADY_STORED,
    ]
    async with pool.acquire() as conn:
        assert (await rows(conn, partition))["studies"] == {"3.1": ("P1", 2, 1, ["CT"])}


async def test_a_concurrent_batch_stores_the_instance_first(pool: asyncpg.Pool) -> None:
    """The duplicate check cannot see an uncommitted batch; the insert waits for it and then finds the
    instance stored. The loser's study (another UID) must not stay behind without instances."""
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
    async with pool.acquire() as first, pool.acquire() as second:
        tx = first.transaction()
        await tx.start()
        (won,) = await index_instances(first, partition, [record(attrs("4.1", "4.1.1", "4.9.9"), partition)])
        assert won.outcome is Outcome.CREATED

        async def lose() -> list[Outcome]:
            async with second.transaction():
                results = await index_instances(
                    second, partition, [record(attrs("4.2", "4.2.1", "4.9.9"), partition)]
                )
            return [r.outcome for r in results]

        losing = asyncio.create_task(lose())
        await asyncio.sleep(0.3)  # it waits on the first batch's unique index entry
        assert not losing.done()
        await tx.commit()
        assert await asyncio.wait_for(losing, 10) == [Outcome.ALREADY_STORED]
    async with pool.acquire() as conn:
        got = await rows(conn, partition)
    assert got["studies"] == {"4.1": ("P1", 1, 1, ["CT"])}


async def test_refresh_after_deleting_instances(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
    batch = [
        attrs("5.1", "5.1.1", "5.1.1.1", modality="MR"),
        attrs("5.1", "5.1.2", "5.1.2.1"),
        attrs("5.2", "5.2.1", "5.2.1.1"),
    ]
    assert await index(pool, partition, batch) == [Outcome.CREATED] * 3
    async with pool.acquire() as conn, conn.transaction():
        keys = await conn.fetch(
            """SELECT study_key, series_key FROM instance WHERE partition_key = $1
               AND sop_instance_uid = ANY($2::text[])""",
            partition,
            ["5.1.1.1", "5.2.1.1"],
        )
        await conn.execute(
            "DELETE FROM instance WHERE partition_key = $1 AND sop_instance_uid = ANY($2::text[])",
            partition,
            ["5.1.1.1", "5.2.1.1"],
        )
        await refresh_counters(
            conn, sorted({k["study_key"] for k in keys}), sorted({k["series_key"] for k in keys})
        )
    async with pool.acquire() as conn:
        got = await rows(conn, partition)
    assert got["studies"] == {"5.1": ("P1", 1, 1, ["CT"])}
    assert got["series"] == {"5.1.2": ("5.1", 1)}


_uids = st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 5))  # study, series, instance


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_uids, min_size=1, max_size=8), min_size=1, max_size=4), data=st.data())
async def test_counters_equal_a_recount_whatever_the_batches(
    pool: asyncpg.Pool, batches: list[list[tuple[int, int, int]]], data: st.DataObject
) -> None:
    """Random batches with duplicates and series reused under other studies: every instance is created
    once, refused as a duplicate, or refused because its series belongs to another study; the rows agree."""
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
    owner: dict[str, str] = {}  # series UID -> the study that first stored it
    stored: set[str] = set()
    modality = {m: data.draw(st.sampled_from(["CT", "MR", "PT"])) for m in range(3)}
    for batch in batches:
        items = []
        for study, series, n in batch:
            study_uid, series_uid = f"9.{study}", f"9.9.{series}"
            items.append(attrs(study_uid, series_uid, f"{series_uid}.{n}", modality=modality[series]))
        expected = []
        seen: set[str] = set()
        owners_now = dict(owner)
        for a in items:
            sop, series_uid, study_uid = (a[t]["Value"][0] for t in ("00080018", "0020000E", "0020000D"))
            if sop in stored or sop in seen:
                expected.append(Outcome.ALREADY_STORED)
            elif owners_now.setdefault(series_uid, study_uid) != study_uid:
                expected.append(Outcome.CONFLICT)
            else:
                expected.append(Outcome.CREATED)
                seen.add(sop)
        assert await index(pool, partition, items) == expected
        owner, stored = owners_now, stored | seen
    async with pool.acquire() as conn:
        got = await rows(conn, partition)
    assert set(got["series"]) == {s for s in owner if any(sop.startswith(f"{s}.") for sop in stored)}


async def test_level_members_follow_the_attributes(pool: asyncpg.Pool) -> None:
    """Migration 0023 keeps a level row's stored QIDO members when an upsert leaves its attributes as they
    are, and computes them again when they change."""
    async with pool.acquire() as conn:
        partition = await new_partition(conn)
    first = attrs("6.1", "6.1.1", "6.1.1.1", patient="A")
    assert await index(pool, partition, [first]) == [Outcome.CREATED]
    same = attrs("6.1", "6.1.1", "6.1.1.2", patient="A")  # the same study and series attributes
    renamed = attrs("6.1", "6.1.1", "6.1.1.3", patient="B")  # a later instance with another PatientID
    check = """SELECT members = qido_members(attrs) AS fresh, members IS NOT NULL AS filled,
                      convert_from(members, 'UTF8') LIKE $2 AS names_b
               FROM study WHERE partition_key = $1"""
    for batch, patient in (([same], "A"), ([renamed], "B")):
        assert await index(pool, partition, batch) == [Outcome.CREATED]
        async with pool.acquire() as conn:
            row = await conn.fetchrow(check, partition, '%"B"%')
            series_fresh = await conn.fetchval(
                "SELECT bool_and(members = qido_members(attrs)) FROM series WHERE partition_key = $1",
                partition,
            )
        assert row["fresh"] and row["filled"] and series_fresh
        assert row["names_b"] == (patient == "B")
