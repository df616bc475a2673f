"""The idle hint: tell the worker when no cell runs in any kernel, so its idle clock means what the user means.

The worker's own idle clock starts at the vGPU's last touch of its memory; a notebook whose last cell
ended an hour ago but whose kernel is still alive looks the same as one that computes on the host
between GPU calls.  Jupyter knows better: when every kernel is idle (no cell running), the time of
the kernels' last activity is when the user stopped.  The worker is told once per idle period (a new
period starts with any kernel activity); a touch of the GPU after the hint wins on the worker."""
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

    def idle_since(self, kernels: list[dict]) -> float | None:
        """The kernels' last activity when none is busy, else None (a cell runs or a kernel starts, or there is
        no kernel)."""
        if not kernels or any(is_busy(k["execution_state"]) for k in kernels):
            return None
        times = [k["last_activity"] for k in kernels if k["last_activity"]]
        return max(times) if times else None

    async def check(self) -> None:
        since = self.idle_since(await kernels_now(self.kernel_manager, None))
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
