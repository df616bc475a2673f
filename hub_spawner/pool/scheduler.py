"""Placement of vGPU requests on GPUs: pure functions over the pool's current state.

Kept free of the database so that strategies and oversubscription are easy to reason
about and to test; the pool calls :func:`place` inside one write transaction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("compact-first", "low-load-first")


@dataclass(frozen=True)
class Request:
    vram: int                 # bytes per vGPU
    compute: int = 100        # percent of one GPU's compute per vGPU
    count: int = 1            # vGPUs (each on a different GPU of one worker)
    mode: str = "any"         # local | remote | any
    qos: str = "medium"       # low | medium | high
    node: str = ""            # the node of the user's server, for mode=local


@dataclass
class GPUState:
    uuid: str
    worker: str
    node: str
    memory: int
    used_vram: int = 0
    used_compute: int = 0
    sessions: int = 0
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    vram_oversubscription: float = 1.0     # how many times a GPU's memory may be promised
    compute_oversubscription: float = 1.0  # how many times 100% compute may be promised


class NoFit(Exception):
    """Nothing fits: the message says why, in words a user understands."""


class InvalidRequest(ValueError):
    """The request itself is impossible (not a matter of capacity)."""


def validate(req: Request) -> None:
    if req.vram <= 0:
        raise InvalidRequest("the profile asks for no GPU memory")
    if not 0 < req.compute <= 100:
        raise InvalidRequest(f"a compute share must be between 1 and 100 percent, not {req.compute}")
    if req.count < 1:
        raise InvalidRequest("a profile must ask for at least one vGPU")
    if req.mode not in ("local", "remote", "any"):
        raise InvalidRequest(f"unknown GPU mode {req.mode!r}")
    if req.qos not in ("low", "medium", "high"):
        raise InvalidRequest(f"unknown QoS {req.qos!r}")


def fits(gpu: GPUState, req: Request, limits: Limits) -> bool:
    """High QoS is never placed on promises beyond the card: oversubscription is for low and medium."""
    vram_ratio = 1.0 if req.qos == "high" else limits.vram_oversubscription
    compute_ratio = 1.0 if req.qos == "high" else limits.compute_oversubscription
    return (gpu.used_vram + req.vram <= gpu.memory * vram_ratio
            and gpu.used_compute + req.compute <= 100 * compute_ratio)


def place(req: Request, gpus: list[GPUState], strategy: str, limits: Limits) -> list[GPUState]:
    """Choose ``req.count`` GPUs of one worker, or raise NoFit with the reason."""
    validate(req)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    candidates = gpus
    if req.mode == "local" and req.node:  # no node yet (Kubernetes): the server follows the vGPU
        candidates = [g for g in gpus if g.node == req.node]
        if not candidates:
            raise NoFit("no GPU on the node of your server (a local vGPU needs one); try a remote profile")
    if not candidates:
        raise NoFit("no GPU worker is available right now")
    biggest = max(g.memory for g in candidates) * limits.vram_oversubscription
    if req.vram > biggest:
        raise NoFit(f"the profile asks for {req.vram / 2**30:.1f} GiB but the largest GPU offers "
                    f"{biggest / 2**30:.1f} GiB")
    free = [g for g in candidates if fits(g, req, limits)]
    if not free:
        raise NoFit("all GPUs are busy: no GPU has room for this profile now (try a smaller profile or later)")

    def load(g: GPUState) -> float:
        return max(g.used_vram / g.memory, g.used_compute / 100)

    # compact-first fills the busiest GPU that still fits (bin-packing); low-load-first spreads.
    order = sorted(free, key=load, reverse=(strategy == "compact-first"))
    by_worker: dict[str, list[GPUState]] = {}
    for g in order:
        by_worker.setdefault(g.worker, []).append(g)
    for g in order:
        group = by_worker[g.worker]
        if len(group) >= req.count:
            return group[:req.count]
    raise NoFit(f"no worker has {req.count} GPUs with room for this profile")
