"""The REST routes under {base_url}gpulab/api/ (docs/jupyter.md), every one for an authenticated user only.

Each handler turns a request into a call on VGPUState (vgpu_state.py) and its answer or error into
JSON: errors are {"message": sentence}, with the worker's own 4xx about a vGPU passed on and 502 for
a worker that cannot be reached or refuses."""
from __future__ import annotations

import json

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from .actions import Busy
from .config import VGPUExtension
from .worker_client import WorkerError

TRACE_DEFAULT, TRACE_MAX = 20, 200


class VGPUHandler(APIHandler):
    """Shared by the routes: the extension's state (None without a vGPU) and JSON answers."""

    def initialize(self, state, config: VGPUExtension):
        self.state = state
        self.vgpu_config = config

    def answer(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))

    def refuse(self, status: int, message: str, **more) -> None:
        self.answer({"message": message, **more}, status)

    async def known(self, vgpu_id: str) -> bool:
        """True for one of this session's vGPUs; otherwise the refusal is written and False returned."""
        if self.state is None:
            self.refuse(404, self.vgpu_config.why_not())
            return False
        try:
            ids = await self.state.vgpu_ids()
        except WorkerError as exc:
            self.refuse(502 if exc.status not in (400, 404, 409) else exc.status, exc.message)
            return False
        if vgpu_id not in ids:
            self.refuse(404, f"this Jupyter server has no vGPU {vgpu_id} (its vGPUs: {', '.join(sorted(ids)) or 'none'})")
            return False
        return True


class VGPUsHandler(VGPUHandler):
    @tornado.web.authenticated
    async def get(self):
        if self.state is None:
            self.answer({"configured": False, "message": self.vgpu_config.why_not(), "emulated": False, "vgpus": [],
                         "gpus": [], "time": None, "refresh": self.vgpu_config.refresh})
            return
        try:
            self.answer(await self.state.panel())
        except WorkerError as exc:
            self.refuse(502, exc.message)


class HistoryHandler(VGPUHandler):
    @tornado.web.authenticated
    async def get(self, vgpu_id):
        if await self.known(vgpu_id):
            self.answer({"interval": self.vgpu_config.refresh, "samples": self.state.history.samples(vgpu_id)})


class TraceHandler(VGPUHandler):
    @tornado.web.authenticated
    async def get(self, vgpu_id):
        raw = self.get_argument("limit", str(TRACE_DEFAULT))
        if not raw.isdigit() or not 1 <= int(raw) <= TRACE_MAX:
            self.refuse(400, f"limit must be a whole number from 1 to {TRACE_MAX}, not {raw!r}")
            return
        if not await self.known(vgpu_id):
            return
        try:
            self.answer({"records": await self.state.trace(vgpu_id, int(raw))})
        except WorkerError as exc:
            self.refuse(exc.status, exc.message)


class TierHandler(VGPUHandler):
    """POST vgpus/<id>/offload {"to": "warm"|"cold"} and vgpus/<id>/restore: 202 with the Action."""

    @tornado.web.authenticated
    async def post(self, vgpu_id, kind):
        to = "hot"
        if kind == "offload":
            try:
                body = json.loads(self.request.body or b"{}")
            except ValueError:
                body = None
            to = body.get("to") if isinstance(body, dict) else None
            if to not in ("warm", "cold"):
                sent = self.request.body[:200].decode(errors="replace")
                self.refuse(400, "the body must be {\"to\": \"warm\"} (free GPU memory into the worker's host RAM) "
                                 f"or {{\"to\": \"cold\"}} (move it to the worker's disk), not {sent!r}")
                return
        if not await self.known(vgpu_id):
            return
        try:
            action = self.state.actions.start(vgpu_id, kind, to)
        except Busy as exc:
            self.refuse(409, str(exc), action=exc.action.json())
            return
        self.answer({"action": action.json()}, 202)


class ActionHandler(VGPUHandler):
    @tornado.web.authenticated
    async def get(self, action_id):
        action = self.state.actions.get(action_id) if self.state is not None else None
        if action is None:
            self.refuse(404, f"there is no tier action {action_id} on this Jupyter server (it keeps the last 100)")
            return
        self.answer(action.json())


def routes(base_url: str, state, config: VGPUExtension) -> list[tuple]:
    """The extension's handlers under {base_url}gpulab/api/."""
    api = url_path_join(base_url, "gpulab", "api")
    args = {"state": state, "config": config}
    vgpu = r"(?P<vgpu_id>[^/]+)"
    return [
        (url_path_join(api, "vgpus"), VGPUsHandler, args),
        (url_path_join(api, "vgpus", vgpu, "history"), HistoryHandler, args),
        (url_path_join(api, "vgpus", vgpu, "trace"), TraceHandler, args),
        (url_path_join(api, "vgpus", vgpu, r"(?P<kind>offload|restore)"), TierHandler, args),
        (url_path_join(api, "actions", r"(?P<action_id>[^/]+)"), ActionHandler, args),
    ]
