"""The workers' side of the pool API: enrolment, registration, heartbeats, session look-ups.

A credential per worker, the JupyterHub way (tokens random, stored only as hashes):

* The shared worker secret ($GPULAB_POOL_WORKER_TOKEN) is an *enrolment* secret.  It can
  only claim a worker name nobody holds yet; the pool then answers a fresh credential for that
  name, once, and keeps its hash.  The worker stores it and uses it from then on.
* A worker's credential lets it change its own record only: its address, node, GPUs, and the
  usage figures of its own allocations.  Re-registering another worker's name is refused (403),
  with the shared secret or with another worker's credential.
* An admin (the hub's token) releases a name whose credential was lost:
  ``DELETE api/workers/<name>/credential``; the next enrolment of that name then succeeds.

These routes are served on the pool's internal worker listener (``GPUPool.worker_bind_url``),
never on the service URL the hub's proxy publishes; there they answer 404 with a sentence.

Every body is checked before anything is stored: a bad one is 400 with a sentence.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from urllib.parse import urlparse

from sqlalchemy import select
from tornado import web

from gpu_worker.client import token_hash

from .api import APIHandler
from .db import GPU, Allocation, Worker

log = logging.getLogger("gpulab.pool")

MAX_GPU_MEMORY = 1 << 44   # 16 TiB: far above any GPU, far below what overflows the placement arithmetic
MAX_GPUS = 64              # GPUs one worker may register
MAX_SESSIONS = 4096        # usage figures one heartbeat may carry
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it appears in URL paths and log lines
CAPABILITY = re.compile(r"(\d{1,3}\.\d{1,3})?")


def credential_hash(credential: str) -> str:
    """What the pool keeps of a credential: random 256-bit tokens need no salt or stretching."""
    return hashlib.sha256(credential.encode()).hexdigest()


def _int(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise web.HTTPError(400, f"{what} must be an integer, not {value!r:.40}")
    if not low <= value <= high:
        raise web.HTTPError(400, f"{what} must be between {low} and {high}, not {value}")
    return value


def _text(value, what: str, longest: int, required: bool = False) -> str:
    if not isinstance(value, str) or len(value) > longest or (required and not value.strip()):
        raise web.HTTPError(400, f"{what} must be {'a non-empty' if required else 'a'} string of at most "
                                 f"{longest} characters")
    return value


def check_address(address) -> str:
    """tcp://host:port or unix:///path: the only addresses the shim can dial."""
    _text(address, "address", 255, required=True)
    url = urlparse(address)
    if url.scheme == "tcp":
        try:
            port = url.port
        except ValueError:
            port = None
        if url.hostname and port and not url.path.strip("/") and not url.query:
            return address
    elif url.scheme == "unix" and len(address) > len("unix://") and not any(c.isspace() for c in address):
        return address
    raise web.HTTPError(400, f"address must be tcp://host:port or unix:///path, not {address!r:.80}")


def check_registration(data: dict) -> dict:
    """The registration body, validated: name, address, node, backend and GPUs."""
    name = data.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise web.HTTPError(400, "name must be 1 to 128 letters, digits, '.', '_' or '-', starting with a "
                                 "letter or digit")
    gpus = data.get("gpus")
    if not isinstance(gpus, list):
        raise web.HTTPError(400, f"gpus must be a list of GPUs, not {gpus!r:.40}")
    if len(gpus) > MAX_GPUS:
        raise web.HTTPError(400, f"a worker may register at most {MAX_GPUS} GPUs, not {len(gpus)}")
    backend = data.get("backend", "cuda")
    if backend not in ("cuda", "emulated"):
        raise web.HTTPError(400, f"backend must be 'cuda' or 'emulated', not {backend!r:.40}")
    out = {"name": name, "address": check_address(data.get("address")),
           "node": _text(data.get("node", ""), "node", 255), "backend": backend, "gpus": []}
    seen = set()
    for i, g in enumerate(gpus):
        if not isinstance(g, dict):
            raise web.HTTPError(400, f"gpus[{i}] must be an object")
        uuid = _text(g.get("uuid"), f"gpus[{i}].uuid", 128, required=True)
        if uuid in seen:
            raise web.HTTPError(400, f"GPU uuid {uuid} appears twice")
        seen.add(uuid)
        capability = _text(g.get("capability", ""), f"gpus[{i}].capability", 16)
        if not CAPABILITY.fullmatch(capability):
            raise web.HTTPError(400, f"gpus[{i}].capability must look like '9.0', not {capability!r}")
        if not isinstance(g.get("emulated", False), bool):
            raise web.HTTPError(400, f"gpus[{i}].emulated must be true or false")
        out["gpus"].append({"uuid": uuid, "index": _int(g.get("index", i), f"gpus[{i}].index", 0, 1023),
                            "model": _text(g.get("model", ""), f"gpus[{i}].model", 255),
                            "memory": _int(g.get("memory"), f"gpus[{i}].memory (bytes)", 1, MAX_GPU_MEMORY),
                            "capability": capability, "emulated": g.get("emulated", False)})
    return out


def check_usage(usage) -> dict | None:
    """A heartbeat's ``sessions`` ({token hash: bytes}) in shape; each allocation's bound comes later."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise web.HTTPError(400, "sessions must map token hashes to bytes in use")
    if len(usage) > MAX_SESSIONS:
        raise web.HTTPError(400, f"a heartbeat may report at most {MAX_SESSIONS} sessions")
    for key, value in usage.items():
        _text(key, "a session's token hash", 128, required=True)
        _int(value, f"bytes in use of session {key:.32}", 0, MAX_GPU_MEMORY * MAX_GPUS)
    return usage


class WorkerAPIHandler(APIHandler):
    """Authenticates a worker: the enrolment secret, or one worker's own credential."""

    enrolling = False
    worker = ""  # the name the credential belongs to

    def prepare(self):
        token = self.request_token()
        secret = self.pool.worker_token
        if token and secret and hmac.compare_digest(secret.encode(), token.encode()):
            self.enrolling = True
            return
        if token:
            with self.book.Session() as db:
                w = db.scalars(select(Worker).where(Worker.credential_hash == credential_hash(token))).first()
            if w is not None:
                self.worker = w.name
                return
        raise web.HTTPError(403, "a valid worker credential is required")

    def own(self, name: str) -> None:
        """Only a worker's own credential acts on its record."""
        if self.enrolling:
            raise web.HTTPError(403, f"the enrolment secret cannot act for worker {name}: use the credential "
                                     "the pool issued to it at enrolment")
        if self.worker != name:
            raise web.HTTPError(403, f"this credential belongs to worker {self.worker}, not {name}")


class WorkersHandler(WorkerAPIHandler):
    def post(self):
        reg = check_registration(self.body())
        name, credential = reg["name"], None
        with self.book.Session.begin() as db:
            w = db.get(Worker, name)
            if self.enrolling:
                if w is not None and w.credential_hash:
                    raise web.HTTPError(403, f"worker {name} is already enrolled: only its own credential may "
                                             "register it again (an admin can release the name with DELETE "
                                             f"api/workers/{name}/credential)")
                credential = secrets.token_urlsafe(32)
            else:
                self.own(name)
            for g in reg["gpus"]:
                row = db.get(GPU, g["uuid"])
                if row is not None and row.worker_name != name:
                    raise web.HTTPError(409, f"GPU {g['uuid']} is registered by worker {row.worker_name}")
            w = w or Worker(name=name)
            if credential:
                w.credential_hash = credential_hash(credential)
            w.address, w.node, w.backend = reg["address"], reg["node"], reg["backend"]
            w.status, w.last_seen = "up", time.time()
            db.add(w)
            known = {g.uuid: g for g in w.gpus}
            for g in reg["gpus"]:
                row = known.get(g["uuid"]) or GPU(uuid=g["uuid"])
                row.index, row.model, row.memory = g["index"], g["model"], g["memory"]
                row.capability, row.emulated = g["capability"], g["emulated"]
                if row.uuid not in known:
                    w.gpus.append(row)
        log.info("worker %s %s at %s with %d GPU(s)", name, "enrolled" if credential else "registered",
                 reg["address"], len(reg["gpus"]))
        self.send({"name": name, **({"credential": credential} if credential else {})})


class HeartbeatHandler(WorkerAPIHandler):
    """A worker is alive; with ``sessions`` ({token hash: bytes}), what each of its live sessions holds.

    The figures are the whole truth at that moment: an active allocation on the worker that is
    missing from them holds nothing.  A heartbeat without ``sessions`` leaves the figures alone.
    Only the worker's own allocations are touched; figures for other hashes are ignored."""

    def post(self, name):
        self.own(name)
        usage = check_usage(self.body().get("sessions"))
        with self.book.Session.begin() as db:
            w = db.get(Worker, name)
            if w is None:
                raise web.HTTPError(404, f"unknown worker {name}")
            if usage is not None:
                memory = {g.uuid: g.memory for g in w.gpus}
                for a in db.scalars(select(Allocation).where(Allocation.worker_name == name,
                                                             Allocation.status == "active")):
                    used = usage.get(token_hash(a.token), 0)
                    bound = sum(memory.get(u, 0) for u in a.gpu_list)
                    if used > bound:
                        raise web.HTTPError(400, f"allocation {a.id} cannot hold {used} bytes: its GPUs have "
                                                 f"{bound} bytes")
                    a.used_vram = used
            if w.status != "up":
                log.info("worker %s is back", name)
            w.status, w.last_seen = "up", time.time()
        self.send({})


class SessionTokenHandler(WorkerAPIHandler):
    def post(self, name):
        self.own(name)
        token = self.body().get("token", "")
        if not isinstance(token, str):
            raise web.HTTPError(400, "token must be a string")
        with self.book.Session.begin() as db:
            a = db.scalars(select(Allocation).where(Allocation.token == token)).first()
            if a is None or a.worker_name != name or a.status != "active":
                raise web.HTTPError(404, "no active allocation with this token on this worker")
            self.send({"vram": a.vram, "compute": a.compute, "allocation": a.id, "user": a.user})


class WorkerCredentialHandler(APIHandler):
    """An admin (the hub's token) releases a worker name whose credential was lost."""

    def delete(self, name):
        with self.book.Session.begin() as db:
            w = db.get(Worker, name)
            if w is None:
                raise web.HTTPError(404, f"unknown worker {name}")
            w.credential_hash = None
        log.info("worker %s's credential was released; the name may be enrolled again", name)
        self.set_status(204)
        self.finish()


class NotHereHandler(APIHandler):
    """The worker API on the public service URL: not found, and where it is instead (a JSON error, as
    the rest of the API answers)."""

    def prepare(self):
        raise web.HTTPError(404, "the worker API is not served here: workers reach the pool at its internal "
                                 "worker listener (c.GPUPool.worker_bind_url)")
