"""`dicomweb replicate`: a standby archive kept in step through the source's change feed. Both sides hold
exactly the same instances byte for byte, in the same partitions; deletes and updates propagate; a restart
resumes from the checkpoint without repeating or missing an entry; re-applying is harmless; and after a
failover (source stopped, replication stopped) clients carry on against the standby."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from io import BytesIO
from pathlib import Path

import httpx
import orjson
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from bench.common import embedded_archive, free_port, serve_processes
from changefeed.checkpoint import FileCheckpoint
from changefeed.commands import replicate
from changefeed.consumer import ChangeFeedError
from changefeed.replicate import DEFAULT_PARTITION, ReplicationStatus, Replicator, stow_body
from dicomweb.cli import main
from dicomweb.config import Settings
from indexer.embedded import EmbeddedPostgres
from storage import LocalBlobStore
from storage.s3 import S3BlobStore
from tests.fixtures.postgres import fresh_database
from tests.fixtures.s3 import S3Server
from tests.fixtures.server import RunningArchive, start_archive
from tests.recovery_support import delete, holdings, instances, stow


@pytest.fixture
async def standby(postgres_server: str, tmp_path: Path) -> AsyncIterator[RunningArchive]:
    """A second archive on a database and blob directory of its own."""
    async with fresh_database(postgres_server) as url:
        blobs = tmp_path / "standby-blobs"
        settings = Settings(data_dir=tmp_path / "standby", max_instance_size=64 << 20)
        thread, running = start_archive(settings, url, LocalBlobStore(blobs), LocalBlobStore(blobs))
        try:
            yield running
        finally:
            thread.stop()


async def latest(client: httpx.AsyncClient, archive: RunningArchive) -> int:
    return (await client.get(f"{archive.base}/v1/changefeed/latest")).json()["Sequence"]


async def run_once(source: RunningArchive, target: RunningArchive, checkpoint: Path) -> ReplicationStatus:
    return await replicate(source.url, target.url, checkpoint=str(checkpoint), follow=False, batch_size=7)


async def test_standby_holds_exactly_the_source_and_resumes_from_its_checkpoint(
    local_archive: RunningArchive, standby: RunningArchive, tmp_path: Path
) -> None:
    source, checkpoint = local_archive, tmp_path / "replica.checkpoint"
    async with httpx.AsyncClient(timeout=60) as client:
        refs = await stow(client, source.url, instances(1, 10))
        others = await stow(client, source.url, instances(2, 4), partition="other")
        await delete(client, source.url, refs[3])
        await delete(client, source.url, others[0])
        status = await run_once(source, standby, checkpoint)
        assert (status.copied, status.deleted, status.already_present) == (12, 0, 0)
        assert status.skipped == 2  # created then deleted before replication: never copied
        assert status.caught_up_at is not None and 0 <= status.behind() < 30  # its end of the feed reached
        assert await FileCheckpoint(checkpoint).load() == await latest(client, source) == 16
        expected = await holdings(client, source.url, source.database_url)
        assert len(expected) == 12 and {p for p, _ in expected} == {DEFAULT_PARTITION, "other"}
        assert await holdings(client, standby.url, standby.database_url) == expected

        # more changes; a second run starts after the checkpoint: nothing repeated, nothing missed
        more = await stow(client, source.url, instances(3, 3), partition="other")
        await delete(client, source.url, refs[0])
        await delete(client, source.url, others[1])
        status = await run_once(source, standby, checkpoint)
        assert (status.copied, status.deleted, status.already_present, status.skipped) == (3, 2, 0, 0)
        expected = await holdings(client, source.url, source.database_url)
        assert (DEFAULT_PARTITION, refs[0].sop) not in expected and ("other", more[2].sop) in expected
        assert await holdings(client, standby.url, standby.database_url) == expected
        r = await client.get(f"{standby.url}/partitions/other/instances")
        assert {i["00080018"]["Value"][0] for i in r.json()} == {sop for p, sop in expected if p == "other"}

        # re-applying the whole feed (a lost checkpoint) changes nothing on the standby
        standby_feed = await latest(client, standby)
        checkpoint.unlink()
        status = await run_once(source, standby, checkpoint)
        assert (status.copied, status.replaced, status.deleted) == (0, 0, 0)
        assert status.already_present == len(expected)
        assert await latest(client, standby) == standby_feed  # not a single write on the standby
        assert await holdings(client, standby.url, standby.database_url) == expected


def changed_copy(data: bytes, name: str) -> bytes:
    """The same SOP instance with another PatientName (what an update or a corrected re-send carries)."""
    ds = pydicom.dcmread(BytesIO(data))
    ds.PatientName = name
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


async def test_updated_and_re_stored_instances_replace_the_standby_copy(
    local_archive: RunningArchive, standby: RunningArchive, tmp_path: Path
) -> None:
    source, checkpoint = local_archive, tmp_path / "replica.checkpoint"
    files = instances(4, 3)
    async with httpx.AsyncClient(timeout=60) as client:
        refs = await stow(client, source.url, files)
        await run_once(source, standby, checkpoint)
        # deleted and stored again with other content, between two runs: the standby gets the new bytes
        await delete(client, source.url, refs[0])
        await stow(client, source.url, [changed_copy(files[0], "Changed^Once")])
        status = await run_once(source, standby, checkpoint)
        assert (status.replaced, status.copied, status.deleted) == (1, 0, 0)
        expected = await holdings(client, source.url, source.database_url)
        assert await holdings(client, standby.url, standby.database_url) == expected

        # an `update` entry (bulk update) re-copies the instance; applied twice, it writes once
        await delete(client, source.url, refs[1])
        await stow(client, source.url, [changed_copy(files[1], "Changed^Twice")])
        entry = {
            "Sequence": 10**6, "StudyInstanceUid": refs[1].study, "SeriesInstanceUid": refs[1].series,
            "SopInstanceUid": refs[1].sop, "Action": "update", "State": "current",
            "PartitionName": DEFAULT_PARTITION, "Timestamp": "2026-01-01T00:00:00Z",
        }  # fmt: skip
        replicator = Replicator(client, source.url, client, standby.url, status_file=tmp_path / "status.json")
        await replicator([entry])
        await replicator([entry])
        assert (replicator.status.replaced, replicator.status.already_present) == (1, 1)
        expected = await holdings(client, source.url, source.database_url)
        assert await holdings(client, standby.url, standby.database_url) == expected
        status_file = orjson.loads((tmp_path / "status.json").read_bytes())
        assert status_file["position"] == 10**6 and status_file["replaced"] == 1
        assert status_file["lag_seconds"] > 0


# ------------------------------------------------------------------------------------------- failover


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Outside pytest's tmp dir: as root each embedded PostgreSQL runs as another account (see
    tests/fixtures/postgres.py)."""
    path = Path(tempfile.mkdtemp(prefix="dicomweb-test-failover-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bearer(data_dir: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {(data_dir / 'owner-token').read_text().strip()}"}


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def scraped(url: str, name: str) -> float:
    """The value of an unlabelled metric on a Prometheus endpoint."""
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}")


def test_failover_to_the_standby(scratch: Path) -> None:
    """Two `dicomweb serve` processes (embedded default, access control on) and `dicomweb replicate
    --follow` between them. The source is killed (SIGKILL, as a lost machine), the standby promoted (the
    replicator stopped: docs/recovery.md), and a client pointed at the standby reads what had been
    replicated, byte for byte, and stores new instances, which the standby's change feed goes on from."""
    src_dir, dr_dir = scratch / "source", scratch / "standby"
    status_file, metrics_file = scratch / "replica.json", scratch / "replica.prom"
    checkpoint = scratch / "replica.checkpoint"
    args = ["--dimse-port", "0"]
    files = instances(5, 8)
    metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
    with embedded_archive(1, dr_dir, insecure_open=False, extra_args=args) as standby_url:
        standby = httpx.Client(headers=bearer(dr_dir), timeout=60)
        with embedded_archive(1, src_dir, insecure_open=False, extra_args=args) as source_url:
            source = httpx.Client(headers=bearer(src_dir), timeout=60)
            replicator = subprocess.Popen(
                [sys.executable, "-m", "dicomweb.cli", "replicate", "--source", source_url,
                 "--target", standby_url, "--source-token-file", str(src_dir / "owner-token"),
                 "--target-token-file", str(dr_dir / "owner-token"), "--checkpoint", str(checkpoint),
                 "--follow", "--status-file", str(status_file), "--metrics-file", str(metrics_file),
                 "--metrics-port", metrics_url.split(":")[2].split("/")[0]],
                start_new_session=True,
            )  # fmt: skip
            try:
                for data in files:  # one request each, as a modality sends
                    body, content_type = stow_body([data])
                    r = source.post(
                        f"{source_url}/studies", content=body, headers={"Content-Type": content_type}
                    )
                    assert r.status_code == 200, r.text
                feed = source_url.removesuffix("/v2") + "/v1/changefeed/latest"
                last = source.get(feed).json()["Sequence"]
                assert last == len(files)

                def caught_up() -> bool:
                    return status_file.exists() and orjson.loads(status_file.read_bytes())["position"] == last

                wait_for(caught_up)
                assert 0 < orjson.loads(status_file.read_bytes())["lag_seconds"] < 30
                metrics = metrics_file.read_text()
                assert f"dicomweb_replication_sequence {last}\n" in metrics
                assert 'dicomweb_replication_applied_total{outcome="copied"} 8\n' in metrics
                assert scraped(metrics_url, "dicomweb_replication_sequence") == last
                expected = {i["00080018"]["Value"][0] for i in source.get(f"{source_url}/instances").json()}
                source.close()
                # the source's machine is lost: no shutdown, no last words (its PostgreSQL runs in a
                # session of its own, so it is killed by name of its data directory too)
                postmaster = EmbeddedPostgres(src_dir / "postgres").postmaster_pid()
                assert postmaster is not None
                for pid in {*serve_processes(source_url), postmaster}:
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not serve_processes(source_url))
                behind = scraped(metrics_url, "dicomweb_replication_behind_seconds")
                time.sleep(1.5)
                assert replicator.poll() is None  # it keeps retrying a source that is gone ...
                # ... and the metric an alert watches grows while it cannot catch up
                assert scraped(metrics_url, "dicomweb_replication_behind_seconds") >= behind + 1.5
            finally:
                replicator.send_signal(signal.SIGTERM)  # promotion: stop replicating into the standby
                replicator.wait(timeout=30)
        # clients switch to the standby's URL and carry on
        client = DICOMwebClient(url=standby_url, headers=bearer(dr_dir))
        assert {i["00080018"]["Value"][0] for i in client.search_for_instances()} == expected
        for data in files:
            ds = pydicom.dcmread(BytesIO(data))
            r = standby.get(
                f"{standby_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}",
                headers={"Accept": "application/dicom; transfer-syntax=*"},
            )
            assert r.status_code == 200 and r.content == data
        standby_feed = standby_url.removesuffix("/v2") + "/v1/changefeed"
        before = standby.get(f"{standby_feed}/latest").json()["Sequence"]
        assert before == len(files)  # one create entry each, from the replicator's STOWs
        new = pydicom.dcmread(BytesIO(instances(6, 1)[0]))
        response = client.store_instances([new])
        assert len(response.ReferencedSOPSequence) == 1 and "FailedSOPSequence" not in response
        assert len(client.search_for_instances()) == len(expected) + 1
        after = standby.get(standby_feed, params={"offset": before}).json()
        assert [(e["Sequence"], e["Action"], e["SopInstanceUid"]) for e in after] == [
            (before + 1, "create", new.SOPInstanceUID)
        ]
        standby.close()


async def test_a_series_the_batch_mostly_wants_is_read_in_one_request(
    local_archive: RunningArchive, standby: RunningArchive, tmp_path: Path
) -> None:
    """Per study of a batch: one QIDO of its series, then one WADO-RS read per series of which the batch
    wants at least half (its other instances are left to their own entries), one per instance otherwise."""
    source = local_archive
    async with httpx.AsyncClient(timeout=60) as client:
        whole = await stow(client, source.url, instances(7, 6))  # two series of three
        lone = await stow(client, source.url, instances(8, 1))
        feed = (await client.get(f"{source.base}/v1/changefeed", params={"offset": "0"})).json()
        assert len(feed) == 7
        seen: list[str] = []

        async def record(request: httpx.Request) -> None:
            seen.append(f"{request.method} {request.url.path}")

        async with httpx.AsyncClient(timeout=60, event_hooks={"request": [record]}) as reader:
            replicator = Replicator(reader, source.url, client, standby.url)
            # the batch holds two of series 0's three instances, all of series 1's, and the lone one
            batch = [e for e in feed if e["SopInstanceUid"] != whole[4].sop]
            await replicator(batch)
        study, series0, series1 = whole[0].study, whole[0].series, whole[1].series
        assert sorted(seen) == sorted(
            [f"GET /v2/studies/{study}/series", f"GET /v2/studies/{study}/series/{series0}",
             f"GET /v2/studies/{study}/series/{series1}", f"GET /v2{lone[0].path()}"]
        )  # fmt: skip
        assert (replicator.status.copied, replicator.status.skipped) == (6, 0)
        held = await holdings(client, standby.url, standby.database_url)
        assert set(held) == {(DEFAULT_PARTITION, ref.sop) for ref in whole + lone} - {
            (DEFAULT_PARTITION, whole[4].sop)
        }
        expected = await holdings(client, source.url, source.database_url)
        assert all(expected[key] == data for key, data in held.items())


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--batch-size", "0", "argument --batch-size: must be within 1..10000, not '0'"),  # a traceback
        ("--parallel", "0", "argument --parallel: must be a whole number of at least 1, not '0'"),  # a hang
        ("--parallel", "-2", "argument --parallel: must be a whole number of at least 1, not '-2'"),
        # an OverflowError traceback from bind(), after the feed was already being read
        ("--metrics-port", "99999", "argument --metrics-port: must be a port within 1..65535, not '99999'"),
        ("--metrics-port", "0", "argument --metrics-port: must be a port within 1..65535, not '0'"),
        ("--metrics-port", "http", "argument --metrics-port: must be a port within 1..65535, not 'http'"),
    ],
)
def test_replicate_refuses_counts_it_cannot_run_with(
    option: str, value: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--batch-size 0 ended in a ValueError traceback, --parallel 0 in a semaphore nothing could pass."""
    argv = ["replicate", "--source", "http://127.0.0.1:9/v2", "--target", "http://127.0.0.1:9/v2",
            "--checkpoint", str(tmp_path / "checkpoint"), option, value]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(error)


async def test_a_restarted_replicator_reports_its_checkpoint_before_its_first_batch(
    local_archive: RunningArchive, standby: RunningArchive, tmp_path: Path
) -> None:
    """Restarted on a source with nothing new, the replicator said "replicated up to sequence 0" and its
    status file and dicomweb_replication_sequence showed 0 until the next change: a monitor saw it fall to
    the start of the feed. They now start at the checkpoint it resumes from."""
    source, checkpoint, status_file = local_archive, tmp_path / "replica.checkpoint", tmp_path / "status.json"
    async with httpx.AsyncClient(timeout=60) as client:
        await stow(client, source.url, instances(7, 3))
        assert (await run_once(source, standby, checkpoint)).position == 3
        again = await replicate(
            source.url, standby.url, checkpoint=str(checkpoint), follow=False, status_file=status_file
        )
    assert (again.position, again.copied, again.already_present) == (3, 0, 0)
    assert orjson.loads(status_file.read_bytes())["position"] == 3
    assert "dicomweb_replication_sequence 3\n" in again.prometheus()


async def test_a_token_the_target_refuses_stops_the_replicator(
    postgres_server: str, local_archive: RunningArchive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer's token the standby refuses (401) is to stop the replicator with the reason, as a single
    request's refusal did; since the batch's copies run in a TaskGroup the refusal came wrapped in an
    ExceptionGroup, so it was retried for ever, each attempt logged with a traceback."""
    async with fresh_database(postgres_server) as url:
        blobs = tmp_path / "secured-blobs"
        settings = Settings(data_dir=tmp_path / "secured")
        thread, secured = start_archive(
            settings, url, LocalBlobStore(blobs), LocalBlobStore(blobs), secure=True
        )
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                await stow(client, local_archive.url, instances(8, 2))
                await stow(client, local_archive.url, instances(9, 2))
            with caplog.at_level(logging.WARNING, logger="changefeed.consumer"):
                with pytest.raises(ChangeFeedError) as stopped:
                    await asyncio.wait_for(
                        replicate(
                            local_archive.url, secured.url, checkpoint=str(tmp_path / "cp"), follow=False,
                            target_token="not-a-token",
                        ),
                        timeout=60,
                    )  # fmt: skip
        finally:
            thread.stop()
    assert "HTTP 401" in str(stopped.value)
    assert str(stopped.value).endswith("(a reader's token on the source, a writer's on the target)")
    assert [r for r in caplog.records if "retrying" in r.getMessage()] == []
    assert await FileCheckpoint(tmp_path / "cp").load() == 0


async def test_a_store_refused_by_the_target_says_why(
    local_archive: RunningArchive,
    postgres_server: str,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The standby answering 409 with failure reason 272 was logged as "failure reason 272" alone; the
    reason the standby gave in its Warning header (here its bucket refusing the writes, elsewhere a
    deadlock) is in the replicator's retry line now."""
    async with fresh_database(postgres_server) as url:
        refusing = S3BlobStore(
            s3_bucket, f"t-{uuid.uuid4().hex}", endpoint_url=s3_server.endpoint_url, region=s3_server.region,
            access_key=s3_server.access_key, secret_key="not-the-secret",
        )  # fmt: skip
        settings = Settings(data_dir=tmp_path / "refusing")
        thread, target = start_archive(settings, url, refusing, LocalBlobStore(tmp_path / "unused"))
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                await stow(client, local_archive.url, instances(11, 1))
            with caplog.at_level(logging.WARNING, logger="changefeed.consumer"):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(
                        replicate(
                            local_archive.url, target.url, checkpoint=str(tmp_path / "cp"), follow=False
                        ),
                        timeout=3,
                    )
        finally:
            thread.stop()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and "failure reason 272 (could not store the object: ClientError: " in retries[0]
    assert "SignatureDoesNotMatch" in retries[0]
    # an expected refusal: one line per retry, no ERROR with a traceback beside it
    assert [r for r in caplog.records if r.name == "changefeed.consumer" and r.exc_info] == []


def test_replicate_refuses_to_copy_an_archive_onto_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--target the same as --source (a copy-paste slip) read the whole feed and found every instance
    "already present" on itself, exit 0, as if a standby were in step. Refused before anything is read."""
    argv = ["replicate", "--source", "http://127.0.0.1:9/v2", "--target", "http://127.0.0.1:9/v1/",
            "--checkpoint", str(tmp_path / "checkpoint")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --source and --target are the same archive (http://127.0.0.1:9/v2)\n"
    )
    assert not (tmp_path / "checkpoint").exists()
