"""A vGPU as text: the tables and phrases `gpulab vgpu` prints and the kernel's `%vgpu` shows.

Both read the same control-API answers (gpu_worker/client/control.py), so one place says how a
size, a tier or a trace record reads; the command and the magics only choose what to show."""
from __future__ import annotations

import datetime

from .control import TIER_WAIT
from .units import format_size

TRACE_HEADER = ["TIME", "PID", "FUNCTION", "DURATION", "BYTES", "RESULT"]
PROCESS_HEADER = ["PID", "CLIENT PID", "VRAM", "OVERHEAD", "CALLS", "KERNELS", "THROTTLED", "WAITING", "STARTED"]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def size(n) -> str:
    return "-" if n is None else format_size(int(n))


def short_gpus(uuids) -> str:
    return ",".join(u[:12] for u in uuids or []) or "-"


def clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def vram(v: dict) -> str:
    charged = (v.get("used") or 0) + (v.get("overhead") or 0)
    return f"{size(charged)} / {size(v.get('quota')) if v.get('quota') is not None else 'whole GPU'}"


def tier_bytes(v: dict, tier: str) -> str:
    return size((v.get("tiers") or {}).get(tier, 0))


def tiers(v: dict) -> str:
    """Where its memory is: "mixed: 150.0 MiB hot, 75.0 MiB warm, 75.0 MiB cold"."""
    return f"{v.get('tier', '-')}: " + ", ".join(f"{tier_bytes(v, t)} {t}" for t in ("hot", "warm", "cold"))


def moved(v: dict, action: str = "", took: float | None = None) -> str:
    """What an offload or restore left: the vGPU's tiers ("... (offload took 0.12 s)" with ``took``), or
    that the worker stopped waiting for its processes (``done`` false in the answer)."""
    if not v.get("done", True):
        return (f"vGPU {v['id']}: asked, but its processes have not all acted within {TIER_WAIT} s (one may be "
                f"in a long call); it is {tiers(v)}")
    return f"vGPU {v['id']} is {tiers(v)}" + ("" if took is None else f" ({action} took {took:.2f} s)")


def moves(v: dict) -> str:
    m = v.get("moves") or {}
    return (f"{m.get('offloads', 0)} offloads ({size(m.get('bytes_offloaded', 0))} in "
            f"{seconds(m.get('offload_seconds', 0))}), {m.get('restores', 0)} restores "
            f"({size(m.get('bytes_restored', 0))} in {seconds(m.get('restore_seconds', 0))}), "
            f"{m.get('failures', 0)} failed")


def seconds(t) -> str:
    return "-" if t is None else f"{t:.2f} s"


def pct(p) -> str:
    return "-" if p is None else f"{p:g}%"


def compute(v: dict) -> str:
    """Its share, whether it may burst, and what it used lately: "25% (bursts), measured 31.5% over 10 s"."""
    share = v.get("share", v.get("compute"))
    if share is None:
        return "-"
    burst = {True: " (may burst into idle time)", False: " (no bursting)"}.get(v.get("burst"), "")
    text = f"{share:g}% of a GPU{burst}"
    if v.get("share_measured") is not None:
        text += f", measured {pct(v['share_measured'])} over the last 10 s"
    return text


def gpu_models(v: dict, gpus: list[dict] | None) -> str:
    """The vGPU's GPUs by model, "NVIDIA H100 80GB HBM3 (GPU-1a2b3c4d5e6f)"; uuids alone without `gpus`."""
    by_uuid = {g.get("uuid"): g for g in gpus or []}
    names = []
    for u in v.get("gpus") or []:
        g = by_uuid.get(u)
        names.append(f"{g.get('model', '?')} ({u[:12]})" if g else u)
    return ", ".join(names) or "-"


def describe(v: dict, gpus: list[dict] | None = None, me: int | None = None) -> str:
    """One vGPU in full: its grant, VRAM, tiers and moves, compute, counters, then its processes
    (the one whose client pid is `me` marked as "this kernel")."""
    lines = [("vGPU", str(v["id"])), ("user", v.get("user") or "-"),
             ("profile", f"{v.get('profile') or '-'} (QoS {v.get('qos') or '-'})"),
             ("state", v.get("state", "-") + (f": {v['reason']}" if v.get("reason") else "")),
             ("GPUs", gpu_models(v, gpus)),
             ("compute", compute(v)),
             ("kernels", f"{seconds(v.get('kernel_time'))} of GPU time; throttled "
                         f"{seconds(v.get('throttled_time'))} waiting for its share, "
                         f"{v.get('queue_depth', '-')} process(es) waiting now"),
             ("VRAM", f"{vram(v)} (allocations {size(v.get('used', 0))}, context overhead "
                      f"{size(v.get('overhead', 0))})"),
             ("tiers", tiers(v) + (f"; idle {v['idle_seconds']:.0f} s" if v.get("idle_seconds") is not None
                                   else "")),
             ("moves", moves(v)),
             ("calls", f"{v.get('calls', 0)} ({v.get('launches', 0)} launches)"),
             ("copied", f"{size(v.get('bytes_in', 0))} to the device, {size(v.get('bytes_out', 0))} from it"),
             ("errors", ", ".join(f"{k} x{n}" for k, n in sorted((v.get("errors") or {}).items())) or "none")]
    text = "\n".join(f"{k + ':':<9} {value}" for k, value in lines)
    procs = v.get("processes") or []
    if procs:
        text += "\n\n" + table(process_rows(procs, me), PROCESS_HEADER)
    return text


def process_rows(procs: list[dict], me: int | None = None) -> list[list[str]]:
    def client(p):
        return str(p.get("client_pid", "-")) + (" (this kernel)" if me and p.get("client_pid") == me else "")

    return [[str(p["pid"]), client(p), size(p.get("used", 0)), size(p.get("overhead", 0)), str(p.get("calls", 0)),
             seconds(p.get("kernel_time")), seconds(p.get("throttled_time")),
             {True: "yes", False: "no"}.get(p.get("waiting"), "-"), clock(p["started"]) if p.get("started") else "-"]
            for p in procs]


def trace_rows(records: list[dict]) -> list[list[str]]:
    return [[clock(r["time"]), str(r["pid"]), r["function"], f"{r['duration'] * 1e6:.0f} us",
             size(r["bytes"]) if r.get("bytes") else "-", r.get("error") or ("CUDA_SUCCESS" if not r["result"]
                                                                              else str(r["result"]))]
            for r in records]
