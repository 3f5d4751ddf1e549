"""What every message handler gets and gives: the partition its changes go to, and what it did."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Target:
    """The partition of the listener (docs/hl7.md, "Partition"): its name, its key (None while it does not
    exist), and how to create it (a new order creates it, as a first STOW does)."""

    name: str
    key: int | None
    create: Callable[[], Awaitable[int]]

    async def ensure(self) -> int:
        if self.key is None:
            self.key = await self.create()
        return self.key


@dataclass
class Outcome:
    """What a message did: the text of its ACK and the result recorded with it."""

    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    operations: int = 0  # operations queued (the runner is woken after commit)
