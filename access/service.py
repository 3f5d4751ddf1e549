"""What one process needs for access control: the authenticator, the audit writer, the LISTEN connection."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import asyncpg

from access.audit import AuditLog
from access.authn import Authenticator, JWTConfig
from access.clock import Clock
from access.notify import AccessNotifier

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str | None) -> tuple[Network, ...]:
    """'10.0.0.0/8, 127.0.0.1' -> networks (proxies whose X-Forwarded-For is believed)."""
    if not text:
        return ()
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str | None:
    """The caller's address: the peer, unless it is a trusted proxy; then the right-most X-Forwarded-For
    entry that is not itself a trusted proxy (entries left of it could be forged by the client)."""
    if peer is None or not trusted or not forwarded_for or not address_within(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not address_within(hop, trusted):
            return hop[:64]
    return peer


def address_within(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether an address is in one of the networks (an IPv4-mapped IPv6 address counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


@dataclass
class AccessControl:
    clock: Clock
    authenticator: Authenticator
    audit: AuditLog
    notifier: AccessNotifier
    insecure_open: bool
    trusted_proxies: tuple[Network, ...]

    @classmethod
    def create(
        cls,
        pool: asyncpg.Pool,
        database_url: str,
        *,
        insecure_open: bool,
        jwt_config: JWTConfig | None,
        trusted_proxies: str | None = None,
        clock: Clock | None = None,
    ) -> AccessControl:
        clock = clock or Clock()
        notifier_box: list[AccessNotifier] = []
        authenticator = Authenticator(
            pool, clock, jwt_config, cache_trusted=lambda: notifier_box[0].connected.is_set()
        )
        notifier = AccessNotifier(database_url, authenticator.invalidate)
        notifier_box.append(notifier)
        return cls(clock, authenticator, AuditLog(pool), notifier, insecure_open,
                   parse_networks(trusted_proxies))  # fmt: skip

    def start(self) -> None:
        self.notifier.start()
        self.audit.start()

    async def stop(self) -> None:
        await self.audit.stop()
        await self.notifier.stop()
