"""Session settings of a serving process's PostgreSQL connections: a node that dies with its machine, or is
cut off from the database, must not keep its locks for hours.

Transactions of one node hold locks that every other node waits for: an operation step holds its operation
row for the whole step (other nodes' claims skip it), a change feed append holds the feed's counter row
until its commit (every writer of every node queues behind it). When only the process dies, its machine's
kernel closes the socket and PostgreSQL rolls back at once. When the machine loses power or the network,
nothing reaches PostgreSQL: the backend waits for the client's next command, locks held, until TCP
keepalive gives up, after more than two hours with the operating system's defaults. With these settings
the backend probes a silent client after 30 s, every 10 s, and drops it after 3 unanswered probes, so a
dead node's transaction is rolled back about a minute after its last packet, its locks are free, and its
operation's lease can run out and be resumed by another node. A live client's kernel answers the probes
whatever its process is doing, so a slow or paused node is never dropped.

PostgreSQL applies them to TCP connections only; on a Unix socket the client is on the same machine.
"""

from __future__ import annotations

DEAD_CLIENT_SETTINGS: dict[str, str] = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


def server_settings() -> dict[str, str]:
    """A fresh copy for asyncpg's `server_settings` (asyncpg keeps the mapping it is given)."""
    return dict(DEAD_CLIENT_SETTINGS)
