"""The worker's control API (docs/vgpu.md), asked without blocking the Jupyter server's event loop.

Every call carries the session's token, so the worker shows and acts on this session's vGPU only.
Whatever goes wrong (no connection, a timeout, a refusal, an answer that is not JSON) comes out as one
WorkerError carrying an HTTP status and a sentence naming the worker and the cause."""
from __future__ import annotations

import json
import urllib.parse

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from gpu_worker.client.control import TIER_WAIT


class WorkerError(Exception):
    """A call to the worker that did not answer with what was asked: ``status`` (the worker's own 4xx for
    a request it refused about a vGPU, else 502) and ``message``, a sentence for the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class WorkerClient:
    """The control API at ``url`` with session token ``token``; ``timeout`` seconds per request."""

    def __init__(self, url: str, token: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.where = urllib.parse.urlsplit(self.url).netloc  # host:port, as the panel shows it
        self.http = AsyncHTTPClient()

    async def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
                   accept: tuple[int, ...] = (200,)) -> tuple[int, dict]:
        """(status, JSON) of one request; WorkerError unless the status is one of ``accept``."""
        request = HTTPRequest(self.url + path, method=method, headers={"Authorization": f"token {self.token}",
                                                                        "Content-Type": "application/json"},
                              body=None if method == "GET" else json.dumps(body or {}),
                              connect_timeout=self.timeout, request_timeout=timeout or self.timeout)
        try:
            response = await self.http.fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:  # refused, reset, name not found, timed out
            raise WorkerError(502, f"cannot reach the vGPU's worker at {self.where}: {_reason(exc)}") from None
        if response.code == 599:  # tornado's own code for a request that never got an answer
            raise WorkerError(502, f"cannot reach the vGPU's worker at {self.where}: {_reason(response.error)}")
        try:
            data = json.loads(response.body or b"null")
        except ValueError:
            data = None
        if response.code in accept and isinstance(data, dict):
            return response.code, data
        said = data.get("message") if isinstance(data, dict) else None
        if response.code in (400, 404, 409) and said:  # about the vGPU or the request: the caller's to know
            raise WorkerError(response.code, said)
        said = said or (f"HTTP {response.code}" if response.code not in accept else "an answer that is not JSON")
        raise WorkerError(502, f"the vGPU's worker at {self.where} refused: {said}")

    async def vgpus(self, trace: int = 0) -> list[dict]:
        """This session's vGPUs; with ``trace``, each carries its ``trace`` newest call records too."""
        return (await self.call("GET", f"/api/vgpus?trace={int(trace)}" if trace else "/api/vgpus"))[1]["vgpus"]

    async def vgpu(self, vgpu_id: str) -> dict:
        return (await self.call("GET", f"/api/vgpus/{_q(vgpu_id)}"))[1]

    async def gpus(self) -> list[dict]:
        return (await self.call("GET", "/api/gpus"))[1]["gpus"]

    async def trace(self, vgpu_id: str, last: int) -> list[dict]:
        """The ``last`` newest records of the vGPU's call trace, oldest first."""
        return (await self.call("GET", f"/api/vgpus/{_q(vgpu_id)}/trace?last={int(last)}&limit={int(last)}"))[1][
            "records"]

    async def move(self, vgpu_id: str, action: str, to: str | None = None) -> tuple[int, dict]:
        """An offload (``to`` warm or cold) or a restore: (status, the vGPU) for 200, 202 (not done within the
        worker's wait), 507 (out of memory) and 409 (another failure; its "message" says which)."""
        status, data = await self.call("POST", f"/api/vgpus/{_q(vgpu_id)}/{action}",
                                        {"to": to} if action == "offload" else {},
                                        timeout=self.timeout + TIER_WAIT, accept=(200, 202, 409, 507))
        return status, data

    async def idle(self, vgpu_id: str, since: float) -> dict:
        """Tell the worker the vGPU's programs have been idle since ``since`` (epoch seconds)."""
        return (await self.call("POST", f"/api/vgpus/{_q(vgpu_id)}/idle", {"since": since}))[1]


def _q(vgpu_id: str) -> str:
    return urllib.parse.quote(str(vgpu_id), safe="")


def _reason(exc) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return {"Timeout": "it did not answer in time", "Stream closed": "it closed the connection"}.get(text, text)
