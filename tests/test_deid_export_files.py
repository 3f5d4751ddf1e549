"""Directory exports written in place by the pool's workers (deid.export._write_output, no temp file and
rename): whatever a crash left under an output key is replaced by the complete output when the export
resumes, and the worker's one-read source reader reads the whole file whatever size the index recorded."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from pathlib import Path

import asyncpg
import pytest

from deid.export import ExportHandler, ExportSettings, _read_source, _write_output
from indexer.operations import OperationRunner
from storage import LocalBlobStore
from tests.fixtures.server import RunningArchive
from tests.test_deid_export import (
    EXPECTED,
    check_outputs,
    counts,
    directory,
    make_cohort,
    pool,
    post_export,
    progress,
    read_dir,
    request_body,
    stow,
    until_exported,
    wait_done,
)

__all__ = ["pool"]  # a fixture, used by name


@pytest.mark.parametrize("length", [0, 1, 4096, (1 << 20) + 3, (3 << 20) + 1])
@pytest.mark.parametrize("recorded", ["exact", "smaller", "larger", "zero"])
def test_read_source_reads_the_whole_file(tmp_path: Path, length: int, recorded: str) -> None:
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    path = tmp_path / "object"
    path.write_bytes(data)
    size = {"exact": length, "smaller": max(0, length - 7), "larger": length + 5, "zero": 0}[recorded]
    assert _read_source(str(path), size) == data


def test_write_output_creates_directories_and_replaces_a_leftover(tmp_path: Path) -> None:
    target = tmp_path / "op" / "results" / "1.2" / "3.4" / "5.6.dcm"
    _write_output(str(target), b"complete output")
    assert target.read_bytes() == b"complete output"
    target.write_bytes(b"a longer leftover of an earlier version's output")
    _write_output(str(target), b"complete output")
    assert target.read_bytes() == b"complete output"
    assert [p.name for p in target.parent.iterdir()] == ["5.6.dcm"]  # no temp files beside it


async def run_to_done(pool: asyncpg.Pool, url: str, op_id: str, handler: ExportHandler) -> dict:
    runner = OperationRunner(pool, {"export": handler}, lease_seconds=5)
    runner.start()
    try:
        return await wait_done(url, op_id)
    finally:
        await runner.stop()


async def test_crash_mid_write_and_resume_leave_complete_outputs(
    quiet_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Every output key holds a crash's leftover before the export starts (a prefix, an empty file, a
    longer file as an earlier version could have left), and the export itself crashes and resumes: the
    outputs end byte for byte those of a clean export, with nothing else beside them."""
    cohort = make_cohort(16)
    await stow(quiet_archive.url, cohort.files)
    store = LocalBlobStore(tmp_path / "blobs")
    settings = ExportSettings(tmp_path / "exports", workers=2)
    clean_id = (await post_export(quiet_archive.url, request_body(cohort, directory("clean")))).json()["id"]
    done = await run_to_done(pool, quiet_archive.url, clean_id, ExportHandler(pool, store, settings))
    assert counts(done) == (EXPECTED, 1, 1)
    clean = read_dir(tmp_path / "exports" / "clean" / clean_id)
    check_outputs(cohort, clean)

    op_id = (await post_export(quiet_archive.url, request_body(cohort, directory("d")))).json()["id"]
    root = tmp_path / "exports" / "d" / op_id
    for n, (key, data) in enumerate(sorted(clean.items())):
        leftover = [data[: len(data) // 2], b"", data + b"\0" * 4099][n % 3]
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(leftover)
    first = OperationRunner(pool, {"export": ExportHandler(pool, store, settings, batch=3)}, lease_seconds=5)
    first.start()
    try:
        await until_exported(pool, op_id, 3)
    finally:
        await first.stop()  # the crash: the running step is canceled and rolled back
    done = await run_to_done(pool, quiet_archive.url, op_id, ExportHandler(pool, store, settings, batch=5))
    assert counts(done) == (EXPECTED, 1, 1)
    assert read_dir(root) == clean
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted([*clean, "errors.log"])
    await store.close()


async def test_a_step_waits_for_a_cancelled_batch_still_writing(
    quiet_archive: RunningArchive, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A pool task of a cancelled batch that a worker was already running goes on writing outputs (with
    O_TRUNC: it may empty a file the redo wrote): no step makes its outputs durable and commits its
    checkpoint until it has finished."""
    cohort = make_cohort(4)
    await stow(quiet_archive.url, cohort.files)
    store = LocalBlobStore(tmp_path / "blobs")
    handler = ExportHandler(pool, store, ExportSettings(tmp_path / "exports", workers=2))
    still_writing: Future[None] = Future()
    still_writing.set_running_or_notify_cancel()  # as a worker's task: it cannot be cancelled any more
    handler._orphans.add(still_writing)
    still_writing.add_done_callback(handler._orphans.discard)
    op_id = (await post_export(quiet_archive.url, request_body(cohort, directory("d")))).json()["id"]
    runner = OperationRunner(pool, {"export": handler}, lease_seconds=30)
    runner.start()
    try:
        await asyncio.sleep(3)  # the step's instances are exported by now, its commit waits
        assert (await progress(pool, op_id)).get("exported", 0) == 0
        still_writing.set_result(None)
        done = await wait_done(quiet_archive.url, op_id)
    finally:
        await runner.stop()
    assert counts(done) == (EXPECTED, 1, 1)
    assert not handler._orphans
    await store.close()
