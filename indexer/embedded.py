"""A private PostgreSQL cluster that lives in the archive's data directory.

`dicomweb serve` with no database configured must still work on a bare machine, so it starts its own
PostgreSQL next to the data it indexes and stops it again with the server.

Binaries, in order of preference (first usable wins, unless the cluster already exists — then the first
one whose major version matches the cluster's ``PG_VERSION``, because a cluster can only be opened by
the major version that created it):

1. ``$DICOMWEB_PG_BIN`` — a directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (exclusive: no
   fallback, so a typo fails loudly instead of silently using something else);
2. ``pg_ctl`` found on ``PATH`` (symlinks resolved to the real installation directory);
3. ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu) and ``/usr/pgsql-*/bin`` (RHEL/PGDG), newest first;
4. the binaries bundled in the ``pgserver`` wheel (``pgserver/pginstall/bin``), located without
   importing ``pgserver`` — its import has side effects (runtime dirs, lock files) we do not want.

Layout of ``cluster_dir`` (mode 0700, owned by the account that runs PostgreSQL)::

    data/              PGDATA (initdb'd into data.initdb/ first, renamed when complete)
    data/dicomweb.conf settings rewritten at every start (port, durability, sockets), included
                       from postgresql.conf, so code changes apply to old clusters too
    postgresql.log     server log (rotated at start once it exceeds 10 MiB)
    .s.PGSQL.<port>    unix socket, the only way in if the path fits the 107-byte limit (otherwise TCP
                       on 127.0.0.1; see Authentication below)
    dicomweb.lock      flock held by the owning process while the server runs

Root: PostgreSQL refuses to run as root, so when ``euid == 0`` every PostgreSQL process runs as an
unprivileged account instead: the owner of an existing cluster if that is not root, else the system
user ``dicomweb-pg`` (created with ``useradd --system`` when missing), falling back to ``postgres`` and
then ``nobody`` if no user can be created. ``cluster_dir`` is chowned to it. That account must be able
to *traverse* to the cluster and to the binaries, which fails for e.g. ``/root/...`` (mode 0700). We do
not move the cluster elsewhere (the data directory must stay self-contained, for backups and for
``rm -rf``), and we do not open ``/root`` to everybody the way ``pgserver`` does (it chmods every parent
``go+rx``). Instead, for each parent directory the account cannot enter, it is granted search
permission (``x`` only, no listing) through a POSIX ACL entry naming just that account; only where
the filesystem has no ACL support do we fall back to ``chmod o+x``. Every change is logged. Note that a
later ``chmod`` of such a directory resets the ACL mask and silently revokes the grant (pytest does this
to ``/tmp/pytest-of-<user>`` at every session start); it is re-granted at the next start, and stop()
falls back to signalling the postmaster if ``pg_ctl`` can no longer reach the cluster.

Leftovers: a lock held for the server's lifetime tells a live owner (refuse, clear error) from a dead
one. If the owner died without stopping PostgreSQL (SIGKILL, OOM), the orphaned postmaster is stopped
and restarted with our settings; a ``postmaster.pid`` whose process is gone, or whose PID was reused by
an unrelated process (typical after a container restart), is removed once no process is left working
in the data directory. ``atexit`` stops the server as a safety net, and the server runs in its own
session so a terminal's Ctrl-C reaches only the archive, which then stops PostgreSQL after draining.

Authentication is ``trust``, so the server is reached only through the unix socket inside the 0700
cluster dir: only its owner and root can connect, and nobody else on the machine gets around the archive's
access control and audit log. TCP on 127.0.0.1 (where any local user could connect) is opened only when
the cluster path is too long for a socket or when the caller asks for a ``port``; for those cases, and
for more than one machine, use an external PostgreSQL with passwords.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import errno
import fcntl
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import asyncpg

__all__ = [
    "PG_BIN_ENV",
    "SERVICE_USER",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PgBinaries",
    "find_pg_binaries",
]

log = logging.getLogger(__name__)

PG_BIN_ENV = "DICOMWEB_PG_BIN"
SERVICE_USER = "dicomweb-pg"
SUPERUSER = "postgres"

_TOOLS = ("initdb", "pg_ctl", "postgres")
_SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_SOCKET_NAME_MAX = len("/.s.PGSQL.65535")
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_CONF_NAME = "dicomweb.conf"
_INCLUDE_LINE = f"include_if_exists '{_CONF_NAME}'"
_START_TIMEOUT = 120  # seconds; crash recovery after an unclean stop can take a while
_STOP_TIMEOUT = 60

T = TypeVar("T")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be set up, started or stopped (message says why and what to do)."""


# --------------------------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class PgBinaries:
    """A directory with initdb/pg_ctl/postgres of one PostgreSQL version, and where it was found."""

    bin_dir: Path
    major: str  # as written in PG_VERSION: "15", "16", or "9.6" for pre-10 servers
    version: str
    source: str  # "env", "path", "system" or "pgserver"

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def _pgserver_bin_dir() -> Path | None:
    """pgserver's bundled binaries, found without importing pgserver (its import has side effects)."""
    try:
        spec = find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "pginstall" / "bin"
        if candidate.is_dir():
            return candidate
    return None


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for .../postgresql/<ver>/bin or /usr/pgsql-<ver>/bin, so the newest comes first."""
    match = re.search(r"(\d+(?:\.\d+)?)", path.parent.name)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (-1,)


def _candidate_dirs() -> list[tuple[Path, str]]:
    override = os.environ.get(PG_BIN_ENV)
    if override:
        return [(Path(override).expanduser(), "env")]
    candidates: list[tuple[Path, str]] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append((Path(on_path).resolve().parent, "path"))
    system = [*Path("/usr/lib/postgresql").glob("*/bin"), *Path("/usr").glob("pgsql-*/bin")]
    candidates += [(d, "system") for d in sorted(system, key=_version_key, reverse=True)]
    bundled = _pgserver_bin_dir()
    if bundled is not None:
        candidates.append((bundled, "pgserver"))
    seen: set[Path] = set()
    unique = []
    for directory, source in candidates:
        real = directory.resolve()
        if real not in seen:
            seen.add(real)
            unique.append((real, source))
    return unique


def _probe(directory: Path, source: str) -> PgBinaries:
    missing = [t for t in _TOOLS if not os.access(directory / t, os.X_OK)]
    if missing:
        raise EmbeddedPostgresError(f"{directory} lacks executable {', '.join(missing)}")
    # `postgres --version` is allowed as root; it only fails if the binary cannot run at all.
    out = subprocess.run(
        [str(directory / "postgres"), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out.stdout)
    if out.returncode != 0 or not match:
        raise EmbeddedPostgresError(
            f"{directory}/postgres does not run: {(out.stderr or out.stdout).strip()}"
        )
    first = int(match.group(1))
    major = str(first) if first >= 10 else f"{first}.{match.group(2) or 0}"
    return PgBinaries(directory, major, out.stdout.strip(), source)


def find_pg_binaries(required_major: str | None = None) -> PgBinaries:
    """The preferred PostgreSQL installation (see module docstring), optionally of one major version."""
    found: list[PgBinaries] = []
    problems: list[str] = []
    for directory, source in _candidate_dirs():
        try:
            binaries = _probe(directory, source)
        except (EmbeddedPostgresError, OSError, subprocess.SubprocessError) as exc:
            if source == "env":
                raise EmbeddedPostgresError(f"${PG_BIN_ENV}={directory} is not usable: {exc}") from exc
            problems.append(f"{directory}: {exc}")
            continue
        if required_major is None or binaries.major == required_major:
            return binaries
        found.append(binaries)
    if required_major is not None and found:
        versions = ", ".join(f"{b.major} ({b.bin_dir})" for b in found)
        raise EmbeddedPostgresError(
            f"the embedded cluster was created by PostgreSQL {required_major}, but only {versions} "
            f"is installed; install PostgreSQL {required_major} and point ${PG_BIN_ENV} at its bin directory"
        )
    detail = ("\n  " + "\n  ".join(problems)) if problems else ""
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found (looked at $PATH, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin and the "
        f"pgserver package); install PostgreSQL, `pip install pgserver`, or set ${PG_BIN_ENV}{detail}"
    )


# ------------------------------------------------------------------------------------- root: run-as user


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account PostgreSQL runs as when we are root."""

    uid: int
    gid: int
    name: str

    def popen_kwargs(self) -> dict[str, Any]:
        # extra_groups=[] drops root's supplementary groups too.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _account(name: str) -> _RunAs | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return _RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _create_service_user() -> _RunAs | None:
    nologin = shutil.which("nologin") or next(
        (p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false"
    )
    commands = [
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", nologin,
         "--user-group", SERVICE_USER],
        ["adduser", "-S", "-D", "-H", "-h", "/nonexistent", "-s", nologin, SERVICE_USER],  # BusyBox/Alpine
    ]  # fmt: skip
    for command in commands:
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        account = _account(SERVICE_USER)  # may also exist because a concurrent process created it
        if account is not None:
            if result.returncode == 0:
                log.warning(
                    "created system user %r to run the embedded PostgreSQL (it refuses root)", SERVICE_USER
                )
            return account
        log.warning("could not create system user %r: %s", SERVICE_USER, result.stderr.strip())
    return None


def _service_account(existing: Path | None) -> _RunAs:
    """Whom PostgreSQL runs as under root: the existing cluster's owner, else a dedicated system user."""
    if existing is not None:
        st = existing.stat()
        if st.st_uid != 0:
            try:
                entry = pwd.getpwuid(st.st_uid)
                return _RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)
            except KeyError:
                return _RunAs(st.st_uid, st.st_gid, str(st.st_uid))
    account = _account(SERVICE_USER) or _create_service_user()
    if account is None:
        for fallback in ("postgres", "nobody"):
            account = _account(fallback)
            if account is not None:
                log.warning("running the embedded PostgreSQL as existing user %r", fallback)
                break
    if account is None:
        raise EmbeddedPostgresError(
            f"running as root, but PostgreSQL refuses root and no user {SERVICE_USER!r}, 'postgres' or "
            f"'nobody' exists (and useradd failed); create one, e.g. `useradd --system {SERVICE_USER}`"
        )
    return account


def _can_enter(path: Path, run_as: _RunAs) -> bool:
    """Whether `run_as` can reach and search `path` (probed for real: modes, ACLs, LSMs all count)."""
    result = subprocess.run(
        ["/bin/sh", "-c", 'cd -- "$1"', "sh", str(path)],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        **run_as.popen_kwargs(),
    )
    return result.returncode == 0


_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_ACL_EXECUTE = 1


def _acl_grant_search(path: Path, uid: int) -> None:
    """Add `user:<uid>:--x` to the directory's POSIX ACL (Linux xattr format; no `setfacl` needed).

    The mask is widened by `x` only, so the owning group's effective rights are unchanged.
    """
    try:
        raw: bytes | None = os.getxattr(path, _ACL_XATTR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        raw = None
    if raw:
        if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION or (len(raw) - 4) % 8:
            raise OSError(errno.EINVAL, f"unexpected ACL format on {path}")
        entries = [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]
    else:
        mode = path.stat().st_mode
        entries = [
            (_ACL_USER_OBJ, (mode >> 6) & 7, _ACL_UNDEFINED_ID),
            (_ACL_GROUP_OBJ, (mode >> 3) & 7, _ACL_UNDEFINED_ID),
            (_ACL_OTHER, mode & 7, _ACL_UNDEFINED_ID),
        ]
    acl = {(tag, ident): perm for tag, perm, ident in entries}
    acl[(_ACL_USER, uid)] = acl.get((_ACL_USER, uid), 0) | _ACL_EXECUTE
    mask_key = (_ACL_MASK, _ACL_UNDEFINED_ID)
    acl[mask_key] = acl.get(mask_key, acl.get((_ACL_GROUP_OBJ, _ACL_UNDEFINED_ID), 0)) | _ACL_EXECUTE
    # The kernel wants entries ordered by tag, then id — which is exactly the sort order of the keys.
    body = b"".join(struct.pack("<HHI", tag, perm, ident) for (tag, ident), perm in sorted(acl.items()))
    os.setxattr(path, _ACL_XATTR, struct.pack("<I", _ACL_VERSION) + body)


def _ensure_traversable(path: Path, run_as: _RunAs) -> None:
    """Let `run_as` reach `path`, granting search permission on exactly the directories that block it."""
    if _can_enter(path, run_as):
        return
    for directory in [*reversed(path.parents), path]:
        if _can_enter(directory, run_as):
            continue
        try:
            _acl_grant_search(directory, run_as.uid)
            how = f"POSIX ACL user:{run_as.name}:--x"
        except (OSError, AttributeError) as exc:  # no ACL support on this filesystem / platform
            log.debug("ACL on %s failed (%s), falling back to chmod o+x", directory, exc)
            how = ""
        if not how or not _can_enter(directory, run_as):
            directory.chmod(stat.S_IMODE(directory.stat().st_mode) | stat.S_IXOTH)
            how = "chmod o+x"
        log.warning(
            "granted %s search permission on %s (%s) so PostgreSQL can reach it", run_as.name, directory, how
        )
    if not _can_enter(path, run_as):
        raise EmbeddedPostgresError(f"user {run_as.name!r} still cannot reach {path}; check its permissions")


def _chown_tree(root: Path, run_as: _RunAs) -> None:
    os.chown(root, run_as.uid, run_as.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), run_as.uid, run_as.gid)


# ----------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conf_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_MB = 1024 * 1024


def _machine_memory() -> int:
    """Bytes of RAM this process may use: physical memory, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def shared_memory_settings(shm_bytes: int | None) -> dict[str, str]:
    """Where parallel queries keep their dynamic shared memory. PostgreSQL's default (posix) puts it in
    /dev/shm, which containers often cap at 64 MB: with the work_mem above, one parallel hash join can
    need more and fail with "could not resize shared memory segment". System V segments do not count
    against /dev/shm, so a small or missing /dev/shm gets those."""
    return {} if shm_bytes is not None and shm_bytes >= 1024 * _MB else {"dynamic_shared_memory_type": "sysv"}


def _dev_shm_size() -> int | None:
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_frsize * stat.f_blocks


def memory_settings(total: int, *, max_connections: int = 100) -> dict[str, str]:
    """PostgreSQL memory and planner settings sized from the machine's RAM, as pgtune does for a web load.

    PostgreSQL's defaults (128 MB of shared buffers, a 4 GB cache assumed) suit a tiny machine; on a
    24 GB machine they made QIDO pages of 1M instances read ~700 buffers from the OS per request.
    shared_buffers 25% of RAM (at most 8 GB), effective_cache_size 75%, work_mem so that every
    connection can run a few sorts at once. random_page_cost stays 4, not pgtune's 1.1 for SSDs: with 1.1
    the planner walked instance_series in parallel for `limit=10` extended-tag range searches, hoping
    for early matches that were not there (2.5 s instead of 28 ms on the 1M-instance bench).
    """
    shared = min(max(total // 4, 128 * _MB), 8192 * _MB)
    work = min(max((total - shared) // (max_connections * 4), 4 * _MB), 64 * _MB)
    maintenance = min(max(total // 16, 64 * _MB), 2048 * _MB)
    return {
        "shared_buffers": f"{shared // _MB}MB",
        "effective_cache_size": f"{max(total * 3 // 4, shared) // _MB}MB",
        "work_mem": f"{work // _MB}MB",
        "maintenance_work_mem": f"{maintenance // _MB}MB",
        "effective_io_concurrency": "200",
        "max_wal_size": "4GB",
    }


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even if the caller's thread has a running loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-pg") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _processes_in(directory: Path) -> list[int] | None:
    """PIDs of PostgreSQL processes working in `directory` (every one of them chdirs to its PGDATA).

    None where /proc is unavailable. Processes we may not inspect are skipped: as root that is none,
    otherwise the cluster's processes run as ourselves anyway. Checking the executable keeps e.g. a
    shell that happens to sit in the directory from counting.
    """
    proc = Path("/proc")
    if not (proc / "self" / "cwd").exists():
        return None
    target = directory.stat()
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.stat(entry / "cwd")
            if (cwd.st_dev, cwd.st_ino) != (target.st_dev, target.st_ino):
                continue
            if not os.path.basename(os.readlink(entry / "exe")).startswith("postgres"):
                continue
        except OSError:
            continue
        pids.append(int(entry.name))
    return pids


def _read_pid(pid_file: Path) -> int | None:
    try:
        first = pid_file.read_text(errors="replace").split("\n", 1)[0].strip()
    except FileNotFoundError:
        return None
    return int(first) if first.lstrip("-").isdigit() else 0


# ------------------------------------------------------------------------------------------- the server


class EmbeddedPostgres:
    """A private PostgreSQL cluster in `cluster_dir`, reached through its unix socket (127.0.0.1 only when
    the path is too long for one or a `port` is asked for), started and stopped on demand.

    `fast_unsafe=True` turns off fsync, synchronous_commit and full_page_writes (and initdb's final
    sync): a crash may corrupt the cluster, which is fine for throwaway test clusters only.
    """

    def __init__(
        self,
        cluster_dir: Path | str,
        *,
        port: int | None = None,
        database: str = "dicomweb",
        fast_unsafe: bool = False,
        max_connections: int = 100,
    ) -> None:
        if not database:
            raise ValueError("database name must not be empty")
        self.cluster_dir = Path(cluster_dir).expanduser().absolute()
        self.data_dir = self.cluster_dir / "data"
        self.log_path = self.cluster_dir / "postgresql.log"
        self.database = database
        self.fast_unsafe = fast_unsafe
        self.max_connections = max(max_connections, 100)
        self._requested_port = port
        self._port: int | None = None
        self._dsn: str | None = None
        self._binaries: PgBinaries | None = None
        self._wal_compression: str | None = None  # probed at the first durable start: "lz4" or ""
        self._socket_dir = ""  # where the server's unix socket is ("": TCP only), set with the settings
        self._run_as: _RunAs | None = None
        self._lock_fd: int | None = None
        self._owner_pid: int | None = None
        self._mutex = threading.Lock()
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}

    # -- public API

    @property
    def dsn(self) -> str:
        """Connection URL of the database (as the superuser); only valid while started."""
        if self._dsn is None:
            raise EmbeddedPostgresError("embedded PostgreSQL is not running; call start() first")
        return self._dsn

    @property
    def port(self) -> int:
        if self._port is None or self._dsn is None:
            raise EmbeddedPostgresError("embedded PostgreSQL is not running; call start() first")
        return self._port

    @property
    def binaries(self) -> PgBinaries | None:
        """The installation used by the last start (None before)."""
        return self._binaries

    @property
    def running(self) -> bool:
        return self._dsn is not None

    def dsn_for(self, database: str) -> str:
        """Connection URL of another database on this server (e.g. "postgres" for admin work)."""
        return self._url(self.port, database)

    def _url(self, port: int, database: str) -> str:
        """The unix socket in the cluster directory where it fits, else TCP on loopback.

        The socket costs both ends less per round trip than loopback TCP: in-process UPS-RS cycles (4
        statements each) took 0.89 against 0.99 ms of the archive's CPU and 1.09 against 1.20 ms of
        PostgreSQL's (docs/performance.md, "UPS-RS worklist"). Only the cluster's owner (and root) can
        reach it, as the directory is 0700.
        """
        name = quote(database, safe="")
        if self._socket_dir:
            return f"postgresql://{SUPERUSER}@/{name}?host={quote(self._socket_dir)}&port={port}"
        return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{name}"

    def running_dsn(self) -> str | None:
        """The DSN of this cluster's server while another process (a running `dicomweb serve`) owns it, read
        from postmaster.pid (line 4: port, line 5: socket directory); None when no server is running. Lets
        `dicomweb backup` work on a live archive without starting (or stopping) anything."""
        if not self._postmaster_alive():
            return None
        try:
            lines = (self.data_dir / "postmaster.pid").read_text(errors="replace").split("\n")
            port = int(lines[3])
        except (OSError, IndexError, ValueError):
            return None
        self._socket_dir = lines[4].strip() if len(lines) > 4 else ""
        return self._url(port, self.database)

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, from postmaster.pid (None if there is none)."""
        return _read_pid(self.data_dir / "postmaster.pid")

    def start(self) -> str:
        """Initialise the cluster if needed, start the server and create the database; return its DSN."""
        with self._mutex:
            if self._dsn is not None:
                return self._dsn
            began = time.monotonic()
            self.cluster_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._acquire_lock()
            try:
                self._prepare_cluster_dir()
                self._clear_leftovers()
                if not (self.data_dir / "PG_VERSION").exists():
                    self._initdb()
                self._launch()
                try:
                    _run_coroutine(self._ensure_database)
                except BaseException:
                    self._stop_server()
                    raise
            except BaseException:
                self._release_lock()
                raise
            self._owner_pid = os.getpid()
            assert self._port is not None
            self._dsn = self._url(self._port, self.database)
            atexit.register(self.stop)
            assert self._binaries is not None
            port = self._port
            where = f"{self._socket_dir}/.s.PGSQL.{port}" if self._socket_dir else f"127.0.0.1:{port}"
            log.info(
                "embedded PostgreSQL %s (%s) ready on %s in %.2fs, cluster %s",
                self._binaries.major,
                self._binaries.source,
                where,
                time.monotonic() - began,
                self.cluster_dir,
            )
            return self._dsn

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions, no waiting for clients); idempotent."""
        with self._mutex:
            if self._dsn is None or self._owner_pid != os.getpid():
                return  # never started, already stopped, or we are a forked child that must not stop it
            try:
                self._stop_server()
            finally:
                self._dsn = None
                self._release_lock()
                atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._dsn else "stopped"
        return f"EmbeddedPostgres({str(self.cluster_dir)!r}, {state})"

    # -- setup

    def _prepare_cluster_dir(self) -> None:
        pg_version = self.data_dir / "PG_VERSION"
        required = pg_version.read_text().strip() if pg_version.exists() else None
        self._binaries = find_pg_binaries(required)
        self._wal_compression = None  # the binaries may differ from the last start's
        if os.geteuid() != 0:
            self._run_as = None
            return
        existing = self.data_dir if self.data_dir.exists() else self.cluster_dir
        run_as = _service_account(existing)
        if self.cluster_dir.stat().st_uid != run_as.uid:
            _chown_tree(self.cluster_dir, run_as)
        self.cluster_dir.chmod(0o700)
        _ensure_traversable(self.cluster_dir, run_as)
        _ensure_traversable(self._binaries.bin_dir.parent, run_as)
        for sub in ("bin", "lib", "share"):
            if (self._binaries.bin_dir.parent / sub).is_dir():
                _ensure_traversable(self._binaries.bin_dir.parent / sub, run_as)
        # pgserver's wheel (auditwheel) keeps libpq in site-packages/pgserver.libs, found via RPATH.
        if len(self._binaries.bin_dir.parents) > 2:
            for libs in self._binaries.bin_dir.parents[2].glob("pgserver*.libs"):
                _ensure_traversable(libs, run_as)
        self._run_as = run_as
        code, out = self._run([self._binaries.tool("postgres"), "--version"], timeout=30)
        if code != 0:
            raise EmbeddedPostgresError(
                f"{self._binaries.bin_dir}/postgres cannot run as {run_as.name}: {out}"
            )

    def _acquire_lock(self) -> None:
        try:
            fd = os.open(self.cluster_dir / "dicomweb.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError as exc:
            owner = self.cluster_dir.stat().st_uid
            raise EmbeddedPostgresError(
                f"{self.cluster_dir} belongs to uid {owner}; run dicomweb as that user (or as root)"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL in {self.cluster_dir} is already in use by another dicomweb "
                f"process (pid {holder}); stop that server first, or use a different data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _clear_leftovers(self) -> None:
        """Deal with a postmaster.pid left by an owner that died (we hold the lock, so it is not alive)."""
        pid_file = self.data_dir / "postmaster.pid"
        pid = _read_pid(pid_file)
        if pid is None:
            return
        procs = _processes_in(self.data_dir)
        if procs is None:
            return  # no /proc: leave the decision to PostgreSQL's own checks
        if pid in procs:
            log.warning("stopping orphaned PostgreSQL (pid %d) left running by a dead dicomweb process", pid)
            self._stop_server()
            procs = _processes_in(self.data_dir) or []
        deadline = time.monotonic() + 15
        while procs and time.monotonic() < deadline:
            time.sleep(0.1)  # backends of a killed postmaster notice its death and exit shortly
            procs = _processes_in(self.data_dir) or []
        if procs:
            raise EmbeddedPostgresError(
                f"processes {procs} still work in {self.data_dir} without a live postmaster; stop them first"
            )
        if pid_file.exists():
            # Nothing uses the data directory, so the pid file is stale even if its PID now belongs to an
            # unrelated process (which would make PostgreSQL refuse to start).
            log.info("removing stale %s (pid %d is not running this cluster)", pid_file, pid)
            pid_file.unlink(missing_ok=True)

    def _initdb(self) -> None:
        assert self._binaries is not None
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(f"{self.data_dir} exists but is no PostgreSQL cluster; move it away")
        staging = self.cluster_dir / "data.initdb"
        if staging.exists():
            shutil.rmtree(staging)  # an earlier initdb was interrupted
        command = [
            self._binaries.tool("initdb"),
            "-D", str(staging),
            "-U", SUPERUSER,
            "--encoding=UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=trust",
            "--data-checksums",  # storage corruption shows up as an error instead of wrong answers
        ]  # fmt: skip
        if self.fast_unsafe:
            command.append("--no-sync")
        code, out = self._run(command, timeout=300)
        if code != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedPostgresError(f"initdb failed ({self._binaries.bin_dir}):\n{out.strip()}")
        self._ensure_include(staging)
        os.rename(staging, self.data_dir)
        if not self.fast_unsafe:
            dir_fd = os.open(self.cluster_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename durable
            finally:
                os.close(dir_fd)
        log.info("initialised embedded PostgreSQL %s cluster in %s", self._binaries.major, self.data_dir)

    def _ensure_include(self, data_dir: Path) -> None:
        conf = data_dir / "postgresql.conf"
        if _INCLUDE_LINE not in conf.read_text():
            with conf.open("a") as f:
                f.write(f"\n# dicomweb: settings rewritten at every start\n{_INCLUDE_LINE}\n")

    def _write_conf(self, port: int) -> None:
        socket_dir = str(self.cluster_dir)
        if len(socket_dir) + _SOCKET_NAME_MAX > _SOCKET_PATH_MAX:
            socket_dir = ""  # path too long for a unix socket: TCP on loopback only
            log.warning(
                "%s is too long for a unix socket: PostgreSQL listens on 127.0.0.1, where every local user "
                "can connect to it as its superuser; use a shorter data directory on a shared machine",
                self.cluster_dir,
            )
        self._socket_dir = socket_dir
        # TCP only where it is needed: a path too long for the socket, or a port the caller asked for
        tcp = not socket_dir or self._requested_port is not None
        durable = "off" if self.fast_unsafe else "on"
        settings = {
            "listen_addresses": _conf_string("127.0.0.1" if tcp else ""),
            "port": str(port),
            "unix_socket_directories": _conf_string(socket_dir),
            "max_connections": str(self.max_connections),
            "fsync": durable,
            "synchronous_commit": durable,
            "full_page_writes": durable,
        }
        # Throwaway test clusters (many at once on one machine) keep PostgreSQL's small defaults.
        if not self.fast_unsafe:
            settings |= memory_settings(_machine_memory(), max_connections=self.max_connections)
            settings |= shared_memory_settings(_dev_shm_size())
            settings |= self._wal_settings()
        text = "# Written by dicomweb (indexer/embedded.py) at every start; changes here are overwritten.\n"
        text += "".join(f"{key} = {value}\n" for key, value in settings.items())
        path = self.data_dir / _CONF_NAME
        path.write_text(text)
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)
        self._ensure_include(self.data_dir)

    def _wal_settings(self) -> dict[str, str]:
        """`wal_compression = lz4` where this server has it (PostgreSQL 15+ built with lz4; pgserver's
        build is not, and an unknown value would stop the server from starting, hence the probe).

        The full-page images a page's first change after each checkpoint writes are most of the WAL of
        small updates: UPS-RS claim/complete cycles wrote 14.2 kB of WAL a cycle, 11.1 kB with lz4, at
        the same CPU (docs/performance.md, "UPS-RS worklist"). Probed once per start.
        """
        if self._wal_compression is None:
            assert self._binaries is not None
            code, _ = self._run(
                [self._binaries.tool("postgres"), "-D", str(self.data_dir), "-C", "wal_compression",
                 "-c", "wal_compression=lz4"],
                timeout=30,
            )  # fmt: skip
            self._wal_compression = "lz4" if code == 0 else ""
        return {"wal_compression": self._wal_compression} if self._wal_compression else {}

    def _rotate_log(self) -> None:
        try:
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        except FileNotFoundError:
            pass

    def _log_tail(self, offset: int, limit: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(offset if offset <= size else 0, size - limit))
                return f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return "(no log written)"

    def _launch(self) -> None:
        assert self._binaries is not None
        self._rotate_log()
        attempts = 1 if self._requested_port else 3
        for attempt in range(1, attempts + 1):
            port = self._requested_port or _free_port()
            self._write_conf(port)
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            code, out = self._pg_ctl(
                ["-w", "-t", str(_START_TIMEOUT), "-l", str(self.log_path), "start"],
                new_session=True,  # Ctrl-C in a terminal must reach the archive, not the database under it
            )
            if code == 0:
                self._port = port
                return
            tail = self._log_tail(offset)
            self._stop_server()  # pg_ctl gives up waiting, but a slow server may still come up
            if attempt < attempts and "could not create any TCP/IP sockets" in tail:
                log.info("port %d was taken before PostgreSQL could bind it; retrying with another", port)
                continue
            raise EmbeddedPostgresError(
                f"PostgreSQL ({self._binaries.bin_dir}) failed to start on 127.0.0.1:{port} for cluster "
                f"{self.data_dir}:\n{out.strip()}\n--- {self.log_path} (tail) ---\n{tail}"
            )

    async def _ensure_database(self) -> None:
        assert self._port is not None
        deadline = time.monotonic() + 15
        while True:
            try:
                conn = await asyncpg.connect(self._url(self._port, "postgres"), ssl=False, timeout=5)
                break
            except (TimeoutError, OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database):
                await conn.execute(f"CREATE DATABASE {_quote_ident(self.database)}")
        finally:
            await conn.close()

    # -- shutdown

    def _postmaster_alive(self) -> bool:
        pid = self.postmaster_pid()
        if not pid or pid < 0:
            return False
        procs = _processes_in(self.data_dir)
        if procs is not None:
            return pid in procs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _stop_server(self) -> None:
        if not self._postmaster_alive():
            return
        code, out = self._pg_ctl(["-w", "-t", str(_STOP_TIMEOUT), "-m", "fast", "stop"])
        if code == 0 or not self._postmaster_alive():
            return
        # pg_ctl can fail where a signal still works, e.g. when the run-as account lost access to the
        # cluster's path while the server ran (a parent directory chmod-ed). Same effect: SIGINT is
        # PostgreSQL's fast shutdown, SIGQUIT its immediate shutdown.
        log.warning("pg_ctl stop failed (%s); signalling the postmaster directly", out.strip())
        pid = self.postmaster_pid()
        for sig, wait in ((signal.SIGINT, _STOP_TIMEOUT), (signal.SIGQUIT, 10.0)):
            if not pid or not self._postmaster_alive():
                return
            os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self._postmaster_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._postmaster_alive():
            raise EmbeddedPostgresError(f"could not stop PostgreSQL in {self.data_dir}; see {self.log_path}")

    # -- processes

    def _pg_ctl(self, args: list[str], *, new_session: bool = False) -> tuple[int, str]:
        assert self._binaries is not None
        command = [self._binaries.tool("pg_ctl"), "-D", str(self.data_dir), *args]
        return self._run(command, timeout=_START_TIMEOUT + 30, new_session=new_session)

    def _run(self, command: list[str], *, timeout: float, new_session: bool = False) -> tuple[int, str]:
        """Run a PostgreSQL tool as the run-as account; output goes to a file, not a pipe, because the
        server pg_ctl forks could otherwise inherit the pipe and keep us waiting for EOF."""
        extra = self._run_as.popen_kwargs() if self._run_as else {}
        with tempfile.TemporaryFile() as out:
            result = subprocess.run(
                command,
                cwd="/",  # the caller's cwd (e.g. /root) may be unreadable for the run-as account
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=new_session,
                check=False,
                **extra,
            )
            out.seek(0)
            return result.returncode, out.read().decode(errors="replace")
