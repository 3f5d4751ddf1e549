"""The AE registry: /aes over HTTP (owners only), `dicomweb ae`, and what the listener makes of it;
DCMTK's echoscu and storescu as third-party peers."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.synthetic import make_instance, make_study, to_bytes
from dimse.aes import AeError, host_matches, parse_ae
from tests.access_support import bearer, make_token
from tests.fixtures.dimse import ARCHIVE_AE, DimseArchive


@pytest.fixture
async def owner(dimse_archive: DimseArchive) -> httpx.AsyncClient:
    token, _ = await make_token(dimse_archive.http.database_url, "owner")
    async with httpx.AsyncClient(base_url=dimse_archive.http.base, headers=bearer(token), timeout=30) as c:
        yield c


async def test_aes_crud_over_http(owner: httpx.AsyncClient) -> None:
    body = {"aeTitle": "CT01", "host": "127.0.0.1", "port": 104, "partition": "ct", "services": ["store"]}
    created = await owner.post("/aes", json=body)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/aes/CT01"
    assert {k: created.json()[k] for k in body} == body
    assert (await owner.post("/aes", json=body)).status_code == 409
    assert [ae["aeTitle"] for ae in (await owner.get("/aes")).json()] == ["CT01"]
    replaced = await owner.put("/aes/CT01", json={"host": "10.0.0.0/8", "services": ["find", "store"]})
    assert replaced.status_code == 200
    got = (await owner.get("/aes/CT01")).json()
    assert got["host"] == "10.0.0.0/8" and got["services"] == ["store", "find"] and got["port"] is None
    assert got["partition"] == "Microsoft.Default"
    assert (await owner.put("/aes/PACS", json={"host": "pacs.example.org", "port": 11112})).status_code == 201
    assert (await owner.delete("/aes/CT01")).status_code == 204
    assert (await owner.get("/aes/CT01")).status_code == 404
    assert (await owner.delete("/aes/CT01")).status_code == 404


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"host": "127.0.0.1"}, "aeTitle"),
        ({"aeTitle": "A" * 17, "host": "127.0.0.1"}, "1 to 16"),
        ({"aeTitle": "BAD\\AE", "host": "127.0.0.1"}, "printable"),
        ({"aeTitle": "CT"}, "host is required"),
        ({"aeTitle": "CT", "host": "not a host!"}, "neither"),
        ({"aeTitle": "CT", "host": "10.0.0.0/33"}, "network"),
        ({"aeTitle": "CT", "host": "h", "port": 70000}, "port"),
        ({"aeTitle": "CT", "host": "h", "services": ["teleport"]}, "unknown services"),
        ({"aeTitle": "CT", "host": "h", "partition": "a/b"}, "partition"),
        ({"aeTitle": "CT", "host": "h", "partition": ".."}, "partition"),  # a URL dot segment
        ({"aeTitle": "CT", "host": "h", "colour": "red"}, "unknown fields"),
    ],
)
async def test_bad_ae_definitions_are_400(owner: httpx.AsyncClient, body: dict, reason: str) -> None:
    response = await owner.post("/aes", json=body)
    assert response.status_code == 400
    assert reason in response.text
    with pytest.raises(AeError, match=reason.split()[0]):
        parse_ae(body)


async def test_aes_are_for_owners_only(dimse_archive: DimseArchive) -> None:
    token, _ = await make_token(dimse_archive.http.database_url, "writer")
    async with httpx.AsyncClient(base_url=dimse_archive.http.base, headers=bearer(token)) as client:
        assert (await client.get("/aes")).status_code == 403
        assert (await client.post("/aes", json={"aeTitle": "X", "host": "*"})).status_code == 403
    async with httpx.AsyncClient(base_url=dimse_archive.http.base) as client:
        assert (await client.get("/aes")).status_code == 401


def test_host_matching() -> None:
    assert host_matches("*", "192.0.2.7")
    assert host_matches("127.0.0.1", "127.0.0.1")
    assert host_matches("127.0.0.1", "::ffff:127.0.0.1")
    assert not host_matches("127.0.0.2", "127.0.0.1")
    assert host_matches("10.0.0.0/8", "10.20.30.40")
    assert not host_matches("10.0.0.0/8", "11.0.0.1")
    assert host_matches("localhost", "127.0.0.1")
    assert not host_matches("no-such-host.invalid", "127.0.0.1")


def _cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomweb.cli", "ae", *args[:1], "--database-url", database_url, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _instances(tmp_path: Path, count: int) -> list[Path]:
    rng = random.Random(11)
    spec = make_study(rng, series_count=1, modalities=["CT"])
    paths = []
    for n in range(count):
        path = tmp_path / f"ct{n}.dcm"
        path.write_bytes(to_bytes(make_instance(spec, 0, n + 1, rng=rng)))
        paths.append(path)
    return paths


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _dcmtk(tool: str, archive: DimseArchive, calling: str, *args: str) -> subprocess.CompletedProcess[str]:
    host, port = archive.address
    cmd = [tool, "-aet", calling, "-aec", ARCHIVE_AE, *args[:-1], host, str(port), *args[-1:]] if args else [
        tool, "-aet", calling, "-aec", ARCHIVE_AE, host, str(port)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


async def test_cli_registers_the_ae_dcmtk_then_echoes_and_stores(
    dimse_archive: DimseArchive, tmp_path: Path
) -> None:
    url = dimse_archive.http.database_url
    # before registration DCMTK's echoscu is rejected (A-ASSOCIATE-RJ: calling AE not recognised)
    refused = _dcmtk("echoscu", dimse_archive, "DCMTK")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    added = _cli("add", "DCMTK", "--host", "127.0.0.1", "--services", "store", database_url=url)
    assert added.returncode == 0, added.stderr
    assert "registered AE DCMTK" in added.stdout
    listed = _cli("list", database_url=url)
    assert "DCMTK\t127.0.0.1\t-\tMicrosoft.Default\tstore" in listed.stdout
    assert _dcmtk("echoscu", dimse_archive, "DCMTK").returncode == 0
    files = _instances(tmp_path, 5)
    host, port = dimse_archive.address
    sent = await asyncio.to_thread(_run, ["storescu", "-aet", "DCMTK", "-aec", ARCHIVE_AE, host, str(port),
                                          *map(str, files)])  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    token, _ = await make_token(url, "reader")
    async with httpx.AsyncClient(base_url=dimse_archive.http.url, headers=bearer(token)) as client:
        found = (await client.get("/instances", params={"limit": "100"})).json()
        assert len(found) == 5
        study, series, sop = (found[0][k]["Value"][0] for k in ("0020000D", "0020000E", "00080018"))
        stored = await client.get(
            f"/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": "application/dicom; transfer-syntax=*"},
        )
    original = next(p.read_bytes() for p in files if sop.encode() in p.read_bytes())
    # the data set is byte-equal to the file storescu sent (file meta differs: pynetdicom writes its own)
    assert stored.content.endswith(original[original.index(b"\x08\x00\x05\x00") :])
    # resending is refused as a duplicate (0x0111), which storescu reports and the archive keeps one copy
    again = await asyncio.to_thread(_run, ["storescu", "-v", "-aet", "DCMTK", "-aec", ARCHIVE_AE, host,
                                           str(port), str(files[0])])  # fmt: skip
    assert "Status: 0x111" in again.stdout + again.stderr
    removed = _cli("remove", "DCMTK", database_url=url)
    assert removed.returncode == 0
    assert _dcmtk("echoscu", dimse_archive, "DCMTK").returncode != 0
    assert _cli("remove", "DCMTK", database_url=url).returncode == 1
    assert _cli("add", "BAD\\AE", "--host", "h", database_url=url).returncode == 2


async def test_cli_empty_services_grant_none_as_over_http(database_url: str) -> None:
    """'ae add X --services ""' registered the AE with every service (an empty list read as 'not given'),
    while POST /aes with "services": [] grants none."""
    migrated = _cli("list", database_url=database_url)  # migrates the new database
    assert migrated.returncode == 0, migrated.stderr
    added = _cli("add", "ECHOONLY", "--host", "127.0.0.1", "--services", "", database_url=database_url)
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip().endswith("services -")
    assert "ECHOONLY\t127.0.0.1\t-\tMicrosoft.Default\t\n" in _cli("list", database_url=database_url).stdout
