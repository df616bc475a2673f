"""Placement of vGPU requests on GPUs: pure functions over the pool's current state.

Kept free of the database so that strategies and oversubscription are easy to reason
about and to test; the pool calls :func:`place` inside one write transaction.  When
nothing fits, :class:`NoFit` names the constraint that failed and its numbers, so the
spawn form and the spawn error can tell a user what is short and what to do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

STRATEGIES = ("compact-first", "low-load-first")
# Requests one availability call may ask about: each costs up to 100 trial placements on the pool's
# event loop.  The spawn form asks once per distinct GPU request and splits longer lists (mixin.py).
MAX_AVAILABILITY_REQUESTS = 100


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
    worker_status: str = "up"  # up | lost | gone: such a worker's GPUs take nothing, but explain a failure
    last_seen: float = 0.0     # the worker's last heartbeat (seconds since the epoch)


@dataclass(frozen=True)
class Limits:
    vram_oversubscription: float = 1.0     # how many times a GPU's memory may be promised
    compute_oversubscription: float = 1.0  # how many times 100% compute may be promised


class NoFit(Exception):
    """Nothing fits.  ``constraint`` (no-workers, lost, node, size, memory, compute or count) names
    what failed, ``need`` and ``free`` its numbers (bytes, percent or GPUs); ``why`` is a phrase for
    a profile's "Full: ..." line and ``str()`` the sentence a user reads when a spawn fails, with
    what to do about it."""

    def __init__(self, constraint: str, why: str, advice: str, need: float | None = None,
                 free: float | None = None):
        self.constraint, self.why, self.advice, self.need, self.free = constraint, why, advice, need, free
        super().__init__(f"{why[:1].upper()}{why[1:]}. {advice}.")

    def to_json(self) -> dict:
        return {"constraint": self.constraint, "reason": self.why, "message": str(self),
                "need": self.need, "free": self.free}


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


def ratios(req: Request, limits: Limits) -> tuple[float, float]:
    """How many times memory and compute may be promised to this request.  High QoS is never placed
    on promises beyond the card: oversubscription is for low and medium."""
    if req.qos == "high":
        return 1.0, 1.0
    return limits.vram_oversubscription, limits.compute_oversubscription


def free_vram(gpu: GPUState, req: Request, limits: Limits) -> float:
    """Bytes that may still be promised on ``gpu`` to this request."""
    return gpu.memory * ratios(req, limits)[0] - gpu.used_vram


def free_compute(gpu: GPUState, req: Request, limits: Limits) -> float:
    """Percent of compute that may still be promised on ``gpu`` to this request."""
    return 100 * ratios(req, limits)[1] - gpu.used_compute


def fits(gpu: GPUState, req: Request, limits: Limits) -> bool:
    return (big_enough(gpu, req) and free_vram(gpu, req, limits) >= req.vram
            and free_compute(gpu, req, limits) >= req.compute)


def big_enough(gpu: GPUState, req: Request) -> bool:
    """One vGPU never holds more than its GPU's memory: oversubscription promises a GPU's memory to
    several vGPUs, never more of it to one (its worker refuses such a quota at grant)."""
    return req.vram <= gpu.memory


def gib(nbytes: float) -> str:
    """Sizes as a person writes them: 8 GiB, 3.5 GiB, 0.25 GiB."""
    return f"{round(max(nbytes, 0) / 2**30, 2):g} GiB"


def place(req: Request, gpus: list[GPUState], strategy: str, limits: Limits) -> list[GPUState]:
    """Choose ``req.count`` GPUs of one live worker, or raise NoFit naming the constraint that failed."""
    validate(req)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    candidates = gpus
    local = req.mode == "local" and bool(req.node)  # no node yet (Kubernetes): the server follows the vGPU
    if local:
        candidates = [g for g in gpus if g.node == req.node]
        if not candidates:
            raise NoFit("node", f"no GPU worker runs on the node of your server ({req.node}), and this "
                        "profile needs a GPU on that node", "Pick a remote profile or ask your hub admin")
    up = [g for g in candidates if g.worker_status == "up"]
    if not up:
        lost = [g for g in candidates if g.worker_status != "up"]  # lost, or gone (its pod)
        if not lost:
            raise NoFit("no-workers", "no GPU worker has registered with this hub yet",
                        "Pick a profile without a GPU, or try again later")
        last = max(lost, key=lambda g: g.last_seen)
        where = "the only GPU worker on the node of your server" if local else "no other GPU worker is up"
        raise NoFit("lost", f"GPU worker {last.worker} stopped responding at "
                    f"{time.strftime('%H:%M', time.localtime(last.last_seen))} and {where}",
                    "Try again in a few minutes; if this goes on, tell your hub admin")
    biggest = max(g.memory for g in up)
    if req.vram > biggest:
        raise NoFit("size", f"this profile asks for {gib(req.vram)} of GPU memory but the largest GPU here "
                    f"offers {gib(biggest)}", "Pick a smaller memory option", need=req.vram, free=biggest)
    per_worker: dict[str, int] = {}
    for g in up:
        per_worker[g.worker] = per_worker.get(g.worker, 0) + 1
    if req.count > max(per_worker.values()):
        raise NoFit("count", f"this profile asks for {req.count} GPUs on one worker but no worker here has "
                    f"more than {max(per_worker.values())}", "Pick a profile with fewer GPUs",
                    need=req.count, free=max(per_worker.values()))
    free = [g for g in up if fits(g, req, limits)]
    if not free:
        roomy = [g for g in up if big_enough(g, req) and free_vram(g, req, limits) >= req.vram]
        if not roomy:
            most = max(0, max(free_vram(g, req, limits) for g in up if big_enough(g, req)))
            raise NoFit("memory", f"no GPU has {gib(req.vram)} of free memory right now (the most free is "
                        f"{gib(most)})", "Pick a smaller memory option or try again later",
                        need=req.vram, free=most)
        most = max(0, max(free_compute(g, req, limits) for g in roomy))
        raise NoFit("compute", f"all GPUs' compute is promised: your profile needs {req.compute}% and the most "
                    f"free is {most:g}%", "Pick a profile with a smaller compute share or try again later",
                    need=req.compute, free=most)

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
    most = max(len(group) for group in by_worker.values())
    raise NoFit("count", f"this profile needs {req.count} GPUs with room on one worker and the most any worker "
                f"has free right now is {most}", "Try again later", need=req.count, free=most)
