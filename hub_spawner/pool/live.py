"""What the workers' last heartbeats said, kept in the pool's memory: per vGPU its processes and last
calls, per GPU its device facts and an hour of history.

The database keeps what placement needs (each allocation's VRAM in use); these facts change at every
heartbeat and matter only while they are fresh, so they are never written to disk.  A restarted pool
knows them again after one heartbeat of each worker.  The dashboard and the pool's metrics read them.
"""
from __future__ import annotations

import collections
import threading
import time

HISTORY_SECONDS = 3600.0  # how far back history() reaches
HISTORY_STEP = 10.0       # at most one history point per GPU this often


class LiveFacts:
    """The latest heartbeat of each worker, thread-safe.  Bodies are the validated heartbeat bodies
    (worker_api.check_heartbeat): ``vgpus`` {token hash: entry}, ``gpus`` {uuid: facts}."""

    def __init__(self):
        self._lock = threading.Lock()
        self._vgpus: dict[str, dict] = {}           # token hash -> entry, with "worker" and "time"
        self._gpus: dict[str, dict] = {}            # uuid -> facts, with "worker" and "time"
        # worker -> (token hashes of its live vGPUs, uuids of its GPUs with facts or history)
        self._by_worker: dict[str, tuple[set, set]] = {}
        self._history: dict[str, collections.deque] = {}

    def record(self, worker: str, body: dict, vgpus: set[str], gpus: set[str], now: float | None = None) -> None:
        """One heartbeat of ``worker``, kept for what the worker owns: ``vgpus`` the token hashes of its
        active allocations, ``gpus`` the uuids of its registered GPUs; anything else in the body is
        dropped, so that one worker's credential cannot fill another worker's panels, nor the pool's
        memory.  Its "vgpus" is the whole truth (a vGPU missing from it is gone); a body without
        "vgpus" or "gpus" leaves that part as it was.  A GPU it no longer has loses its history."""
        now = time.time() if now is None else now
        with self._lock:
            hashes, uuids = self._by_worker.setdefault(worker, (set(), set()))
            self._drop_gpus(uuids - gpus)
            uuids &= gpus
            if "vgpus" in body:
                for h in hashes:
                    self._vgpus.pop(h, None)
                hashes.clear()
                for h, entry in body["vgpus"].items():
                    if h in vgpus:
                        self._vgpus[h] = {**entry, "worker": worker, "time": now}
                        hashes.add(h)
            if "gpus" in body:
                for uuid, facts in body["gpus"].items():
                    if uuid not in gpus:
                        continue
                    self._gpus[uuid] = {**facts, "worker": worker, "time": now}
                    uuids.add(uuid)
                    points = self._history.setdefault(uuid, collections.deque())
                    if not points or now - points[-1][0] >= HISTORY_STEP:
                        points.append((now, facts.get("memory_used"), facts.get("utilization")))
                    while points and points[0][0] < now - HISTORY_SECONDS:
                        points.popleft()

    def forget(self, worker: str, gpus: set[str] | None = None) -> None:
        """A worker marked lost, or registered again with other GPUs: its vGPUs and GPUs are no longer
        live.  The history of its GPUs stays, but for those not in ``gpus`` (its registered GPUs now;
        None: all of them stay)."""
        with self._lock:
            hashes, uuids = self._by_worker.get(worker, (set(), set()))
            for h in hashes:
                self._vgpus.pop(h, None)
            hashes.clear()
            for u in uuids:
                self._gpus.pop(u, None)
            if gpus is not None:
                self._drop_gpus(uuids - gpus)
                uuids &= gpus

    def _drop_gpus(self, uuids: set[str]) -> None:
        for u in uuids:
            self._gpus.pop(u, None)
            self._history.pop(u, None)

    def vgpu(self, token_hash: str) -> dict | None:
        """The last reported entry of a vGPU (as in the heartbeat: "used" and "overhead" apart, its
        processes and last calls) with "worker" and "time" (epoch s of the heartbeat), or None."""
        with self._lock:
            entry = self._vgpus.get(token_hash)
            return dict(entry) if entry else None

    def gpu(self, uuid: str) -> dict | None:
        """The latest facts of a GPU (memory_total, memory_used, utilization, temperature, power,
        sm_clock, emulated) with "worker" and "time", or None."""
        with self._lock:
            facts = self._gpus.get(uuid)
            return dict(facts) if facts else None

    def history(self, uuid: str, now: float | None = None) -> list[tuple[float, int | None, float | None]]:
        """(epoch s, memory used in bytes, utilization 0..1) over the last hour, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            return [p for p in self._history.get(uuid, ()) if p[0] >= now - HISTORY_SECONDS]
