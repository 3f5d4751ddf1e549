"""Keep-alive connections spread over the workers (dicomweb/balance.py): the balancer's decisions with a
fake clock and another worker's count file, and `dicomweb serve --workers 2` with four keep-alive clients
that all connect at once, which without it often left one worker with three or four of them."""

from __future__ import annotations

import http.client
import os
import threading
import time
from pathlib import Path

from bench.common import free_port, wait_ready
from dicomweb import balance
from dicomweb.balance import ConnectionBalancer
from tests.test_serve_workers import _command, _serving, _wait_until_ready, _workers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def other_worker(directory: Path, count: int, pid: int | None = None, written: float | None = None) -> None:
    """The count file of another worker (by default this test's parent process, which is alive)."""
    pid = os.getppid() if pid is None else pid
    written = time.time() if written is None else written
    (directory / f"connections-{pid}").write_text(f"{count} {written}")


def test_closes_only_while_two_or_more_ahead_of_the_least_busy(tmp_path: Path) -> None:
    clock = Clock()
    balancer = ConnectionBalancer(tmp_path, clock=clock)
    other_worker(tmp_path, 1)
    assert not any(balancer.should_close(("early", n)) for n in range(5))  # none in its first moments
    clock.now += balance.WINDOW + balance.REFRESH  # those clients have gone
    assert [balancer.should_close(("c", n)) for n in range(2)] == [False, False]  # 2 against 1
    assert balancer.should_close(("c", 2))  # 3 against 1: this one goes
    assert not balancer.should_close(("c", 0))  # back to 2 against 1
    assert not balancer.should_close(("c", 3))  # 3 against 1 again, but one move per interval
    clock.now += balance.REFRESH
    assert balancer.should_close(("c", 3))
    other_worker(tmp_path, 2)
    clock.now += balance.REFRESH
    assert not balancer.should_close(("c", 3))  # 3 against 2
    # clients silent for longer than the window no longer count
    clock.now += balance.WINDOW + balance.REFRESH
    other_worker(tmp_path, 0)
    assert not balancer.should_close(("c", 9))  # 1 against 0
    assert (tmp_path / f"connections-{os.getpid()}").read_text().split()[0] == "1"


def test_an_idle_worker_is_seen_and_gone_workers_are_not(tmp_path: Path) -> None:
    (tmp_path / "idle").mkdir()
    ConnectionBalancer(tmp_path / "idle")
    assert (tmp_path / "idle" / f"connections-{os.getpid()}").read_text().startswith("0 ")
    # a lone worker, then one beside a worker that is gone (no such pid), close nothing
    balancer = ConnectionBalancer(tmp_path)
    assert not any(balancer.should_close(("c", n)) for n in range(10))
    other_worker(tmp_path, 0, pid=2**22 + 5)
    balancer = ConnectionBalancer(tmp_path)
    assert not any(balancer.should_close(("c", n)) for n in range(10))
    # a live worker whose last count is older than a window has no clients left: this one moves clients
    other_worker(tmp_path, 5, written=time.time() - balance.WINDOW - 1)
    clock = Clock()
    balancer = ConnectionBalancer(tmp_path, clock=clock)
    balancer.should_close(("c", 0))
    clock.now += 2 * balance.REFRESH
    assert [balancer.should_close(("c", n)) for n in range(1, 4)] == [True, False, False]


def _sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def _established_on(port: int) -> set[str]:
    """Inodes of the established TCP sockets whose local port is `port` (the server's side)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    return inodes


def test_four_clients_end_up_two_on_each_worker(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    with _serving(_command(database_url, tmp_path, port, "--dimse-port", "0")) as proc:
        assert wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, timeout=120)  # type: ignore[arg-type]
        workers = _workers(proc.pid)
        assert len(workers) == 2
        _wait_until_ready(workers)
        time.sleep(balance.WINDOW + 0.5)  # the readiness probes' connections no longer count
        splits = []
        for _ in range(3):
            splits.append(_split_under_four_clients(port, workers))
            time.sleep(balance.WINDOW + 0.5)  # the clients age out before the next round
        assert splits == [[2, 2]] * 3, splits


def _split_under_four_clients(port: int, workers: set[int]) -> list[int]:
    """Four keep-alive clients that connect at once and send requests for 2 s: how many each worker holds."""
    start, stop = threading.Barrier(4), threading.Event()

    def client() -> None:
        start.wait()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            conn.request("GET", "/v2/studies?limit=1")
            reply = conn.getresponse()
            reply.read()
            assert reply.status in (200, 204)
            if reply.getheader("connection", "").lower() == "close":
                conn.close()  # http.client connects again for the next request
        time.sleep(0.5)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    open_now = _established_on(port)
    split = sorted(len(_sockets_of(pid) & open_now) for pid in workers)
    stop.set()
    for t in threads:
        t.join()
    return split


def test_a_client_counts_while_its_request_runs(tmp_path: Path) -> None:
    clock = Clock()
    balancer = ConnectionBalancer(tmp_path, clock=clock)
    balancer.started(("slow", 1))
    clock.now += 10 * balance.WINDOW  # a long retrieval: no response for a while
    other_worker(tmp_path, 0)
    balancer.should_close(("c", 1))
    clock.now += 3 * balance.REFRESH
    assert balancer.should_close(("c", 2))  # the slow client, c1 and c2 against 0
    balancer.finished(("slow", 1))
    clock.now += balance.WINDOW + balance.REFRESH
    other_worker(tmp_path, 0)
    assert not balancer.should_close(("c", 3))  # the slow client has gone: 1 against 0
