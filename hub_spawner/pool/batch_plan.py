"""Placing a batch of one-GPU vGPUs from one read of the pool's GPUs.

A lab's first minute brings hundreds of requests at once (placer.py hands them over together).  Placed one
by one, each costs the database a statement and a round trip (on PostgreSQL about 1 ms: most of a
placement).  A plan reads the GPUs at the front of the strategy's order once, places in memory with
scheduler.fits in that order, and writes each GPU's promise once.  It answers what placing one by one
would, or None when what it read cannot tell (a GPU beyond what it read might come first, or nothing it
read fits): the caller then writes what the plan placed (flush) and places the rest one by one.
"""
from __future__ import annotations

import bisect
import functools

from sqlalchemy import Float, bindparam, select

from .db import GPU, Worker
from .scheduler import GPUState, Limits, Request, fits, ratios

SPARE = 8  # GPUs read beyond one per request


class BatchPlan:
    """The GPUs a batch may go on, as read inside the placement lock's transaction on ``conn``."""

    def __init__(self, conn, strategy: str, limits: Limits, requests: list[Request]):
        self.strategy, self.limits = strategy, limits
        self.compact = strategy == "compact-first"
        # a GPU any of them fits is below the larger of its ratios (allocations.fitting_gpus says why)
        full = max(max(ratios(r, limits)) for r in requests)
        wanted = len(requests) + SPARE
        rows = conn.execute(front_of(strategy), {"full": float(full), "wanted": wanted}).all()
        # kept in the strategy's order as placing here changes their loads: a request takes the first that
        # fits, mostly at the front (a batch of 200 looked at all 208 GPUs read for each: most of its time)
        self.gpus = sorted((GPUState(uuid, worker, "", memory, vram, compute, sessions)
                            for uuid, worker, memory, vram, compute, sessions in rows), key=self.order)
        # GPUs not read come after the last one read, in the strategy's order: None when all were read
        self.last = load(self.gpus[-1]) if len(rows) == wanted else None
        self.changed: set[str] = set()
        self.pending: dict[str, list[int]] = {}  # uuid -> [vram, compute, sessions] promised here

    def take(self, req: Request) -> tuple[str, str] | None:
        """(uuid, worker) of the GPU ``req`` (one GPU, any node) goes on, promised here; None when the
        database must be asked."""
        at = next((i for i, g in enumerate(self.gpus) if fits(g, req, self.limits)), None)
        if at is None:
            return None
        g = self.gpus[at]
        # compact-first: a GPU placed on here only moves forward, past every GPU not read.
        # low-load-first: it moves back; one that reached the last read load may follow GPUs not read
        if not self.compact and self.last is not None and g.uuid in self.changed and load(g) >= self.last:
            return None
        del self.gpus[at]
        g.used_vram += req.vram
        g.used_compute += req.compute
        g.sessions += 1
        bisect.insort(self.gpus, g, key=self.order)
        self.changed.add(g.uuid)
        promise = self.pending.setdefault(g.uuid, [0, 0, 0])
        promise[0] += req.vram
        promise[1] += req.compute
        promise[2] += 1
        return g.uuid, g.worker

    def order(self, g: GPUState) -> tuple[float, str]:
        """A GPU's place in the strategy's order: compact-first the busiest first, low-load-first the
        idlest; uuid breaks ties (scheduler.place's order)."""
        return (-load(g) if self.compact else load(g), g.uuid)

    def flush(self, conn, promise_statement) -> None:
        """Write what was promised here, a row per GPU in uuid order (as every writer of several GPUs)."""
        if self.pending:
            conn.execute(promise_statement, [{"gpu": u, "vram": v, "compute": c, "sessions": n}
                                             for u, (v, c, n) in sorted(self.pending.items())])
        self.pending = {}


def load(g: GPUState) -> float:
    """scheduler.place's load of a GPU."""
    return max(g.used_vram / g.memory, g.used_compute / 100)


def live_gpus_in_order(strategy: str, *columns):
    """``columns`` of the GPUs of live workers below load ``full`` (a parameter), in the strategy's order:
    its index (ix_gpus_busiest or ix_gpus_idlest), then uuid.  What allocations.fitting_gpus narrows to
    one request and front_of cuts short."""
    g, w = GPU.__table__.c, Worker.__table__.c
    return (select(*columns).join(Worker.__table__, w.name == g.worker_name)
            .where(g.load < bindparam("full", type_=Float), w.status == "up")
            .order_by(g.load.desc() if strategy == "compact-first" else g.load.asc(), g.uuid))


@functools.lru_cache(maxsize=None)
def front_of(strategy: str):
    """The first ``wanted`` of live_gpus_in_order, with their promised figures."""
    g = GPU.__table__.c
    return live_gpus_in_order(strategy, g.uuid, g.worker_name, g.memory, g.promised_vram, g.promised_compute,
                              g.sessions).limit(bindparam("wanted"))
