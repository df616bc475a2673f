"""The daemon's VRAM tier policy: idle vGPUs move to host memory, and a full GPU evicts others.

The executors move the memory (tiers.py); the daemon only decides who moves where and asks
(`registry.request_tier`: the ledger's request and a SIGUSR2 to each executor of the vGPU).

Idle policy, once a second (`Tiering.tick`): a vGPU whose idle clock is older than its QoS's
``warm_after`` goes warm (the worker's host RAM), older than ``cold_after`` cold (files in the spool
directory); 0 is never.  The idle clock is the last call of any of its processes that needed its
device memory (their ledger slots' ``last_touch``; a process that never touched counts from its
start), a restore asked by hand, or the ``since`` of an idle hint from outside (the Jupyter server
saying the kernel is idle) when no process touched after the hint came.  The policy only moves
colder: a touch restores (the executor does it), and it asks for one tier once per idle spell.
The decision is `decide`, a pure function of plain records, so tests give it their own clock.

Eviction (`Tiering.request`, answered in a thread of its own): an executor whose GPU is full (or a
native process whose driver says so, or a native thaw short of room: native.py) asks
for ``need`` bytes there, and may say how long it waits (``wait``, seconds).  It counts as waiting
for room from the moment its request arrives, so it is never a victim while it cannot move.  One
eviction runs at a time per GPU.  Victims are the other active vGPUs holding memory on that GPU
(their executors' rows on the tier board, their native processes' slots until frozen: `held_on`)
whose QoS is not above the requester's and that are not themselves waiting for room, lowest QoS
first, then least recently active; each goes warm while the warm budget has room for it, else
cold (a native process's checkpoint stays in host memory: a vGPU whose native processes the budget
cannot hold is passed over), until the bytes they hold there cover the shortfall.  The answer comes within
``eviction_wait`` seconds of the request's arrival (or its ``wait``, if shorter): ``{"freed": n}``,
or ``{"refused": cause}`` at once when nothing can move.  The cause alone: the executor says the
GPU's figures, fails the call with CUDA_ERROR_OUT_OF_MEMORY and the sentence.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import NamedTuple

from ..client.units import format_size
from .pacing import QOS_RANK
from .tierboard import MAX_GPUS

log = logging.getLogger("gpulab.worker.tiers")

HOT, WARM, COLD = 0, 1, 2
TIER_WORDS = {HOT: "hot", WARM: "warm", COLD: "cold"}
WHERE = {WARM: "the worker's host RAM (warm)", COLD: "files on the worker's disk (cold)"}
EVICT_POLL = 0.005  # seconds between two looks at the board while victims move out


class TierState(NamedTuple):
    """What the policy knows of one vGPU (gathered by `VGPURegistry.tier_state`)."""

    id: str
    qos: str
    touches: list  # each live process's last call that needed device memory (wall clock; 0: none yet)
    started: list  # when each live process started (wall clock)
    hint: tuple    # the idle hint: (since, received); (0, 0) when none came
    tiers: tuple   # bytes (hot, warm, cold) over its processes
    asked: tuple   # the last tier asked of it (0 hot, 1 warm, 2 cold) and when (wall clock; 0: never)


def last_activity(s: TierState) -> float | None:
    """When the vGPU last did something: its latest touch (else its first process's start), or a
    restore asked by hand after that; None with no process."""
    touch = max(s.touches, default=0.0)
    if touch <= 0:
        touch = min(s.started, default=0.0)
    want, at = s.asked
    if want == HOT and at > touch:
        touch = at
    return touch or None


def idle_clock(s: TierState) -> float | None:
    """Since when the vGPU counts as idle (wall clock); None when nothing says (no process, no hint)."""
    touch = last_activity(s)
    since, received = s.hint
    if received > 0 and (touch is None or touch <= received):
        return since
    return touch


def tier_name(hot: int, warm: int, cold: int) -> str:
    """One word for where a vGPU's memory is: hot, warm, cold, mixed, or none with no allocation."""
    where = [name for name, n in (("hot", hot), ("warm", warm), ("cold", cold)) if n]
    if not where:
        return "none"
    return where[0] if len(where) == 1 else "mixed"


def decide(vgpus: list[TierState], now: float, warm_after: dict, cold_after: dict) -> list[tuple[str, int]]:
    """(vGPU id, tier to ask for) for each vGPU idle long enough to move colder than it is."""
    out = []
    for s in vgpus:
        hot, warm, _cold = s.tiers
        clock = idle_clock(s)
        if clock is None or not (hot or warm):
            continue
        idle = now - clock
        to_warm, to_cold = warm_after.get(s.qos) or 0, cold_after.get(s.qos) or 0
        if to_cold and idle >= to_cold:
            want = COLD
        elif to_warm and idle >= to_warm and hot:
            want = WARM
        else:
            continue
        asked, at = s.asked
        touched = last_activity(s) or 0.0
        if asked >= want and at >= touched:
            continue  # asked already in this idle spell (by the policy, an eviction or by hand)
        out.append((s.id, want))
    return out


class Tiering:
    """The idle policy and eviction over a VGPURegistry (vgpus.py) and its tier board."""

    def __init__(self, registry, warm_after: dict, cold_after: dict, eviction_wait: float):
        self.registry = registry
        self.warm_after, self.cold_after = dict(warm_after), dict(cold_after)
        self.eviction_wait = eviction_wait
        self.guard = threading.Lock()
        self.gpu_locks: dict[int, threading.Lock] = collections.defaultdict(threading.Lock)
        self.waiting: collections.Counter = collections.Counter()  # vGPU id -> its requests waiting for room

    # ------------------------------------------------------------ idle policy
    def tick(self, now: float | None = None) -> list[tuple[str, int]]:
        """Ask the vGPUs idle long enough to move colder (never waits for them); what was asked."""
        now = time.time() if now is None else now
        reg = self.registry
        with reg.lock:
            states = {v.id: reg.tier_state(v) for v in reg.table.values() if v.state == "active" and v.procs}
            for v in reg.table.values():  # a freeze the warm budget refused is asked again once it has the room
                if v.id in states and v.native and reg.native_budget_has_room(v):
                    states[v.id] = states[v.id]._replace(asked=(0, 0.0))
        asked = []
        for vid, want in decide(list(states.values()), now, self.warm_after, self.cold_after):
            if reg.request_tier(vid, want) is not None:
                asked.append((vid, want))
                clock = idle_clock(states[vid])
                log.info("vGPU %s (QoS %s) idle for %.0f s: its %s move to %s", vid, states[vid].qos,
                         now - clock, format_size(sum(states[vid].tiers[:want])), WHERE[want])
        return asked

    # --------------------------------------------------------------- eviction
    def request(self, vgpu, pid: int, message: bytes, send) -> None:
        """An executor's request for room, as it arrives (the daemon's loop calls this): counted as waiting
        at once, answered with ``send(reply)`` from a thread of its own (a wait on one GPU never delays
        another GPU's request)."""
        start = self._arrived(vgpu)

        def answer():
            try:
                try:
                    reply = self._answer(vgpu, pid, message, start)
                finally:
                    self._left(vgpu)
            except Exception as exc:
                log.exception("eviction for vGPU %s failed", vgpu.id)
                reply = _refused(f"the worker could not make room on the GPU ({exc})")
            try:
                send(reply)
            except OSError:
                pass  # the executor ended meanwhile

        threading.Thread(target=answer, name="gpulab-evict", daemon=True).start()

    def handle(self, vgpu, pid: int, message: bytes) -> bytes:
        """An executor of ``vgpu`` (pid ``pid``) found its GPU full: the JSON answer to its request (waits)."""
        start = self._arrived(vgpu)
        try:
            return self._answer(vgpu, pid, message, start)
        finally:
            self._left(vgpu)

    def _arrived(self, vgpu) -> float:
        with self.guard:
            self.waiting[vgpu.id] += 1  # while it waits, nobody evicts it for room
        return time.monotonic()

    def _left(self, vgpu) -> None:
        with self.guard:
            self.waiting[vgpu.id] -= 1
            if self.waiting[vgpu.id] <= 0:
                del self.waiting[vgpu.id]

    def _answer(self, vgpu, pid: int, message: bytes, start: float) -> bytes:
        try:
            req = json.loads(message)
            gpu, need, wait = req["gpu"], req["need"], req.get("wait", self.eviction_wait)
            if not (type(gpu) is int and type(need) is int and 0 <= gpu < MAX_GPUS and need > 0
                    and type(wait) in (int, float) and wait >= 0):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            return _refused(f"the worker did not understand this process's request for room on its GPU "
                            f"({bytes(message[:80])!r}); expected {{\"gpu\": index, \"need\": bytes}}")
        wait = min(float(wait), self.eviction_wait)
        with self.guard:
            lock = self.gpu_locks[gpu]
        if lock.acquire(timeout=max(start + wait - time.monotonic(), 0)):
            try:
                reply = self._evict(vgpu, pid, gpu, need, start, start + wait)
            finally:
                lock.release()
        else:
            reply = _refused(f"another vGPU's wait for room there took longer than {round(wait, 1):g} s")
        if b'"refused"' in reply:
            log.info("no room made on GPU %d for vGPU %s (process %d, %s): %s", gpu, vgpu.id, pid,
                     format_size(need), json.loads(reply)["refused"])
        return reply

    def _evict(self, vgpu, pid: int, gpu: int, need: int, start: float, deadline: float) -> bytes:
        reg, board = self.registry, self.registry.tierboard
        qos = vgpu.grant.get("qos") or "medium"
        rank = QOS_RANK.get(qos, 1)
        with reg.lock:
            capacity, in_use = board.capacity(gpu), board.hot_on(gpu)
            if capacity and in_use + need <= capacity:  # room came while it waited for the lock
                return _freed(capacity - in_use)
            short = in_use + need - capacity if capacity else need
            candidates, higher, waiting, pinned = [], 0, 0, 0
            for v in reg.table.values():
                if v is vgpu or v.state != "active" or not (v.rows or v.native):
                    continue
                here, everywhere = reg.held_on(v, gpu)
                if here <= 0:
                    # native memory on this GPU that a checkpoint cannot move
                    pinned += bool(reg.native_on(v, gpu))
                    continue
                their_rank = QOS_RANK.get(v.grant.get("qos") or "medium", 1)
                if their_rank > rank:
                    higher += 1
                elif self.waiting.get(v.id):
                    waiting += 1
                else:
                    candidates.append((their_rank, idle_clock(reg.tier_state(v)) or 0.0, v, here, everywhere))
            if not candidates:
                whys = []
                if higher:
                    whys.append(f"the other vGPUs there have a higher QoS than this one ({qos}) and are never moved "
                                f"for it")
                elif waiting:
                    whys.append("the other vGPUs there are waiting for room themselves")
                if pinned:
                    whys.append(f"{pinned} vGPU(s) there hold only memory that the driver's checkpoint cannot move "
                                f"(managed or shared between processes)")
                return _refused("; ".join(whys) or "no other vGPU holds memory there")
            candidates.sort(key=lambda c: (c[0], c[1]))
            room = board.warm_budget - board.warm_total()
            victims, expected, unheld = [], 0, 0
            for _rank, _clock, v, here, all_hot in candidates:
                if expected >= short:
                    break
                # a native process's checkpoint keeps its memory in host RAM, whichever tier is asked: only
                # while the warm budget has room for it
                frozen = sum(reg.native_hot_by_gpu(v, movable=True)) if v.native else 0
                if frozen > room:
                    unheld += 1
                    continue
                room -= frozen
                want = WARM if all_hot - frozen <= room else COLD
                if want == WARM:
                    room -= all_hot - frozen
                victims.append((v, want, here))
                expected += here
            if expected < short:
                why = (f"; {unheld} native vGPU(s) there cannot be frozen: the warm budget has no room for what "
                       f"their checkpoint would keep in host memory" if unheld else "")
                return _refused(f"moving every vGPU there of QoS {qos} or lower would free only "
                                f"{format_size(expected)} of the {format_size(short)} needed{why}")
        for v, want, _here in victims:
            reg.request_tier(v.id, want)
        before = sum(here for _v, _want, here in victims)
        while True:
            with reg.lock:
                left = sum(reg.held_on(v, gpu)[0] for v, _w, _h in victims)
                room = capacity - board.hot_on(gpu) if capacity else 0
            freed = max(before - left, 0)
            if left == 0 or (capacity and room >= need) or (not capacity and freed >= need):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(EVICT_POLL)
        n = freed or (room if capacity and room >= need else 0)  # nothing freed, yet room came: say so
        took = time.monotonic() - start
        moved = ", ".join(f"{v.id} -> {TIER_WORDS[want]} ({format_size(here)})" for v, want, here in victims)
        if n <= 0:
            return _refused(f"the vGPUs asked to make room ({', '.join(v.id for v, _w, _h in victims)}) "
                            f"did not move within {round(deadline - start, 1):g} s")
        log.info("eviction on GPU %d for vGPU %s (process %d, %s): %s; %s freed in %.3f s", gpu, vgpu.id, pid,
                 format_size(need), moved, format_size(freed), took)
        return _freed(n)


def _freed(n: int) -> bytes:
    return json.dumps({"freed": int(n)}).encode()


def _refused(sentence: str) -> bytes:
    return json.dumps({"refused": sentence}).encode()
