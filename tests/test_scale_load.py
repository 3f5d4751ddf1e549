"""bench.scale_load writes rows in SQL from templates; they must be the rows the archive's own ingest
writes. The generated instances are indexed again through indexer.writes (STOW's index path) into a second
partition, and every QIDO search, the study/series/instance rows and the change feed must agree; and the
same instances, made into DICOM objects and stored over STOW-RS, must give the same QIDO answers over HTTP."""

from __future__ import annotations

import hashlib
import random

import asyncpg
import httpx
import orjson
import pytest
from pydicom.valuerep import IS

from bench import scale_load
from bench.qido_search import SEED
from bench.synthetic import make_instance, make_study, multipart_body, to_bytes
from indexer.attributes import Level
from indexer.qido import parse_query, search_page
from indexer.writes import InstanceRecord, index_instances
from tests.fixtures.postgres import fresh_database
from tests.fixtures.server import RunningArchive

STUDIES, PER_STUDY = 120, 5
STOWED = 40  # studies stored over STOW-RS: each search below matches some
BASE = "http://archive.test/v2"
SEARCHES: list[tuple[Level, list[tuple[str, str]]]] = [
    (Level.STUDY, [("limit", "200")]),
    (Level.STUDY, [("PatientName", "smi*"), ("limit", "200")]),
    (Level.STUDY, [("PatientName", "ann"), ("fuzzymatching", "true"), ("limit", "200")]),
    (Level.STUDY, [("ModalitiesInStudy", "MR"), ("StudyDate", "20050101-20201231"), ("limit", "200")]),
    (Level.STUDY, [("StudyDescription", "HEAD*"), ("includefield", "all"), ("limit", "200")]),
    (Level.STUDY, [("includefield", "SliceThickness"), ("limit", "200")]),
    (Level.SERIES, [("Modality", "CT"), ("limit", "300")]),
    (Level.SERIES, [("includefield", "all"), ("limit", "300")]),
    (Level.INSTANCE, [("limit", "1000")]),
    (Level.INSTANCE, [("InstanceNumber", "3"), ("includefield", "all"), ("limit", "1000")]),
]
# columns that differ between the two copies by construction (keys, partition, times, object keys)
IGNORED = {
    "partition_key", "patient_key", "study_key", "series_key", "instance_key", "created_at", "updated_at",
    "storage_key",
}  # fmt: skip


async def rows(conn: asyncpg.Connection, table: str, partition: int, order: str) -> list[dict]:
    records = await conn.fetch(f"SELECT * FROM {table} WHERE partition_key = $1 ORDER BY {order}", partition)
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in records]


async def test_generated_rows_equal_indexed_rows(database_url: str) -> None:
    await scale_load.load(database_url, 70, PER_STUDY, chunk=50)  # two chunks, the last one short
    await scale_load.load(database_url, STUDIES, PER_STUDY, chunk=50)  # grown: indexes dropped and rebuilt
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM instance") == STUDIES * PER_STUDY
        assert await conn.fetchval("SELECT index_defs FROM scale_load_progress") is None
        assert await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = 'study_page'") == 1
        # the same instances (their generated metadata) through the archive's index path, in partition 2
        await conn.execute("INSERT INTO partition (partition_key, name) VALUES (2, 'copy')")
        generated = await conn.fetch("SELECT * FROM instance ORDER BY instance_key")
        for s in range(STUDIES):
            records = []
            for row in generated[s * PER_STUDY : (s + 1) * PER_STUDY]:
                attrs = orjson.loads(row["metadata"])
                sop = row["sop_instance_uid"]
                records.append(
                    InstanceRecord(
                        study_instance_uid=attrs["0020000D"]["Value"][0],
                        series_instance_uid=attrs["0020000E"]["Value"][0],
                        sop_instance_uid=sop,
                        sop_class_uid=attrs["00080016"]["Value"][0],
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        attrs=attrs,
                        storage_key=f"copy/{sop}",
                        size=34_000,
                        sha256=hashlib.sha256(sop.encode()).digest(),
                        metadata=orjson.dumps(attrs),
                    )
                )
            async with conn.transaction():
                await index_instances(conn, 2, records)
        for table, order in (("study", "study_key"), ("series", "series_key"), ("instance", "instance_key")):
            assert await rows(conn, table, 1, order) == await rows(conn, table, 2, order), table
        members = await conn.fetch(
            """SELECT i.partition_key, q.members FROM instance_qido q JOIN instance i USING (instance_key)
               ORDER BY i.partition_key, i.instance_key"""
        )
        assert [r["members"] for r in members[: len(generated)]] == [
            r["members"] for r in members[len(generated) :]
        ]
        for level, params in SEARCHES:
            query = parse_query(level, params)
            generated_page = await search_page(conn, 1, query, BASE, encoded=True)
            indexed_page = await search_page(conn, 2, query, BASE, encoded=True)
            assert generated_page.results, (level, params)
            assert orjson.dumps(generated_page.results) == orjson.dumps(indexed_page.results), (level, params)
        # one create entry per instance, in key order, and the counter where the writers continue
        feed = await conn.fetch("SELECT * FROM changefeed ORDER BY sequence")
        assert [
            (f["sequence"], f["partition_ordinal"], f["instance_key"], f["sop_instance_uid"], f["action"])
            for f in feed
        ] == [(n + 1, n + 1, r["instance_key"], r["sop_instance_uid"], 0) for n, r in enumerate(generated)]
        assert await conn.fetchval("SELECT last_sequence FROM changefeed_counter") == len(generated)
        # a second run with the same size is a no-op (restartable: it resumes after the last chunk)
        await scale_load.load(database_url, STUDIES, PER_STUDY, chunk=50)
        assert await conn.fetchval("SELECT count(*) FROM instance WHERE partition_key = 1") == len(generated)
        # growing is refused now: the instances indexed above hold the keys the next chunk would write
        with pytest.raises(SystemExit, match="did not write"):
            await scale_load.load(database_url, STUDIES + 10, PER_STUDY, chunk=50)
        assert await conn.fetchval("SELECT next_study FROM scale_load_progress") == STUDIES
    finally:
        await conn.close()


# the attributes scale_load varies (keyword, JSON key), set on bench.qido_search's template instance
VARIED = [
    ("PatientName", "00100010"), ("PatientID", "00100020"), ("PatientBirthDate", "00100030"),
    ("PatientSex", "00100040"), ("StudyDate", "00080020"), ("StudyTime", "00080030"),
    ("AccessionNumber", "00080050"), ("ReferringPhysicianName", "00080090"), ("StudyDescription", "00081030"),
    ("Modality", "00080060"), ("StudyInstanceUID", "0020000D"), ("SeriesInstanceUID", "0020000E"),
    ("SOPInstanceUID", "00080018"), ("SeriesNumber", "00200011"), ("InstanceNumber", "00200013"),
    ("AcquisitionDate", "00080022"), ("AcquisitionNumber", "00200012"),
]  # fmt: skip


def dicom_object(attrs: dict) -> bytes:
    """The PS3.10 object whose DICOM JSON is `attrs` (a generated instance's metadata)."""
    ds = make_instance(make_study(random.Random(SEED), series_count=1), 0, 1)
    for keyword, key in VARIED:
        value = attrs[key]["Value"][0]
        value = value["Alphabetic"] if isinstance(value, dict) else value
        setattr(ds, keyword, IS(value) if isinstance(value, int) else value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return to_bytes(ds)


async def test_generated_rows_answer_qido_as_stow_does(
    postgres_server: str, local_archive: RunningArchive
) -> None:
    async with fresh_database(postgres_server) as generated_url:
        await scale_load.load(generated_url, STOWED, PER_STUDY, chunk=15)
        conn = await asyncpg.connect(generated_url)
        try:
            metadata = [orjson.loads(r["metadata"]) for r in await conn.fetch(
                "SELECT metadata FROM instance ORDER BY instance_key"
            )]  # fmt: skip
            async with httpx.AsyncClient(base_url=local_archive.url, timeout=60) as client:
                for s in range(STOWED):  # one STOW per study, as bench.qido_search's load indexes them
                    body, content_type = multipart_body(
                        [dicom_object(a) for a in metadata[s * PER_STUDY : (s + 1) * PER_STUDY]]
                    )
                    stored = await client.post(
                        "/studies", content=body, headers={"Content-Type": content_type}
                    )
                    assert stored.status_code == 200, stored.text
                for level, params in SEARCHES:
                    path = {Level.STUDY: "/studies", Level.SERIES: "/series", Level.INSTANCE: "/instances"}[
                        level
                    ]
                    over_http = (await client.get(path, params=params)).json()
                    page = await search_page(conn, 1, parse_query(level, params), local_archive.url)
                    assert over_http and page.results == over_http, (level, params)
                instances = (await client.get("/instances", params={"limit": "1000"})).json()
                assert len(instances) == STOWED * PER_STUDY
        finally:
            await conn.close()
