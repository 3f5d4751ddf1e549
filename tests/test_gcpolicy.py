"""Serving processes freeze their start-up heap and collect cyclic garbage in larger steps."""

from __future__ import annotations

import gc

from dicomweb.gcpolicy import THRESHOLDS, tune_for_serving


def test_tune_for_serving_freezes_the_heap_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_for_serving()
        assert gc.get_threshold() == THRESHOLDS
        assert gc.get_freeze_count() > 1000  # the interpreter's and the test run's objects
        # cycles made afterwards are still found and freed
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
