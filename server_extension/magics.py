"""`%vgpu`: the kernel's own vGPU from inside a notebook (`%load_ext gpulab`).

    %vgpu                      status: profile, GPU, VRAM used / quota, tiers, compute share, processes
    %vgpu offload [warm|cold]  move the vGPU's memory off the GPU (default warm: the worker's host RAM)
    %vgpu restore              bring it back now rather than at the next call that needs it
    %vgpu trace [N]            the N newest driver calls (default 20, at most 1024), oldest first

The kernel asks the worker's control API as its session ($GPULAB_CONTROL_URL, $GPULAB_TOKEN: the
spawner or the "Python 3 (vGPU)" kernelspec's provisioner put them there), so it sees only its own
vGPU.  Offloading from a cell works although this kernel is one of the vGPU's processes: the
worker's executor holds the device memory and moves it, not the kernel; the kernel's next call
that touches the memory brings it back.  A failure is one sentence (IPython's UsageError, no
traceback): no vGPU in this kernel's environment, the worker unreachable, or the worker's refusal.
"""
from __future__ import annotations

import os
import shlex
import time

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from gpu_worker.client.control import MAX_TRACE, TIER_WAIT, Control, ControlError, missing_vgpu_settings, quote
from gpu_worker.client.vgpu_text import TRACE_HEADER, describe, moved, table, trace_rows

USAGE = "usage: %vgpu [status | offload [warm|cold] | restore | trace [N]]"
TRACE_DEFAULT = 20


def session_credential(environ=None) -> tuple[str, str]:
    """(control URL, session token) from this kernel's environment; UsageError naming what is missing."""
    env = os.environ if environ is None else environ
    missing = missing_vgpu_settings(env.get("GPULAB_WORKER", ""), env.get("GPULAB_TOKEN", ""))
    if missing:
        raise UsageError(f"this kernel has no vGPU: {missing} not in its environment (start it from the "
                         f"\"Python 3 (vGPU)\" kernel, or a server spawned with a GPU profile)")
    if not env.get("GPULAB_CONTROL_URL"):
        raise UsageError(f"this kernel's vGPU (worker {env['GPULAB_WORKER']}) has no control API address: "
                         f"GPULAB_CONTROL_URL is not in its environment")
    return env["GPULAB_CONTROL_URL"].rstrip("/"), env["GPULAB_TOKEN"]


@magics_class
class VGPUMagics(Magics):
    """The `%vgpu` line magic and its subcommands."""

    def ask(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        url, token = session_credential()
        try:
            return Control(url, token).call(method, path, body, timeout)
        except ControlError as e:
            raise UsageError(str(e)) from None

    def mine(self) -> dict:
        """This session's vGPU (a session token sees only its own)."""
        vgpus = self.ask("GET", "/api/vgpus")["vgpus"]
        if not vgpus:
            raise UsageError("the worker knows no vGPU for this kernel's token (its session may have ended)")
        if len(vgpus) > 1:
            raise UsageError(f"this kernel's token sees {len(vgpus)} vGPUs: it is an admin token, not a session's")
        return vgpus[0]

    @line_magic
    def vgpu(self, line: str = ""):
        """%vgpu [status | offload [warm|cold] | restore | trace [N]]: this kernel's vGPU."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise UsageError(f"{e}; {USAGE}") from None
        command, args = (words[0], words[1:]) if words else ("status", [])
        handler = {"status": self.status, "offload": self.offload, "restore": self.restore,
                   "trace": self.trace}.get(command)
        if handler is None:
            raise UsageError(f"no %vgpu subcommand {command!r}; {USAGE}")
        handler(args)

    def status(self, args: list[str]) -> None:
        if args:
            raise UsageError(USAGE)
        v = self.mine()
        gpus = self.ask("GET", "/api/gpus").get("gpus")
        print(describe(v, gpus, me=os.getpid()))

    def offload(self, args: list[str]) -> None:
        if len(args) > 1 or (args and args[0] not in ("warm", "cold")):
            raise UsageError("usage: %vgpu offload [warm|cold] (warm: the worker's host RAM, the default; cold: "
                             "its disk)")
        self.move("offload", {"to": args[0] if args else "warm"})

    def restore(self, args: list[str]) -> None:
        if args:
            raise UsageError("usage: %vgpu restore")
        self.move("restore", None)

    def move(self, action: str, body: dict | None) -> None:
        vid, started = self.mine()["id"], time.monotonic()
        v = self.ask("POST", f"/api/vgpus/{quote(vid)}/{action}", body, timeout=TIER_WAIT + 30)
        print(moved(v, action, took=time.monotonic() - started))

    def trace(self, args: list[str]) -> None:
        if len(args) > 1 or (args and not (args[0].isdigit() and 0 < int(args[0]) <= MAX_TRACE)):
            raise UsageError(f"usage: %vgpu trace [N] (N: how many of the newest calls, 1 to {MAX_TRACE})")
        n = int(args[0]) if args else TRACE_DEFAULT
        vid = self.mine()["id"]
        kept = self.ask("GET", f"/api/vgpus/{quote(vid)}/trace?last={n}")["records"]
        print(table(trace_rows(kept), TRACE_HEADER) if kept else "no calls recorded")


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(VGPUMagics)
