"""The DIMSE services the listener offers: each module adds its presentation contexts and its handlers.

A handler takes the pynetdicom event and the Gateway; the modules are thin adapters over the archive's
services (ingest, the QIDO compiler, the blob store, the worklist), as the HTTP routes are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pynetdicom import AE

from dimse import commitment, find, mwl, retrieve, storescp
from dimse.gateway import Gateway

# each: register(ae, gateway) -> [(event, handler, [gateway])], after adding its supported contexts
_MODULES: list[Callable[[AE, Gateway], list[tuple[Any, ...]]]] = [
    storescp.register,
    find.register,
    mwl.register,
    commitment.register,
    retrieve.register,
]


def register(ae: AE, gateway: Gateway) -> list[tuple[Any, ...]]:
    handlers: list[tuple[Any, ...]] = []
    for module_register in _MODULES:
        handlers.extend(module_register(ae, gateway))
    return handlers
