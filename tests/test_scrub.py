"""The scrub: missing, altered and unreferenced objects found, reported (CLI exit status, findings, audit
log, report route, metrics), resumed after a crash without double counting, and scheduled once across
processes."""

from __future__ import annotations

import asyncio
import io
import os
import random
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from access.audit import AuditLog
from access.policy import Family, Grant, Role, allows, classify
from archive import scrub
from archive.ingest import Ingestor
from archive.scrub import SCRUB, ScrubHandler, schedule_scrub, scrub_params
from archive.update import UpdateHandler
from archive.update_request import UPDATE, parse_update_request, update_params
from bench.synthetic import instance_variants, make_study
from dicomweb.cli import main
from dicomweb.routes.scrub import audit_reporters
from indexer.operations import OperationRunner, create_operation, get_operation
from indexer.writes import remove_instances
from storage import LocalBlobStore
from tests.fixtures.server import RunningArchive
from tests.test_bulk_update import NEW_NAME
from tests.test_stow_wado_delete import stow


async def ingest(pool: asyncpg.Pool, store: LocalBlobStore, seed: int, count: int) -> tuple[str, list[str]]:
    """Store `count` instances of a new study; its UID and their storage keys, in instance order."""
    spec = make_study(random.Random(seed), series_count=1)
    ingestor = Ingestor(pool, store, 1)
    for data in instance_variants(spec, 0, count, start=seed * 1000):
        await ingestor.add(io.BytesIO(data))
    assert all(o.failure is None for o in await ingestor.finish())
    rows = await pool.fetch(
        "SELECT storage_key FROM instance i JOIN study s USING (study_key) WHERE s.study_instance_uid = $1"
        " ORDER BY instance_key",
        spec.study_uid,
    )
    return spec.study_uid, [r[0] for r in rows]


async def flip_byte(store: LocalBlobStore, key: str) -> None:
    data = bytearray(await store.read(key))
    data[len(data) // 2] ^= 0x80
    await store.put(key, bytes(data))


async def put_stray(store: LocalBlobStore, key: str, age: timedelta) -> None:
    await store.put(key, b"not referenced by anything")
    stamp = time.time() - age.total_seconds()
    os.utime(store.root / key, (stamp, stamp))


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(main, ["scrub", *args])


async def test_cli_reports_missing_altered_and_unreferenced(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    study, keys = await ingest(pool, store, 1, 6)
    common = ["--database-url", database_url, "--storage-url", (tmp_path / "blobs").as_uri()]
    assert await run_cli(*common) == 0
    out, err = capsys.readouterr()
    assert out == "" and "6 objects" in err and "0 missing, 0 altered, 0 unreferenced" in err

    await flip_byte(store, keys[1])
    await store.delete(keys[2])
    await put_stray(store, "p1/stray/old.dcm", timedelta(hours=2))
    await put_stray(store, "p1/stray/young.dcm", timedelta(minutes=5))  # may be an upload on its way
    # deleted while the scrub runs: rows gone, object still queued for deletion: neither missing nor stray
    async with pool.acquire() as conn, conn.transaction():
        spec_study, _ = await ingest(pool, store, 2, 1)
        await remove_instances(conn, 1, spec_study)
    started = time.monotonic()
    assert await run_cli(*common, "--rate-mb", "0.5") == 1
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    lines = sorted(line.split("\t")[:2] for line in out.splitlines())
    assert lines == sorted([["altered", keys[1]], ["missing", keys[2]], ["unreferenced", "p1/stray/old.dcm"]])
    assert "1 missing, 1 altered, 1 unreferenced" in err
    read = sum([len(await store.read(k)) for k in keys if k != keys[2]])
    assert elapsed >= read / 0.5e6 * 0.9  # held to the rate

    assert await run_cli(*common, "--grace-minutes", "1") == 1
    out, _ = capsys.readouterr()
    assert "p1/stray/young.dcm" in out

    records = await pool.fetch(
        "SELECT path, status, outcome, detail, study_uid FROM audit_event WHERE action = 'scrub'"
        " ORDER BY event_id"
    )
    summaries = [r for r in records if r["path"] == "/scrub"]
    assert [r["outcome"] for r in summaries] == [0, 8, 8]
    altered = [r for r in records if r["path"] == keys[1]]
    assert len(altered) == 2 and altered[0]["status"] == 409 and altered[0]["outcome"] == 8
    assert altered[0]["study_uid"] == study and "altered: SHA-256" in altered[0]["detail"]
    assert [r["status"] for r in records if r["path"] == keys[2]] == [404, 404]


async def bulk_update(pool: asyncpg.Pool, store: LocalBlobStore, study: str) -> dict[str, str]:
    """Update a study's PatientName (a new version of each instance, the original kept); SOP Instance UID ->
    the storage key of its original."""
    async with pool.acquire() as conn:
        request = parse_update_request({"studyInstanceUids": [study], "changeDataset": NEW_NAME})
        op = await create_operation(conn, UPDATE, update_params("Microsoft.Default", request), [])
    assert await OperationRunner(pool, {UPDATE: UpdateHandler(store)}).run_once(op.id)
    rows = await pool.fetch("SELECT sop_instance_uid, storage_key FROM instance_original")
    return {r[0]: r[1] for r in rows}


async def test_originals_of_bulk_updates_are_checked_and_never_unreferenced(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    study, _ = await ingest(pool, store, 4, 3)
    await ingest(pool, store, 5, 2)  # not updated: no original
    originals = await bulk_update(pool, store, study)
    assert len(originals) == 3
    common = ["--database-url", database_url, "--storage-url", (tmp_path / "blobs").as_uri()]
    assert await run_cli(*common, "--grace-minutes", "0") == 0
    out, err = capsys.readouterr()
    # 5 current versions and 3 originals read; the originals are not unreferenced objects
    assert out == "" and "8 objects" in err and "0 missing, 0 altered, 0 unreferenced" in err

    first, second, _ = sorted(originals.values())
    await flip_byte(store, first)
    await store.delete(second)
    assert await run_cli(*common, "--grace-minutes", "0") == 1
    out, err = capsys.readouterr()
    sop = {key: uid for uid, key in originals.items()}
    lines = sorted(line.split("\t")[:3] for line in out.splitlines())
    assert [(kind, key, uids.split("/")[0], uids.split("/")[2]) for kind, key, uids in lines] == [
        ("altered", first, study, sop[first]),
        ("missing", second, study, sop[second]),
    ]
    assert "1 missing, 1 altered, 0 unreferenced" in err
    rows = await pool.fetch("SELECT kind, storage_key, sop_instance_uid FROM scrub_finding ORDER BY kind")
    assert [tuple(r) for r in rows][-2:] == [("altered", first, sop[first]), ("missing", second, sop[second])]


async def test_resumes_after_a_crash_without_counting_twice(
    pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scrub, "STEP_ROWS", 3)
    monkeypatch.setattr(scrub, "LIST_PAGE", 4)
    store = LocalBlobStore(tmp_path / "blobs")
    _, keys = await ingest(pool, store, 3, 10)
    await flip_byte(store, keys[4])
    await put_stray(store, "p1/zz/stray.dcm", timedelta(hours=2))
    reported: list[str] = []
    handler = ScrubHandler(store, report=lambda _op, f: reported.append(f.storage_key))
    async with pool.acquire() as conn:
        op = await create_operation(conn, SCRUB, scrub_params(), [])
    first = OperationRunner(pool, {SCRUB: handler}, lease_seconds=30)
    claimed = await first.claim(op.id)
    assert claimed is not None and first._token is not None
    assert await first.run_step(op.id, first._token)  # rows 1-3 committed
    # the second step's work is done, then the process dies before its commit
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        current = await get_operation(conn, op.id)
        assert current is not None
        await handler.step(conn, current)
        await tx.rollback()
    assert reported == []  # found in the lost step, which never committed: nothing reported
    # its lease runs out; another process resumes from the last commit
    await pool.execute("UPDATE operation SET leased_until = now() - interval '1 second'")
    second = OperationRunner(pool, {SCRUB: handler})
    assert await second.run_once(op.id)
    async with pool.acquire() as conn:
        done = await get_operation(conn, op.id)
    assert done is not None and done.status == "succeeded" and done.attempts == 2
    assert done.results["checkedObjects"] == 10 and done.results["listedObjects"] == 11
    assert (done.results["altered"], done.results["missing"], done.results["unreferenced"]) == (1, 0, 1)
    rows = await pool.fetch("SELECT kind, storage_key FROM scrub_finding ORDER BY finding_id")
    assert [tuple(r) for r in rows] == [("altered", keys[4]), ("unreferenced", "p1/zz/stray.dcm")]
    assert reported == [keys[4], "p1/zz/stray.dcm"]  # each reported once, by the steps that committed it


async def test_scheduled_once_across_processes(pool: asyncpg.Pool) -> None:
    week = timedelta(hours=168)
    queued = await asyncio.gather(*(schedule_scrub(pool, week, scrub_params()) for _ in range(4)))
    assert len([q for q in queued if q is not None]) == 1
    assert await schedule_scrub(pool, timedelta(0), scrub_params()) is None  # one is still unfinished
    await pool.execute("UPDATE operation SET status = 'succeeded', finished_at = now()")
    assert await schedule_scrub(pool, week, scrub_params()) is None  # not due yet
    assert await schedule_scrub(pool, timedelta(0), scrub_params()) is not None
    assert await pool.fetchval("SELECT count(*) FROM operation WHERE type = 'scrub'") == 2


def test_owners_only() -> None:
    owner, auditor, writer = Grant(Role.OWNER), Grant(Role.AUDITOR), Grant(Role.WRITER)
    for method, path in (("POST", "/scrub"), ("GET", "/scrub/report")):
        target = classify(method, path)
        assert target.family is Family.SCRUB
        assert allows([owner], target, _now()) and not allows([auditor, writer], target, _now())
    assert classify("GET", "/scrub").family is Family.UNKNOWN


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def test_operation_report_and_metrics(local_archive: RunningArchive) -> None:
    from bench.synthetic import multipart_body  # noqa: F401 - the archive's own STOW helper is below

    spec = make_study(random.Random(5), series_count=1)
    files = instance_variants(spec, 0, 4, start=5000)
    async with httpx.AsyncClient(base_url=local_archive.base, timeout=60) as client:
        v2 = httpx.AsyncClient(base_url=local_archive.url, timeout=60)
        async with v2:
            assert (await stow(v2, files)).status_code == 200
        conn = await asyncpg.connect(local_archive.database_url)
        try:
            key = await conn.fetchval("SELECT storage_key FROM instance ORDER BY instance_key LIMIT 1")
        finally:
            await conn.close()
        assert isinstance(local_archive.store, LocalBlobStore)
        await flip_byte(local_archive.store, key)
        assert (await client.get("/scrub/report")).status_code == 404
        assert (await client.post("/scrub?rate=x")).status_code == 400
        started = await client.post("/scrub?rate=0")
        assert started.status_code == 202
        href = started.json()["href"]
        assert href == started.headers["location"] and "/v2/operations/" in href
        for _ in range(300):  # a loaded machine: up to 30 s
            progress = await client.get(href)
            if progress.status_code == 200:
                break
            assert progress.status_code == 202
            await asyncio.sleep(0.1)
        body = progress.json()
        assert body["type"] == "scrub" and body["status"] == "succeeded"
        assert body["results"]["altered"] == 1 and body["results"]["checkedObjects"] == 4
        report = (await client.get("/scrub/report")).json()
        assert report["operation"]["id"] == started.json()["id"] and report["truncated"] is False
        [finding] = report["findings"]
        assert finding["kind"] == "altered" and finding["storageKey"] == key
        assert finding["studyInstanceUID"] == spec.study_uid and finding["partition"] == "Microsoft.Default"
        assert len(finding["recordedSha256"]) == 64 and finding["recordedSha256"] != finding["foundSha256"]
        by_id = await client.get(f"/scrub/report?operation={started.json()['id']}&limit=1")
        assert by_id.json()["findings"] == [finding]
        assert (await client.get("/scrub/report?operation=" + "0" * 32)).status_code == 404
        metrics = (await client.get("/metrics")).text
        assert "dicomweb_scrub_altered_objects 1.0" in metrics
        assert "dicomweb_scrub_checked_objects 4.0" in metrics


async def test_audit_reporters_write_records(pool: asyncpg.Pool) -> None:
    audit = AuditLog(pool)
    report, summary = audit_reporters(audit)
    async with pool.acquire() as conn:
        op = await create_operation(conn, SCRUB, scrub_params(), [])
    report(op.id, scrub.Finding("unreferenced", "p1/x.dcm", size=3))
    summary(op.id, {"checkedObjects": 1, "checkedBytes": 3, "listedObjects": 2, "missing": 0, "altered": 0,
                    "unreferenced": 1, "clean": False})  # fmt: skip
    assert await audit.flush() == 2
    rows = await pool.fetch("SELECT subject, method, status, outcome FROM audit_event ORDER BY event_id")
    assert [tuple(r) for r in rows] == [("system", "SCRUB", 200, 4), ("system", "SCRUB", 200, 8)]


async def test_objects_kept_for_a_restore_window_are_checked(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A delayed delete (retention) keeps the objects for a restore: the scrub reads them too, so that a
    restore brings back what was stored; they are neither missing nor unreferenced while kept."""
    from datetime import UTC, datetime

    from retention.deletion import delete_in
    from retention.policy import RetentionPolicy

    store = LocalBlobStore(tmp_path / "blobs")
    study, keys = await ingest(pool, store, 5, 4)
    async with pool.acquire() as conn, conn.transaction():
        deletion = await delete_in(
            conn, 1, study, None, None, datetime.now(UTC), RetentionPolicy(delete_delay_days=7)
        )
    assert len(deletion.removed) == 4
    assert await pool.fetchval("SELECT count(*) FROM deleted_object") == 4
    common = ["--database-url", database_url, "--storage-url", (tmp_path / "blobs").as_uri()]
    assert await run_cli(*common) == 0
    _, err = capsys.readouterr()
    assert "4 objects" in err and "0 missing, 0 altered, 0 unreferenced" in err
    await flip_byte(store, keys[0])
    await store.delete(keys[3])
    assert await run_cli(*common) == 1
    out, err = capsys.readouterr()
    lines = sorted(line.split("\t")[:2] for line in out.splitlines())
    assert lines == sorted([["altered", keys[0]], ["missing", keys[3]]])


GRACE = "argument --grace-minutes: must be a number from 0 to 52560000"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["sweep", "--grace-minutes", "nan"], f"{GRACE}, not 'nan'"),  # a ValueError traceback
        (["sweep", "--grace-minutes", "inf"], f"{GRACE}, not 'inf'"),  # an OverflowError traceback
        (["sweep", "--grace-minutes", "-5"], f"{GRACE}, not '-5'"),  # spared nothing being written
        (["scrub", "--grace-minutes", "-1"], f"{GRACE}, not '-1'"),
        (["scrub", "--rate-mb", "nan"], "argument --rate-mb: must be a number from 0 to 1000000, not 'nan'"),
    ],
)
def test_sweep_and_scrub_refuse_amounts_they_cannot_use(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--database-url", "postgresql://nowhere.invalid/x"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(error)


@pytest.mark.parametrize(
    "command",
    [["sweep"], ["scrub"], ["audit", "verify"], ["token", "list"], ["backup", "BACKUP"]],
)
async def test_commands_on_no_archive_say_so(
    command: list[str], database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --data-dir made the command create a PostgreSQL cluster there and die with asyncpg's
    UndefinedTableError traceback; an empty database (a mistyped --database-url) the same traceback.
    Both are one line and exit 1 now, and the mistyped directory is not created."""
    argv = [str(tmp_path / "backup") if a == "BACKUP" else a for a in command]
    typo = tmp_path / "dicomweb-dta"
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(main, [*argv, "--data-dir", str(typo)])
    assert exited.value.code == (
        f"error: {typo} holds no archive: check --data-dir (`dicomweb serve` or `dicomweb migrate` makes one)"
    )
    assert not typo.exists() and not (tmp_path / "backup").exists()
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(main, [*argv, "--database-url", database_url])  # no migrations applied
    assert exited.value.code == (
        "error: the database holds no archive (no dicomweb tables): check --database-url "
        "(`dicomweb migrate` prepares a new one)"
    )
    assert "Traceback" not in capsys.readouterr().err
