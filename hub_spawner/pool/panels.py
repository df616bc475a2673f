"""What the dashboard draws per GPU and per vGPU, from the book and the workers' heartbeats.

Pure functions from figures to figures: a GPU's VRAM bar (one segment per vGPU placed on it: its
used bytes, its processes' context overhead and the rest of its quota; then the memory nobody was
promised), the geometry of its last-hour chart (inline SVG, no script), and a vGPU's rows (usage,
its compute share beside the share measured, time throttled and processes waiting; its memory's tier;
processes, last calls).  ``live`` is the pool's LiveFacts (live.py): the latest heartbeat's ``vgpu(token_hash)`` and
``gpu(uuid)`` entries and a GPU's ``history(uuid)`` of ``(epoch, memory_used, utilization)``; without
a report a figure is shown as unknown, never as 0.
"""
from __future__ import annotations

from gpu_worker.client.units import format_size

HOUR = 3600.0
CHART_W, CHART_H = 600, 120  # the SVG's user units; it scales to the page's width


def percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 3) if whole > 0 else 0.0


def vram_bar(gpu: dict, allocations: list, live) -> dict:
    """One GPU's VRAM bar: a group per vGPU placed on it (its used bytes, its processes' context overhead,
    the rest of its quota), then the memory nobody was promised.  The bar spans the GPU's memory, or what
    was promised on it when that is more (oversubscription): then a mark shows where the memory ends.  A
    vGPU on several GPUs is drawn on each with its figures split evenly (the heartbeat reports its total)."""
    memory = gpu["memory"]
    groups, promised = [], 0
    for a in allocations:
        facts = live.vgpu(a.token_hash) if live else None
        label = f"vGPU {a.id} · {a.user}"
        parts = []
        if facts is not None:
            parts = [("used", facts.get("used", 0) // a.count, "in use"),
                     ("overhead", facts.get("overhead", 0) // a.count, "context overhead")]
        held = sum(n for _, n, _ in parts)
        parts.append(("reserved", max(0, a.vram - held), f"of its {format_size(a.vram)} quota not in use"
                      + ("" if facts is not None else " (no report from its worker yet)")))
        size = max(a.vram, held)
        promised += size
        groups.append({"vgpu": a.id, "label": label, "bytes": size, "quota": format_size(a.vram),
                       "reported": facts is not None,
                       **{kind: format_size(n) for kind, n, _ in parts},
                       "segments": [{"kind": kind, "bytes": n, "size": format_size(n), "width": percent(n, size),
                                     "title": f"{label}: {format_size(n)} {what}"} for kind, n, what in parts if n]})
    free = max(0, memory - promised)
    scale = max(memory, promised)
    for g in groups:
        g["width"] = percent(g["bytes"], scale)
    return {"vgpus": groups, "free": free, "free_size": format_size(free), "free_width": percent(free, scale),
            "memory": format_size(memory), "promised": format_size(promised),
            "oversubscribed": promised > memory, "memory_mark": percent(memory, scale),
            "ratio": f"{promised / memory:.2f}×" if memory else ""}


def history_chart(points: list, memory_total: int, now: float) -> dict:
    """Polylines of the last hour: memory used (of ``memory_total``) and utilization (0..1), x from an hour
    ago to now.  A sample without a figure (null) breaks its line rather than drawing a false 0."""
    lines: dict[str, list[list[str]]] = {"memory": [[]], "utilization": [[]]}
    shown = 0
    for t, used, util in points:
        if t < now - HOUR or t > now:
            continue
        shown += 1
        x = round((t - (now - HOUR)) / HOUR * CHART_W, 1)
        for name, value, whole in (("memory", used, memory_total), ("utilization", util, 1.0)):
            if value is None or not whole:
                if lines[name][-1]:
                    lines[name].append([])
                continue
            y = round(CHART_H - min(value / whole, 1.0) * CHART_H, 1)
            lines[name][-1].append(f"{x:g},{y:g}")
    return {"width": CHART_W, "height": CHART_H, "samples": shown, "memory_total": format_size(memory_total),
            **{name: [" ".join(p) for p in runs if p] for name, runs in lines.items()}}


def gpu_facts(facts: dict | None) -> list[tuple[str, str]]:
    """The latest heartbeat's figures of a GPU, as (name, value) pairs; those it did not report are left out."""
    if not facts:
        return []
    shown = [("memory used", facts.get("memory_used"), format_size),
             ("utilization", facts.get("utilization"), lambda v: f"{100 * v:.0f}%"),
             ("temperature", facts.get("temperature"), lambda v: f"{v:.0f} °C"),
             ("power", facts.get("power"), lambda v: f"{v:.0f} W"),
             ("SM clock", facts.get("sm_clock"), lambda v: f"{v / 1e6:.0f} MHz")]
    return [(name, fmt(value)) for name, value, fmt in shown if value is not None]


def duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def compute_line(a, facts: dict | None) -> dict:
    """A vGPU's compute share (the allocation's) and, from the heartbeat, the share its kernels took over
    the last 10 s, the time its processes waited for their share and how many wait now; a figure its
    worker did not report (a worker without compute shares) is None, shown as unknown."""
    facts = facts or {}
    measured, throttled, queue = (facts.get(k) for k in ("share_measured", "throttled_time", "queue_depth"))
    burst = getattr(a, "burst", None)
    return {"share": f"{a.compute}%", "burst": {True: "may burst", False: "no burst"}.get(burst, ""),
            "measured": None if measured is None else f"{measured:.1f}%",
            "throttled": None if throttled is None else duration(throttled) if throttled else "0 s",
            "queue_depth": queue}


def tier_line(facts: dict | None) -> dict | None:
    """Where a vGPU's memory is (hot on the GPU, warm in its worker's RAM, cold on its disk) and bytes per
    tier; None when its worker did not say (no report yet, or a worker without tiers)."""
    if not facts or facts.get("tier") is None or facts.get("tiers") is None:
        return None
    return {"tier": facts["tier"], **{t: format_size(facts["tiers"].get(t, 0)) for t in ("hot", "warm", "cold")}}


def vgpu_rows(a, facts: dict | None) -> dict:
    """One vGPU's panel: the allocation's terms and, from its worker's last heartbeat, its usage, its
    compute share measured and throttled, processes and last calls (newest first)."""
    row = {"id": a.id, "user": a.user, "profile": a.profile, "worker": a.worker_name, "gpus": a.gpu_list,
           "quota": format_size(a.vram), "reported": facts is not None, "compute": compute_line(a, facts),
           "tier": tier_line(facts)}
    if facts is None:
        return row
    return {**row, "used": format_size(facts.get("used", 0)), "overhead": format_size(facts.get("overhead", 0)),
            "calls": facts.get("calls", 0), "launches": facts.get("launches", 0),
            "bytes_in": format_size(facts.get("bytes_in", 0)), "bytes_out": format_size(facts.get("bytes_out", 0)),
            "errors": facts.get("errors", 0),
            "processes": [{"pid": p.get("pid"), "client_pid": p.get("client_pid"), "used": format_size(p.get("used", 0)),
                           "overhead": format_size(p.get("overhead", 0)), "calls": p.get("calls", 0)}
                          for p in facts.get("processes", [])],
            "last_calls": [{"function": c.get("function", ""), "duration": duration(c.get("duration", 0.0)),
                            "bytes": format_size(c.get("bytes", 0)) if c.get("bytes") else "",
                            "result": c.get("error") or ("CUDA_SUCCESS" if c.get("result", 0) == 0
                                                         else str(c.get("result"))),
                            "failed": bool(c.get("result"))}
                           for c in reversed(facts.get("last_calls", []))]}
