"""The process memory policies of common.memory."""

from __future__ import annotations

import gc

import pytest

from common.memory import settle_collector


@pytest.fixture
def collector():
    """Restore the collector as it was (the test process goes on)."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_collector_takes_what_lives_out_of_every_collection(collector) -> None:
    long_lived = [{"kept": [i]} for i in range(1000)]  # tracked (a list inside)
    frozen = settle_collector(young=5000)
    assert frozen >= len(long_lived)
    scanned = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
    assert not any(id(d) in scanned for d in long_lived)  # a full collection no longer walks them
    assert gc.get_threshold()[0] == 5000
    young = [{"new": [i]} for i in range(10)]  # what comes later is collected as before
    assert id(young[0]) in {id(o) for g in range(3) for o in gc.get_objects(generation=g)}


def test_settle_collector_collects_garbage_before_freezing(collector) -> None:
    class Cycle:
        pass

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    del a, b
    settle_collector()
    assert not any(isinstance(o, Cycle) for o in gc.get_objects())  # freed, not frozen for ever
