"""`dicomweb` commands on a data directory whose embedded PostgreSQL a running server owns: they use that
server (through its socket) instead of failing with a traceback; `serve` itself still refuses to share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomweb.cli import main
from indexer.embedded import EmbeddedPostgres


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Outside pytest's tmp root: the cluster's socket path must stay short (see the postgres fixture)."""
    path = Path(tempfile.mkdtemp(prefix="dicomweb-attach-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def running(data_dir: Path) -> Iterator[EmbeddedPostgres]:
    """The embedded PostgreSQL as a running `dicomweb serve` holds it (its lock taken by this process)."""
    with EmbeddedPostgres(data_dir / "postgres", fast_unsafe=True) as server:
        yield server


def test_commands_attach_to_the_running_servers_postgres(
    data_dir: Path, running: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data-dir", str(data_dir)]
    assert main(["migrate", *common]) == 0
    assert main(["token", "create", "--role", "reader", "--name", "attached", *common]) == 0
    capsys.readouterr()
    assert main(["token", "list", *common]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1:3] for line in listed[1:]] == [["attached", "reader"]]
    assert main(["audit", "verify", *common]) == 0
    assert running.running  # still the one that owns it: nothing was started or stopped
    assert main(["token", "list", *common]) == 0


def test_serve_refuses_a_data_directory_in_use_with_a_message(
    data_dir: Path, running: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--data-dir", str(data_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the embedded PostgreSQL in ")
    assert "already in use by another dicomweb process" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["token", "list", "--database-url", "postgresql://nobody@127.0.0.1:1/x"], "error: cannot use the "
         "database: [Errno 111] Connect call failed ('127.0.0.1', 1)"),
        (["ae", "list", "--database-url", "notaurl"], "error: cannot use the database: invalid DSN: scheme "
         "is expected to be either \"postgresql\" or \"postgres\", got ''"),
        (["migrate", "--database-url", "postgresql://nobody@127.0.0.1:1/x"], "error: cannot use the "
         "database: [Errno 111] Connect call failed ('127.0.0.1', 1)"),
        (["serve", "--database-url", "notaurl"], "error: cannot use the database: invalid DSN: scheme is "
         "expected to be either \"postgresql\" or \"postgres\", got ''"),
    ],
)  # fmt: skip
def test_a_database_that_cannot_be_reached_is_a_message_not_a_traceback(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == error
