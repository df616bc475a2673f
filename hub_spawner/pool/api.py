"""The pool's REST API for the hub (JSON, ``Authorization: token <secret>``); see app.py for the routes.

The workers' routes live in worker_api.py."""
from __future__ import annotations

import hmac
import json
import logging

from sqlalchemy import select
from tornado import web

from .allocations import AllocationBook, allocation_json
from .db import Allocation, Worker
from .scheduler import MAX_AVAILABILITY_REQUESTS, InvalidRequest, NoFit

log = logging.getLogger("gpulab.pool")


def log_request(handler) -> None:
    """Heartbeats every few seconds would drown the log: successful requests log at debug level."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING
    log.log(level, "%d %s %s %.1fms", status, handler.request.method, handler.request.uri,
            1000 * handler.request.request_time())


class APIHandler(web.RequestHandler):
    """The hub's side of the API: authenticated with the pool's api_token (workers use worker_api.py)."""

    @property
    def pool(self):
        """The GPUPool application: its secrets and its book."""
        return self.settings["pool"]

    @property
    def book(self) -> AllocationBook:
        return self.pool.book

    def check_xsrf_cookie(self):
        """Token-authenticated API: no cookies, no XSRF."""

    def request_token(self) -> str:
        """The secret of ``Authorization: token <secret>`` ("" without one)."""
        header = self.request.headers.get("Authorization", "")
        return header[6:].strip() if header.lower().startswith("token ") else ""

    def prepare(self):
        token = self.request_token()
        expected = self.pool.api_token
        if expected and token and hmac.compare_digest(expected.encode(), token.encode()):
            return
        raise web.HTTPError(403, "a valid token is required")

    def body(self) -> dict:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        return data

    def send(self, data, status=200):
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))


class HealthHandler(APIHandler):
    def prepare(self):
        pass

    def get(self):
        """Alive, which replica answers and whether it leads (does the periodic work: leader.py)."""
        self.send({"status": "ok", "replica": self.pool.replica_name, "leader": self.pool.leader})


MAX_ID = (1 << 63) - 1  # SQLite's largest integer: a larger id names no allocation


def allocation_id(text: str) -> int:
    """An allocation id from the URL (digits by the route); one beyond the database's range is a 404."""
    n = int(text)
    if n > MAX_ID:
        raise web.HTTPError(404, f"no allocation {text[:30]}")
    return n


class AllocationsHandler(APIHandler):
    async def post(self):
        spec = self.body()
        if not spec.get("user"):
            raise web.HTTPError(400, "user is required")
        for field in ("user", "server_name", "profile"):
            value = spec.get(field, "")
            if not isinstance(value, str) or len(value) > 255:
                raise web.HTTPError(400, f"{field} must be a string of at most 255 characters")
        placed = await self.pool.placer.place(spec)  # placer.py: with the requests that came with it
        if isinstance(placed, InvalidRequest):
            raise web.HTTPError(400, str(placed))
        if isinstance(placed, NoFit):
            log.info("no room for %s: %s", spec.get("user"), placed)
            self.pool.metrics.refused(placed.constraint)
            self.send({"status": 503, **placed.to_json()}, status=503)
            return
        alloc, token, worker = placed
        data = allocation_json(alloc, worker)
        data["token"] = token  # once: the pool keeps only its hash
        self.send(data, status=201)

    def get(self):
        q = select(Allocation)
        if self.get_argument("user", None):
            q = q.where(Allocation.user == self.get_argument("user"))
        if self.get_argument("status", None):
            q = q.where(Allocation.status == self.get_argument("status"))
        with self.book.Session() as db:
            workers = {w.name: w for w in db.scalars(select(Worker))}
            self.send([allocation_json(a, workers.get(a.worker_name)) for a in db.scalars(q.order_by(Allocation.id))])


class AllocationHandler(APIHandler):
    def get(self, alloc_id):
        with self.book.Session() as db:
            a = db.get(Allocation, allocation_id(alloc_id))
            if a is None:
                raise web.HTTPError(404, f"no allocation {alloc_id}")
            self.send(allocation_json(a, db.get(Worker, a.worker_name)))

    def delete(self, alloc_id):
        if not self.book.release(allocation_id(alloc_id)):
            raise web.HTTPError(404, f"no allocation {alloc_id}")
        self.set_status(204)
        self.finish()


class RevokeHandler(APIHandler):
    """An admin ends an active vGPU with a message, which its worker gives the vGPU's programs within
    one heartbeat (the spawner still releases it when the server stops)."""

    def post(self, alloc_id):
        message = self.body().get("message")
        if not isinstance(message, str) or not message.strip() or len(message) > 500:
            raise web.HTTPError(400, "message must say why, in at most 500 characters")
        alloc, revoked = self.book.revoke(allocation_id(alloc_id), message.strip())
        if alloc is None:
            raise web.HTTPError(404, f"no allocation {alloc_id}")
        if not revoked:
            raise web.HTTPError(409, f"allocation {alloc_id} already ended ({alloc.status})")
        with self.book.Session() as db:
            self.send(allocation_json(alloc, db.get(Worker, alloc.worker_name)))


class AvailabilityHandler(APIHandler):
    def post(self):
        specs = self.body().get("requests", [])
        if not isinstance(specs, list):
            raise web.HTTPError(400, "requests must be a list")
        if len(specs) > MAX_AVAILABILITY_REQUESTS:
            raise web.HTTPError(400, f"at most {MAX_AVAILABILITY_REQUESTS} requests per availability call, "
                                     f"not {len(specs)}: split the list")
        try:
            self.send(self.book.availability(specs))
        except InvalidRequest as exc:
            raise web.HTTPError(400, str(exc)) from None


class GPUsHandler(APIHandler):
    def get(self):
        self.send(self.book.gpu_table())


class UsageHandler(APIHandler):
    """GPU-hours per user and per hub group, wall clock and weighted by the kernel time measured:
    ``{"users": [{user, gpu_hours, gpu_hours_weighted, active}], "groups": [{group, ..., users}]}``."""

    def get(self):
        self.send(self.book.usage_report())
