"""The size cap on JSON request bodies (dicomweb/jsonbody.py): 413 with a clear message whether the size is
declared (Content-Length, refused before the body is read) or only discovered while a chunked body streams
in, on every route family that takes JSON, and nothing changed in the index by a refused request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from dicomcore.uids import new_uid
from dicomweb.config import Settings
from tests.fixtures.server import RunningArchive, local_store_archive
from tests.worklist_data import workitem

LIMIT = 64 << 10


@pytest.fixture
def capped_archive(database_url: str, tmp_path: Path) -> Iterator[RunningArchive]:
    settings = Settings(data_dir=tmp_path, insecure_open=True, max_json_body_size=LIMIT)
    with local_store_archive(settings, database_url, tmp_path) as running:
        yield running


def _padded(value: object, size: int) -> bytes:
    """`value` as JSON followed by whitespace up to `size` bytes: valid JSON of exactly that size."""
    body = orjson.dumps(value)
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def _chunked(body: bytes, chunk: int = 8192) -> AsyncIterator[bytes]:
    """The body without a Content-Length (httpx sends an async iterable chunked)."""
    for start in range(0, len(body), chunk):
        yield body[start : start + chunk]


async def _count(database_url: str, table: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await conn.close()


def _assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.json()["error"]["message"] == (
        f"the request body exceeds the maximum size of {LIMIT} bytes for a JSON body"
    )


async def test_bulk_update_over_the_limit_is_413_and_queues_nothing(capped_archive: RunningArchive) -> None:
    update = {"studyInstanceUids": ["1.2.3"], "changeDataset": {"00100020": {"vr": "LO", "Value": ["X"]}}}
    url = f"{capped_archive.url}/studies/$bulkUpdate"
    json_type = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60) as client:
        declared = await client.post(url, content=_padded(update, LIMIT + 1), headers=json_type)
        _assert_too_large(declared)
        streamed = await client.post(url, content=_chunked(_padded(update, LIMIT + 1)), headers=json_type)
        _assert_too_large(streamed)
        without_type = await client.post(url, content=_padded(update, LIMIT + 1))  # Azure needs no type
        _assert_too_large(without_type)
        assert await _count(capped_archive.database_url, "operation") == 0
        # at the limit exactly, declared or streamed, the update is queued
        assert (await client.post(url, content=_padded(update, LIMIT), headers=json_type)).status_code == 202
        at_limit = await client.post(url, content=_chunked(_padded(update, LIMIT)), headers=json_type)
        assert at_limit.status_code == 202, at_limit.text
    assert await _count(capped_archive.database_url, "operation") == 2


async def test_workitem_over_the_limit_is_413_and_stores_nothing(capped_archive: RunningArchive) -> None:
    uid = new_uid()
    item = workitem()
    item["00741000"] = {"vr": "CS", "Value": ["SCHEDULED"]}
    dicom_json = {"Content-Type": "application/dicom+json"}
    async with httpx.AsyncClient(base_url=capped_archive.url, timeout=60) as client:
        declared = await client.post(
            f"/workitems?{uid}", content=_padded([item], LIMIT + 1), headers=dicom_json
        )
        _assert_too_large(declared)
        streamed = await client.post(
            f"/workitems?{uid}", content=_chunked(_padded([item], 4 * LIMIT)), headers=dicom_json
        )
        _assert_too_large(streamed)
        assert (await client.get(f"/workitems/{uid}")).status_code == 404
        assert await _count(capped_archive.database_url, "ups_workitem") == 0
        created = await client.post(f"/workitems?{uid}", content=_padded([item], LIMIT), headers=dicom_json)
        assert created.status_code == 201, created.text
        # an update of the stored item is capped the same way and leaves it as it was
        before = (await client.get(f"/workitems/{uid}")).json()
        change = [{"00741202": {"vr": "LO", "Value": ["changed"]}}]
        refused = await client.post(
            f"/workitems/{uid}", content=_padded(change, LIMIT + 1), headers=dicom_json
        )
        _assert_too_large(refused)
        assert (await client.get(f"/workitems/{uid}")).json() == before


async def test_resource_routes_over_the_limit_are_413(capped_archive: RunningArchive) -> None:
    json_type = {"Content-Type": "application/json"}
    database_url = capped_archive.database_url
    async with httpx.AsyncClient(base_url=capped_archive.base, timeout=60) as client:
        ae = {"aeTitle": "BIG", "host": "127.0.0.1", "port": 104}
        _assert_too_large(await client.post("/aes", content=_padded(ae, LIMIT + 1), headers=json_type))
        assert await _count(database_url, "dimse_ae") == 0
        tags = [{"Path": "PatientAge", "Level": "Study"}]
        for body in (_padded(tags, LIMIT + 1), _chunked(_padded(tags, LIMIT + 1))):
            _assert_too_large(await client.post("/v2/extendedquerytags", content=body, headers=json_type))
        assert await _count(database_url, "extended_query_tag") == 0
        token = {"role": "reader", "name": "big"}
        _assert_too_large(await client.post("/tokens", content=_padded(token, LIMIT + 1), headers=json_type))
        assert await _count(database_url, "access_token") == 0
        # the same bodies under the limit are accepted
        assert (await client.post("/aes", content=_padded(ae, LIMIT), headers=json_type)).status_code == 201
        tag_response = await client.post(
            "/v2/extendedquerytags", content=_padded(tags, LIMIT), headers=json_type
        )
        assert tag_response.status_code == 202, tag_response.text
    assert await _count(database_url, "dimse_ae") == 1


async def test_a_declared_size_is_refused_before_the_body_is_sent(capped_archive: RunningArchive) -> None:
    """The 413 comes back while the client has sent only the headers: the server never waits for (or
    buffers) a body it will refuse."""
    port = int(capped_archive.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v2/studies/$bulkUpdate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 30000000\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        assert head.startswith(b"HTTP/1.1 413 "), head
    finally:
        writer.close()
    assert await _count(capped_archive.database_url, "operation") == 0


async def test_the_default_limit_refuses_a_30_mb_bulk_update(local_archive: RunningArchive) -> None:
    assert Settings().max_json_body_size == 4 << 20
    update = {"studyInstanceUids": [new_uid() for _ in range(1000)], "changeDataset": {}}
    body = _padded(update, 30 << 20)
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(
            f"{local_archive.url}/studies/$bulkUpdate",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert str(4 << 20) in response.json()["error"]["message"]
    assert await _count(local_archive.database_url, "operation") == 0


async def test_a_nul_in_a_json_string_is_400_and_changes_nothing(local_archive: RunningArchive) -> None:
    """U+0000 (written \\u0000) in any string of a JSON body: PostgreSQL's text and jsonb cannot hold it,
    and a token name, an extended query tag's PrivateCreator, an export's S3 prefix or pixel rule, or a work
    item holding one was a 500 with a traceback. Every JSON route reads its body through read_body, which
    now refuses it with 400 before anything is done. An escaped backslash before "u0000" is no NUL."""
    json_type = {"Content-Type": "application/json"}
    export = {
        "source": {"type": "identifiers", "settings": {"values": ["1.2.3"]}},
        "destination": {"type": "s3", "settings": {"bucket": "b", "prefix": "a\u0000"}},
        "deidentification": {"project": "p1"},
    }
    item = workitem()
    item["00741000"] = {"vr": "CS", "Value": ["SCHEDULED"]}
    item["00404010"] = {"vr": "DT", "Value": ["20260101"]}
    item["00741202"] = {"vr": "LO", "Value": ["a\u0000"]}
    requests = [
        ("/tokens", {"role": "reader", "name": "a\u0000b"}, json_type),
        ("/v2/extendedquerytags", [{"Path": "00091003", "VR": "LO", "PrivateCreator": "A\u0000B",
                                    "Level": "Instance"}], json_type),
        ("/v2/export", export, json_type),
        ("/v2/workitems", [item], {"Content-Type": "application/dicom+json"}),
    ]  # fmt: skip
    async with httpx.AsyncClient(base_url=local_archive.base, timeout=60) as client:
        for path, body, headers in requests:
            response = await client.post(path, content=orjson.dumps(body), headers=headers)
            assert (response.status_code, response.json()["error"]["message"]) == (
                400,
                "the body holds a NUL character (\\u0000) in a string, which nothing here can store",
            ), path
        # a backslash followed by the text u0000 is an ordinary value
        named = await client.post("/tokens", content=orjson.dumps({"role": "reader", "name": "a\\u0000"}),
                                  headers=json_type)  # fmt: skip
        assert named.status_code == 201, named.text
        assert named.json()["name"] == "a\\u0000"
    assert await _count(local_archive.database_url, "extended_query_tag") == 0
    assert await _count(local_archive.database_url, "ups_workitem") == 0
    assert await _count(local_archive.database_url, "operation") == 0
