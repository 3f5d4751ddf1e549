"""The registry of known application entities: who may associate, from where, into which partition, for what.

Rows of `dimse_ae` (migration 0016). The HTTP routes (`/aes`), the `dicomweb ae` command and the DIMSE
listener all go through this module, so validation and matching rules live in one place.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from indexer.lookup import valid_partition_name

DEFAULT_PARTITION = "Microsoft.Default"


class Service:
    """What a registered AE may ask for on its associations (C-ECHO is always allowed)."""

    STORE = "store"  # C-STORE into its partition
    FIND = "find"  # C-FIND, Patient and Study Root
    RETRIEVE = "retrieve"  # C-MOVE and C-GET
    WORKLIST = "worklist"  # Modality Worklist C-FIND
    COMMITMENT = "commitment"  # Storage Commitment Push Model


SERVICES = (Service.STORE, Service.FIND, Service.RETRIEVE, Service.WORKLIST, Service.COMMITMENT)


class AeError(ValueError):
    """An AE definition the archive cannot accept (the HTTP layer answers 400)."""


@dataclass(frozen=True, slots=True)
class RegisteredAe:
    ae_title: str
    host: str
    port: int | None
    partition: str
    services: tuple[str, ...]
    description: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def may(self, service: str) -> bool:
        return service in self.services

    def to_json(self) -> dict[str, Any]:
        """Azure-style camelCase fields, as the /aes routes answer."""
        body: dict[str, Any] = {
            "aeTitle": self.ae_title,
            "host": self.host,
            "port": self.port,
            "partition": self.partition,
            "services": list(self.services),
        }
        if self.description:
            body["description"] = self.description
        if self.created_at is not None:
            body["createdDate"] = self.created_at.isoformat()
        if self.updated_at is not None:
            body["updatedDate"] = self.updated_at.isoformat()
        return body

    def address(self) -> tuple[str, int]:
        """Where the archive connects to reach this AE (C-MOVE destination, acquisition source)."""
        if self.port is None:
            raise AeError(f"AE {self.ae_title!r} has no port: the archive cannot connect to it")
        if self.host == "*" or "/" in self.host:
            raise AeError(f"AE {self.ae_title!r} has host {self.host!r}, not an address to connect to")
        return self.host, self.port


def check_ae_title(value: object, what: str = "aeTitle") -> str:
    """An AE title: 1-16 characters of the default repertoire, no backslash or control characters, not only
    spaces (PS3.5 Table 6.2-1); leading and trailing spaces are not significant."""
    if not isinstance(value, str):
        raise AeError(f"{what} must be a string")
    title = value.strip(" ")
    if not 1 <= len(title) <= 16:
        raise AeError(f"{what} {value!r} must be 1 to 16 characters (spaces around it do not count)")
    if not title.isascii() or any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in title):
        raise AeError(f"{what} {value!r} may hold only printable ASCII characters other than '\\'")
    return title


def _check_host(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AeError("host must be an address, a network (CIDR), a host name or '*'")
    host = value.strip()
    if host == "*":
        return host
    if "/" in host:
        try:
            return str(ipaddress.ip_network(host, strict=False))
        except ValueError as exc:
            raise AeError(f"host {value!r} is not a valid network: {exc}") from exc
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(
        1 <= len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() for label in labels
    ):
        raise AeError(f"host {value!r} is neither an address, a network nor a host name")
    return host.lower()


def _check_partition(value: object) -> str:
    if value is None:
        return DEFAULT_PARTITION
    if not isinstance(value, str) or not valid_partition_name(value):
        raise AeError(
            f"partition {value!r} is invalid: use 1-64 letters, digits, '_', '.', '-' (not '.' or '..')"
        )
    return value


def _check_services(value: object) -> tuple[str, ...]:
    if value is None:
        return SERVICES
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise AeError(f"services must be a list of {', '.join(SERVICES)}")
    unknown = sorted({s for s in value} - set(SERVICES))
    if unknown:
        raise AeError(f"unknown services {unknown}: choose from {', '.join(SERVICES)}")
    return tuple(s for s in SERVICES if s in value)


def _check_port(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise AeError("port must be an integer from 1 to 65535")
    return value


_FIELDS = {"aeTitle", "host", "port", "partition", "services", "description"}


def parse_ae(body: object, *, ae_title: str | None = None) -> RegisteredAe:
    """An AE from its JSON form; `ae_title` is the one in the URL (PUT), which the body may repeat."""
    if not isinstance(body, dict):
        raise AeError("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise AeError(f"unknown fields {unknown}: expected {sorted(_FIELDS)}")
    title = check_ae_title(body.get("aeTitle", ae_title))
    if ae_title is not None and title != check_ae_title(ae_title):
        raise AeError(f"aeTitle {title!r} in the body differs from {ae_title!r} in the URL")
    if "host" not in body:
        raise AeError("host is required: the address (or network, host name, '*') associations come from")
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 1024):
        raise AeError("description must be a string of at most 1024 characters")
    return RegisteredAe(
        ae_title=title,
        host=_check_host(body["host"]),
        port=_check_port(body.get("port")),
        partition=_check_partition(body.get("partition")),
        services=_check_services(body.get("services")),
        description=description,
    )


def _row(row: asyncpg.Record) -> RegisteredAe:
    return RegisteredAe(
        row["ae_title"], row["host"], row["port"], row["partition_name"], tuple(row["services"]),
        row["description"], row["created_at"], row["updated_at"],
    )  # fmt: skip


_COLUMNS = "ae_title, host, port, partition_name, services, description, created_at, updated_at"


async def create_ae(conn: asyncpg.Connection | asyncpg.Pool, ae: RegisteredAe) -> RegisteredAe | None:
    """Register an AE; None when the title is taken already."""
    row = await conn.fetchrow(
        f"""INSERT INTO dimse_ae (ae_title, host, port, partition_name, services, description)
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (ae_title) DO NOTHING RETURNING {_COLUMNS}""",
        ae.ae_title, ae.host, ae.port, ae.partition, list(ae.services), ae.description,
    )  # fmt: skip
    return _row(row) if row else None


async def put_ae(conn: asyncpg.Connection | asyncpg.Pool, ae: RegisteredAe) -> tuple[RegisteredAe, bool]:
    """Create or replace an AE; the stored AE and whether it was created."""
    row = await conn.fetchrow(
        f"""INSERT INTO dimse_ae (ae_title, host, port, partition_name, services, description)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (ae_title) DO UPDATE SET host = EXCLUDED.host, port = EXCLUDED.port,
                partition_name = EXCLUDED.partition_name, services = EXCLUDED.services,
                description = EXCLUDED.description, updated_at = now()
            RETURNING {_COLUMNS}, (xmax = 0) AS created""",
        ae.ae_title, ae.host, ae.port, ae.partition, list(ae.services), ae.description,
    )  # fmt: skip
    return _row(row), bool(row["created"])


async def get_ae(conn: asyncpg.Connection | asyncpg.Pool, ae_title: str) -> RegisteredAe | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM dimse_ae WHERE ae_title = $1", ae_title.strip(" "))
    return _row(row) if row else None


async def list_aes(conn: asyncpg.Connection | asyncpg.Pool) -> list[RegisteredAe]:
    return [_row(r) for r in await conn.fetch(f"SELECT {_COLUMNS} FROM dimse_ae ORDER BY ae_title")]


async def delete_ae(conn: asyncpg.Connection | asyncpg.Pool, ae_title: str) -> bool:
    return await conn.fetchval("DELETE FROM dimse_ae WHERE ae_title = $1 RETURNING true", ae_title.strip(" "))


def host_matches(pattern: str, address: str) -> bool:
    """Whether an association from `address` may use an AE registered with host `pattern`.

    Names are resolved at each check (a scanner's DHCP address may change; resolution is cheap next to an
    association), and every address a name has counts.
    """
    if pattern == "*":
        return True
    try:
        peer = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    if "/" in pattern:
        return peer in ipaddress.ip_network(pattern, strict=False)
    try:
        return peer == ipaddress.ip_address(pattern)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(pattern, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return any(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) == peer for info in infos)
