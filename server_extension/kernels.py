"""Kernel awareness: which Jupyter kernel (and notebook) each of the vGPU's client processes belongs to.

The worker names each process of a vGPU by its ``client_pid``, the pid of the program on this host.
A kernel's own pid is known to its provisioner (LocalProvisioner keeps ``pid``), and a program a
kernel started (``!python train.py``, a multiprocessing worker) descends from it: so each client pid
is walked up its parent chain in /proc until it meets a kernel.  Sessions name a kernel's notebook."""
from __future__ import annotations

import datetime as dt

MAX_DEPTH = 64  # parent links followed from one process before giving up (init is reached far sooner)

# A kernel in one of these states may be changing the vGPU: a cell runs, or the kernel is starting.
# Anything else (idle, dead, unknown) is not.  vgpu_state.busy() and the idle hint both ask this.
BUSY_STATES = ("busy", "starting")


def is_busy(execution_state) -> bool:
    return execution_state in BUSY_STATES


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc; None when it is gone (or hidden from this server)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
    except (OSError, ValueError, IndexError):
        return None


def owner(pid: int, kernel_pids: dict[int, str]) -> str | None:
    """The kernel id whose process is ``pid`` or one of its ancestors, else None."""
    for _ in range(MAX_DEPTH):
        if pid in kernel_pids:
            return kernel_pids[pid]
        parent = parent_of(pid)
        if not parent or parent == pid:
            return None
        pid = parent


def kernel_pid(kernel) -> int | None:
    """The pid of a kernel manager's kernel process, if its provisioner runs one on this host."""
    provisioner = getattr(kernel, "provisioner", None)
    pid = getattr(provisioner, "pid", None)
    if pid is None:
        process = getattr(provisioner, "process", None)
        pid = getattr(process, "pid", None)
    return pid if isinstance(pid, int) and pid > 0 else None


def epoch(when) -> float | None:
    if isinstance(when, dt.datetime):
        return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


async def kernels_now(kernel_manager, session_manager) -> list[dict]:
    """This server's kernels: id, kernelspec name, pid, notebook path (None without a session),
    execution state and last activity (epoch seconds)."""
    notebooks = {}
    if session_manager is not None:
        for s in await session_manager.list_sessions():
            kernel = s.get("kernel") or {}
            if kernel.get("id"):
                notebooks[kernel["id"]] = s.get("path")
    out = []
    for kid in list(kernel_manager.list_kernel_ids()):
        try:
            kernel = kernel_manager.get_kernel(kid)
        except KeyError:  # it ended meanwhile
            continue
        out.append({"kernel_id": kid, "name": getattr(kernel, "kernel_name", ""), "pid": kernel_pid(kernel),
                    "notebook": notebooks.get(kid), "execution_state": getattr(kernel, "execution_state", None),
                    "last_activity": epoch(getattr(kernel, "last_activity", None))})
    return out


def map_processes(processes: list[dict], kernels: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per kernel: its client pids and their usage summed; the processes no kernel owns).  Every kernel
    is listed, one without a process on the vGPU with nothing used; those using most come first."""
    kernel_pids = {k["pid"]: k["kernel_id"] for k in kernels if k["pid"]}
    rows = {k["kernel_id"]: {"kernel_id": k["kernel_id"], "name": k["name"], "notebook": k["notebook"],
                             "execution_state": k["execution_state"], "pids": [], "used": 0, "overhead": 0,
                             "calls": 0} for k in kernels}
    others = []
    for p in processes:
        kid = owner(int(p.get("client_pid") or 0), kernel_pids) if p.get("client_pid") else None
        if kid is None:
            others.append(p)
            continue
        row = rows[kid]
        row["pids"].append(p["client_pid"])
        for k in ("used", "overhead", "calls"):
            row[k] += p.get(k) or 0
    return sorted(rows.values(), key=lambda r: (-r["used"], r["notebook"] or "", r["kernel_id"])), others
