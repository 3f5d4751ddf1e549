"""`dicomweb serve --workers 2` under a service manager: a worker that cannot start makes the command exit 3
with the reason on stderr (uvicorn's own supervisor exited 0, or respawned such a worker for ever); a
worker that dies after it was serving is respawned; SIGTERM stops a healthy server with status 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from bench.common import free_port, wait_ready
from dicomweb.supervisor import READY_DIR_ENV


def _command(database_url: str, tmp_path: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dicomweb.cli", "serve", "--workers", "2", "--port", str(port),
        "--database-url", database_url, "--storage-url", (tmp_path / "blobs").as_uri(),
        "--data-dir", str(tmp_path / "data"), "--insecure-open", *extra,
    ]  # fmt: skip


@contextmanager
def _serving(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def _workers(parent: int) -> set[int]:
    """The pids of the parent's worker processes (multiprocessing spawns them with this argument)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    found = set()
    for pid in children:
        with suppress(FileNotFoundError):
            if b"--multiprocessing-fork" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(int(pid))
    return found


def _wait_until_ready(pids: set[int]) -> None:
    """Until each worker has marked itself ready in the directory its parent gave it."""
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ready_dir = next(v.split(b"=", 1)[1] for v in environ if v.startswith(READY_DIR_ENV.encode() + b"="))
        mark = Path(os.fsdecode(ready_dir), str(pid))
        deadline = time.monotonic() + 120
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.exists()


def test_a_worker_that_cannot_bind_the_dimse_port_stops_the_server_with_status_3(
    database_url: str, tmp_path: Path
) -> None:
    # The port is taken after the parent checked it (a port already taken is refused before any worker
    # starts, tests/test_cli_serve.py): a sitecustomize module in the spawned workers binds it first, without
    # SO_REUSEPORT, so their DIMSE listeners cannot.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os, socket, sys\n"
        "if '--multiprocessing-fork' in sys.argv:\n"
        "    taken = socket.socket()\n"
        "    try:\n"
        "        taken.bind(('127.0.0.1', int(os.environ['TAKEN_PORT'])))\n"
        "        taken.listen()\n"
        "    except OSError:\n"
        "        pass  # the other worker holds it\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    dimse_port = free_port()
    cmd = _command(database_url, tmp_path, free_port(), "--dimse-port", str(dimse_port))
    with _serving(cmd, {"PYTHONPATH": pythonpath, "TAKEN_PORT": str(dimse_port)}) as proc:
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker process "), stderr
    assert "exited with status 3 before it was ready to serve" in last
    assert "Address already in use" in stderr  # the worker's own reason, above


def test_a_worker_killed_while_starting_is_not_respawned_for_ever(database_url: str, tmp_path: Path) -> None:
    """A fault uvicorn's supervisor did not stop on (it stops for status 3 only): every worker is killed
    by a signal at its first import, as the kernel's OOM killer might. A sitecustomize module does that in
    the spawned workers alone, since no configuration can make only the workers die this way."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "if '--multiprocessing-fork' in sys.argv:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    cmd = _command(database_url, tmp_path, free_port(), "--dimse-port", "0")
    with _serving(cmd, {"PYTHONPATH": pythonpath}) as proc:
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .endswith(
            "was killed by SIGKILL before it was ready to serve (its messages above give the reason); "
            "stopping the other workers"
        )
    ), stderr


def test_two_workers_serve_survive_a_crash_and_stop_with_status_0(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with _serving(_command(database_url, tmp_path, port, "--dimse-port", "0")) as proc:
        assert wait_ready(f"{base}/health/ready", proc, timeout=120)  # type: ignore[arg-type]
        assert httpx.get(f"{base}/v2/studies", timeout=30).status_code in (200, 204)
        first = _workers(proc.pid)
        assert len(first) == 2
        _wait_until_ready(first)  # a worker killed before it is ready would stop the server (the test above)
        # a worker that dies after it was serving is replaced, and the server goes on
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (len(now := _workers(proc.pid)) == 2 and victim not in now):
            time.sleep(0.2)
        assert victim not in _workers(proc.pid) and len(_workers(proc.pid)) == 2
        assert proc.poll() is None
        assert wait_ready(f"{base}/health/ready", proc, timeout=120)  # type: ignore[arg-type]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "error:" not in stderr


def test_workers_end_with_a_killed_supervisor_and_the_next_start_serves(
    database_url: str, tmp_path: Path
) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) takes its workers with it. They served on,
    holding the listening socket: the next `dicomweb serve` failed with "address already in use"."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = _command(database_url, tmp_path, port, "--dimse-port", "0")
    with _serving(cmd) as proc:
        assert wait_ready(f"{base}/health/ready", proc, timeout=120)  # type: ignore[arg-type]
        workers = _workers(proc.pid)
        assert len(workers) == 2
        _wait_until_ready(workers)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    with _serving(cmd) as again:
        assert wait_ready(f"{base}/health/ready", again, timeout=120)  # type: ignore[arg-type]
        assert httpx.get(f"{base}/v2/studies", timeout=30).status_code in (200, 204)
        again.send_signal(signal.SIGTERM)
        _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr


def test_an_unreachable_database_is_status_1_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"postgresql://nobody@127.0.0.1:{closed.getsockname()[1]}/archive"
    with _serving(_command(url, tmp_path, free_port(), "--dimse-port", "0")) as proc:
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1].startswith("error: cannot use the database: ")
