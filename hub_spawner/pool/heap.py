"""Short pauses of the garbage collector in a long-running pool.

CPython's full collection walks every object it tracks. A pool serving 1,000 workers holds about 120,000 of
them that live as long as the workers' connections (sockets, streams, handlers, suspended coroutines, what
each worker's last heartbeat left), and a full pass over them took 55-92 ms on a 2-core machine, a few times
a minute under load: one that fell inside a lab's burst added as much to its allocations.

What survives a full pass is frozen (gc.freeze): later passes walk only what was made since, a few
milliseconds. A frozen object that later becomes garbage in a reference cycle is not freed until it is
unfrozen, so every ``unfreeze_every`` seconds everything is unfrozen and the next full pass, a long one,
frees such cycles before what survives it is frozen again: memory held by dead cycles is bounded by what
that interval makes.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("gpulab.pool")

UNFREEZE_EVERY = 600.0  # seconds between the long passes that free cycles among frozen objects


class HeapKeeper:
    """Freezes the survivors of each full collection (on the event loop, just after it), and unfreezes them
    every ``unfreeze_every`` seconds."""

    def __init__(self, loop, unfreeze_every: float = UNFREEZE_EVERY):
        self.loop = loop
        self.unfreeze_every = unfreeze_every
        self.frozen_at = time.monotonic()
        self.full_passes = 0  # full collections seen (the tests and the log read it)

    def start(self) -> None:
        """What start-up made lives as long as the pool: frozen now, and the callback installed."""
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._collected)

    def stop(self) -> None:
        if self._collected in gc.callbacks:
            gc.callbacks.remove(self._collected)

    def _collected(self, phase: str, info: dict) -> None:
        # the collector calls this in whichever thread collected, and freezing inside a collection is not
        # allowed: the loop does it next
        if phase == "stop" and info["generation"] == 2:
            self.full_passes += 1
            self.loop.call_soon_threadsafe(self._after_full_pass)

    def _after_full_pass(self) -> None:
        now = time.monotonic()
        if now - self.frozen_at >= self.unfreeze_every:
            # everything goes back to the oldest generation: the next full pass walks it all and frees dead
            # cycles; what survives that one is frozen again
            gc.unfreeze()
            self.frozen_at = now
            return
        gc.freeze()
