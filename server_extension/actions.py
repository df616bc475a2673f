"""Tier actions (offload to warm or cold, restore) run in the background, with progress and an outcome.

The worker answers an offload or restore only once the vGPU's processes have moved their memory (up
to 30 s), so the browser cannot wait on that request: the server makes it, and meanwhile looks at
the vGPU's tiers every LOOK seconds into the Action the panel polls.  One action at a time per vGPU."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from gpu_worker.client import format_size

from .worker_client import WorkerClient, WorkerError

LOOK = 0.25  # seconds between two looks at the tiers while an action runs ("updated" at least every 0.5 s)
PENDING_WAIT = 120.0  # seconds an action the worker answered 202 (not done yet) is still followed
KEEP = 100  # ended actions remembered (GET actions/<id>)
WHERE = {"warm": "the worker's host RAM", "cold": "files on the worker's disk", "hot": "the GPU"}


@dataclass
class Action:
    id: str
    vgpu: str
    kind: str  # offload | restore
    to: str  # warm | cold | hot
    state: str = "running"  # running | done | failed
    started: float = field(default_factory=time.time)
    updated: float = 0.0
    elapsed: float = 0.0
    tiers: dict = field(default_factory=dict)
    status: int | None = None  # the worker's HTTP answer, once it came
    message: str | None = None

    def touch(self) -> None:
        self.updated = time.time()
        self.elapsed = round(self.updated - self.started, 3)

    def end(self, state: str, status: int | None, message: str) -> None:
        self.state, self.status, self.message = state, status, message
        self.touch()

    def json(self) -> dict:
        return asdict(self)


class Busy(Exception):
    """An action already runs for this vGPU."""

    def __init__(self, action: Action):
        super().__init__(f"vGPU {action.vgpu} is already busy: its {action.kind} to {action.to} started "
                         f"{time.time() - action.started:.0f} s ago and has not ended")
        self.action = action


class Actions:
    """The running and recent tier actions of this server's vGPUs; ``ended`` is called when one ends
    (the vGPU's figures changed: the cached answer is stale)."""

    def __init__(self, client: WorkerClient, ended=None):
        self.client = client
        self.ended = ended
        self.by_id: OrderedDict[str, Action] = OrderedDict()
        self.tasks: set[asyncio.Task] = set()

    def get(self, action_id: str) -> Action | None:
        return self.by_id.get(action_id)

    def latest(self, vgpu_id: str) -> Action | None:
        """The vGPU's running action, else its last one."""
        for a in reversed(self.by_id.values()):
            if a.vgpu == str(vgpu_id):
                return a
        return None

    def start(self, vgpu_id: str, kind: str, to: str) -> Action:
        last = self.latest(vgpu_id)
        if last is not None and last.state == "running":
            raise Busy(last)
        action = Action(id=uuid.uuid4().hex[:12], vgpu=str(vgpu_id), kind=kind, to=to)
        action.touch()
        self.by_id[action.id] = action
        while len(self.by_id) > KEEP and next(iter(self.by_id.values())).state != "running":
            self.by_id.popitem(last=False)
        task = asyncio.ensure_future(self._run(action))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return action

    async def _run(self, action: Action) -> None:
        move = asyncio.ensure_future(self.client.move(action.vgpu, action.kind, action.to))
        look = None
        try:
            while not move.done():
                look = self._look(action, look)
                await asyncio.wait([move], timeout=LOOK)
                action.touch()
            try:
                status, body = move.result()
            except WorkerError as exc:
                action.end("failed", exc.status, f"the {self.words(action)} failed: {exc.message}")
                return
            action.tiers = body.get("tiers") or action.tiers
            if status == 202:  # the processes have not all acted yet (one in a long call acts after it)
                status = await self._follow(action)
            self._outcome(action, status, body)
        except asyncio.CancelledError:  # the server stops (cancel()): not an Exception
            action.end("failed", None, f"the {self.words(action)} was stopped with the Jupyter server; the worker "
                                       f"may still finish it")
            raise
        except Exception as exc:  # a bug of ours must still end the action, with a sentence
            action.end("failed", None, f"the {self.words(action)} failed inside the Jupyter server: {exc!r}")
            raise
        finally:
            if not move.done():
                move.cancel()  # its request, which would otherwise outlive the loop
            if look is not None:
                look.cancel()
            if self.ended is not None:
                self.ended(action)

    def _look(self, action: Action, look: asyncio.Future | None) -> asyncio.Future:
        """Take the last look's tiers into the action and start the next look once that one answered."""
        if look is not None and not look.done():
            return look
        if look is not None and not look.cancelled() and look.exception() is None:
            action.tiers = look.result().get("tiers") or action.tiers
        return asyncio.ensure_future(self.client.vgpu(action.vgpu))

    async def _follow(self, action: Action) -> int:
        """After a 202: look until the tiers show the asked tier (200) or PENDING_WAIT passes (202)."""
        deadline = time.monotonic() + PENDING_WAIT
        while time.monotonic() < deadline:
            try:
                action.tiers = (await self.client.vgpu(action.vgpu)).get("tiers") or action.tiers
            except WorkerError:
                pass
            if reached(action.tiers, action.to):
                return 200
            action.touch()
            await asyncio.sleep(LOOK)
        return 202

    def _outcome(self, action: Action, status: int, body: dict) -> None:
        words = self.words(action)
        if status == 200:
            held = action.tiers.get(action.to, 0)
            if action.kind == "offload" and not held:
                said = f"vGPU {action.vgpu} had no memory on the GPU to move: nothing changed"
            else:
                said = f"{format_size(held)} of vGPU {action.vgpu} now in {WHERE[action.to]}"
            action.end("done", 200, f"{said} ({action.elapsed:.1f} s)")
        elif status == 202:
            action.end("failed", 202, f"the {words} is still pending after {action.elapsed:.0f} s: a process of the "
                                      f"vGPU busy in a long call acts when the call ends, and the worker goes on")
        elif status == 507:
            action.end("failed", 507, f"the {words} ran out of memory: {body.get('message') or 'no room'}")
        else:
            action.end("failed", status, f"the {words} failed: {body.get('message') or f'HTTP {status}'}")

    @staticmethod
    def words(action: Action) -> str:
        return "restore" if action.kind == "restore" else f"offload to {action.to}"

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


def reached(tiers: dict, to: str) -> bool:
    """Do the tiers show the asked tier: nothing hot after an offload (nor warm to cold), nothing
    warm or cold after a restore?"""
    left = {"hot": ("warm", "cold"), "warm": ("hot",), "cold": ("hot", "warm")}[to]
    return bool(tiers) and not any(tiers.get(t, 0) for t in left)
