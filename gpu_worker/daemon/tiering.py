"""(placeholder until the daemon's tier policy lands): see /tmp/tier_spec.md."""
from __future__ import annotations

import json


class Tiering:
    def __init__(self, registry, warm_after, cold_after, eviction_wait):
        self.registry = registry

    def tick(self) -> None:
        pass

    def handle(self, vgpu, pid, message: bytes) -> bytes:
        return json.dumps({"refused": "not yet"}).encode()
