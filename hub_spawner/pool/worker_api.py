"""The workers' side of the pool API: enrolment, registration, heartbeats and their grants.

A credential per worker, the JupyterHub way (tokens random, stored only as hashes):

* The shared worker secret ($GPULAB_POOL_WORKER_TOKEN) is an *enrolment* secret.  It can
  only claim a worker name nobody holds yet; the pool then answers a fresh credential for that
  name, once, and keeps its hash.  The worker stores it and uses it from then on.
* A worker's credential lets it change its own record only: its address, node, GPUs, and the
  usage figures of its own allocations; it learns the grants of its own allocations only.
  Re-registering another worker's name is refused (403), with the shared secret or with another
  worker's credential.
* An admin (the hub's token) releases a name whose credential was lost:
  ``DELETE api/workers/<name>/credential``; the next enrolment of that name then succeeds.

These routes are served on the pool's internal worker listener (``GPUPool.worker_bind_url``),
never on the service URL the hub's proxy publishes; there they answer 404 with a sentence.

Heartbeats come two ways, with one body of work (``take_heartbeat``): a message on the worker's
WebSocket (``api/workers/<name>/heartbeats``, kept open between beats: about half the CPU an HTTP
request costs the pool besides the heartbeat's work) or, from older workers and as the fallback,
``POST api/workers/<name>/heartbeat``.

Every body is checked before anything is stored: a bad one is 400 with a sentence.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from urllib.parse import urlparse

from sqlalchemy import select
from tornado import web, websocket

from gpu_worker.client.limits import MAX_COUNT as MAX_GPUS_PER_VGPU

from .allocations import WRONG_CREDENTIAL, moved, recount
from .api import APIHandler
from .db import GPU, Worker

log = logging.getLogger("gpulab.pool")

MAX_GPU_MEMORY = 1 << 44   # 16 TiB: far above any GPU, far below what overflows the placement arithmetic
MAX_GPUS = 64              # GPUs one worker may register
MAX_VGPUS = 4096           # vGPUs one heartbeat may report
MAX_PROCESSES = 4096       # processes one heartbeat may report, over all its vGPUs
MAX_ENDED = 4096           # vGPUs one heartbeat may report its worker ended
MAX_MESSAGE = 1024         # characters of why a vGPU ended: what an allocation's message holds
MAX_VRAM = MAX_GPU_MEMORY * MAX_GPUS  # bytes one vGPU may hold at most (its GPUs' bound comes later)
MAX_COUNT = (1 << 63) - 1  # counters: what a 64-bit integer holds
MAX_SECONDS = 1e11         # cumulative kernel or throttled seconds of one vGPU: some 3000 years
MAX_SHARE = 100 * MAX_GPUS_PER_VGPU  # percent of one GPU a vGPU of the most GPUs can measure
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it appears in URL paths and log lines
CAPABILITY = re.compile(r"(\d{1,3}\.\d{1,3})?")
MAX_SOCKET_PATH = 107      # bytes of a Unix socket's path (sun_path, less its NUL)
POD = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a Kubernetes object name (DNS subdomain)


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


def check_unix_socket(path) -> str:
    """The worker's Unix socket path, which the servers of its local vGPUs dial (native mode), or "" where
    it listens on none: absolute, and short enough for a socket address (sun_path holds 107 bytes)."""
    if path == "":
        return path
    if not (isinstance(path, str) and path.startswith("/") and len(path.encode()) <= MAX_SOCKET_PATH
            and path.isprintable()):
        raise web.HTTPError(400, f"unix_socket must be an absolute path of at most {MAX_SOCKET_PATH} bytes, or "
                                 f"absent, not {path!r:.80}")
    return path


def check_control(url) -> str:
    """The worker's control API, http://host:port (or https), or "" where it serves none."""
    if url == "":
        return url
    _text(url, "control", 255)
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme in ("http", "https") and parsed.hostname and port and not parsed.path.strip("/") \
            and not parsed.query:
        return url
    raise web.HTTPError(400, f"control must be http://host:port or empty, not {url!r:.80}")


def check_registration(data: dict) -> dict:
    """The registration body, validated: name, address, node, backend, pod, Unix socket and GPUs."""
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
    pod = data.get("pod", "")
    if pod != "" and not (isinstance(pod, str) and POD.fullmatch(pod)):
        raise web.HTTPError(400, f"pod must be the name of the worker's Kubernetes pod (lower-case letters, digits, "
                                 f"'-' and '.', at most 253) or absent, not {pod!r:.80}")
    out = {"name": name, "address": check_address(data.get("address")), "pod": pod,
           "node": _text(data.get("node", ""), "node", 255), "backend": backend,
           "control": check_control(data.get("control", "")),
           "unix_socket": check_unix_socket(data.get("unix_socket", "")), "gpus": []}
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


def _number(value, what: str, low: float, high: float, nullable: bool = True):
    """A finite number in [low, high] (or None where ``nullable``)."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise web.HTTPError(400, f"{what} must be a number from {low:g} to {high:g}"
                                 f"{' or null' if nullable else ''}, not {value!r:.40}")
    return value


def _object(value, what: str, longest: int) -> dict:
    return _bounded(value, what, longest, dict, "a JSON object")


def _list(value, what: str, longest: int) -> list:
    return _bounded(value, what, longest, list, "a list")


def _bounded(value, what: str, longest: int, kind: type, name: str):
    """A JSON object or list of at most ``longest`` entries."""
    if not isinstance(value, kind):
        raise web.HTTPError(400, f"{what} must be {name}")
    if len(value) > longest:
        raise web.HTTPError(400, f"{what} may have at most {longest} entries, not {len(value)}")
    return value


def _counts(entry: dict, what: str, names) -> dict:
    """The named counters of a heartbeat entry: whole numbers, 0 when absent."""
    return {k: _int(entry.get(k, 0), f"{what}.{k}", 0, MAX_COUNT) for k in names}


def check_call(call, what: str) -> dict:
    """One trace record of a vGPU's last calls (docs/architecture.md)."""
    _object(call, what, 16)
    return {"seq": _int(call.get("seq", 0), f"{what}.seq", 0, MAX_COUNT),
            "time": _number(call.get("time"), f"{what}.time", 0, 1e11, nullable=False),
            "pid": _int(call.get("pid", 0), f"{what}.pid", 0, 1 << 32),
            "function": _text(call.get("function", ""), f"{what}.function", 128),
            "duration": _number(call.get("duration", 0), f"{what}.duration", 0, 1e9, nullable=False),
            "bytes": _int(call.get("bytes", 0), f"{what}.bytes", 0, MAX_COUNT),
            "result": _int(call.get("result", 0), f"{what}.result", 0, 1 << 32),
            "error": _text(call.get("error", ""), f"{what}.error", 128)}


def _tiers(value, what: str) -> dict | None:
    """A vGPU's bytes per VRAM tier (hot, warm, cold), or None."""
    if value is None:
        return None
    _object(value, what, 3)
    return {t: _int(value.get(t, 0), f"{what}.{t}", 0, MAX_VRAM) for t in ("hot", "warm", "cold")}


def check_vgpu(entry, what: str) -> dict:
    """One vGPU of a heartbeat: its figures, processes and last calls.  Each figure has a bound here;
    the bound of its allocation (the memory of its GPUs) is checked against the database."""
    _object(entry, what, 32)
    out = {"id": _text(entry.get("id", ""), f"{what}.id", 64),
           "used": _int(entry.get("used", 0), f"{what}.used", 0, MAX_VRAM),
           "overhead": _int(entry.get("overhead", 0), f"{what}.overhead", 0, MAX_VRAM),
           **_counts(entry, what, ("calls", "launches", "bytes_in", "bytes_out", "errors")),
           # compute shares: cumulative seconds, the share measured lately and processes waiting for it now
           # (None: a worker without compute shares)
           "kernel_time": _number(entry.get("kernel_time"), f"{what}.kernel_time", 0, MAX_SECONDS),
           "throttled_time": _number(entry.get("throttled_time"), f"{what}.throttled_time", 0, MAX_SECONDS),
           "share_measured": _number(entry.get("share_measured"), f"{what}.share_measured", 0, MAX_SHARE),
           "queue_depth": None if entry.get("queue_depth") is None else _int(entry["queue_depth"],
                                                                              f"{what}.queue_depth", 0, MAX_PROCESSES),
           # VRAM tiers (None: a worker without tiers)
           "tier": None if entry.get("tier") is None else _text(entry["tier"], f"{what}.tier", 8),
           "tiers": _tiers(entry.get("tiers"), f"{what}.tiers"),
           "processes": []}
    for i, p in enumerate(_list(entry.get("processes", []), f"{what}.processes", MAX_PROCESSES)):
        where = f"{what}.processes[{i}]"
        _object(p, where, 16)
        out["processes"].append({"pid": _int(p.get("pid", 0), f"{where}.pid", 0, 1 << 32),
                                 "client_pid": _int(p.get("client_pid", 0), f"{where}.client_pid", 0, 1 << 32),
                                 "used": _int(p.get("used", 0), f"{where}.used", 0, MAX_VRAM),
                                 "overhead": _int(p.get("overhead", 0), f"{where}.overhead", 0, MAX_VRAM),
                                 "calls": _int(p.get("calls", 0), f"{where}.calls", 0, MAX_COUNT)})
    out["last_calls"] = [check_call(c, f"{what}.last_calls[{i}]")
                         for i, c in enumerate(_list(entry.get("last_calls", []), f"{what}.last_calls", 5))]
    return out


def check_gpu_facts(facts, what: str) -> dict:
    """One GPU's device facts in a heartbeat (NVML's, or the emulated device's own)."""
    _object(facts, what, 16)
    if not isinstance(facts.get("emulated", False), bool):
        raise web.HTTPError(400, f"{what}.emulated must be true or false")
    used = facts.get("memory_used")
    return {"memory_total": _int(facts.get("memory_total"), f"{what}.memory_total", 0, MAX_GPU_MEMORY),
            "memory_used": None if used is None else _int(used, f"{what}.memory_used", 0, MAX_GPU_MEMORY),
            "utilization": _number(facts.get("utilization"), f"{what}.utilization", 0, 1),
            "temperature": _number(facts.get("temperature"), f"{what}.temperature", -273, 1000),
            "power": _number(facts.get("power"), f"{what}.power", 0, 1e5),
            "sm_clock": _number(facts.get("sm_clock"), f"{what}.sm_clock", 0, 1e11),
            "emulated": facts.get("emulated", False)}


def check_heartbeat(data: dict) -> dict:
    """A heartbeat body in shape (docs/architecture.md, *Heartbeat*): "vgpus" {token hash: entry},
    "ended" {token hash: why} and "gpus" {uuid: facts}, each optional (absent: that part is left as
    it was; nothing ended)."""
    out = {}
    if "ended" in data:
        ended = _object(data["ended"], "ended", MAX_ENDED)
        out["ended"] = {_text(h, "an ended vGPU's token hash", 128, required=True):
                        _text(why, f"ended[{h:.32}] (why the vGPU ended)", MAX_MESSAGE, required=True)
                        for h, why in ended.items()}
    if "vgpus" in data:
        vgpus = _object(data["vgpus"], "vgpus", MAX_VGPUS)
        out["vgpus"] = {_text(h, "a vGPU's token hash", 128, required=True): check_vgpu(e, f"vgpus[{h:.32}]")
                        for h, e in vgpus.items()}
        if sum(len(e["processes"]) for e in out["vgpus"].values()) > MAX_PROCESSES:
            raise web.HTTPError(400, f"a heartbeat may report at most {MAX_PROCESSES} processes")
    if "gpus" in data:
        gpus = _object(data["gpus"], "gpus", MAX_GPUS)
        out["gpus"] = {_text(u, "a GPU uuid", 128, required=True): check_gpu_facts(f, f"gpus[{u:.40}]")
                       for u, f in gpus.items()}
    return out


def hold_shares(name: str, body: dict, grants: list[dict]) -> None:
    """A vGPU cannot use more than all of its GPUs: a measured share above 100% per GPU of its grant is
    a worker's error, held at that bound with a warning (the rest of the heartbeat counts)."""
    count = {g["token_hash"]: len(g["gpus"]) for g in grants}
    for h, e in body.get("vgpus", {}).items():
        bound = 100 * count.get(h, MAX_GPUS_PER_VGPU)
        if e["share_measured"] is not None and e["share_measured"] > bound:
            log.warning("worker %s says vGPU %s used %.0f%% of a GPU, more than its %d GPU(s): counted as %d%%",
                        name, e["id"] or h[:12], e["share_measured"], bound // 100, bound)
            e["share_measured"] = bound


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
            self.book.lock_placement(db)  # what it offers changes what may be placed
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
            w.address, w.node, w.backend, w.control_url = reg["address"], reg["node"], reg["backend"], reg["control"]
            w.pod, w.unix_socket = reg["pod"], reg["unix_socket"]
            w.status, w.last_seen = "up", time.time()
            w.version = (w.version or 0) + 1  # what its heartbeats are answered changes (GPUs, grants)
            moved(db, name)
            db.add(w)
            # the GPUs it offers now are all its GPUs: one it no longer offers leaves the pool, and the
            # allocations on it are revoked at its next heartbeat (AllocationBook._grants)
            known = {g.uuid: g for g in w.gpus}
            rows = []
            for g in reg["gpus"]:
                row = known.get(g["uuid"]) or GPU(uuid=g["uuid"])
                row.index, row.model, row.memory = g["index"], g["model"], g["memory"]
                row.capability, row.emulated = g["capability"], g["emulated"]
                rows.append(row)
            w.gpus = rows
            db.flush()
            recount(db.connection(), [name])  # a GPU it offers again is promised what is still on it
        if set(known) != {g["uuid"] for g in reg["gpus"]}:
            self.pool.live.forget(name, {g["uuid"] for g in reg["gpus"]})
        self.book.registered()
        self.pool.compare_nodes([reg["node"]])  # its GPUs against its node's labels, where the pod watch read them
        log.info("worker %s %s at %s with %d GPU(s)", name, "enrolled" if credential else "registered",
                 reg["address"], len(reg["gpus"]))
        self.send({"name": name, **({"credential": credential} if credential else {})})


MAX_SOCKET_MESSAGE = 4 << 20  # bytes of one heartbeat socket message (the worker sends a larger beat by POST)
CLOSE_CREDENTIAL, CLOSE_UNKNOWN = 4403, 4404  # the socket's close codes: the HTTP route's 403 and 404


def heartbeat_data(raw: bytes | str) -> dict:
    """A heartbeat's JSON object, from a request body or a socket message (empty: {})."""
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise web.HTTPError(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPError(400, "the body must be a JSON object")
    return data


def take_heartbeat(pool, name: str, credential: str, raw: bytes | str):
    """One heartbeat of worker ``name``, whichever way it came, so that the two cannot drift: the body
    checked (web.HTTPError 400 with its sentence), its figures stored by the book in one transaction
    that also checks the credential, its live facts kept.  The reply ({"grants", "revoked"}), or what
    the book answered instead: None (no such worker) or WRONG_CREDENTIAL."""
    body = check_heartbeat(heartbeat_data(raw))
    usage, kernel = None, None
    if "vgpus" in body:
        usage = {h: (e["used"], e["overhead"]) for h, e in body["vgpus"].items()}
        kernel = {h: e["kernel_time"] for h, e in body["vgpus"].items() if e["kernel_time"] is not None}
    beat = pool.book.heartbeat(name, usage, body.get("ended", {}), kernel, credential=credential_hash(credential))
    if beat is None or beat is WRONG_CREDENTIAL:
        return beat
    hold_shares(name, body, beat.grants)
    pool.live.record(name, body, {g["token_hash"] for g in beat.grants}, beat.gpus)
    return beat.reply()


class HeartbeatHandler(WorkerAPIHandler):
    """A worker is alive; with "vgpus", what each of its vGPUs holds (the whole truth: an active
    allocation missing from it holds nothing), with "gpus" its devices' facts.  The database keeps
    each allocation's VRAM in use (used + overhead) and overhead; the rest stays in memory
    (live.py).  Only the worker's own allocations and GPUs are touched; figures for other hashes and
    uuids are ignored.  A figure beyond the memory of its allocation's GPUs is held at that bound.

    With "ended", the vGPUs the worker ended by itself (revoked through its control API), with why:
    each of them that is still an active allocation of this worker ends as revoked with that
    sentence, as an admin's revocation here would; the others are ignored.

    The reply is the worker's grants (every active allocation on it) and "revoked" {token hash: why}
    of its allocations that ended in the last hour: the worker ends every vGPU not granted.

    HeartbeatSocket takes the same heartbeats as messages on one connection per worker."""

    def prepare(self):
        """Authenticated in post(), by the heartbeat's own transaction: the usual heartbeat costs one."""

    def authenticate(self, name: str) -> None:
        """What every other worker route checks before its work, with its 403 sentences."""
        super().prepare()
        self.own(name)

    def post(self, name):
        token = self.request_token()
        if not token:
            self.authenticate(name)  # 403 before reading the body
        try:
            reply = take_heartbeat(self.pool, name, token, self.request.body)
        except web.HTTPError:
            self.authenticate(name)  # a caller without the credential learns nothing of the body
            raise
        if reply is None or reply is WRONG_CREDENTIAL:
            self.authenticate(name)  # raises the 403 that says why
            raise web.HTTPError(404, f"unknown worker {name}")
        self.send(reply)


class HeartbeatSocket(WorkerAPIHandler, websocket.WebSocketHandler):
    """A worker's heartbeats as text messages on one WebSocket it keeps open: each message is a
    heartbeat body (HeartbeatHandler's), each answered in turn by {"status": 200, "grants", "revoked"},
    or {"status": 400, "message"} for a bad one, after which the socket goes on.  The upgrade is
    authenticated as every worker route is (403 with its sentence, no socket); each message checks
    the credential again in the heartbeat's transaction, so a credential an admin released meanwhile
    closes the socket with 4403 (4404: the worker is gone), the sentence as the reason: the worker
    then registers again, as after the HTTP route's 403 or 404."""

    def prepare(self):
        super().prepare()
        self.own(self.path_args[0])

    def open(self, name):
        self.credential = self.request_token()  # prepare() found it is worker ``name``'s (self.worker)
        self.set_nodelay(True)  # a reply is one small frame: no waiting for the worker's ACK

    def on_message(self, message):
        start = time.perf_counter()
        try:
            if isinstance(message, bytes):
                raise web.HTTPError(400, "a heartbeat is a text message: a JSON object")
            reply = take_heartbeat(self.pool, self.worker, self.credential, message)
        except web.HTTPError as exc:
            self.answer({"status": exc.status_code, "message": exc.log_message}, start)
            return
        if reply is WRONG_CREDENTIAL:
            self.hang_up(CLOSE_CREDENTIAL, "a valid worker credential is required", start)
        elif reply is None:
            self.hang_up(CLOSE_UNKNOWN, f"unknown worker {self.worker}", start)
        else:
            self.answer({"status": 200, **reply}, start)

    def answer(self, reply: dict, start: float) -> None:
        """One reply, logged as log_request logs an HTTP heartbeat (successes at debug level)."""
        status = reply["status"]
        log.log(logging.DEBUG if status < 400 else logging.WARNING, "%d MESSAGE %s %.1fms", status,
                self.request.path, 1000 * (time.perf_counter() - start))
        if self.ws_connection is None:  # the worker hung up while its heartbeat was taken
            return
        try:
            self.write_message(json.dumps(reply))
        except websocket.WebSocketClosedError:
            pass

    def hang_up(self, code: int, reason: str, start: float) -> None:
        """Close with ``code``; a close reason holds at most 123 bytes."""
        log.warning("%d CLOSE %s %.1fms: %s", code, self.request.path, 1000 * (time.perf_counter() - start), reason)
        self.close(code, reason.encode()[:123].decode(errors="ignore"))


class GrantHandler(WorkerAPIHandler):
    """A session presents a token the worker has no grant for yet (placed since its last heartbeat):
    the worker asks by the token's hash; only its own active allocations answer."""

    def post(self, name):
        self.own(name)
        hashed = _text(self.body().get("token_hash"), "token_hash", 128, required=True)
        grant = self.book.grant(name, hashed)
        if grant is None:
            raise web.HTTPError(404, "no active allocation with this token hash on this worker")
        self.send(grant)


class WorkerCredentialHandler(APIHandler):
    """An admin (the hub's token) releases a worker name whose credential was lost."""

    def delete(self, name):
        with self.book.Session.begin() as db:
            w = db.get(Worker, name)
            if w is None:
                raise web.HTTPError(404, f"unknown worker {name}")
            w.credential_hash = None
            w.version = (w.version or 0) + 1  # its heartbeats are refused from now on, here and at every replica
            moved(db, name)
        log.info("worker %s's credential was released; the name may be enrolled again", name)
        self.set_status(204)
        self.finish()


class NotHereHandler(APIHandler):
    """The worker API on the public service URL: not found, and where it is instead (a JSON error, as
    the rest of the API answers)."""

    def prepare(self):
        raise web.HTTPError(404, "the worker API is not served here: workers reach the pool at its internal "
                                 "worker listener (c.GPUPool.worker_bind_url)")
