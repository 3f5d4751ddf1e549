"""What a request answers while PostgreSQL or the object store is down: 503 with the reason and Retry-After
(it was a text/plain 500 "Internal Server Error" and a traceback per request)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import httpx
import pydicom

from dicomweb.config import Settings
from indexer.embedded import EmbeddedPostgres
from storage import LocalBlobStore
from storage.s3 import S3BlobStore
from tests.fixtures.s3 import S3Server, make_s3_store
from tests.fixtures.server import start_archive
from tests.test_frames import TEST_FILES

UNAVAILABLE = re.compile(
    r"(the database|the database or the object store) is unavailable \(.+\); try again later"
)


def test_a_database_that_died_is_503(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "postgres", fast_unsafe=True) as postgres:
        blobs = LocalBlobStore(tmp_path / "blobs")
        settings = Settings(data_dir=tmp_path)
        thread, archive = start_archive(settings, postgres.dsn, blobs, LocalBlobStore(tmp_path / "blobs"))
        try:
            with httpx.Client(base_url=archive.url, timeout=30) as client:
                assert client.get("/studies").status_code == 200
                pid = postgres.postmaster_pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                # a backend outlives its postmaster until it notices (it may still answer a query or two)
                deadline = time.monotonic() + 20
                while client.get("/studies").status_code == 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
                for path in ("/studies", "/changefeed"):
                    response = client.get(path)
                    assert response.status_code == 503, (path, response.text)
                    assert response.headers["retry-after"] == "10"
                    assert UNAVAILABLE.fullmatch(response.json()["error"]["message"]), response.text
        finally:
            thread.stop()


def test_an_object_store_that_does_not_answer_is_503(
    database_url: str, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    prefix = f"outage-{uuid.uuid4().hex}"
    settings = Settings(data_dir=tmp_path)
    thread, up = start_archive(
        settings,
        database_url,
        make_s3_store(s3_server, s3_bucket, prefix),
        make_s3_store(s3_server, s3_bucket, prefix),
    )
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
    down_store = S3BlobStore(
        s3_bucket,
        prefix,
        endpoint_url=nobody,
        region=s3_server.region,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    other, down = start_archive(
        settings, database_url, down_store, make_s3_store(s3_server, s3_bucket, prefix)
    )
    try:
        data = (TEST_FILES / "rtdose.dcm").read_bytes()
        instance_url = _stow(up.url, data)
        path = instance_url.removeprefix(up.url)
        with httpx.Client(base_url=down.url, timeout=60) as client:
            assert client.get(f"{path}/metadata").status_code == 200  # the index answers
            for suffix, accept in (("", "application/dicom; transfer-syntax=*"), ("/frames/1", "*/*")):
                response = client.get(path + suffix, headers={"Accept": accept})
                assert response.status_code == 503, response.text
                message = response.json()["error"]["message"]
                assert message.startswith("the object store is unavailable (EndpointConnectionError: "), (
                    message
                )
        with httpx.Client(base_url=up.url, timeout=30) as client:
            response = client.get(path, headers={"Accept": "application/dicom; transfer-syntax=*"})
            assert response.status_code == 200 and response.content == data
        assert str(pydicom.dcmread(TEST_FILES / "rtdose.dcm").SOPInstanceUID) in path
    finally:
        other.stop()
        thread.stop()


def _stow(url: str, data: bytes) -> str:
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/studies", content=data, headers={"Content-Type": "application/dicom"})
        assert response.status_code == 200, response.text
        return response.json()["00081199"]["Value"][0]["00081190"]["Value"][0]


def test_readiness_says_when_the_bucket_is_missing(
    database_url: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """/health/ready probed a key, which answers 404 for a bucket that does not exist too: "storage": "ok"
    while every STOW failed. It asks for the bucket now."""
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    settings = Settings(data_dir=tmp_path)
    thread, archive = start_archive(
        settings, database_url, make_s3_store(s3_server, bucket, "p"), LocalBlobStore(tmp_path / "unused")
    )
    try:
        response = httpx.get(f"{archive.base}/health/ready", timeout=30)
    finally:
        thread.stop()
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": "ok",
        "storage": f"error: bucket {bucket!r} does not exist at {s3_server.endpoint_url}; create it "
        "(`dicomweb migrate` with this --storage-url does)",
    }
