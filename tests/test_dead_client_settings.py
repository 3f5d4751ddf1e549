"""Every PostgreSQL connection of a serving process asks the server to drop it once its machine is silent.

Nodes on other machines reach PostgreSQL over TCP. A node whose machine dies mid-transaction must not keep its
locks (an operation row, the change feed's counter) for the operating system's two-hour keepalive
(indexer/sessions.py). What shows it from outside, as the server sees it: the keepalive timer on each of
the server's sockets, which runs from the session's `tcp_keepalives_idle`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from bench.common import free_port
from dicomweb.config import Settings
from indexer.embedded import EmbeddedPostgres
from indexer.sessions import DEAD_CLIENT_SETTINGS
from storage import LocalBlobStore
from tests.fixtures.server import start_archive

KEEPALIVE_TIMER = 2  # /proc/net/tcp "tr" of a socket whose keepalive timer runs
TICKS = 100  # /proc/net/tcp counts timers in USER_HZ


@pytest.fixture
def tcp_postgres() -> Iterator[int]:
    """A PostgreSQL that also listens on loopback TCP; its port. (Outside pytest's tmp root: see the
    postgres_server fixture for why.)"""
    scratch = Path(tempfile.mkdtemp(prefix="dicomweb-keepalive-test-"))
    port = free_port()
    try:
        with EmbeddedPostgres(scratch / "cluster", port=port, fast_unsafe=True):
            yield port
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def server_sockets(port: int) -> list[tuple[int, int]]:
    """(timer kind, seconds left) of every established connection the server on `port` holds."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state = int(fields[1].split(":")[1], 16), fields[3]
        if local_port == port and state == "01":  # ESTABLISHED
            kind, when = fields[5].split(":")
            found.append((int(kind, 16), int(when, 16) // TICKS))
    return found


async def test_every_connection_of_a_serving_process_is_probed_within_30_s(
    tcp_postgres: int, tmp_path: Path
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{tcp_postgres}/dicomweb"
    assert server_sockets(tcp_postgres) == []
    # a plain connection keeps the operating system's keepalive (7200 s on Linux): what the settings change
    conn = await asyncpg.connect(url)
    try:
        await asyncio.sleep(0.2)
        assert [kind for kind, _ in server_sockets(tcp_postgres)] == [KEEPALIVE_TIMER]
        assert server_sockets(tcp_postgres)[0][1] > 3600
    finally:
        await conn.close()
    # an archive: its pool, its LISTEN connections (change feed, worklist, access) and the UPS-RS status lock
    # a pool of one, so that the count is exact: what Settings.connections_per_worker budgets
    settings = Settings(data_dir=tmp_path, scrub_interval_hours=0, db_pool_size=1)
    thread, _ = start_archive(
        settings, url, LocalBlobStore(tmp_path / "blobs"), LocalBlobStore(tmp_path / "b")
    )
    try:
        idle = int(DEAD_CLIENT_SETTINGS["tcp_keepalives_idle"])
        async with asyncio.timeout(30):  # until every connection is idle with its timer armed
            while True:
                sockets = server_sockets(tcp_postgres)
                if len(sockets) >= 5 and all(kind == KEEPALIVE_TIMER for kind, _ in sockets):
                    break
                await asyncio.sleep(0.2)
        assert all(left <= idle for _, left in sockets), sockets
        await asyncio.sleep(0.5)  # nothing else connects
        assert len(server_sockets(tcp_postgres)) == settings.connections_per_worker() == 5
    finally:
        thread.stop()
