"""`dicomweb changefeed tail` and `fhir-sync` as a script runs them: a separate process, JSON lines out."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import asyncpg
import httpx

from bench.synthetic import instance_variants, make_instance, make_study, multipart_body, to_bytes
from tests.access_support import bearer, make_token, start_secure
from tests.fixtures.fhir import RunningFhir
from tests.fixtures.server import RunningArchive


def dicomweb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DICOMWEB_TOKEN"} | (env or {})
    cmd = [sys.executable, "-m", "dicomweb.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=environment)


def store(archive: RunningArchive, seed: int, count: int) -> list[str]:
    """Store `count` instances one request each; their SOP Instance UIDs in feed order."""
    rng = random.Random(seed)
    spec = make_study(rng, series_count=1)
    sops = []
    for n in range(count):
        ds = make_instance(spec, 0, n + 1, rng=rng)
        body, content_type = multipart_body([to_bytes(ds)])
        r = httpx.post(
            f"{archive.url}/studies", content=body, headers={"Content-Type": content_type}, timeout=30
        )
        assert r.status_code == 200, r.text
        sops.append(ds.SOPInstanceUID)
    return sops


def feed(archive: RunningArchive, **params: str) -> list[dict]:
    r = httpx.get(f"{archive.base}/v1/changefeed", params={"limit": "100", **params}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_tail_prints_the_feed_as_json_lines(local_archive: RunningArchive) -> None:
    store(local_archive, 1, 3)
    url = f"{local_archive.base}/v1"
    done = dicomweb("changefeed", "tail", "--url", url, "--limit", "2")
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout) == feed(local_archive)
    assert all("Metadata" in e for e in lines(done.stdout))

    done = dicomweb("changefeed", "tail", "--url", url, "--from", "1", "--no-metadata")
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout) == feed(local_archive, offset="1", includemetadata="false")
    assert [e["Sequence"] for e in lines(done.stdout)] == [2, 3]

    done = dicomweb("changefeed", "tail", "--url", url, "--from", "latest")
    assert (done.returncode, done.stdout) == (0, "")


def test_tail_with_a_checkpoint_resumes(local_archive: RunningArchive, tmp_path: Path) -> None:
    url, checkpoint = f"{local_archive.base}/v1", str(tmp_path / "tail.checkpoint")
    first = store(local_archive, 2, 2)
    done = dicomweb("changefeed", "tail", "--url", url, "--checkpoint", checkpoint, "--no-metadata")
    assert [e["SopInstanceUid"] for e in lines(done.stdout)] == first
    assert Path(checkpoint).read_text() == "2\n"
    second = store(local_archive, 3, 1)
    done = dicomweb("changefeed", "tail", "--url", url, "--checkpoint", checkpoint, "--no-metadata")
    assert [(e["Sequence"], e["SopInstanceUid"]) for e in lines(done.stdout)] == [(3, second[0])]
    assert Path(checkpoint).read_text() == "3\n"


def test_tail_follow_prints_entries_as_they_commit(local_archive: RunningArchive) -> None:
    cmd = [sys.executable, "-m", "dicomweb.cli", "changefeed", "tail", "--url", f"{local_archive.base}/v1"]
    proc = subprocess.Popen([*cmd, "--follow", "--no-metadata"], stdout=subprocess.PIPE, text=True)
    try:
        got: list[dict] = []
        reader = threading.Thread(
            target=lambda: got.extend(json.loads(proc.stdout.readline()) for _ in range(2))
        )
        reader.start()
        sops = store(local_archive, 4, 2)
        reader.join(timeout=30)
        assert not reader.is_alive(), "tail --follow printed nothing"
        assert [(e["Sequence"], e["SopInstanceUid"], e["Action"]) for e in got] == [
            (1, sops[0], "create"),
            (2, sops[1], "create"),
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tail_errors(local_archive: RunningArchive, tmp_path: Path) -> None:
    url = f"{local_archive.base}/v1"
    store(local_archive, 5, 1)
    done = dicomweb("changefeed", "tail", "--url", url, "--from", "5")
    assert done.returncode == 3 and done.stdout == ""
    assert "the checkpoint (5) is ahead of the change feed (latest sequence 1)" in done.stderr
    done = dicomweb("changefeed", "tail", "--url", url, "--from", "-1")
    assert done.returncode == 2 and "--from takes a sequence number or 'latest', not '-1'" in done.stderr
    done = dicomweb("changefeed", "tail", "--url", url, "--limit", "0")
    assert done.returncode == 2 and "argument --limit: must be within 1..10000, not '0'" in done.stderr
    (tmp_path / "cp").write_text("twelve")
    done = dicomweb("changefeed", "tail", "--url", url, "--checkpoint", str(tmp_path / "cp"))
    assert done.returncode == 1 and "expected a sequence number, found 'twelve'" in done.stderr
    done = dicomweb("changefeed", "tail", "--from", "1", "--checkpoint", str(tmp_path / "cp"))
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
    # a URL without scheme or host was retried for ever ("Request URL is missing an 'http://' ...")
    for bad, why in (("notaurl", "is not an http:// or https:// URL with a host"),
                     ("ftp://x/v1", "is not an http:// or https:// URL with a host"),
                     ("http://x:99999/v1", "is not a URL: Port out of range 0-65535")):  # fmt: skip
        done = dicomweb("changefeed", "tail", "--url", bad, "--from", "0")
        assert done.returncode == 2 and f"argument --url: {bad!r} {why}" in done.stderr, done.stderr
    done = dicomweb("changefeed", "fhir-sync", "--url", url, "--fhir-url", "fhir:8080/fhir", "--once")
    assert done.returncode == 2 and "argument --fhir-url: 'fhir:8080/fhir' is not an http" in done.stderr
    done = dicomweb("replicate", "--source", url, "--target", "localhost/v2", "--checkpoint", "x")
    assert done.returncode == 2 and "argument --target: 'localhost/v2' is not an http" in done.stderr


def test_fhir_sync_once(local_archive: RunningArchive, fhir_server: RunningFhir, tmp_path: Path) -> None:
    store(local_archive, 6, 2)
    args = ["changefeed", "fhir-sync", "--url", f"{local_archive.base}/v1", "--fhir-url", fhir_server.url]
    args += ["--checkpoint", str(tmp_path / "fhir.checkpoint"), "--once"]
    done = dicomweb(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ImagingStudy: 1 written, 0 unchanged, 0 deleted\n"
    assert (tmp_path / "fhir.checkpoint").read_text() == "2\n"
    (study,) = fhir_server.store.of_type("ImagingStudy")
    assert study["numberOfInstances"] == 2
    assert dicomweb(*args).stdout == "ImagingStudy: 0 written, 0 unchanged, 0 deleted\n"  # nothing new


def test_tail_into_a_closed_pipe_exits_quietly(local_archive: RunningArchive) -> None:
    """`dicomweb changefeed tail | head -1`: no traceback, status 0, once the reader has gone."""
    spec = make_study(random.Random(7), series_count=1)
    body, content_type = multipart_body(instance_variants(spec, 0, 40))
    r = httpx.post(
        f"{local_archive.url}/studies", content=body, headers={"Content-Type": content_type}, timeout=60
    )
    assert r.status_code == 200, r.text
    cmd = [sys.executable, "-m", "dicomweb.cli", "changefeed", "tail", "--url", f"{local_archive.base}/v1"]
    proc = subprocess.Popen([*cmd, "--limit", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["Sequence"] == 1  # 40 entries with metadata overflow the pipe
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_tail_killed_mid_stream_resumes_from_its_checkpoint(
    local_archive: RunningArchive, tmp_path: Path
) -> None:
    """SIGKILL while printing (blocked on a full pipe), then a restart: every entry is printed, and the only
    ones printed twice are those after the checkpoint, at most one batch (`--limit`)."""
    spec = make_study(random.Random(8), series_count=1)
    body, content_type = multipart_body(instance_variants(spec, 0, 60))
    r = httpx.post(
        f"{local_archive.url}/studies", content=body, headers={"Content-Type": content_type}, timeout=60
    )
    assert r.status_code == 200, r.text
    checkpoint = tmp_path / "tail.checkpoint"
    cmd = [sys.executable, "-m", "dicomweb.cli", "changefeed", "tail", "--url", f"{local_archive.base}/v1"]
    cmd += ["--checkpoint", str(checkpoint), "--limit", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    first = [json.loads(proc.stdout.readline())["Sequence"] for _ in range(25)]
    proc.kill()
    proc.wait(timeout=30)
    rest = proc.stdout.read().split(b"\n")
    first += [json.loads(line)["Sequence"] for line in rest[:-1]]  # rest[-1]: a line cut by the kill, or b""
    saved = int(checkpoint.read_text())
    assert saved % 10 == 0 and 20 <= saved < 60  # killed mid-stream, at a batch boundary
    assert first == list(range(1, len(first) + 1)) and len(first) >= saved

    done = dicomweb(
        "changefeed", "tail", "--url", f"{local_archive.base}/v1", "--checkpoint", str(checkpoint)
    )
    assert done.returncode == 0, done.stderr
    second = [e["Sequence"] for e in lines(done.stdout)]
    assert second == list(range(saved + 1, 61))
    assert set(first) | set(second) == set(range(1, 61))  # nothing missed
    twice = sorted(set(first) & set(second))
    assert twice == list(range(saved + 1, len(first) + 1)) and len(twice) <= 10  # the at-least-once window


async def test_tail_and_fhir_sync_with_a_token_and_a_database_checkpoint(
    database_url: str, tmp_path: Path, fhir_server: RunningFhir
) -> None:
    """With access control on, tail and fhir-sync need a reader's token (from a file or DICOMWEB_TOKEN);
    a checkpoint can be a row in a PostgreSQL table instead of a file."""
    secure = start_secure(database_url, tmp_path)
    try:
        writer, _ = await make_token(database_url, "writer")
        reader, _ = await make_token(database_url, "reader")
        spec = make_study(random.Random(9), series_count=1)
        body, content_type = multipart_body(instance_variants(spec, 0, 2))
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(
                f"{secure.running.url}/studies",
                content=body,
                headers={"Content-Type": content_type, **bearer(writer)},
            )
            assert r.status_code == 200, r.text
        url = f"{secure.running.base}/v1"
        checkpoint = f"{database_url}#tail-test"

        done = await asyncio.to_thread(dicomweb, "changefeed", "tail", "--url", url, "--no-metadata")
        assert done.returncode == 1 and "HTTP 401: the archive refused the credential" in done.stderr

        (tmp_path / "token").write_text(reader + "\n")
        args = ["changefeed", "tail", "--url", url, "--checkpoint", checkpoint, "--no-metadata"]
        done = await asyncio.to_thread(dicomweb, *args, "--token-file", str(tmp_path / "token"))
        assert done.returncode == 0, done.stderr
        assert [e["Sequence"] for e in lines(done.stdout)] == [1, 2]
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchval(
                "SELECT sequence FROM changefeed_checkpoint WHERE consumer = 'tail-test'"
            )
        finally:
            await conn.close()
        assert row == 2
        done = await asyncio.to_thread(dicomweb, *args, env={"DICOMWEB_TOKEN": reader})
        assert (done.returncode, done.stdout) == (0, "")  # resumed after 2: nothing new

        sync = ["changefeed", "fhir-sync", "--url", url, "--fhir-url", fhir_server.url, "--once"]
        done = await asyncio.to_thread(
            dicomweb, *sync, "--checkpoint", database_url, env={"DICOMWEB_TOKEN": reader}
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "ImagingStudy: 1 written, 0 unchanged, 0 deleted\n"
        (study,) = fhir_server.store.of_type("ImagingStudy")
        assert study["numberOfInstances"] == 2
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT consumer, sequence FROM changefeed_checkpoint ORDER BY consumer")
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [("fhir-sync", 2), ("tail-test", 2)]
    finally:
        await asyncio.to_thread(secure.thread.stop)
