"""What the panel shows, from the worker's answer kept for ``refresh`` seconds.

However many browser tabs poll, the worker is asked at most once per interval (and, while a panel
shows a vGPU's recent calls, once more when its counters moved).  The same refresh feeds the usage
history, and runs on a timer while no panel is open (every background_refresh seconds) so that the
chart has a past.  A quiet vGPU (two answers in a row showing no activity, no cell running in any
kernel, no tier action) is asked every background_refresh seconds too: an idle session's open panel
costs the worker little, and the first sign of work (a cell starting) brings the pace back."""
from __future__ import annotations

import asyncio
import time

from tornado.ioloop import PeriodicCallback

from .actions import Actions
from .config import VGPUExtension
from .history import History
from .idle import IdleHint
from .kernels import is_busy, kernels_now, map_processes
from .worker_client import WorkerClient, WorkerError

GPUS_EVERY = 60.0  # seconds between two looks at the GPUs (model and memory do not change; their facts little)
TRACE_EVERY = 300.0  # seconds a vGPU's recent calls are kept while its counters do not move (a safety net)


class WorkerView:
    """The worker's answers as this server last had them, asked for as little as the panel allows: the
    vGPUs at each refresh; the GPUs (model and memory, which do not change) every GPUS_EVERY seconds or
    when a vGPU names one not seen yet; a vGPU's recent calls only when its call counter moved since
    they were fetched (or TRACE_EVERY passed), and in the refresh's own request while a panel shows
    them: a panel costs one request per refresh.  benchmarks/panel_polling.py polls through this class, as the server does."""

    def __init__(self, client: WorkerClient):
        self.client = client
        self.marks: list[tuple] = []  # the activity marks of the last two answers
        self.vgpus: list[dict] = []
        self.gpus: list[dict] | None = None
        self.gpus_at = 0.0
        self.traces: dict[tuple[str, int], tuple[float, tuple, list[dict]]] = {}

    async def refresh(self, trace: int = 0) -> tuple[list[dict], list[dict]]:
        """(the vGPUs as this session sees them, their GPUs) from the worker; with ``trace`` (a panel shows
        recent calls) each vGPU's newest records come in the same request and are kept for ``trace()``."""
        if self.gpus is None or time.monotonic() - self.gpus_at >= GPUS_EVERY:
            self.vgpus, self.gpus = await asyncio.gather(self.client.vgpus(trace), self.client.gpus())
            self.gpus_at = time.monotonic()
        else:
            self.vgpus = await self.client.vgpus(trace)
            known = {g["uuid"] for g in self.gpus}
            if any(u not in known for v in self.vgpus for u in v.get("gpus") or ()):
                self.gpus, self.gpus_at = await self.client.gpus(), time.monotonic()
        for v in self.vgpus:
            if "trace" in v:
                self.traces[(str(v["id"]), trace)] = (time.monotonic(), mark(v), v.pop("trace"))
        self.forget_old_traces()
        self.marks = [*self.marks[-1:], tuple(activity(v) for v in self.vgpus)]
        return self.vgpus, self.gpus

    def quiet(self) -> bool:
        """Did the last two answers show the same activity: no call, allocation, move or process between them?"""
        return len(self.marks) == 2 and self.marks[0] == self.marks[1]

    def interval(self, refresh: float, background: float, busy: bool) -> float:
        """Seconds the last answer may serve: ``refresh``, or ``background`` while the vGPU is quiet and
        nothing on this server (a cell running, a tier action) may be changing it."""
        return background if self.quiet() and not busy else refresh

    async def trace(self, vgpu_id: str, last: int) -> list[dict]:
        """The vGPU's ``last`` newest call records, fetched again only when its counters moved."""
        now = mark(next((v for v in self.vgpus if str(v["id"]) == vgpu_id), {}))
        kept = self.traces.get((vgpu_id, last))
        if kept is None or kept[1] != now or time.monotonic() - kept[0] >= TRACE_EVERY:
            records = await self.client.trace(vgpu_id, last)
            self.traces[(vgpu_id, last)] = kept = (time.monotonic(), now, records)
            self.forget_old_traces()
        return kept[2]

    def forget_old_traces(self) -> None:
        """Drop what no panel asked for within TRACE_EVERY (another N, a vGPU gone)."""
        now = time.monotonic()
        self.traces = {k: x for k, x in self.traces.items() if now - x[0] < TRACE_EVERY}


def mark(v: dict) -> tuple:
    """What moves when a vGPU's call trace gets new records."""
    return (v.get("calls"), v.get("launches"), v.get("sessions_opened"), len(v.get("processes") or ()))


def activity(v: dict) -> tuple:
    """What moves when anything happens on a vGPU (its clocks aside)."""
    return (v.get("state"), v.get("used"), v.get("overhead"), v.get("calls"), v.get("launches"), v.get("kernel_time"),
            tuple(sorted((v.get("tiers") or {}).items())), tuple(p.get("pid") for p in v.get("processes") or ()))


class VGPUState:
    """The extension's state on a server with a vGPU: cached answers, history, actions, idle hint."""

    def __init__(self, config: VGPUExtension, kernel_manager, session_manager):
        self.config = config
        self.kernel_manager = kernel_manager
        self.session_manager = session_manager
        self.client = WorkerClient(config.control_url, config.token, config.request_timeout)
        self.view = WorkerView(self.client)
        self.history = History(config.history)
        self.actions = Actions(self.client, ended=lambda _action: self.stale())
        self.idle = IdleHint(self, kernel_manager)
        self.cached: tuple[float, dict | WorkerError] | None = None
        self.lock: asyncio.Lock | None = None
        self.timers: list[PeriodicCallback] = []
        self.fetches = 0  # refreshes from the worker, for the tests
        self.watched = 0.0  # when a panel last asked (time.monotonic)
        self.traced = (0, 0.0)  # the recent calls a panel last asked for (how many, when): refreshes bring them

    # ------------------------------------------------------------ the worker's answer, cached
    def fresh(self, t: float, interval: float | None = None) -> bool:
        """Was ``t`` (when a request to the worker started) within this interval (default: refresh)?  A little
        slack, so that the sampling timer, firing one interval after the last request, does not find it fresh."""
        interval = self.config.refresh if interval is None else interval
        return time.monotonic() - t < interval - min(0.1, self.config.refresh / 10)

    def busy(self) -> bool:
        """Is something on this server changing the vGPU now: a cell running or a kernel starting (kernels.py
        is_busy, as the idle hint has it), a tier action?"""
        if any(a.state == "running" for a in self.actions.by_id.values()):
            return True
        for kid in list(self.kernel_manager.list_kernel_ids()):
            try:
                if is_busy(getattr(self.kernel_manager.get_kernel(kid), "execution_state", None)):
                    return True
            except KeyError:
                continue
        return False

    async def snapshot(self) -> dict:
        """{"vgpus", "gpus", "time"} no older than ``refresh`` (``background_refresh`` while the vGPU is quiet);
        WorkerError (kept one refresh interval)."""
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:  # tabs asking together share one request
            interval = self.view.interval(self.config.refresh, self.config.background_refresh, self.busy())
            if self.cached is not None and isinstance(self.cached[1], WorkerError):
                interval = self.config.refresh  # a failure is kept one interval: a down worker is not hammered
            if self.cached is None or not self.fresh(self.cached[0], interval):
                asked = time.monotonic()
                try:
                    last, when = self.traced
                    vgpus, gpus = await self.view.refresh(last if asked - when < 3 * self.config.refresh else 0)
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
        self.watched = time.monotonic()
        snap = await self.snapshot()
        kernels = await kernels_now(self.kernel_manager, self.session_manager)
        vgpus = []
        for v in snap["vgpus"]:
            mapped, others = map_processes(v.get("processes") or [], kernels)
            action = self.actions.latest(v["id"])
            v = {k: x for k, x in v.items() if k != "token_hash"}  # the worker's business, not the browser's
            vgpus.append({**v, "worker": self.client.where, "kernels": mapped, "other_processes": others,
                          "action": action.json() if action else None})
        return {"configured": True, "message": None, "emulated": any(g.get("emulated") for g in snap["gpus"]),
                "vgpus": vgpus, "gpus": snap["gpus"], "time": snap["time"], "refresh": self.config.refresh}

    async def trace(self, vgpu_id: str, last: int) -> list[dict]:
        """The recent calls as of the cached answer: WorkerView keeps them and asks again only when the
        vGPU's counters moved, so another tab asking too costs the worker nothing."""
        self.traced = (last, time.monotonic())
        await self.snapshot()  # the counters that say whether the worker has new records (and, often, them)
        return await self.view.trace(vgpu_id, last)

    # ------------------------------------------------------------ timers
    def start(self) -> None:
        self.timers.append(PeriodicCallback(self._sample, self.config.refresh * 1000))
        if self.config.idle_hint or self.config.wake_on_busy:
            self.timers.append(PeriodicCallback(self.idle.check, self.config.idle_interval * 1000))
        for t in self.timers:
            t.start()

    async def _sample(self) -> None:
        """A history sample each refresh while a panel polls, each background_refresh while none does."""
        if (time.monotonic() - self.watched > 3 * self.config.refresh and self.cached is not None
                and self.fresh(self.cached[0], self.config.background_refresh)):
            return
        try:
            await self.snapshot()
        except WorkerError:
            pass  # the panel shows the sentence when it asks

    def stop(self) -> None:
        for t in self.timers:
            t.stop()
        self.timers.clear()
        self.actions.cancel()
