"""`dicomweb serve` on its embedded default, as a user runs it: a second start finds what was stored."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.common import embedded_archive
from bench.synthetic import instance_variants, make_study, multipart_body
from dicomweb.config import Settings
from indexer.embedded import EmbeddedPostgres
from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY, S3Server


def test_embedded_default_keeps_data_across_restarts(tmp_path: Path) -> None:
    spec = make_study(random.Random(11), series_count=1)
    files = instance_variants(spec, 0, 3)
    body, content_type = multipart_body(files)
    data_dir = tmp_path / "data"
    with embedded_archive(workers=1, data_dir=data_dir) as url:
        r = httpx.post(f"{url}/studies", content=body, headers={"Content-Type": content_type}, timeout=60)
        assert r.status_code == 200, r.text
    assert (data_dir / "postgres").is_dir() and (data_dir / "blobs").is_dir()
    with embedded_archive(workers=2, data_dir=data_dir) as url:
        found = httpx.get(f"{url}/studies", params={"StudyInstanceUID": spec.study_uid}, timeout=60).json()
        assert [s["00201208"]["Value"] for s in found] == [[3]]
        accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        r = httpx.get(f"{url}/studies/{spec.study_uid}", headers=accept, timeout=60)
        assert r.status_code == 200
        for data in files:
            assert data in r.content
        # metrics: whichever worker answers the scrape reports the requests of both
        for _ in range(5):
            httpx.get(f"{url}/studies", timeout=60)
        base = url.removesuffix("/v2")
        for _ in range(3):
            scrape = httpx.get(f"{base}/metrics", timeout=60).text
            assert 'handler="qido.search_studies",method="GET",status="200"} 6.0' in scrape, scrape
            assert "dicomweb_instances 3.0" in scrape
    # stopping the server (SIGTERM) stops its private PostgreSQL too: a clean shutdown removes its pid file
    assert not (data_dir / "postgres" / "data" / "postmaster.pid").exists()


def test_workers_default_to_the_cores_and_size_the_database() -> None:
    """Unset, a worker per core this process may run on; the embedded PostgreSQL takes every worker's pool
    (plus LISTEN and UPS status connections: counted in tests/test_dead_client_settings.py) and some to
    spare, never fewer than PostgreSQL's 100."""
    cores = len(os.sched_getaffinity(0))
    assert Settings.from_env({}).worker_count() == cores
    assert Settings.from_env({"DICOMWEB_WORKERS": "3"}).worker_count() == 3
    assert Settings.from_env({}, workers=5).worker_count() == 5
    sixteen = Settings(workers=16, db_pool_size=8)
    assert sixteen.database_connections() == 16 * 12 + 10
    assert (
        EmbeddedPostgres("/nonexistent", max_connections=sixteen.database_connections()).max_connections
        == 202
    )
    assert EmbeddedPostgres("/nonexistent", max_connections=20).max_connections == 100


def test_serve_refuses_an_operation_lease_under_a_second() -> None:
    """A lease of 0 runs out between one step's commit and the next, so nodes would take a running
    operation from each other at every step: refused before anything starts (the database named here does
    not exist, and is never reached)."""
    env = {**os.environ, "DICOMWEB_OPERATION_LEASE_SECONDS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "dicomweb.cli", "serve", "--database-url", "postgresql://nowhere.invalid/x"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1] == "error: DICOMWEB_OPERATION_LEASE_SECONDS must be at least 1"
    )


def test_serve_refuses_a_dimse_port_another_process_listens_on() -> None:
    """The DIMSE listener binds with SO_REUSEPORT (its workers share the port), so a second archive given
    the same port (11112 by default) started too, and the kernel split associations between the two
    archives. Refused before anything starts (the database named here is never reached)."""
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another archive's listener binds it
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dicomweb.cli", "serve", "--database-url", "postgresql://nowhere.invalid/x",
             "--dimse-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        other.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --dimse-port {port} on 127.0.0.1 is in use by another process (another archive?); choose "
        "another port, or 0 to turn that listener off"
    )


@pytest.mark.parametrize(
    ("args", "error", "env"),
    [
        (["--port", "99999"], "error: --port (DICOMWEB_PORT) must be within 0..65535, not 99999", {}),
        (
            ["--hl7-port", "70000"],
            "error: --hl7-port (DICOMWEB_HL7_PORT) must be within 0..65535, not 70000",
            {},
        ),
        (
            ["--dimse-port", "-1"],
            "error: --dimse-port (DICOMWEB_DIMSE_PORT) must be within 0..65535, not -1",
            {},
        ),
        (
            ["--workers", "-3"],
            "error: --workers (DICOMWEB_WORKERS) must be at least 1 (0: one per core), not -3",
            {},
        ),
        (
            ["--dimse-ae-title", "WAYTOOLONGAETITLE17"],
            "error: --dimse-ae-title (DICOMWEB_DIMSE_AE_TITLE) 'WAYTOOLONGAETITLE17' must be 1 to 16 "
            "characters (spaces around it do not count)",
            {},
        ),
        (
            ["--hl7-partition", "bad partition!"],
            "error: --hl7-partition (DICOMWEB_HL7_PARTITION) 'bad partition!' is not a partition name: 1-64 "
            "letters, digits, '_', '.', '-'",
            {},
        ),
        (
            ["--hl7-port", "2575"],
            "error: DICOMWEB_HL7_ALLOWED_HOSTS: 'not-an-address' does not appear to be an IPv4 or IPv6 "
            "network; list addresses and networks (CIDR), comma-separated",
            {"DICOMWEB_HL7_ALLOWED_HOSTS": "10.0.0.0/8, not-an-address"},
        ),
        (
            [],
            "error: DICOMWEB_TRUSTED_PROXIES: '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network; "
            "list addresses and networks (CIDR), comma-separated",
            {"DICOMWEB_TRUSTED_PROXIES": "10.0.0.0/33"},
        ),
    ],
)
def test_serve_refuses_settings_that_cannot_work(args: list[str], error: str, env: dict[str, str]) -> None:
    """A port out of range was a traceback (OverflowError) or a worker dying at start, a negative worker
    count a server that took connections and never answered, a malformed list of networks workers dying at
    start with tracebacks; an AE title or HL7 partition nobody could use was accepted. Refused before
    anything starts (the database is never reached)."""
    done = subprocess.run(
        [sys.executable, "-m", "dicomweb.cli", "serve", "--database-url", "postgresql://nowhere.invalid/x",
         *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == error
    assert "Traceback" not in done.stderr


def _serve_on(
    storage_url: str, endpoint: str, secret: str, command: str = "serve"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret}
    return subprocess.run(
        [sys.executable, "-m", "dicomweb.cli", command, "--database-url", "postgresql://nowhere.invalid/x",
         "--storage-url", storage_url, "--s3-endpoint-url", endpoint,
         *(["--dimse-port", "0"] if command == "serve" else [])],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_serve_refuses_a_bucket_it_cannot_use(s3_server: S3Server, s3_bucket: str) -> None:
    """With a wrong secret key, a bucket that does not exist or an endpoint nobody listens on, `serve`
    started and answered every STOW 409 (272) while /health/ready said the storage was fine when the
    bucket was missing. The bucket is now checked before anything starts, as the database is: exit 1 and
    one line saying what is wrong (the database named here is never reached)."""
    endpoint = s3_server.endpoint_url
    done = _serve_on(f"s3://{s3_bucket}/a", endpoint, "not-the-secret")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot use the store s3://{s3_bucket}/a: S3 at {endpoint} refused bucket {s3_bucket!r} "
        "with HTTP 403 (wrong credentials, or no access to this bucket)"
    )
    done = _serve_on("s3://no-such-bucket-here/a", endpoint, SECRET_KEY)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: cannot use the store s3://no-such-bucket-here/a: bucket 'no-such-bucket-here' does not "
        f"exist at {endpoint}; create it (`dicomweb migrate` with this --storage-url does)"
    )
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
    done = _serve_on(f"s3://{s3_bucket}/a", nobody, SECRET_KEY)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot use the store s3://{s3_bucket}/a: cannot reach S3 at {nobody}: Could not connect to "
        f'the endpoint URL: "{nobody}/{s3_bucket}"'
    )
    # the sweep said the same with a traceback
    done = _serve_on(f"s3://{s3_bucket}/a", endpoint, "not-the-secret", command="sweep")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith(f"error: cannot use the store s3://{s3_bucket}/a: ")
    )
