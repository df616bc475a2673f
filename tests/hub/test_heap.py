"""HeapKeeper (hub_spawner/pool/heap.py): what survives a full collection is frozen, so that the next ones
walk only what was made since; every unfreeze_every seconds it is unfrozen, and a dead cycle among frozen
objects is freed by the pass after."""
import asyncio
import gc
import weakref

import pytest

from hub_spawner.pool.heap import HeapKeeper


class Node:
    """An object in a reference cycle, which only the collector can free."""

    def __init__(self):
        self.me = self


@pytest.fixture
def keeper():
    loop = asyncio.new_event_loop()
    keeper = HeapKeeper(loop, unfreeze_every=3600.0)
    keeper.start()
    yield keeper, loop
    keeper.stop()
    gc.unfreeze()
    loop.close()


def full_pass(loop) -> None:
    """A full collection, then the loop's turn (where the keeper freezes or unfreezes)."""
    gc.collect()
    loop.run_until_complete(asyncio.sleep(0))


def test_what_survives_a_full_pass_is_frozen_and_later_passes_skip_it(keeper):
    keeper, loop = keeper
    assert gc.get_freeze_count() > 1000  # start-up's objects
    made = [[i] for i in range(20000)]  # tracked objects, alive
    walked = len(gc.get_objects())  # what a full pass walks: the generations, not the frozen
    passes = keeper.full_passes
    full_pass(loop)
    assert keeper.full_passes == passes + 1
    assert walked - len(gc.get_objects()) >= 20000 and gc.get_freeze_count() >= 20000
    assert made[19999] == [19999]  # frozen objects are alive and unchanged


def test_a_dead_cycle_among_frozen_objects_is_freed_after_the_unfreeze(keeper):
    keeper, loop = keeper
    node = Node()
    gone = weakref.ref(node)
    full_pass(loop)  # node survives (referenced) and is frozen
    del node
    full_pass(loop)
    assert gone() is not None  # frozen: the collector does not look at it
    keeper.unfreeze_every = 0.0
    full_pass(loop)  # due: everything is unfrozen after this pass
    assert gc.get_freeze_count() == 0
    full_pass(loop)  # the long pass frees the cycle, and what survives is frozen again
    assert gone() is None
    keeper.unfreeze_every = 3600.0
    full_pass(loop)
    assert gc.get_freeze_count() > 1000
