"""What the panel shows, from the worker's answer kept for ``refresh`` seconds.

However many browser tabs poll, the worker is asked at most once per interval (and once per interval
more for the recent calls of a vGPU while a panel shows them).  The same refresh feeds the usage
history, and runs on a timer while no panel is open so that the chart has a past."""
from __future__ import annotations

import asyncio
import time

from tornado.ioloop import PeriodicCallback

from .actions import Actions
from .config import VGPUExtension
from .history import History
from .idle import IdleHint
from .kernels import kernels_now, map_processes
from .worker_client import WorkerClient, WorkerError


async def fetch(client: WorkerClient) -> tuple[list[dict], list[dict]]:
    """One refresh from the worker: (its vGPUs as this session sees them, their GPUs)."""
    vgpus, gpus = await asyncio.gather(client.vgpus(), client.gpus())
    return vgpus, gpus


class VGPUState:
    """The extension's state on a server with a vGPU: cached answers, history, actions, idle hint."""

    def __init__(self, config: VGPUExtension, kernel_manager, session_manager):
        self.config = config
        self.kernel_manager = kernel_manager
        self.session_manager = session_manager
        self.client = WorkerClient(config.control_url, config.token, config.request_timeout)
        self.history = History(config.history)
        self.actions = Actions(self.client, ended=lambda _action: self.stale())
        self.idle = IdleHint(self, kernel_manager)
        self.cached: tuple[float, dict | WorkerError] | None = None
        self.traces: dict[tuple[str, int], tuple[float, list[dict]]] = {}
        self.lock: asyncio.Lock | None = None
        self.timers: list[PeriodicCallback] = []
        self.fetches = 0  # refreshes from the worker, for the tests

    # ------------------------------------------------------------ the worker's answer, cached
    def fresh(self, t: float) -> bool:
        """Was ``t`` (when a request to the worker started) within this refresh interval?  A little slack,
        so that the sampling timer, firing one interval after the last request, does not find it fresh."""
        return time.monotonic() - t < self.config.refresh - min(0.1, self.config.refresh / 10)

    async def snapshot(self) -> dict:
        """{"vgpus", "gpus", "time"} no older than ``refresh``; WorkerError (also kept that long)."""
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:  # tabs asking together share one request
            if self.cached is None or not self.fresh(self.cached[0]):
                asked = time.monotonic()
                try:
                    vgpus, gpus = await fetch(self.client)
                    answer: dict | WorkerError = {"vgpus": vgpus, "gpus": gpus, "time": time.time()}
                    self.history.add(answer["time"], vgpus)
                except WorkerError as exc:
                    answer = exc
                self.fetches += 1
                self.cached = (asked, answer)
        answer = self.cached[1]
        if isinstance(answer, WorkerError):
            raise answer
        return answer

    def stale(self) -> None:
        """The vGPU changed (an action ended): the next request asks the worker again."""
        self.cached = None

    async def vgpu_ids(self) -> set[str]:
        return {str(v["id"]) for v in (await self.snapshot())["vgpus"]}

    # ------------------------------------------------------------ what the routes answer
    async def panel(self) -> dict:
        snap = await self.snapshot()
        kernels = await kernels_now(self.kernel_manager, self.session_manager)
        vgpus = []
        for v in snap["vgpus"]:
            mapped, others = map_processes(v.get("processes") or [], kernels)
            action = self.actions.latest(v["id"])
            vgpus.append({**v, "worker": self.client.where, "kernels": mapped, "other_processes": others,
                          "action": action.json() if action else None})
        return {"configured": True, "message": None, "emulated": any(g.get("emulated") for g in snap["gpus"]),
                "vgpus": vgpus, "gpus": snap["gpus"], "time": snap["time"], "refresh": self.config.refresh}

    async def trace(self, vgpu_id: str, last: int) -> list[dict]:
        key = (vgpu_id, last)
        kept = self.traces.get(key)
        if kept is None or not self.fresh(kept[0]):
            asked = time.monotonic()
            records = await self.client.trace(vgpu_id, last)
            self.traces = {k: v for k, v in self.traces.items() if self.fresh(v[0])}
            self.traces[key] = kept = (asked, records)
        return kept[1]

    # ------------------------------------------------------------ timers
    def start(self) -> None:
        self.timers.append(PeriodicCallback(self._sample, self.config.refresh * 1000))
        if self.config.idle_hint:
            self.timers.append(PeriodicCallback(self.idle.check, self.config.idle_interval * 1000))
        for t in self.timers:
            t.start()

    async def _sample(self) -> None:
        try:
            await self.snapshot()
        except WorkerError:
            pass  # the panel shows the sentence when it asks

    def stop(self) -> None:
        for t in self.timers:
            t.stop()
        self.timers.clear()
        self.actions.cancel()
