"""Cyclic garbage collector settings for `dicomweb serve` worker processes.

With CPython's defaults (700, 10, 10) a STOW worker spent ~0.19 ms per stored instance in the collector
(measured with gc.callbacks: ~16% of its CPU): each parsed instance allocates hundreds of dicts and lists,
which trigger young collections every few instances, and full collections walk the whole heap, most of it
import-time objects (pydicom's dictionaries, the app) that never become garbage. Freezing the heap as it
is after start-up takes those out of every collection, and a larger first threshold lets an instance's
short-lived containers die by reference counting before a collection sees them (docs/performance.md,
"STOW-RS ingest"). Garbage in cycles is still collected, only in larger steps.
"""

from __future__ import annotations

import gc

# Young-generation threshold (net container allocations) and the older generations' ratios.
THRESHOLDS = (20_000, 20, 20)


def tune_for_serving() -> None:
    """Freeze what exists now (call once the app is built) and raise the collection thresholds."""
    gc.collect()  # what is garbage already should not be frozen
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
