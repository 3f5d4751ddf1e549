"""UPS-RS test helpers: the archive fixture and the work item data sets (from bench.ups_synthetic)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ups_synthetic import code, performed, workitem
from dicomweb.config import Settings
from tests.fixtures.server import RunningArchive, local_store_archive


@pytest.fixture
def ups_archive(database_url: str, tmp_path: Path) -> Iterator[RunningArchive]:
    """`local_archive` with access control open: these tests are about UPS-RS, not about authentication."""
    settings = Settings(data_dir=tmp_path, max_instance_size=64 << 20, insecure_open=True)
    with local_store_archive(settings, database_url, tmp_path) as running:
        yield running


__all__ = ["code", "performed", "ups_archive", "workitem"]
