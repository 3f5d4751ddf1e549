"""QIDO-RS search: query parsing, SQL matching against a real PostgreSQL, result shaping, and a hypothesis
comparison of `indexer.qido.search` with the plain-Python matcher in tests/qido_reference.py."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dicomcore.tags import dictionary_vr, parse_tag, tag_hex
from indexer.attributes import Level
from indexer.migrate import migrate
from indexer.qido import (
    ALL,
    Exact,
    QidoQuery,
    QueryError,
    Range,
    Wildcard,
    Words,
    _Args,
    _successor,
    _wildcard_sql,
    parse_query,
    search,
    search_page,
)
from indexer.writes import InstanceRecord, index_instances
from tests import qido_reference as ref

BASE = "http://archive.test/dicomweb"
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
UID_KEY = {Level.STUDY: "0020000D", Level.SERIES: "0020000E", Level.INSTANCE: "00080018"}


# --- helpers ------------------------------------------------------------------------------------------


def element(keyword: str, value: Any) -> dict:
    """A DICOM JSON element for a keyword; PN strings become Alphabetic groups."""
    tag = parse_tag(keyword)
    vr = (dictionary_vr(tag) or "UN").split()[0]  # "OB or OW" -> OB
    if value is None:
        return {"vr": vr}
    if isinstance(value, str) and vr.startswith("O"):
        return {"vr": vr, "BulkDataURI": value}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        values = [{"Alphabetic": v} if isinstance(v, str) else v for v in values]
    return {"vr": vr, "Value": values}


def instance(study: str, series: str, sop: str, **attrs: Any) -> dict:
    """DICOM JSON of an instance; attributes given as None are left out."""
    out = {
        "0020000D": element("StudyInstanceUID", study),
        "0020000E": element("SeriesInstanceUID", series),
        "00080018": element("SOPInstanceUID", sop),
        "00080016": element("SOPClassUID", attrs.pop("SOPClassUID", CT)),
    }
    for keyword, value in attrs.items():
        if value is not None:
            out[tag_hex(parse_tag(keyword))] = element(keyword, value)
    return dict(sorted(out.items()))


async def load(conn: asyncpg.Connection, instances: list[dict], partition_key: int = 1) -> None:
    """Index the instances one by one, in order, as separate stores would."""
    for attrs in instances:
        blob = orjson.dumps(attrs)
        sop = attrs["00080018"]["Value"][0]
        record = InstanceRecord(
            study_instance_uid=attrs["0020000D"]["Value"][0],
            series_instance_uid=attrs["0020000E"]["Value"][0],
            sop_instance_uid=sop,
            sop_class_uid=attrs["00080016"]["Value"][0],
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            attrs=attrs,
            storage_key=f"{partition_key}/{sop}",
            size=len(blob),
            sha256=hashlib.sha256(blob).digest(),
            metadata=blob,
        )
        async with conn.transaction():
            (result,) = await index_instances(conn, partition_key, [record])
        assert result.instance_key is not None, result


async def run(
    conn: asyncpg.Connection,
    level: Level,
    params: list[tuple[str, str]] | None = None,
    study: str | None = None,
    series: str | None = None,
    partition_key: int = 1,
) -> list[dict]:
    query = parse_query(level, params or [], study_uid=study, series_uid=series)
    return await search(conn, partition_key, query, BASE)


async def uids(
    conn: asyncpg.Connection,
    level: Level,
    params: list[tuple[str, str]] | None = None,
    study: str | None = None,
    series: str | None = None,
) -> list[str]:
    return [r[UID_KEY[level]]["Value"][0] for r in await run(conn, level, params, study, series)]


def value(result: dict, keyword: str) -> Any:
    values = result.get(tag_hex(parse_tag(keyword)), {}).get("Value")
    return values[0] if values else None


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    await migrate(connection)
    try:
        yield connection
    finally:
        await connection.close()


# Three studies; UIDs tell the hierarchy (study 1.2.1 > series 1.2.1.1 > instance 1.2.1.1.1).
STUDY_A = dict(
    PatientName="Müller^Ann",
    PatientID="P_1",
    PatientBirthDate="19800101",
    PatientSex="F",
    StudyDate="20200101",
    StudyTime="103015.5",
    AccessionNumber="A1",
    ReferringPhysicianName="Smith^Bo",
    StudyID="1",
    StudyDescription="Head CT",
    SpecificCharacterSet="ISO_IR 192",
)
STUDY_B = dict(
    PatientName={"Alphabetic": "Yamada^Taro", "Ideographic": "山田^太郎"},
    PatientID="PX1",
    PatientSex="M",
    StudyDate="20200215",
    StudyTime="2359",
    AccessionNumber="A2",
    StudyDescription="Thorax",
)
STUDY_C = dict(
    PatientName="MULLER^ANNA",
    PatientID="P%1",
    StudyDate="20191231",
    StudyTime="0930",
    StudyDescription="head",
)
ARCHIVE = [
    instance(
        "1.2.1", "1.2.1.1", "1.2.1.1.1", **STUDY_A, Modality="CT", SeriesNumber=2, SeriesDescription="Axial",
        PerformedProcedureStepStartDate="20200101", PerformedProcedureStepStartTime="1030",
        ManufacturerModelName="Model X", InstanceNumber=2, Rows=512, Columns=512, BitsAllocated=16,
        SliceThickness=1.5,
    ),
    instance(
        "1.2.1", "1.2.1.1", "1.2.1.1.2", **STUDY_A, Modality="CT", SeriesNumber=2, SeriesDescription="Axial",
        PerformedProcedureStepStartDate="20200101", PerformedProcedureStepStartTime="1030",
        ManufacturerModelName="Model X", InstanceNumber=1, Rows=512, Columns=512, BitsAllocated=16,
        SliceThickness=2.5,
    ),
    instance(
        "1.2.1", "1.2.1.2", "1.2.1.2.1", **STUDY_A, Modality="MR", SeriesNumber=1, SOPClassUID=MR,
        InstanceNumber=1, ImageType=["ORIGINAL", "PRIMARY"],
    ),
    instance(
        "1.2.2", "1.2.2.1", "1.2.2.1.1", **STUDY_B, Modality="US", PixelData="bulkdata/7FE00010",
        NumberOfFrames=10,
    ),
    instance("1.2.3", "1.2.3.1", "1.2.3.1.1", **STUDY_C, Modality="CT", SeriesNumber=10, InstanceNumber=7),
]  # fmt: skip


@pytest.fixture
async def archive(conn: asyncpg.Connection) -> asyncpg.Connection:
    await load(conn, ARCHIVE)
    return conn


# --- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "params", "param"),
    [
        (Level.STUDY, [("foo", "1")], "foo"),
        (Level.STUDY, [("Rows", "512")], "Rows"),
        (Level.STUDY, [("SeriesInstanceUID", "1.2")], "SeriesInstanceUID"),
        (Level.SERIES, [("SOPInstanceUID", "1.2")], "SOPInstanceUID"),
        (Level.STUDY, [("PatientID", "a"), ("PatientID", "b")], "PatientID"),
        (Level.STUDY, [("PatientID", "a"), ("00100020", "b")], "00100020"),
        (Level.STUDY, [("00400275.00401001", "x")], "00400275.00401001"),
        (Level.STUDY, [("StudyDate", "2020")], "StudyDate"),
        (Level.STUDY, [("StudyDate", "20201301")], "StudyDate"),
        (Level.STUDY, [("StudyDate", "20200101-20190101")], "StudyDate"),
        (Level.STUDY, [("StudyDate", "-")], "StudyDate"),
        (Level.STUDY, [("StudyDate", "2020*")], "StudyDate"),
        (Level.STUDY, [("StudyDate", "2020-01-01")], "StudyDate"),
        (Level.STUDY, [("PatientBirthDate", "19800101-x")], "PatientBirthDate"),
        (Level.STUDY, [("StudyTime", "25")], "StudyTime"),
        (Level.STUDY, [("StudyTime", "1060")], "StudyTime"),
        (Level.STUDY, [("StudyTime", "10:30")], "StudyTime"),
        (Level.STUDY, [("StudyTime", "11-10")], "StudyTime"),
        (Level.STUDY, [("StudyTime", "1030.5")], "StudyTime"),
        (Level.SERIES, [("SeriesNumber", "x")], "SeriesNumber"),
        (Level.SERIES, [("SeriesNumber", "1.5")], "SeriesNumber"),
        (Level.SERIES, [("SeriesNumber", "99999999999")], "SeriesNumber"),
        (Level.INSTANCE, [("InstanceNumber", "1\\two")], "InstanceNumber"),
        (Level.STUDY, [("StudyInstanceUID", "1.02")], "StudyInstanceUID"),
        (Level.STUDY, [("StudyInstanceUID", "1.2,abc")], "StudyInstanceUID"),
        (Level.STUDY, [("StudyInstanceUID", "1.2*")], "StudyInstanceUID"),
        (Level.STUDY, [("limit", "-1")], "limit"),
        (Level.STUDY, [("limit", "0")], "limit"),
        (Level.STUDY, [("limit", "ten")], "limit"),
        (Level.STUDY, [("limit", "")], "limit"),
        (Level.STUDY, [("limit", "5"), ("limit", "6")], "limit"),
        (Level.STUDY, [("offset", "-3")], "offset"),
        (Level.STUDY, [("offset", "1e3")], "offset"),
        (Level.STUDY, [("offset", str(2**40))], "offset"),
        (Level.STUDY, [("fuzzymatching", "maybe")], "fuzzymatching"),
        (Level.STUDY, [("includefield", "NoSuchKeyword")], "includefield"),
        (Level.STUDY, [("includefield", "00400275.00401001")], "includefield"),
        (Level.STUDY, [("PatientName", "=山田")], "PatientName"),
        (Level.STUDY, [("PatientID", "a\x00b")], "PatientID"),
    ],
)
def test_parse_errors_name_the_parameter(level: Level, params: list[tuple[str, str]], param: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query(level, params)
    assert info.value.param == param
    assert param in str(info.value)


def test_parse_includefield_limit_offset() -> None:
    query = parse_query(
        Level.STUDY,
        [("includefield", "StudyDescription,00081080"), ("includefield", "0008103e"), ("limit", "7")],
    )
    assert query.include == {0x00081030, 0x00081080, 0x0008103E}
    assert (query.limit, query.offset, query.fuzzy) == (7, 0, False)
    assert parse_query(Level.STUDY, [("includefield", "PatientAge"), ("includefield", "all")]).include is ALL
    defaults = parse_query(Level.STUDY, [], default_limit=50, max_limit=200)
    assert (defaults.limit, defaults.offset) == (50, 0)
    clamped = parse_query(Level.STUDY, [("limit", "100000"), ("offset", "20")], max_limit=200)
    assert (clamped.limit, clamped.offset) == (200, 20)
    assert parse_query(Level.STUDY, [("FuzzyMatching", "TRUE")]).fuzzy


def test_parse_terms() -> None:
    query = parse_query(
        Level.INSTANCE,
        [
            ("PatientID", "P1\\p?*"),
            ("Modality", "CT,MR"),
            ("StudyDate", "20200101-"),
            ("StudyTime", "-10"),
            ("SeriesNumber", "1\\2,3"),
            ("PatientName", "Dö^*"),
            ("StudyInstanceUID", "1.2.3,1.2.4\\1.2.5"),
            ("AccessionNumber", ""),
            ("StudyDescription", "*"),
            ("SeriesDescription", "a\\*"),
        ],
        study_uid="1.2.3",
    )
    terms = {f.param: f.terms for f in query.filters}
    assert terms == {
        "PatientID": (Exact("P1"), Wildcard("p?*")),
        "Modality": (Exact("CT"), Exact("MR")),
        "StudyDate": (Range(dt.date(2020, 1, 1), None),),
        "StudyTime": (Range(None, dt.time(10, 59, 59, 999999)),),
        "SeriesNumber": (Exact(1), Exact(2), Exact(3)),
        "PatientName": (Wildcard("dö^*"),),
        "StudyInstanceUID": (Exact("1.2.3"), Exact("1.2.4"), Exact("1.2.5")),
    }
    # universal keys are still matching keys: they are returned with each result
    assert {0x00080050, 0x00081030, 0x0008103E} <= query.match_tags
    leap = parse_query(Level.STUDY, [("StudyTime", "235960")])  # a leap second: the minute's last
    assert leap.filters[0].terms == (Range(dt.time(23, 59, 59), dt.time(23, 59, 59, 999999)),)
    fuzzy = parse_query(Level.STUDY, [("PatientName", "Dö*^Ánn"), ("fuzzymatching", "true")])
    assert fuzzy.filters[0].terms == (Words(("do", "ann")),)
    alias = parse_query(Level.STUDY, [("Modality", "CT")])
    assert alias.filters[0].attribute.keyword == "ModalitiesInStudy"


def test_sql_takes_values_only_as_parameters() -> None:
    args = _Args(1)
    sql = _wildcard_sql("st.patient_id", "O'Brien_%\\*x?", args)
    assert "Brien" not in sql
    assert args.values[1:] == ["O'Brien_%\\", "O'Brien_%]", "O'Brien\\_\\%\\\\%x_"]
    assert _successor("ab") == "ac"
    assert _successor("a\U0010ffff") == "b"
    assert _successor("\ud7ff") == "\ue000"
    assert _successor("\U0010ffff") is None
    prefix_only = _Args(1)
    assert _wildcard_sql("c", "ab**", prefix_only) == "c >= $2 AND c < $3"


def test_scope_must_be_consistent_with_level() -> None:
    with pytest.raises(ValueError):
        parse_query(Level.SERIES, [], study_uid="1.2", series_uid="1.2.3")
    with pytest.raises(ValueError):
        parse_query(Level.STUDY, [], study_uid="1.2")


# --- matching -----------------------------------------------------------------------------------------


async def test_uid_matching(archive: asyncpg.Connection) -> None:
    assert await uids(archive, Level.STUDY, [("StudyInstanceUID", "1.2.2")]) == ["1.2.2"]
    assert await uids(archive, Level.STUDY, [("StudyInstanceUID", "1.2.3,1.2.1")]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("0020000D", "1.2.3\\1.2.9")]) == ["1.2.3"]
    assert await uids(archive, Level.SERIES, [("SeriesInstanceUID", "1.2.1.2")]) == ["1.2.1.2"]
    assert await uids(archive, Level.INSTANCE, [("SOPClassUID", MR)]) == ["1.2.1.2.1"]
    assert await uids(archive, Level.INSTANCE, [("SOPInstanceUID", "1.2.1.1.2,1.2.3.1.1")]) == [
        "1.2.1.1.2",
        "1.2.3.1.1",
    ]
    # a UID matching key of the scope's level is ANDed with the path's UID
    assert await uids(archive, Level.SERIES, [("StudyInstanceUID", "1.2.1")], study="1.2.1") == [
        "1.2.1.2",
        "1.2.1.1",
    ]
    assert await uids(archive, Level.SERIES, [("StudyInstanceUID", "1.2.2")], study="1.2.1") == []


async def test_string_matching(archive: asyncpg.Connection) -> None:
    assert await uids(archive, Level.STUDY, [("PatientID", "P_1")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("PatientID", "p_1")]) == []  # byte-exact, not PN
    # % and _ are literal characters; ? and * are the wildcards
    assert await uids(archive, Level.STUDY, [("PatientID", "P_*")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("PatientID", "P%*")]) == ["1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientID", "P?1")]) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientID", "*_1")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("PatientID", "?%?")]) == ["1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientID", "*1")]) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientID", "PX1\\P%1")]) == ["1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("StudyDescription", "head")]) == ["1.2.3"]
    assert await uids(archive, Level.STUDY, [("StudyDescription", "H*")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("StudyDescription", "*a*")]) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("AccessionNumber", "A*")]) == ["1.2.1", "1.2.2"]
    # '*' alone and empty values are universal: entities without the attribute match too
    assert await uids(archive, Level.STUDY, [("AccessionNumber", "*")]) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("AccessionNumber", "")]) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientSex", "M,F")]) == ["1.2.1", "1.2.2"]
    assert await uids(archive, Level.SERIES, [("Modality", "CT")]) == ["1.2.1.1", "1.2.3.1"]
    assert await uids(archive, Level.SERIES, [("ManufacturerModelName", "Model ?")]) == ["1.2.1.1"]


async def test_person_name_matching(archive: asyncpg.Connection) -> None:
    assert await uids(archive, Level.STUDY, [("PatientName", "müller^ann")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("PatientName", "MÜLLER*")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("PatientName", "M?LLER*")]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientName", "yamada^taro=山田^太郎")]) == ["1.2.2"]
    assert await uids(archive, Level.STUDY, [("PatientName", "*ann*\\yam*")]) == ["1.2.1", "1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("ReferringPhysicianName", "SMITH^BO")]) == ["1.2.1"]
    fuzzy = [("fuzzymatching", "true")]
    assert await uids(archive, Level.STUDY, [("PatientName", "muller"), *fuzzy]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientName", "ann mul"), *fuzzy]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientName", "anna"), *fuzzy]) == ["1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientName", "Tar*"), *fuzzy]) == ["1.2.2"]
    assert await uids(archive, Level.STUDY, [("PatientName", "山田"), *fuzzy]) == ["1.2.2"]
    assert await uids(archive, Level.STUDY, [("PatientName", "ann^smith"), *fuzzy]) == []
    assert await uids(archive, Level.SERIES, [("PatientName", "bo"), *fuzzy]) == []
    assert await uids(archive, Level.SERIES, [("ReferringPhysicianName", "bo"), *fuzzy]) == [
        "1.2.1.2",
        "1.2.1.1",
    ]


async def test_date_and_time_matching(archive: asyncpg.Connection) -> None:
    assert await uids(archive, Level.STUDY, [("StudyDate", "20200101")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("StudyDate", "20200101-20200215")]) == ["1.2.1", "1.2.2"]
    assert await uids(archive, Level.STUDY, [("StudyDate", "-20200101")]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("StudyDate", "20200102-")]) == ["1.2.2"]
    assert await uids(archive, Level.STUDY, [("StudyDate", "20191231\\20200215")]) == ["1.2.2", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("PatientBirthDate", "19000101-")]) == ["1.2.1"]
    # a TM value covers its whole precision: "10" is 10:00-10:59:59.999999
    assert await uids(archive, Level.STUDY, [("StudyTime", "10")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("StudyTime", "1030")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("StudyTime", "103015")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("StudyTime", "103015.5")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("StudyTime", "103015.4")]) == []
    assert await uids(archive, Level.STUDY, [("StudyTime", "-09")]) == ["1.2.3"]
    assert await uids(archive, Level.STUDY, [("StudyTime", "-0929")]) == []
    assert await uids(archive, Level.STUDY, [("StudyTime", "1031-")]) == ["1.2.2"]
    assert await uids(archive, Level.STUDY, [("StudyTime", "0930-1030")]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.SERIES, [("PerformedProcedureStepStartTime", "10")]) == ["1.2.1.1"]
    assert await uids(archive, Level.SERIES, [("PerformedProcedureStepStartDate", "-20201231")]) == [
        "1.2.1.1"
    ]


async def test_integer_and_modalities_matching(archive: asyncpg.Connection) -> None:
    assert await uids(archive, Level.SERIES, [("SeriesNumber", "2")]) == ["1.2.1.1"]
    assert await uids(archive, Level.SERIES, [("SeriesNumber", "1\\10")]) == ["1.2.1.2", "1.2.3.1"]
    assert await uids(archive, Level.INSTANCE, [("InstanceNumber", "+1")]) == ["1.2.1.1.2", "1.2.1.2.1"]
    assert await uids(archive, Level.STUDY, [("ModalitiesInStudy", "MR")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("ModalitiesInStudy", "US,MR")]) == ["1.2.1", "1.2.2"]
    assert await uids(archive, Level.STUDY, [("ModalitiesInStudy", "?T")]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("Modality", "CT")]) == ["1.2.1", "1.2.3"]
    assert await uids(archive, Level.STUDY, [("Modality", "CT"), ("ModalitiesInStudy", "MR")]) == ["1.2.1"]
    assert await uids(archive, Level.SERIES, [("ModalitiesInStudy", "MR")]) == ["1.2.1.2", "1.2.1.1"]


async def test_levels_and_scopes(archive: asyncpg.Connection) -> None:
    assert await uids(archive, Level.STUDY) == ["1.2.1", "1.2.2", "1.2.3"]
    # series: by study, then SeriesNumber (missing last)
    assert await uids(archive, Level.SERIES) == ["1.2.1.2", "1.2.1.1", "1.2.2.1", "1.2.3.1"]
    assert await uids(archive, Level.SERIES, [("PatientID", "P_1")]) == ["1.2.1.2", "1.2.1.1"]
    assert await uids(archive, Level.SERIES, study="1.2.1") == ["1.2.1.2", "1.2.1.1"]
    assert await uids(archive, Level.SERIES, [("Modality", "MR")], study="1.2.1") == ["1.2.1.2"]
    # instances: by series, then InstanceNumber
    assert await uids(archive, Level.INSTANCE, [("StudyDate", "20200101")]) == [
        "1.2.1.1.2",
        "1.2.1.1.1",
        "1.2.1.2.1",
    ]
    assert await uids(archive, Level.INSTANCE, study="1.2.1") == ["1.2.1.1.2", "1.2.1.1.1", "1.2.1.2.1"]
    assert await uids(archive, Level.INSTANCE, [("Modality", "MR")], study="1.2.1") == ["1.2.1.2.1"]
    assert await uids(archive, Level.INSTANCE, study="1.2.1", series="1.2.1.1") == ["1.2.1.1.2", "1.2.1.1.1"]
    assert await uids(archive, Level.INSTANCE, study="1.2.2", series="1.2.1.1") == []
    assert await uids(archive, Level.SERIES, study="1.2.9") == []
    assert await uids(archive, Level.INSTANCE, study="1.2.9", series="1.2.9.1") == []


async def test_partitions_are_separate(archive: asyncpg.Connection) -> None:
    other = await archive.fetchval("INSERT INTO partition (name) VALUES ('other') RETURNING partition_key")
    await load(archive, [instance("1.2.1", "1.2.1.7", "1.2.1.7.1", PatientID="P_1")], partition_key=other)
    assert await uids(archive, Level.STUDY, [("PatientID", "P_1")]) == ["1.2.1"]
    assert len(await run(archive, Level.SERIES, [("PatientID", "P_1")], partition_key=other)) == 1
    assert len(await run(archive, Level.INSTANCE, study="1.2.1", partition_key=other)) == 1


async def test_search_in_callers_transaction_and_settings_do_not_leak(archive: asyncpg.Connection) -> None:
    async with archive.transaction():
        assert await uids(archive, Level.STUDY, [("PatientID", "P_1")]) == ["1.2.1"]
    assert await uids(archive, Level.STUDY, [("PatientID", "PX1")]) == ["1.2.2"]
    assert not archive.is_in_transaction()
    assert await archive.fetchval("SHOW plan_cache_mode") == "auto"


async def test_paging(archive: asyncpg.Connection) -> None:
    query = parse_query(Level.SERIES, [("limit", "2"), ("offset", "1")])
    page = await search_page(archive, 1, query, BASE)
    assert [value(r, "SeriesInstanceUID") for r in page.results] == ["1.2.1.1", "1.2.2.1"]
    assert page.more
    last = await search_page(archive, 1, parse_query(Level.SERIES, [("limit", "2"), ("offset", "2")]), BASE)
    assert [value(r, "SeriesInstanceUID") for r in last.results] == ["1.2.2.1", "1.2.3.1"]
    assert not last.more
    assert await uids(archive, Level.STUDY, [("offset", "3")]) == []


# --- returned attributes --------------------------------------------------------------------------------


async def test_study_results(archive: asyncpg.Connection) -> None:
    (result,) = await run(archive, Level.STUDY, [("PatientID", "P_1"), ("StudyDescription", "")])
    assert list(result) == sorted(result)
    assert set(result) == {
        "00080005", "00080020", "00080030", "00080050", "00080056", "00080061", "00080090", "00081030",
        "00081190", "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010", "00201206",
        "00201208",
    }  # fmt: skip
    assert result["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert result["00201206"] == {"vr": "IS", "Value": [2]}
    assert result["00201208"] == {"vr": "IS", "Value": [3]}
    assert result["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
    assert result["00081190"] == {"vr": "UR", "Value": [f"{BASE}/studies/1.2.1"]}
    assert result["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Müller^Ann"}]}
    assert result["00081030"] == {"vr": "LO", "Value": ["Head CT"]}  # a matching key


async def test_series_and_instance_results(archive: asyncpg.Connection) -> None:
    scoped = await run(archive, Level.SERIES, [("Modality", "CT")], study="1.2.1")
    assert set(scoped[0]) == {
        "00080005", "00080060", "0008103E", "00081190", "0020000D", "0020000E", "00200011",
        "00201209", "00400244", "00400245",
    }  # fmt: skip
    assert scoped[0]["00201209"] == {"vr": "IS", "Value": [2]}
    assert value(scoped[0], "RetrieveURL") == f"{BASE}/studies/1.2.1/series/1.2.1.1"
    # without a study in the path, the study's default attributes come along
    unscoped = await run(archive, Level.SERIES, [("SeriesInstanceUID", "1.2.1.1")])
    assert {"00100010", "00100020", "00080061", "00201206", "00201208", "00200010"} <= set(unscoped[0])
    assert value(unscoped[0], "NumberOfStudyRelatedInstances") == 3
    # a study attribute named by includefield in a study-scoped search
    (with_name,) = await run(
        archive, Level.SERIES, [("includefield", "PatientName"), ("Modality", "MR")], study="1.2.1"
    )
    assert value(with_name, "PatientName") == {"Alphabetic": "Müller^Ann"}
    (inst,) = await run(archive, Level.INSTANCE, study="1.2.1", series="1.2.1.2")
    assert set(inst) == {
        "00080005", "00080016", "00080018", "00080056", "00081190", "0020000D", "0020000E", "00200013",
    }  # fmt: skip
    assert value(inst, "RetrieveURL") == f"{BASE}/studies/1.2.1/series/1.2.1.2/instances/1.2.1.2.1"
    (us,) = await run(archive, Level.INSTANCE, [("Modality", "US")])
    assert value(us, "NumberOfFrames") == 10
    assert value(us, "NumberOfSeriesRelatedInstances") == 1
    assert value(us, "ModalitiesInStudy") == "US"
    assert value(us, "PatientID") == "PX1"


async def test_includefield_all(archive: asyncpg.Connection) -> None:
    (study,) = await run(archive, Level.STUDY, [("PatientID", "P_1"), ("includefield", "all")])
    assert value(study, "StudyDescription") == "Head CT"
    assert "00080060" not in study and "00280010" not in study  # series/instance attributes: not study's
    (series,) = await run(
        archive, Level.SERIES, [("includefield", "all"), ("SeriesInstanceUID", "1.2.1.1")], study="1.2.1"
    )
    assert value(series, "ManufacturerModelName") == "Model X"
    assert value(series, "NumberOfSeriesRelatedInstances") == 2
    assert "00100010" not in series and "00180050" not in series
    (inst,) = await run(archive, Level.INSTANCE, [("includefield", "all"), ("Modality", "US")])
    assert inst["7FE00010"] == {
        "vr": "OB",
        "BulkDataURI": f"{BASE}/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.1/bulkdata/7FE00010",
    }
    assert value(inst, "PatientID") == "PX1"  # study default: no study in the path
    (scoped,) = await run(archive, Level.INSTANCE, [("includefield", "all")], study="1.2.2", series="1.2.2.1")
    assert "00100020" not in scoped and "7FE00010" in scoped


async def test_includefield_from_representative_instance(archive: asyncpg.Connection) -> None:
    # SliceThickness is not a study or series attribute: it comes from the latest stored instance
    studies = await run(archive, Level.STUDY, [("includefield", "SliceThickness,ImageType,00280010")])
    a, b, c = studies
    assert value(a, "ImageType") == "ORIGINAL"  # 1.2.1.2.1 is study 1.2.1's latest instance
    assert "00180050" not in a and "00280010" not in a
    assert "00180050" not in b and "00180050" not in c
    series = await run(archive, Level.SERIES, [("includefield", "SliceThickness")], study="1.2.1")
    assert [value(s, "SliceThickness") for s in series] == [None, 2.5]
    (us,) = await run(archive, Level.SERIES, [("includefield", "PixelData"), ("Modality", "US")])
    assert us["7FE00010"]["BulkDataURI"].endswith(
        "/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.1/bulkdata/7FE00010"
    )


async def test_latest_instance_supplies_level_attributes(conn: asyncpg.Connection) -> None:
    await load(
        conn,
        [
            instance("1.5", "1.5.1", "1.5.1.1", PatientName="Old^Name", SeriesDescription="first"),
            instance("1.5", "1.5.1", "1.5.1.2", PatientName="New^Name", SeriesDescription="second"),
        ],
    )
    assert await uids(conn, Level.STUDY, [("PatientName", "old*")]) == []
    (study,) = await run(conn, Level.STUDY, [("PatientName", "new*")])
    assert value(study, "PatientName") == {"Alphabetic": "New^Name"}
    assert await uids(conn, Level.SERIES, [("SeriesDescription", "second")]) == ["1.5.1"]


# --- hypothesis: SQL against the reference matcher ------------------------------------------------------

NAMES: list[Any] = [
    "Müller^Ann", "MULLER^ANNA", "muller^ann", "Smith^Bo", "smíth^Bo Jr", "O_Neil%^X", "Doe",
    {"Alphabetic": "Yamada^Taro", "Ideographic": "山田^太郎"}, None,
]  # fmt: skip
DATES = ["20200101", "20200102", "20191231", "20200229", "2020", None]
TIMES = ["10", "1030", "103015", "103015.5", "235959.999999", "000000", "0930", "1061", None]
POOLS: dict[str, list[Any]] = {
    "PatientName": NAMES,
    "ReferringPhysicianName": NAMES,
    "PatientID": ["P1", "p1", "P10", "P_1", "P%1", None],
    "PatientBirthDate": DATES,
    "PatientSex": ["M", "F", "O", None],
    "StudyDate": DATES,
    "StudyTime": TIMES,
    "AccessionNumber": ["A1", "A2", "a1", None],
    "StudyID": ["1", "2", None],
    "StudyDescription": ["Head", "head", "Head CT", "Thorax", None],
    "Modality": ["CT", "MR", "US", "OT", None],
    "SeriesNumber": [1, 2, 10, None],
    "SeriesDescription": ["Axial", "axial 2", "Scout", None],
    "PerformedProcedureStepStartDate": DATES,
    "PerformedProcedureStepStartTime": TIMES,
    "ManufacturerModelName": ["Model X", "Model Y", None],
    "InstanceNumber": [1, 2, 3, None],
}
STUDY_KEYS = [k for k, (_, _, lvl) in ref.KEYS.items() if lvl == "study" and k in POOLS]
SERIES_KEYS = [k for k, (_, _, lvl) in ref.KEYS.items() if lvl == "series" and k in POOLS]

QUERY_EXTRAS: dict[str, list[str]] = {
    "PN": ["müller", "MÜLLER^ANN", "mul*", "M?LLER^ANN*", "*ann", "o_neil%^x", "O?Neil*", "smith*\\doe",
           "taro", "山田", "=山田", "Ann Müller", "yam tar", "bo jr", "*", "?"],
    "DA": ["20200103", "20200101-20200229", "20200229-20200101", "-20200101", "20191231-", "2020",
           "20201301", "-", "20200101\\20191231"],
    "TM": ["10", "1030", "103015", "103015.5", "103015.50", "0930", "23", "2359", "235959.999999", "00",
           "-10", "1030-", "0930-1030", "10-0930", "25", "1061", "10:30", "103015.1234567", "-0929"],
    "IS": ["1", "2", "10", "3", "1\\2", "2,10", "+1", "x", "1.5", "-0"],
    "CS": ["CT\\MR", "US,OT", "MR,CT", "CT", "MR", "C*", "*T", "?T", "ct", "M", "F,O", "*", "O\\US\\MR"],
    "LO": ["P_1", "P?1", "P%*", "*_1", "*%?", "P_?", "?_*", "p*", "P1\\P10", "P\\1", "Head*", "*a*",
           "Model ?", "A1 ", "a?"],
}  # fmt: skip


def _text_of(stored: Any) -> str | None:
    if isinstance(stored, dict):
        return stored.get("Alphabetic")
    return None if stored is None else str(stored)


@st.composite
def archives(draw: st.DrawFn) -> list[dict]:
    """A few studies/series/instances with values from small pools, stored in a random order."""
    out = []
    for s in range(draw(st.integers(1, 4))):
        study = {k: draw(st.sampled_from(POOLS[k])) for k in STUDY_KEYS}
        for se in range(draw(st.integers(1, 3))):
            series = {k: draw(st.sampled_from(POOLS[k])) for k in SERIES_KEYS}
            for i in range(draw(st.integers(1, 3))):
                sop_class = draw(st.sampled_from([CT, MR]))
                number = draw(st.sampled_from(POOLS["InstanceNumber"]))
                uid = f"1.2.3.{s + 1}.{se + 1}.{i + 1}"
                out.append(
                    instance(
                        f"1.2.3.{s + 1}", f"1.2.3.{s + 1}.{se + 1}", uid, **study, **series,
                        SOPClassUID=sop_class, InstanceNumber=number,
                    )
                )  # fmt: skip
    return draw(st.permutations(out))


def _derive(draw: st.DrawFn, text: str) -> str:
    """A query value made from a stored value: same, case-changed, prefix*, with a ?, *suffix."""
    mode = draw(st.sampled_from(["same", "prefix", "qmark", "suffix", "same", "lower", "upper"]))
    if not text or mode == "same":
        return text
    if mode == "lower":
        return text.lower()
    if mode == "upper":
        return text.upper()
    cut = draw(st.integers(0, len(text) - 1))
    if mode == "prefix":
        return text[:cut] + "*"
    if mode == "qmark":
        return text[:cut] + "?" + text[cut + 1 :]
    return "*" + text[cut:]


QUERY_DATES = ["20191231", "20200101", "20200102", "20200103", "20200229"]
QUERY_TIMES = ["00", "09", "0930", "10", "1030", "103015", "103015.5", "103015.50", "23", "2359"]


@st.composite
def query_value(draw: st.DrawFn, keyword: str, archive: list[dict], target: dict) -> str:
    """A value for a matching key, mostly derived from the target instance's value so that several keys
    can match together; the derivations are those of the key's match kind (ranges, truncated times,
    name-word prefixes, wildcards, lists). Choices that tend to match come first: hypothesis favours them.
    """
    hex_key, vr, _ = ref.KEYS[keyword]
    if vr == "UI":
        known = [*sorted({ref.first(a, hex_key) for a in archive}), "1.2.999"]
        picked = [ref.first(target, hex_key), *draw(st.lists(st.sampled_from(known), max_size=2))]
        sep = draw(st.sampled_from([",", "\\"]))
        return draw(st.sampled_from([sep.join(picked), sep.join(picked), "1.02", "*", ""]))
    source = target if draw(st.integers(0, 4)) < 4 else draw(st.sampled_from(archive))
    stored = _text_of(ref.first(source, "00080060" if keyword == "ModalitiesInStudy" else hex_key))
    extras = QUERY_EXTRAS["LO" if vr in ("LO", "SH") else vr]
    if stored is None or draw(st.integers(0, 5)) == 5:
        return draw(st.sampled_from(extras))
    if vr == "DA":
        if not ref.valid_date(stored):
            return draw(st.sampled_from(extras))
        other = draw(st.sampled_from(QUERY_DATES))
        low, high = sorted([stored, other])
        forms = [stored, f"{low}-{high}", f"{stored}-", f"-{stored}", f"{stored}\\{other}", f"{high}-{low}"]
        return draw(st.sampled_from(forms))
    if vr == "TM":
        if ref.time_bounds(stored) is None:
            return draw(st.sampled_from(extras))
        cut = stored[: draw(st.sampled_from([len(stored), 2, 4, 6, 8]))].rstrip(".")
        other = draw(st.sampled_from(QUERY_TIMES))
        forms = [cut, f"{cut}-", f"-{cut}", f"{cut}-{other}", f"{other}-{cut}", f"{cut}\\{other}"]
        return draw(st.sampled_from(forms))
    if vr == "IS":
        other = draw(st.sampled_from(["1", "2", "3", "10"]))
        return draw(st.sampled_from([stored, f"{other}\\{stored}", f"{stored},{other}", f"+{stored}"]))
    if vr == "PN" and draw(st.booleans()):  # name-word prefixes, for fuzzymatching
        words = ref.words_of("=".join(v for v in (ref.first(source, hex_key) or {}).values()))
        if words:
            chosen = draw(st.lists(st.sampled_from(words), min_size=1, max_size=2))
            return " ".join(w[: draw(st.integers(1, len(w)))] for w in chosen).upper()
    value = _derive(draw, stored)
    if draw(st.integers(0, 3)) == 3:
        value = f"{value}\\{_derive(draw, draw(st.sampled_from(extras)))}"
    return value


@st.composite
def queries(
    draw: st.DrawFn, archive: list[dict]
) -> tuple[Level, list[tuple[str, str]], str | None, str | None]:
    level = draw(st.sampled_from(list(Level)))
    target = draw(st.sampled_from(archive))
    study_uids = [*sorted({ref.first(a, "0020000D") for a in archive}), "1.2.999"]
    series_uids = sorted({ref.first(a, "0020000E") for a in archive})
    study = series = None
    if level is not Level.STUDY and draw(st.booleans()):
        study = draw(st.sampled_from([ref.first(target, "0020000D"), *study_uids]))
        if level is Level.INSTANCE and draw(st.booleans()):
            series = draw(st.sampled_from([ref.first(target, "0020000E"), *series_uids]))
    depth = ref.DEPTH[level.value]
    keywords = [k for k, (_, _, lvl) in ref.KEYS.items() if ref.DEPTH[lvl] <= depth]
    if draw(st.integers(0, 9)) == 0:  # now and then a key the level does not allow
        keywords = [*keywords, "SOPInstanceUID", "Rows", "NoSuchKey"]
    params = []
    for keyword in draw(
        st.lists(st.sampled_from(keywords), min_size=draw(st.integers(0, 1)), max_size=3, unique=True)
    ):
        if keyword not in ref.KEYS:
            params.append((keyword, "1"))
            continue
        name = ref.KEYS[keyword][0] if draw(st.integers(0, 4)) == 0 else keyword
        params.append((name, draw(query_value(keyword, archive, target))))
    fuzzy = draw(st.sampled_from([None, "true", "false"]))
    if fuzzy is not None:
        params.append(("fuzzymatching", fuzzy))
    limit = draw(st.sampled_from([None, "1", "2", "5"]))
    if limit is not None:
        params.append(("limit", limit))
    offset = draw(st.sampled_from([None, None, None, "0", "1", "3"]))
    if offset is not None:
        params.append(("offset", offset))
    return level, draw(st.permutations(params)), study, series


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_search_agrees_with_reference(conn: asyncpg.Connection, data: st.DataObject) -> None:
    archive = data.draw(archives(), label="archive")
    # CASCADE: rows of other tables that hang off instances (thumbnails, ...) go with them
    await conn.execute("TRUNCATE instance, series, study, patient RESTART IDENTITY CASCADE")
    await load(conn, archive)
    studies, _, _ = ref.build(archive)
    by_uid = {s.uid: s for s in studies}
    for _ in range(10):
        level, params, study, series = data.draw(queries(archive), label="query")
        try:
            expected = ref.search(archive, level.value, params, study, series)
        except ref.ReferenceQueryError:
            event("invalid query")
            with pytest.raises(QueryError):
                parse_query(level, params, study_uid=study, series_uid=series)
            continue
        query: QidoQuery = parse_query(level, params, study_uid=study, series_uid=series)
        results = await search(conn, 1, query, BASE)
        event(f"{'no' if not results else 'some'} matches, {min(len(query.filters), 2)}+ filters")
        assert [r[UID_KEY[level]]["Value"][0] for r in results] == expected, (level, params, study, series)
        for r in results:
            if study is None:
                st_uid = r["0020000D"]["Value"][0]
                entity = by_uid[st_uid]
                assert r["00201208"]["Value"] == [entity.instance_count]
                assert r["00201206"]["Value"] == [len(entity.children)]
                assert r["00080061"].get("Value", []) == sorted(entity.modalities)


def test_pn_trailing_empty_components_are_the_same_name() -> None:
    from indexer.attributes import fold_case

    assert fold_case("Doe^John^^") == fold_case("Doe^John") == "doe^john"
    assert fold_case("Doe^John^^ ") == "doe^john"
    assert fold_case("Doe^*") == "doe^*"
