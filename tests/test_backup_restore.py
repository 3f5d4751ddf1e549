"""`dicomweb backup` of a running archive while it is written to, and `dicomweb restore` onto a new
embedded data directory and onto external services (S3): the restored archive holds exactly the
instances the backup's change feed sequence implies, byte for byte, and serves them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from archive.backup import OBJECTS, BackupError, backup, read_manifest, read_object_list, restore
from archive.maintenance import DELETIONS_PAUSED_LOCK, drain_deletions
from changefeed.replicate import DEFAULT_PARTITION
from dicomweb.cli import main
from dicomweb.config import Settings
from indexer.embedded import EmbeddedPostgres
from storage import LocalBlobStore
from tests.fixtures.postgres import fresh_database
from tests.fixtures.s3 import make_s3_store
from tests.fixtures.server import RunningArchive, start_archive
from tests.recovery_support import Holdings, delete, holdings, instances, stow
from tests.test_bulk_update import NEW_NAME, _bulk_update, _wait


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory outside pytest's tmp dir: as root the embedded PostgreSQL runs as another account that
    must keep access, and concurrent pytest sessions chmod /tmp/pytest-of-root (see fixtures/postgres.py)."""
    path = Path(tempfile.mkdtemp(prefix="dicomweb-test-restore-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def state_at(client: httpx.AsyncClient, base: str, sequence: int) -> set[tuple[str, str]]:
    """The instances the source's change feed implies at `sequence` (creates minus deletes)."""
    r = await client.get(f"{base}/v1/changefeed", params={"offset": "0", "limit": "10000"})
    held: set[tuple[str, str]] = set()
    for entry in r.json():
        if entry["Sequence"] > sequence:
            break
        key = (entry["PartitionName"], entry["SopInstanceUid"])
        if entry["Action"] == "delete":
            held.discard(key)
        else:
            held.add(key)
    return held


async def keep_writing(client: httpx.AsyncClient, root: str, written: dict[str, bytes], stop: asyncio.Event):
    """Store instances one request at a time and delete every third, until stopped."""
    seed = 1000
    while not stop.is_set():
        seed += 1
        files = instances(seed, 3)
        refs = await stow(client, root, files)
        written.update({ref.sop: data for ref, data in zip(refs, files, strict=True)})
        await delete(client, root, refs[0])


@contextlib.asynccontextmanager
async def embedded_archive(data_dir: Path) -> AsyncIterator[RunningArchive]:
    """Serve a restored embedded data directory (its own PostgreSQL, its blobs)."""
    server = EmbeddedPostgres(data_dir / "postgres")
    dsn = await asyncio.to_thread(server.start)
    store = LocalBlobStore(data_dir / "blobs")
    thread, running = start_archive(
        Settings(data_dir=data_dir), dsn, store, LocalBlobStore(data_dir / "blobs")
    )
    try:
        yield running
    finally:
        thread.stop()
        await asyncio.to_thread(server.stop)


async def test_backup_of_a_live_archive_restores_onto_a_new_data_dir(
    local_archive: RunningArchive, tmp_path: Path, scratch: Path
) -> None:
    root = local_archive.url
    first, other = instances(1, 12), instances(2, 4)
    written = {}
    async with httpx.AsyncClient(timeout=60) as client:
        refs = await stow(client, root, first)
        refs += await stow(client, root, other, partition="other")
        written.update({ref.sop: data for ref, data in zip(refs, first + other, strict=True)})
        await delete(client, root, refs[0])
        await delete(client, root, refs[-1])
        stop = asyncio.Event()
        writer = asyncio.create_task(keep_writing(client, root, written, stop))
        await asyncio.sleep(0.3)
        dest = tmp_path / "backup"
        code = await asyncio.to_thread(
            main, ["backup", str(dest), "--database-url", local_archive.database_url,
                   "--storage-url", f"file://{tmp_path / 'blobs'}"],
        )  # fmt: skip
        stop.set()
        await writer
        assert code == 0
        manifest = read_manifest(dest)
        sequence = manifest["changefeed_sequence"]
        conn = await asyncpg.connect(local_archive.database_url)
        try:
            server = await conn.fetchval("SHOW server_version")  # "15.14 (Debian ...)": the release
        finally:
            await conn.close()
        assert manifest["postgres"] == server.split()[0]
        expected = await state_at(client, local_archive.base, sequence)
        assert {(DEFAULT_PARTITION, refs[1].sop), ("other", refs[-2].sop)} <= expected
        assert (DEFAULT_PARTITION, refs[0].sop) not in expected
        listed = read_object_list(dest)
        assert len(listed) == len(expected) == manifest["objects"]
        assert all((dest / OBJECTS / e.key).stat().st_size == e.size for e in listed)

        restored_dir = scratch / "restored"
        code = await asyncio.to_thread(main, ["restore", str(dest), "--data-dir", str(restored_dir)])
        assert code == 0

    async with embedded_archive(restored_dir) as restored, httpx.AsyncClient(timeout=60) as client:
        held = await holdings(client, restored.url, restored.database_url)
        assert set(held) == expected
        assert all(data == written[sop] for (_, sop), data in held.items())
        latest = await client.get(f"{restored.base}/v1/changefeed/latest")
        assert latest.json()["Sequence"] == sequence
        r = await client.get(f"{restored.url}/partitions/other/instances")
        assert {i["00080018"]["Value"][0] for i in r.json()} == {sop for p, sop in expected if p == "other"}
        # the restored archive takes new instances, and its feed goes on after the backup's sequence
        new = await stow(client, restored.url, instances(99, 1))
        r = await client.get(f"{restored.base}/v1/changefeed", params={"offset": str(sequence)})
        assert [(e["Sequence"], e["SopInstanceUid"]) for e in r.json()] == [(sequence + 1, new[0].sop)]
        # a backup of a running embedded archive attaches to its PostgreSQL (the server holds the lock)
        again = tmp_path / "again"
        code = await asyncio.to_thread(main, ["backup", str(again), "--data-dir", str(restored_dir)])
        assert code == 0
        assert read_manifest(again)["changefeed_sequence"] == sequence + 1
        assert read_manifest(again)["objects"] == len(expected) + 1


async def test_deletions_wait_while_a_backup_copies(local_archive: RunningArchive, tmp_path: Path) -> None:
    store = local_archive.store
    async with httpx.AsyncClient(timeout=60) as client:
        refs = await stow(client, local_archive.url, instances(3, 2))
    pool = await asyncpg.create_pool(local_archive.database_url, min_size=1, max_size=2)
    guard = await asyncpg.connect(local_archive.database_url)
    try:
        key = await pool.fetchval("SELECT storage_key FROM instance WHERE sop_instance_uid = $1", refs[0].sop)
        await guard.execute("SELECT pg_advisory_lock($1)", DELETIONS_PAUSED_LOCK)
        async with httpx.AsyncClient(timeout=60) as client:
            await delete(client, local_archive.url, refs[0])
        assert await drain_deletions(pool, store) == 0
        await asyncio.sleep(2.5)  # the server's own drain runs every 2 s: it must have skipped too
        assert await store.exists(key)
        assert await pool.fetchval("SELECT count(*) FROM blob_deletion") == 1
        await guard.execute("SELECT pg_advisory_unlock($1)", DELETIONS_PAUSED_LOCK)
        await drain_deletions(pool, store)
        assert not await store.exists(key)
    finally:
        await guard.close()
        await pool.close()


async def test_backup_and_restore_on_s3_and_an_external_database(
    request: pytest.FixtureRequest, database_url: str, postgres_server: str, tmp_path: Path
) -> None:
    s3_server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    prefix = f"source-{uuid.uuid4().hex}"
    source = make_s3_store(s3_server, bucket, prefix)  # the test's client; the server has its own
    thread, archive = start_archive(
        Settings(data_dir=tmp_path), database_url, make_s3_store(s3_server, bucket, prefix), source
    )
    try:
        files = instances(4, 6)
        async with httpx.AsyncClient(timeout=60) as client:
            refs = await stow(client, archive.url, files)
            await delete(client, archive.url, refs[2])
            summary = await backup(database_url, source, tmp_path / "backup")
            assert summary.objects == 5
            target_prefix = f"target-{uuid.uuid4().hex}"
            target = make_s3_store(s3_server, bucket, target_prefix)
            async with fresh_database(postgres_server) as target_url:
                restored = await restore(tmp_path / "backup", target_url, target)
                assert (restored.objects, restored.changefeed_sequence) == (5, summary.changefeed_sequence)
                thread2, copy = start_archive(
                    Settings(data_dir=tmp_path),
                    target_url,
                    make_s3_store(s3_server, bucket, target_prefix),
                    target,
                )
                try:
                    held: Holdings = await holdings(client, copy.url, target_url)
                finally:
                    thread2.stop()
            expected = {
                (DEFAULT_PARTITION, r.sop): f for r, f in zip(refs, files, strict=True) if r != refs[2]
            }
            assert held == expected
    finally:
        thread.stop()


async def test_restore_refuses_what_it_cannot_restore_cleanly(
    local_archive: RunningArchive, postgres_server: str, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        await stow(client, local_archive.url, instances(5, 2))
    dest = tmp_path / "backup"
    await backup(local_archive.database_url, local_archive.store, dest)
    with pytest.raises(BackupError, match="not empty"):
        await backup(local_archive.database_url, local_archive.store, dest)
    # onto an archive that already holds data
    with pytest.raises(BackupError, match="already holds an archive"):
        await restore(dest, local_archive.database_url, LocalBlobStore(tmp_path / "elsewhere"))
    # an incomplete backup (no manifest): the CLI says so and exits 1
    incomplete = tmp_path / "incomplete"
    shutil.copytree(dest, incomplete)
    (incomplete / "manifest.json").unlink()
    assert main(["restore", str(incomplete), "--data-dir", str(tmp_path / "never")]) == 1
    assert not (tmp_path / "never").exists()
    # a damaged object copy of the same size: the digest check refuses it
    entry = read_object_list(dest)[0]
    (dest / OBJECTS / entry.key).write_bytes(b"x" * entry.size)
    async with fresh_database(postgres_server) as target_url:
        with pytest.raises(BackupError, match="does not match its digest"):
            await restore(dest, target_url, LocalBlobStore(tmp_path / "target"))
    assert orjson.loads((dest / "manifest.json").read_bytes())["objects"] == 2


async def test_originals_kept_by_bulk_updates_are_backed_up_and_restored(
    local_archive: RunningArchive, postgres_server: str, tmp_path: Path
) -> None:
    """The objects of `instance_original` are in the backup, restored, served with
    `msdicom-request-original: true`, and the restored archive scrubs clean."""
    files = instances(6, 3)
    async with httpx.AsyncClient(timeout=60) as client:
        refs = await stow(client, local_archive.url, files)
        response = await _bulk_update(
            client, local_archive.url, {"studyInstanceUids": [refs[0].study], "changeDataset": NEW_NAME}
        )
        assert (await _wait(client, response.json()["href"]))["status"] == "succeeded"
        updated = await holdings(client, local_archive.url, local_archive.database_url)
        summary = await backup(local_archive.database_url, local_archive.store, tmp_path / "backup")
        assert summary.objects == 6  # three current versions, three originals
        listed = read_object_list(tmp_path / "backup")
        # patient data, token hashes and the audit log: readable by the backup's owner only
        assert (tmp_path / "backup").stat().st_mode & 0o777 == 0o700
        made = [p for p in (tmp_path / "backup").rglob("*") if p.is_file()]
        assert len(made) == 3 + 6 and all(p.stat().st_mode & 0o777 == 0o600 for p in made)
        keys = {e.key for e in listed}
        assert (
            summary.bytes
            == sum(e.size for e in listed)
            == sum(map(len, updated.values())) + sum(map(len, files))
        )
        async with fresh_database(postgres_server) as target_url:
            target = LocalBlobStore(tmp_path / "target")
            restored = await restore(tmp_path / "backup", target_url, target)
            assert (restored.objects, restored.bytes) == (6, summary.bytes)
            assert {info.key async for info in target.list()} == keys
            thread, copy = start_archive(Settings(data_dir=tmp_path), target_url, target, target)
            try:
                assert await holdings(client, copy.url, target_url) == updated
                original = {
                    "Accept": "application/dicom; transfer-syntax=*",
                    "msdicom-request-original": "true",
                }
                for ref, data in zip(refs, files, strict=True):
                    r = await client.get(f"{copy.url}{ref.path()}", headers=original)
                    assert r.status_code == 200 and r.content == data
            finally:
                thread.stop()
            scrub = ["scrub", "--database-url", target_url, "--storage-url", (tmp_path / "target").as_uri()]
            assert await asyncio.to_thread(main, [*scrub, "--grace-minutes", "0"]) == 0


async def test_a_backup_directory_that_cannot_be_made_is_an_error_line(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A destination whose parent does not exist (or cannot be written) was a FileNotFoundError traceback."""
    dest = tmp_path / "no" / "such" / "parent"
    (tmp_path / "no").write_text("a file, not a directory")
    argv = ["backup", str(dest), "--database-url", database_url, "--storage-url", f"file://{tmp_path}/blobs"]
    assert await asyncio.to_thread(main, ["migrate", "--database-url", database_url]) == 0
    assert await asyncio.to_thread(main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(tmp_path / "no") in err[-1]
    assert not any("Traceback" in line for line in err)


async def test_restore_refuses_a_damaged_backup_before_writing_anything(
    local_archive: RunningArchive, postgres_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """objects.jsonl that lost its last lines restored an index whose instances had no objects, exit 0
    and "every digest checked" (the scrub then found them missing); cut mid-line, or a manifest that is not
    JSON, the command died with an orjson traceback; a missing or truncated copy was found only after the
    index was loaded. Each is now refused before the target is touched, in one line."""
    async with httpx.AsyncClient(timeout=60) as client:
        await stow(client, local_archive.url, instances(6, 3))
    good = tmp_path / "backup"
    await backup(local_archive.database_url, local_archive.store, good)
    listed = (good / "objects.jsonl").read_bytes().splitlines(keepends=True)
    total = sum(e.size for e in read_object_list(good))
    last = read_object_list(good)[2]

    def damaged(name: str, damage: Callable[[Path], None]) -> Path:
        copy = tmp_path / name
        shutil.copytree(good, copy)
        damage(copy)
        return copy

    cases = [
        (
            damaged("lines", lambda b: (b / "objects.jsonl").write_bytes(b"".join(listed[:2]))),
            f"lists 2 objects of {total - last.size} bytes, manifest.json 3 of {total}: the backup is "
            "damaged",
        ),
        (
            damaged("cut", lambda b: (b / "objects.jsonl").write_bytes(b"".join(listed)[:-20])),
            "objects.jsonl line 3 is not an object entry",
        ),
        (
            damaged("manifest", lambda b: (b / "manifest.json").write_bytes(b'{"format": ')),
            "is not valid JSON",
        ),
        (damaged("gone", lambda b: (b / OBJECTS / last.key).unlink()), "is missing: the backup is damaged"),
        (
            damaged("short", lambda b: (b / OBJECTS / last.key).write_bytes(b"x")),
            f"is 1 bytes, objects.jsonl says {last.size}: the backup is damaged",
        ),
    ]
    for source, reason in cases:
        async with fresh_database(postgres_server) as target_url:
            target = LocalBlobStore(tmp_path / f"target-{source.name}")
            with pytest.raises(BackupError) as refused:
                await restore(source, target_url, target)
            assert reason in str(refused.value), source.name
            conn = await asyncpg.connect(target_url)
            try:
                assert await conn.fetchval("SELECT to_regclass('instance')") is None  # nothing loaded
            finally:
                await conn.close()
            assert [b async for b in target.list("")] == []
        never = tmp_path / f"never-{source.name}"
        assert main(["restore", str(source), "--data-dir", str(never)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and reason in err and "Traceback" not in err, err
        assert not never.exists()


async def test_restore_refuses_a_blob_store_that_is_not_empty(
    local_archive: RunningArchive, postgres_server: str, tmp_path: Path
) -> None:
    """Restored onto an empty database but a store holding objects (another archive's bucket and prefix),
    the restore went ahead: those objects were unreferenced in the restored index, so its orphan sweeper
    deleted them after the grace period. Refused now, before anything is written."""
    async with httpx.AsyncClient(timeout=60) as client:
        await stow(client, local_archive.url, instances(12, 2))
    dest = tmp_path / "backup"
    await backup(local_archive.database_url, local_archive.store, dest)
    occupied = LocalBlobStore(tmp_path / "occupied")
    await occupied.put("p1/someone/elses.dcm", b"an object of another archive")
    async with fresh_database(postgres_server) as target_url:
        with pytest.raises(BackupError) as refused:
            await restore(dest, target_url, occupied)
        conn = await asyncpg.connect(target_url)
        try:
            assert await conn.fetchval("SELECT to_regclass('instance')") is None
        finally:
            await conn.close()
    assert str(refused.value) == (
        "the target blob store is not empty (it holds p1/someone/elses.dcm, and the restored archive would "
        "delete what its index does not reference): restore into an empty one"
    )
    assert [b.key async for b in occupied.list("")] == ["p1/someone/elses.dcm"]
