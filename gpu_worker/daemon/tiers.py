"""(placeholder until the tier store lands) An executor's VRAM tiers: see /tmp/tier_spec.md."""
from __future__ import annotations


class TierStore:
    def __init__(self, backend, slot, board, row, gpus, spool, evict_sock):
        self.backend, self.slot, self.board, self.row = backend, slot, board, row
        self.gpus, self.spool, self.evict_sock = gpus, spool, evict_sock
        self.off = False
