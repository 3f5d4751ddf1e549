"""Settings from DICOMWEB_* environment variables, overridable by command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

DEFAULT_PARTITION = "Microsoft.Default"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("./dicomweb-data")
    # external services; None means the embedded default (private PostgreSQL, local blob directory)
    database_url: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # S3 Object Lock: objects written under a COMPLIANCE retention of this many days (0: none); the bucket
    # must have Object Lock enabled (storage/s3.py, docs/integrity.md)
    s3_object_lock_days: int = 0
    # scheme://host[:port] that clients reach this archive at, when a proxy rewrites it (URLs in responses)
    public_url: str | None = None
    # origins a browser viewer may call from ("https://viewer.example.org,http://localhost:3000" or "*");
    # None: no CORS headers, so only same-origin pages can read responses
    cors_origins: str | None = None
    # server processes; None: one per core this process may run on (the README's plain `dicomweb serve`
    # must use the machine: docs/performance.md, "Side by side with Orthanc")
    workers: int | None = None
    # PostgreSQL connections per server process. One event loop cannot keep more backends busy than this,
    # and more only contend in PostgreSQL: UPS-RS cycles cost PostgreSQL 1.13-1.44 ms of CPU with 6-8 per
    # process against 1.16-1.77 ms with 20, 8 interleaved pairs (docs/performance.md, "UPS-RS worklist")
    db_pool_size: int = 8
    qido_default_limit: int = 100
    qido_max_limit: int = 1000
    max_instance_size: int = 4 << 30  # one uploaded object; larger parts get 413
    # the largest JSON (and DICOM JSON) request body: resources, $bulkUpdate, UPS-RS work items. They are
    # parsed whole in memory, so a larger one gets 413 before it is read (dicomweb/jsonbody.py)
    max_json_body_size: int = 4 << 20
    log_level: str = "info"
    # access control (access/, docs/security.md): every route needs a credential unless this is set
    insecure_open: bool = False
    jwt_issuer: str | None = None  # bearer JWTs: required iss and aud, and an HS256 secret and/or a JWKS URL
    jwt_audience: str | None = None
    jwt_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_roles_claim: str = "roles"
    # proxies (addresses or CIDRs, comma-separated) whose X-Forwarded-For names the client in the audit log
    trusted_proxies: str | None = None
    # where "directory" destinations of exports live (their paths are relative to it); None: DATA_DIR/exports
    export_dir: Path | None = None
    # UPS-RS event queues (worklist.retention): unacknowledged events beyond this many per subscriber, or
    # older than this many hours, are dropped, and the subscriber is told on its next connection
    ups_event_queue_max: int = 10_000
    ups_event_retention_hours: int = 168
    # DIMSE listener (dimse/): its port on `host` (None or 0: none; `dicomweb serve` defaults to 11112) and
    # the AE title peers must call it by
    dimse_port: int | None = None
    dimse_ae_title: str = "DICOMWEB"
    # C-GET and C-MOVE: a pending response (PS3.4 C.4.2.3, C.4.3.3: optional) after the first C-STORE
    # sub-operation and then at most one per this many milliseconds; 0: one after every sub-operation
    dimse_pending_interval_ms: int = 200
    # HL7 v2 listener (hl7/, docs/hl7.md): its MLLP port on `host` (None or 0: none), and the partition
    # whose studies ADT messages update and where orders become work items
    hl7_port: int | None = None
    hl7_partition: str = DEFAULT_PARTITION
    # addresses and networks (CIDR), comma-separated, that may connect to it ("*": any); HL7 v2 has no
    # credentials, so the sender's address is the only one (docs/security.md)
    hl7_allowed_hosts: str = "127.0.0.1,::1"
    # the scrub (archive/scrub.py, docs/integrity.md): queued every this many hours (0: never on its own),
    # reading at most this many MB/s (0: no limit) so that it leaves the disks to requests
    scrub_interval_hours: int = 168
    scrub_rate_mb: int = 50
    # the retention sweep (retention/sweep.py, docs/retention.md): queued every this many hours (0: never);
    # it ends restore windows and deletes studies past their partition's expireAfterDays
    retention_sweep_hours: int = 1
    # background operations (indexer/operations.py): how long a claim lasts without a step's heartbeat. A
    # process that dies mid-operation hands it to another node after at most this long; a step must be
    # much shorter than it (operations' steps take well under a second)
    operation_lease_seconds: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """DICOMWEB_<FIELD> variables, then non-None overrides (the CLI's flags)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"DICOMWEB_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            if f.type in ("int", int, "int | None"):
                values[f.name] = int(raw)
            elif f.type in ("Path", Path):
                values[f.name] = Path(raw)
            elif f.type in ("bool", bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)

    def worker_count(self) -> int:
        if self.workers:
            return self.workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def connections_per_worker(self) -> int:
        """PostgreSQL connections one server process may hold: its pool, its three LISTEN connections
        (change feed, UPS-RS events, access control) and the UPS-RS status lock's."""
        return self.db_pool_size + 4

    def database_connections(self) -> int:
        """PostgreSQL connections the server's processes may hold at once, and a few for the CLI and
        migrations."""
        return self.worker_count() * self.connections_per_worker() + 10

    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir.resolve() / "blobs").as_uri()

    def to_env(self) -> dict[str, str]:
        """The settings as DICOMWEB_* variables (to hand them to uvicorn worker processes)."""
        return {
            f"DICOMWEB_{f.name.upper()}": str(v)
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None
        }
