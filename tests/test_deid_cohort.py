"""Cohort queries of exports and data requests (deid.cohort): resolved in one statement to exactly the
studies a QIDO-RS study search matches, in study_key order, on an index of 200 studies."""

from __future__ import annotations

import datetime as dt
import random
from urllib.parse import parse_qsl, quote

import asyncpg
import pytest

from bench.qido_search import study_records
from bench.synthetic import make_instance, make_study, to_bytes
from deid import cohort
from deid.cohort import resolve_query
from deid.export_request import ExportRequestError
from dicomcore.parse import parse_instance
from indexer.attributes import Level
from indexer.qido import matching_study_uids, parse_query, search_page
from indexer.writes import index_instances

STUDIES = 200


def _value(attrs: dict, key: str) -> str:
    return attrs[key]["Value"][0]


@pytest.fixture
async def index(pool: asyncpg.Pool) -> list[dict]:
    """Index rows of STUDIES studies (two series each, of random modalities; PatientIDs PID00000-99999
    drawn at random), one transaction per study; per study its UID, PatientID, date and modalities."""
    rng = random.Random(7)
    template = parse_instance(to_bytes(make_instance(make_study(rng, series_count=1), 0, 1))).attrs
    studies = []
    for n in range(STUDIES):
        records = study_records(rng, template, n)
        async with pool.acquire() as conn, conn.transaction():
            await index_instances(conn, 1, records)
        attrs = records[0].attrs
        studies.append(
            {
                "uid": _value(attrs, "0020000D"),
                "patient": _value(attrs, "00100020"),
                "date": dt.datetime.strptime(_value(attrs, "00080020"), "%Y%m%d").date(),
                "modalities": {_value(r.attrs, "00080060") for r in records},
            }
        )
    order = [r[0] for r in await pool.fetch("SELECT study_instance_uid FROM study ORDER BY study_key")]
    rank = {uid: i for i, uid in enumerate(order)}
    return sorted(studies, key=lambda s: rank[s["uid"]])


async def paged_search(conn: asyncpg.Connection, query: str) -> list[str]:
    """The studies of a study search, paged by 7 through indexer.qido.search_page."""
    uids: list[str] = []
    while True:
        params = [*parse_qsl(query), ("limit", "7"), ("offset", str(len(uids)))]
        page = await search_page(conn, 1, parse_query(Level.STUDY, params), "http://x/v2")
        uids += [r["0020000D"]["Value"][0] for r in page.results]
        if not page.more:
            return uids


async def test_cohorts_are_exactly_the_matching_studies(pool: asyncpg.Pool, index: list[dict]) -> None:
    patients = sorted({s["patient"] for s in index})[::3]  # every third patient, some with several studies
    low, high = dt.date(2005, 1, 1), dt.date(2014, 6, 30)
    cases = {
        "ModalitiesInStudy=CT&StudyDate=20050101-20140630": lambda s: (
            "CT" in s["modalities"] and low <= s["date"] <= high
        ),
        "PatientID=" + quote("\\".join(patients)): lambda s: s["patient"] in patients,
        "PatientID=PID1*": lambda s: s["patient"].startswith("PID1"),
        "ModalitiesInStudy=MR,US&StudyDate=-20101231": lambda s: (
            bool(s["modalities"] & {"MR", "US"}) and s["date"] <= dt.date(2010, 12, 31)
        ),
        "StudyDate=19000101": lambda s: False,
    }
    async with pool.acquire() as conn:
        for query, matches in cases.items():
            expected = [s["uid"] for s in index if matches(s)]
            assert await resolve_query(conn, 1, query) == expected, query
            assert await paged_search(conn, query) == expected, query  # what QIDO-RS pages return
        assert min(len([s for s in index if m(s)]) for m in list(cases.values())[:4]) > 10
        parsed = parse_query(Level.STUDY, [("PatientID", "PID1*")])
        assert (
            await matching_study_uids(conn, 1, parsed, 3)
            == [s["uid"] for s in index if s["patient"].startswith("PID1")][:3]
        )
        async with conn.transaction():  # inside the caller's transaction (a data request's approval)
            assert await resolve_query(conn, 1, "PatientID=PID1*") == [
                s["uid"] for s in index if s["patient"].startswith("PID1")
            ]
        assert await resolve_query(conn, 2, "PatientID=PID1*") == []  # another partition's


async def test_cohort_limits(pool: asyncpg.Pool, index: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    async with pool.acquire() as conn:
        for query in ("PatientID=PID1*&limit=10", "offset=5", "includefield=all"):
            with pytest.raises(ExportRequestError, match="limit, offset and includefield do not apply"):
                await resolve_query(conn, 1, query)
        with pytest.raises(ExportRequestError, match=r"source\.settings\.query: .*StudyDate"):
            await resolve_query(conn, 1, "StudyDate=2020-13-45")
        monkeypatch.setattr(cohort, "MAX_IDENTIFIERS", 5)
        with pytest.raises(ExportRequestError, match="matches more than 5 studies"):
            await resolve_query(conn, 1, "PatientID=PID*")
        assert len(await resolve_query(conn, 1, f"PatientID={index[0]['patient']}")) <= 5
    with pytest.raises(ValueError, match="study-level"):
        async with pool.acquire() as conn:
            await matching_study_uids(conn, 1, parse_query(Level.SERIES, []), 10)
