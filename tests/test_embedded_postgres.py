"""The embedded PostgreSQL: lifecycle, crash leftovers, root handling, both binary sources, test fixtures."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from indexer import embedded
from indexer.embedded import (
    PG_BIN_ENV,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    _dev_shm_size,
    _free_port,
    _machine_memory,
    _pgserver_bin_dir,
    find_pg_binaries,
    memory_settings,
    shared_memory_settings,
)
from tests.fixtures.postgres import TEST_DATABASE_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]
PGSERVER_BIN = _pgserver_bin_dir()


async def fetchval(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), f"process {pid} still alive"


def spawn_unrelated_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def orphan_a_server(cluster: Path) -> int:
    """Start a server in a child process that exits without stopping it; return the postmaster's pid."""
    script = textwrap.dedent(
        f"""
        import os
        from indexer.embedded import EmbeddedPostgres
        server = EmbeddedPostgres({str(cluster)!r}, fast_unsafe=True)
        server.start()
        print(server.postmaster_pid(), flush=True)
        os._exit(0)  # no atexit: the server is orphaned
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return int(out.stdout.strip())


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory for clusters outside pytest's tmp root (see the postgres_server fixture for why)."""
    path = Path(tempfile.mkdtemp(prefix="dicomweb-embedded-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _default_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose binaries explicitly; an override in the developer's shell must not leak in."""
    monkeypatch.delenv(PG_BIN_ENV, raising=False)


async def test_start_stop_restart_keeps_data(scratch: Path) -> None:
    server = EmbeddedPostgres(scratch / "cluster", fast_unsafe=True)
    dsn = server.start()
    # the unix socket in the 0700 cluster directory, and nothing else: trust auth on loopback TCP would let
    # any local user in as the superuser
    assert dsn == f"postgresql://postgres@/dicomweb?host={server.cluster_dir}&port={server.port}"
    assert server.start() == dsn  # idempotent
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')")
        settings = await conn.fetchrow(
            "SELECT current_setting('listen_addresses') AS listen, current_setting('fsync') AS fsync, "
            "current_setting('unix_socket_directories') AS sockets, "
            "current_setting('server_encoding') AS enc, inet_client_addr() AS client"
        )
    finally:
        await conn.close()
    assert dict(settings) == {
        "listen": "",
        "fsync": "off",
        "sockets": str(server.cluster_dir),
        "enc": "UTF8",
        "client": None,  # not a TCP connection
    }
    with pytest.raises(OSError):
        await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres", database="dicomweb")
    pid = server.postmaster_pid()
    assert pid
    if os.geteuid() == 0:
        assert process_uid(pid) != 0  # PostgreSQL refuses root; it must run as the service account

    server.stop()
    server.stop()  # idempotent
    wait_gone(pid)
    assert not server.running
    with pytest.raises(EmbeddedPostgresError, match="not running"):
        _ = server.dsn

    again = EmbeddedPostgres(scratch / "cluster", fast_unsafe=True)
    with again:
        assert await fetchval(again.dsn, "SELECT v FROM kept") == "survives"
    assert not again.running


async def test_durable_defaults(scratch: Path) -> None:
    with EmbeddedPostgres(scratch / "cluster", database="other db") as server:
        assert "/other%20db?" in server.dsn
        conn = await asyncpg.connect(server.dsn)
        try:
            row = await conn.fetchrow(
                "SELECT current_database() AS db, current_setting('fsync') AS fsync, "
                "current_setting('full_page_writes') AS fpw, "
                "current_setting('max_connections') AS mc, current_setting('data_checksums') AS sums, "
                "current_setting('random_page_cost') AS rpc, "
                "pg_size_bytes(current_setting('shared_buffers')) AS sb_bytes, "
                "pg_size_bytes(current_setting('work_mem')) AS wm_bytes, "
                "current_setting('dynamic_shared_memory_type') AS dsm"
            )
        finally:
            await conn.close()
    tuned = memory_settings(_machine_memory())  # sized from this machine's RAM
    assert dict(row) == {
        "db": "other db",
        "fsync": "on",
        "fpw": "on",
        "mc": "100",
        "sums": "on",
        "rpc": "4",
        "sb_bytes": int(tuned["shared_buffers"].removesuffix("MB")) * 2**20,
        "wm_bytes": int(tuned["work_mem"].removesuffix("MB")) * 2**20,
        "dsm": shared_memory_settings(_dev_shm_size()).get("dynamic_shared_memory_type", "posix"),
    }


def test_small_dev_shm_moves_parallel_query_memory_to_system_v() -> None:
    mib = 2**20
    assert shared_memory_settings(64 * mib) == {"dynamic_shared_memory_type": "sysv"}  # a container's
    assert shared_memory_settings(None) == {"dynamic_shared_memory_type": "sysv"}  # no /dev/shm at all
    assert shared_memory_settings(12 * 1024 * mib) == {}


def test_memory_settings_follow_the_machine() -> None:
    gib = 2**30
    assert memory_settings(24 * gib) == {
        "shared_buffers": "6144MB",
        "effective_cache_size": "18432MB",
        "work_mem": "46MB",
        "maintenance_work_mem": "1536MB",
        "effective_io_concurrency": "200",
        "max_wal_size": "4GB",
    }
    keys = ("shared_buffers", "work_mem", "maintenance_work_mem")
    small = memory_settings(gib // 4)  # floors: PostgreSQL's own defaults
    assert [small[k] for k in keys] == ["128MB", "4MB", "64MB"]
    huge = memory_settings(512 * gib)  # ceilings
    assert [huge[k] for k in keys] == ["8192MB", "64MB", "2048MB"]


async def test_parallel_query_runs_on_system_v_shared_memory(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in a container whose /dev/shm is 64 MB: the cluster starts, and a parallel aggregate (whose
    workers share dynamic shared memory) answers."""
    monkeypatch.setattr(embedded, "_dev_shm_size", lambda: 64 * 2**20)
    with EmbeddedPostgres(scratch / "cluster") as server:
        conn = await asyncpg.connect(server.dsn)
        try:
            assert await conn.fetchval("SELECT current_setting('dynamic_shared_memory_type')") == "sysv"
            await conn.execute("SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0")
            await conn.execute("SET min_parallel_table_scan_size = 0")
            await conn.execute("CREATE TABLE numbers AS SELECT n FROM generate_series(1, 200000) n")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN SELECT sum(n) FROM numbers"))
            assert "Gather" in plan
            assert await conn.fetchval("SELECT sum(n) FROM numbers") == 200000 * 200001 // 2
        finally:
            await conn.close()


async def test_long_path_falls_back_to_tcp_only(scratch: Path, caplog: pytest.LogCaptureFixture) -> None:
    deep = scratch / ("x" * 60) / ("y" * 40) / "cluster"  # socket path would exceed 107 bytes
    with EmbeddedPostgres(deep, fast_unsafe=True) as server:
        assert "too long for a unix socket" in caplog.text  # a weaker setup than the default: said so
        assert server.dsn == f"postgresql://postgres@127.0.0.1:{server.port}/dicomweb"
        assert await fetchval(server.dsn, "SELECT current_setting('unix_socket_directories')") == ""


async def test_a_requested_port_is_also_open_on_loopback(scratch: Path) -> None:
    port = _free_port()
    with EmbeddedPostgres(scratch / "cluster", port=port, fast_unsafe=True) as server:
        assert await fetchval(f"postgresql://postgres@127.0.0.1:{port}/dicomweb", "SELECT 1") == 1
        assert "?host=" in server.dsn  # its own connections still take the socket


async def test_startup_error_shows_log_tail_and_leaves_nothing_behind(scratch: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = EmbeddedPostgres(scratch / "cluster", port=port, fast_unsafe=True)
        with pytest.raises(EmbeddedPostgresError, match=r"(?s)failed to start.*tail.*Address already in use"):
            server.start()
    assert not server.running and server.postmaster_pid() is None
    with EmbeddedPostgres(scratch / "cluster", fast_unsafe=True) as again:  # lock was released
        assert await fetchval(again.dsn, "SELECT 1") == 1


async def test_second_server_on_running_cluster_is_refused(scratch: Path) -> None:
    with EmbeddedPostgres(scratch / "cluster", fast_unsafe=True) as first:
        with pytest.raises(EmbeddedPostgresError, match=rf"already in use .*pid {os.getpid()}"):
            EmbeddedPostgres(scratch / "cluster", fast_unsafe=True).start()
        assert await fetchval(first.dsn, "SELECT 1") == 1  # the running one is untouched


async def test_restart_after_postmaster_crash(scratch: Path) -> None:
    server = EmbeddedPostgres(scratch / "cluster", fast_unsafe=True)
    dsn = server.start()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        await conn.execute("CHECKPOINT")  # commits are asynchronous with fast_unsafe; make it durable
    finally:
        await conn.close()
    pid = server.postmaster_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert (server.data_dir / "postmaster.pid").exists()  # left behind by the crash
    server.stop()  # must cope with the server being gone already

    with EmbeddedPostgres(scratch / "cluster", fast_unsafe=True) as again:
        assert await fetchval(again.dsn, "SELECT v FROM kept") == 42


async def test_stale_pid_file_naming_a_reused_pid(scratch: Path) -> None:
    """After e.g. a container restart the old PID belongs to another process; PostgreSQL alone refuses."""
    server = EmbeddedPostgres(scratch / "cluster", fast_unsafe=True)
    server.start()
    pid_file = server.data_dir / "postmaster.pid"
    lines = pid_file.read_text().split("\n")
    server.stop()
    with spawn_unrelated_process() as unrelated:
        try:
            pid_file.write_text("\n".join([str(unrelated.pid), *lines[1:]]))
            with EmbeddedPostgres(scratch / "cluster", fast_unsafe=True) as again:
                assert await fetchval(again.dsn, "SELECT 1") == 1
            assert unrelated.poll() is None  # and we did not signal it
        finally:
            unrelated.kill()


async def test_orphan_of_a_killed_owner_is_replaced(scratch: Path) -> None:
    """The owning process died without stopping PostgreSQL (SIGKILL, OOM): the next start takes over."""
    cluster = scratch / "cluster"
    orphan = orphan_a_server(cluster)
    assert alive(orphan)
    with EmbeddedPostgres(cluster, fast_unsafe=True) as server:
        assert server.postmaster_pid() != orphan
        assert await fetchval(server.dsn, "SELECT 1") == 1
    wait_gone(orphan)


@pytest.mark.skipif(os.geteuid() != 0, reason="root handling")
async def test_root_reaches_cluster_below_private_directory(scratch: Path) -> None:
    """Like a data dir under /root (0700): only the service account gets search (x) access, via an ACL."""
    private = scratch / "private"
    private.mkdir(mode=0o700)
    with EmbeddedPostgres(private / "sub" / "cluster", fast_unsafe=True) as server:
        pid = server.postmaster_pid()
        assert pid and process_uid(pid) != 0
        assert await fetchval(server.dsn, "SELECT 1") == 1
    mode = stat.S_IMODE(private.stat().st_mode)
    assert not mode & (stat.S_IROTH | stat.S_IXOTH)  # not opened to everybody
    assert os.getxattr(private, "system.posix_acl_access")


def test_system_binaries_preferred() -> None:
    system = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "postgres").exists()]
    if not system:
        pytest.skip("no system PostgreSQL installed")
    assert find_pg_binaries().source in {"path", "system"}


def test_bad_override_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PG_BIN_ENV, str(tmp_path))
    with pytest.raises(EmbeddedPostgresError, match=PG_BIN_ENV):
        find_pg_binaries()


@pytest.mark.skipif(PGSERVER_BIN is None, reason="pgserver not installed")
async def test_pgserver_binaries(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fresh-machine path: binaries bundled in the pgserver wheel."""
    assert PGSERVER_BIN is not None
    monkeypatch.setenv(PG_BIN_ENV, str(PGSERVER_BIN))
    bundled = find_pg_binaries()
    with EmbeddedPostgres(scratch / "cluster", fast_unsafe=True) as server:
        assert server.binaries is not None and server.binaries.source == "env"
        version = await fetchval(server.dsn, "SELECT current_setting('server_version_num')::int")
        assert str(version // 10000) == bundled.major
        await fetchval(server.dsn, "CREATE TABLE kept AS SELECT 1 AS v")

    # Without the override, a restart must pick binaries matching the cluster's version again (the
    # preferred system PostgreSQL may be another major version, which could not open this cluster).
    monkeypatch.delenv(PG_BIN_ENV)
    with EmbeddedPostgres(scratch / "cluster", fast_unsafe=True) as server:
        assert server.binaries is not None and server.binaries.major == bundled.major
        assert await fetchval(server.dsn, "SELECT v FROM kept") == 1


@pytest.mark.parametrize("source", ["default", "pgserver"])
async def test_wal_compression_is_lz4_where_the_server_has_it(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """A durable cluster compresses its WAL with lz4 if its server offers lz4, and a server built without it
    (pgserver's) still starts, uncompressed: the setting is probed, not assumed from the version."""
    if source == "pgserver":
        if PGSERVER_BIN is None:
            pytest.skip("pgserver not installed")
        monkeypatch.setenv(PG_BIN_ENV, str(PGSERVER_BIN))
    with EmbeddedPostgres(scratch / "cluster") as server:
        conn = await asyncpg.connect(server.dsn)
        try:
            row = await conn.fetchrow(
                "SELECT setting, enumvals FROM pg_settings WHERE name = 'wal_compression'"
            )
        finally:
            await conn.close()
    assert row["setting"] == ("lz4" if "lz4" in row["enumvals"] else "off")


_seen_databases: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
async def test_database_url_is_fresh_and_isolated(database_url: str, postgres_server: str, run: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        await conn.execute("CREATE TABLE marker (run int)")
    finally:
        await conn.close()
    assert name.startswith(TEST_DATABASE_PREFIX)
    assert tables == 0  # nothing from the other run, nor from the server's main database
    admin = await asyncpg.connect(postgres_server)
    try:
        leftovers = await admin.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1::text[])", _seen_databases
        )
    finally:
        await admin.close()
    assert leftovers == 0  # earlier tests' databases were dropped
    _seen_databases.append(name)


async def test_max_connections_follows_the_server_processes(scratch: Path) -> None:
    with EmbeddedPostgres(scratch / "cluster", fast_unsafe=True, max_connections=170) as server:
        assert await fetchval(server.dsn, "SELECT current_setting('max_connections')") == "170"
