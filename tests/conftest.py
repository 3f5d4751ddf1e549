"""Shared fixtures: real PostgreSQL and a real S3 server, started once per test session on loopback."""

from __future__ import annotations

import signal
from types import FrameType

import pytest

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.server",
    "tests.fixtures.fhir",
    "tests.fixtures.dimse",
    "tests.fixtures.orthanc",
]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, `kill`) ends the run the way Ctrl-C does, through the session's teardown: the
    embedded PostgreSQL and SeaweedFS run in sessions of their own, as another user, and would outlive a
    plainly terminated pytest."""
    signal.signal(signal.SIGTERM, _interrupt)
