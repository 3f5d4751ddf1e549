"""Several server processes under one parent that fails loudly when they cannot start.

uvicorn's own supervisor (`uvicorn.supervisors.Multiprocess`, 0.55) respawns every worker that dies. It
stops only when a worker exits with uvicorn's startup-failure status (3), and `uvicorn.run` then returns
normally, so `dicomweb serve` exited 0: a service manager took a server that never served for a clean
stop. A worker that failed any other way (an import error, killed while starting) was respawned for ever.

Here each worker marks itself ready when its lifespan's startup has finished (`mark_ready`: an empty file
named by its pid, in a directory the parent made for this run). The parent checks the marks of workers that
died: one that died without its mark never served and would fail the same way again, so the parent stops
the others and reports it, and `dicomweb serve` exits 3 (uvicorn's status for a failed startup, as with one
worker). A worker that dies after it was ready is respawned, as uvicorn does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from socket import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

READY_DIR_ENV = "DICOMWEB_READY_DIR"  # set by the parent, read by the workers it spawns
SUPERVISOR_PID_ENV = "DICOMWEB_SUPERVISOR_PID"  # likewise: the workers end when that process is gone
PARENT_POLL_SECONDS = 1.0  # where the kernel cannot signal a parent's death (not Linux)
_PR_SET_PDEATHSIG = 1
log = logging.getLogger("uvicorn.error")


def follow_supervisor() -> None:
    """Called by a worker as it starts: it stops (SIGTERM, its graceful shutdown) when its supervisor dies.

    A supervisor killed outright (SIGKILL, the OOM killer) left its workers serving on: they held the
    listening socket, so the next `dicomweb serve` failed with "address already in use", and the embedded
    PostgreSQL they used was stopped by that next start as orphaned. On Linux the kernel sends the signal
    (PR_SET_PDEATHSIG); elsewhere a thread notices within PARENT_POLL_SECONDS. Nothing when the process is
    not a supervised worker."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if not supervisor or not supervisor.isdigit():
        return
    parent = int(supervisor)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died before the request took effect
                os.kill(os.getpid(), signal.SIGTERM)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def mark_ready() -> None:
    """Called by a worker when it is ready to serve; nothing when the process is not a supervised worker."""
    directory = os.environ.get(READY_DIR_ENV)
    if directory:
        Path(directory, str(os.getpid())).touch()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor, which stops (with `failure` set) when a worker dies before it was ready.

    Only the supervision loop is ours: signals, SIGHUP restarts and SIGTTIN/SIGTTOU are uvicorn's."""

    def __init__(self, config: Config, sockets: list[socket], ready_dir: Path) -> None:
        super().__init__(config, sockets)
        self.ready_dir = ready_dir
        self.failure: str | None = None

    def keep_subprocess_alive(self) -> None:
        """uvicorn's loop (replace a dead or hung worker) with the readiness check before a respawn."""
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: it does not answer uvicorn's health pings
            process.join()
            if self.should_exit.is_set():
                return  # a signal arrived meanwhile: the stop is under way
            code, mark = process.exitcode, self.ready_dir / str(process.pid)
            if code is None or code == STARTUP_FAILURE or not mark.exists():
                self.failure = (
                    f"worker process {process.pid} {describe_exit(code if code is not None else 1)} "
                    "before it was ready to serve (its messages above give the reason); stopping the other "
                    "workers"
                )
                log.error(self.failure)
                self.should_exit.set()
                return
            mark.unlink()  # its pid may be reused by a later worker, which must mark itself
            log.warning("worker process %s %s; starting another", process.pid, describe_exit(code))
            replacement = Process(self.config, self.sockets)
            replacement.start()
            self.processes[idx] = replacement
