"""The idle hint: tell the worker when no cell runs in any kernel, so its idle clock means what the user means.

The worker's own idle clock starts at the vGPU's last touch of its memory; a notebook whose last cell
ended an hour ago but whose kernel is still alive looks the same as one that computes on the host
between GPU calls.  Jupyter knows better: when every kernel is idle (no cell running), the time of
the kernels' last activity is when the user stopped.  The worker is told once per idle period (a new
period starts with any kernel activity); a touch of the GPU after the hint wins on the worker.

The other way round (``wake_on_busy``): when a cell starts and the vGPU's memory was moved off the GPU
while everything was idle, the worker is asked to bring it back at once, once per busy period. The
cell's first GPU call would bring it back anyway; asked early, the move overlaps the cell's host work,
and a native process frozen by the driver's checkpoint is thawed even when its first call is one that
the shim does not see (a driver-private function reached through cuGetExportTable)."""
from __future__ import annotations

import logging

from .kernels import is_busy, kernels_now
from .worker_client import WorkerError

log = logging.getLogger("gpulab.server_extension")


class IdleHint:
    """Looks at the kernels (``check``, called every idle_interval) and tells the worker about each of
    this server's vGPUs; ``state`` is the VGPUState whose cached answer names them."""

    def __init__(self, state, kernel_manager):
        self.state = state
        self.kernel_manager = kernel_manager
        self.told: float | None = None  # the `since` of the idle period the worker was told about
        self.hints = 0  # hints sent, for the log and the tests
        self.failing = False  # the worker could not be told: warned once, until it can be again
        self.woken = False  # this busy period's wake-up was asked (or not needed)
        self.wakes = 0  # restores asked, for the log and the tests

    def idle_since(self, kernels: list[dict]) -> float | None:
        """The kernels' last activity when none is busy, else None (a cell runs or a kernel starts, or there is
        no kernel)."""
        if not kernels or any(is_busy(k["execution_state"]) for k in kernels):
            return None
        times = [k["last_activity"] for k in kernels if k["last_activity"]]
        return max(times) if times else None

    async def check(self) -> None:
        kernels = await kernels_now(self.kernel_manager, None)
        if any(k["execution_state"] == "busy" for k in kernels):  # a cell runs (a kernel starting is no cell)
            if not self.woken and self.state.config.wake_on_busy:
                await self.wake()
        else:
            self.woken = False
        since = self.idle_since(kernels) if self.state.config.idle_hint else None
        if since is None or since == self.told:
            return
        try:
            vgpus = (await self.state.snapshot())["vgpus"]
            for v in vgpus:
                if v.get("state") == "active":
                    await self.state.client.idle(v["id"], since)
                    self.hints += 1
                    log.info("vGPU %s: told the worker that all kernels have been idle since %.0f", v["id"], since)
        except WorkerError as exc:
            if not self.failing:  # once per outage, not every idle_interval while it lasts
                log.warning("cannot tell the vGPU's worker that the kernels are idle (retried every %g s, not "
                            "logged again until it works): %s", self.state.config.idle_interval, exc.message)
            else:
                log.debug("cannot tell the vGPU's worker that the kernels are idle: %s", exc.message)
            self.failing = True
            return
        if self.failing:
            log.info("the vGPU's worker answers the idle hint again")
        self.failing = False
        self.told = since

    async def wake(self) -> None:
        """A cell runs: ask the worker to restore each vGPU whose memory is off the GPU. Once per busy period, and
        not at all in one where a tier action of this server runs (the person's offload is not undone); a
        failure is logged, not retried."""
        self.woken = True
        if any(a.state == "running" for a in self.state.actions.by_id.values()):
            return
        try:
            self.state.stale()  # the worker's answer now, not one kept from the idle spell
            vgpus = (await self.state.snapshot())["vgpus"]
            for v in vgpus:
                if v.get("state") == "active" and v.get("tier") in ("warm", "cold", "mixed"):
                    self.wakes += 1  # counted when asked: the restore may be done before its answer comes
                    status, body = await self.state.client.move(v["id"], "restore")
                    log.info("vGPU %s: a cell runs and its memory was %s; asked the worker to bring it back (%d%s)",
                             v["id"], v["tier"], status, "" if status == 200 else f": {body.get('message', '')}")
            self.state.stale()
        except WorkerError as exc:
            log.warning("a cell runs, but the vGPU's worker could not be asked to bring its memory back: %s",
                        exc.message)
