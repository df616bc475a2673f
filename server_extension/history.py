"""Usage history: a ring of samples per vGPU, so a panel opened later draws its chart at once.

A sample is taken whenever the server refreshes from the worker (vgpu_state.py), never by asking
the worker once more."""
from __future__ import annotations

from collections import deque

FIELDS = ("used", "overhead", "quota", "share", "share_measured")


class History:
    """The last ``length`` samples of each vGPU, oldest first."""

    def __init__(self, length: int):
        self.length = length
        self.rings: dict[str, deque] = {}

    def add(self, t: float, vgpus: list[dict]) -> None:
        """One sample of each vGPU in the worker's answer at time ``t``; vGPUs no longer there are dropped."""
        seen = set()
        for v in vgpus:
            vid = str(v["id"])
            seen.add(vid)
            tiers = v.get("tiers") or {}
            sample = {"t": round(t, 3), **{k: tiers.get(k, 0) for k in ("hot", "warm", "cold")},
                      **{k: v.get(k) for k in FIELDS}}
            self.rings.setdefault(vid, deque(maxlen=self.length)).append(sample)
        for vid in set(self.rings) - seen:
            del self.rings[vid]

    def samples(self, vgpu_id: str) -> list[dict]:
        return list(self.rings.get(str(vgpu_id), ()))
