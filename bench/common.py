"""Helpers for benchmark scripts: an embedded archive to measure, percentiles, result printing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_archive(
    workers: int | None = 2,
    data_dir: Path | None = None,
    database_url: str | None = None,
    *,
    insecure_open: bool = True,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    code: Path | None = None,
) -> Iterator[str]:
    """Run `dicomweb serve` (embedded default unless database_url) in a scratch directory; yields /v2 root.

    workers=None leaves the worker count to the server's default (as many as cores). `code`: another checkout
    whose packages the server imports instead of this one's (A/B runs of two commits side by side)."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicomweb-bench-")))
        cmd = [
            sys.executable, "-m", "dicomweb.cli", "serve", "--port", str(port),
            "--data-dir", str(data_dir), "--log-level", "warning",
        ]  # fmt: skip
        if workers is not None:
            cmd += ["--workers", str(workers)]
        if insecure_open:  # benches measure the archive; bench/auth.py and --auth runs measure access control
            cmd.append("--insecure-open")
        cmd += extra_args or []
        if database_url:
            cmd += ["--database-url", database_url]
        env = {**os.environ, **(env or {})}
        if code is not None:  # `-m` puts the working directory first on sys.path, PYTHONPATH after it
            env["PYTHONPATH"] = str(code)
        proc = subprocess.Popen(cmd, env=env, cwd=code, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            if not wait_ready(f"{url}/health/ready", proc, timeout=120):
                raise RuntimeError("the archive did not start")
            yield f"{url}/v2"
        finally:
            # as an operator's `kill PID` would: the server must stop its workers and database itself
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(url: str, proc: subprocess.Popen[bytes], *, timeout: float) -> bool:
    """Poll url until it answers 200; False if the process exits or the time runs out first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (from /proc), to report a figure the machine's load cannot skew:
    shared machines give a benchmark an unknown share of their cores, CPU time per instance does not care."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def processes_with(match: Callable[[list[bytes]], bool]) -> set[int]:
    """Pids of the processes whose arguments (the command line split at NULs) `match` accepts."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if match(args):
                found.add(int(entry.name))
    return found


def serve_processes(root: str) -> set[int]:
    """The `dicomweb serve` process listening on the port of `root` (its workers are its descendants)."""
    port = str(httpx.URL(root).port).encode()
    return processes_with(lambda args: b"serve" in args and port in args)


def archive_processes(root: str, data_dir: Path) -> set[int]:
    """`dicomweb serve` on the port of `root` and its embedded PostgreSQL in data_dir, which runs as a
    daemon (not a descendant): with tree_cpu_seconds, all the CPU the archive spends."""
    postmaster = int((data_dir / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    return serve_processes(root) | {postmaster}


def tree_cpu_seconds(roots: set[int]) -> float:
    """CPU seconds (user + system) used so far by the processes `roots` and their descendants."""
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    members, grew = set(roots), True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in members} - members
        members |= more
        grew = bool(more)
    return sum(stats[pid][1] for pid in members if pid in stats)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]
