"""The GPU pool: a JupyterHub service that knows the workers and places vGPUs on their GPUs.

REST API (JSON, ``Authorization: token <secret>``), under the service prefix:

==========================================  =======  ==============================================
``POST   api/workers``                       worker   register (name, address, node, backend, gpus)
``POST   api/workers/<name>/heartbeat``      worker   keep-alive; a worker silent for
                                                      ``heartbeat_timeout`` is marked lost
``POST   api/workers/<name>/sessions``       worker   limits of a session token issued for it
``POST   api/allocations``                   hub      place a vGPU request; 201 or 503 with a reason
``GET    api/allocations[/<id>]``            hub      allocations (``?user=``, ``?status=``)
``DELETE api/allocations/<id>``              hub      release (idempotent)
``POST   api/availability``                  hub      how many of each request would fit now
``GET    api/gpus``, ``api/usage``           hub      GPUs with their load; GPU-hours per user
``GET    /``                                 admin    the dashboard (JupyterHub OAuth)
==========================================  =======  ==============================================
"""
from __future__ import annotations

import hmac
import html
import json
import logging
import os
import secrets
import time
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from sqlalchemy import select
from tornado import ioloop, web
from traitlets import Enum, Float, Set, Unicode, default
from traitlets.config import Application

from gpu_worker.pool_link import token_hash
from gpu_worker.units import parse_size

from .db import GPU, Allocation, Worker, make_sessionmaker
from .scheduler import STRATEGIES, GPUState, InvalidRequest, Limits, NoFit, Request, place

log = logging.getLogger("gpulab.pool")


class GPUPool(Application):
    """Configuration and state of the pool service (``c.GPUPool.*``)."""

    name = "gpulab-pool"
    description = "gpulab GPU pool service"

    db_url = Unicode("sqlite:///gpulab-pool.sqlite", help="SQLAlchemy URL of the pool database "
                     "(SQLite file by default; e.g. postgresql://user:pw@host/db).").tag(config=True)
    strategy = Enum(list(STRATEGIES), "compact-first", help="Placement strategy: 'compact-first' packs vGPUs "
                    "onto the busiest GPU that fits; 'low-load-first' spreads them.").tag(config=True)
    vram_oversubscription = Float(1.0, help="How many times a GPU's memory may be promised (>1 relies on "
                                  "tiering idle sessions out of VRAM).").tag(config=True)
    compute_oversubscription = Float(1.0, help="How many times 100% of a GPU's compute may be promised."
                                     ).tag(config=True)
    heartbeat_timeout = Float(30.0, help="Seconds without a heartbeat before a worker is marked lost."
                              ).tag(config=True)
    api_token = Unicode(help="Secret the hub (spawner) uses for the allocation API "
                        "(default: $GPULAB_POOL_API_TOKEN).").tag(config=True)
    worker_token = Unicode(help="Secret workers use to register (default: $GPULAB_POOL_WORKER_TOKEN)."
                           ).tag(config=True)
    admin_users = Set(Unicode(), help="Hub users who may see the dashboard (hub admins always may)."
                      ).tag(config=True)
    bind_url = Unicode(help="URL to listen on (default: $JUPYTERHUB_SERVICE_URL or http://127.0.0.1:8765)."
                       ).tag(config=True)
    prefix = Unicode(help="URL prefix (default: $JUPYTERHUB_SERVICE_PREFIX or /).").tag(config=True)

    aliases = {"db-url": "GPUPool.db_url", "strategy": "GPUPool.strategy", "bind-url": "GPUPool.bind_url",
               "heartbeat-timeout": "GPUPool.heartbeat_timeout"}

    @default("api_token")
    def _api_token(self):
        return os.environ.get("GPULAB_POOL_API_TOKEN", "")

    @default("worker_token")
    def _worker_token(self):
        return os.environ.get("GPULAB_POOL_WORKER_TOKEN", "")

    @default("bind_url")
    def _bind_url(self):
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8765")

    @default("prefix")
    def _prefix(self):
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")

    # ------------------------------------------------------------------ state
    def init_db(self):
        self.engine, self.Session = make_sessionmaker(self.db_url)

    def limits(self) -> Limits:
        return Limits(self.vram_oversubscription, self.compute_oversubscription)

    def gpu_states(self, db, lock: bool = False) -> list[GPUState]:
        """GPUs of live workers with what active allocations already hold (``lock``: for placing)."""
        q = select(GPU, Worker).join(Worker).where(Worker.status == "up")
        rows = db.execute(q.with_for_update() if lock else q).all()
        states = {g.uuid: GPUState(g.uuid, w.name, w.node, g.memory) for g, w in rows}
        for a in db.scalars(select(Allocation).where(Allocation.status == "active")):
            for u in a.gpu_list:
                if u in states:
                    states[u].used_vram += a.vram
                    states[u].used_compute += a.compute
                    states[u].sessions += 1
        return sorted(states.values(), key=lambda s: s.uuid)

    def allocate(self, spec: dict) -> Allocation:
        req = request_from(spec)
        with self.Session.begin() as db:
            chosen = place(req, self.gpu_states(db, lock=True), self.strategy, self.limits())
            worker = db.get(Worker, chosen[0].worker)
            alloc = Allocation(user=str(spec["user"]), server_name=str(spec.get("server_name", "")),
                               profile=str(spec.get("profile", "")), worker_name=worker.name,
                               gpu_uuids=",".join(g.uuid for g in chosen), vram=req.vram, compute=req.compute,
                               count=req.count, mode=req.mode, qos=req.qos, token=secrets.token_urlsafe(24))
            db.add(alloc)
        log.info("allocated %s for %s on %s (%d MiB, %d%%)", alloc.id, alloc.user, alloc.worker_name,
                 alloc.vram >> 20, alloc.compute)
        return alloc

    def release(self, alloc_id: int) -> bool:
        with self.Session.begin() as db:
            alloc = db.get(Allocation, alloc_id)
            if alloc is None:
                return False
            if alloc.status == "active" or alloc.status == "lost":
                alloc.status = "released"
                alloc.ended = alloc.ended or time.time()
        return True

    def availability(self, specs: list[dict]) -> list[dict]:
        """For each request: does it fit now, and how many such vGPUs could still be placed."""
        out = []
        with self.Session.begin() as db:
            states = self.gpu_states(db)
        for spec in specs:
            try:
                req = request_from(spec)
            except (InvalidRequest, NoFit) as exc:
                out.append({"fits": False, "slots": 0, "reason": str(exc)})
                continue
            trial = [GPUState(**vars(s)) for s in states]
            slots, reason = 0, ""
            while slots < 100:
                try:
                    for g in place(req, trial, self.strategy, self.limits()):
                        g.used_vram += req.vram
                        g.used_compute += req.compute
                    slots += 1
                except NoFit as exc:
                    reason = str(exc)
                    break
            out.append({"fits": slots > 0, "slots": slots, "reason": "" if slots else reason})
        return out

    def check_heartbeats(self) -> None:
        """Mark silent workers lost; their sessions' allocations become lost with a message."""
        cutoff = time.time() - self.heartbeat_timeout
        with self.Session.begin() as db:
            for w in db.scalars(select(Worker).where(Worker.status == "up", Worker.last_seen < cutoff)):
                w.status = "lost"
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.last_seen))
                log.warning("worker %s stopped sending heartbeats (last at %s): marked lost", w.name, when)
                for a in db.scalars(select(Allocation).where(Allocation.worker_name == w.name,
                                                             Allocation.status == "active")):
                    a.status = "lost"
                    a.ended = time.time()
                    a.message = (f"Your vGPU was lost: GPU worker {w.name} stopped responding at {when}. "
                                 "Stop and start your server to get a new one.")

    # -------------------------------------------------------------- web app
    def make_app(self) -> web.Application:
        p = self.prefix if self.prefix.endswith("/") else self.prefix + "/"
        routes = [
            (p + "api/health", HealthHandler),
            (p + "api/workers", WorkersHandler),
            (p + r"api/workers/([^/]+)/heartbeat", HeartbeatHandler),
            (p + r"api/workers/([^/]+)/sessions", SessionTokenHandler),
            (p + "api/allocations", AllocationsHandler),
            (p + r"api/allocations/(\d+)", AllocationHandler),
            (p + "api/availability", AvailabilityHandler),
            (p + "api/gpus", GPUsHandler),
            (p + "api/usage", UsageHandler),
        ]
        settings = {"pool": self, "log_function": log_request}
        if os.environ.get("JUPYTERHUB_API_TOKEN"):  # running as a hub service: the dashboard uses hub OAuth
            routes += [(p, DashboardHandler), (p + "oauth_callback", HubOAuthCallbackHandler)]
            settings["cookie_secret"] = os.environ.get("JUPYTERHUB_COOKIE_SECRET") or secrets.token_bytes(32)
        return web.Application(routes, **settings)

    def start(self):
        self.init_db()
        url = urlparse(self.bind_url)
        app = self.make_app()
        app.listen(url.port or 80, url.hostname or "127.0.0.1")
        ioloop.PeriodicCallback(self.check_heartbeats, max(self.heartbeat_timeout / 3, 0.2) * 1000).start()
        print(f"gpulab pool listening on {self.bind_url}{self.prefix} (database {self.db_url}, "
              f"strategy {self.strategy})", flush=True)
        ioloop.IOLoop.current().start()


def log_request(handler) -> None:
    """Heartbeats every few seconds would drown the log: successful requests log at debug level."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING
    log.log(level, "%d %s %s %.1fms", status, handler.request.method, handler.request.uri,
            1000 * handler.request.request_time())


def request_from(spec: dict) -> Request:
    try:
        return Request(vram=parse_size(spec["vram"]), compute=int(spec.get("compute", 100)),
                       count=int(spec.get("count", 1)), mode=str(spec.get("mode", "any")),
                       qos=str(spec.get("qos", "medium")), node=str(spec.get("node", "")))
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidRequest(f"invalid GPU request: {exc}") from None


def allocation_json(a: Allocation, worker: Worker | None) -> dict:
    return {"id": a.id, "user": a.user, "server_name": a.server_name, "profile": a.profile,
            "worker": a.worker_name, "address": worker.address if worker else "",
            "node": worker.node if worker else "", "gpus": a.gpu_list,
            "vram": a.vram, "compute": a.compute, "count": a.count, "mode": a.mode, "qos": a.qos,
            "status": a.status, "message": a.message, "used_vram": a.used_vram, "created": a.created, "ended": a.ended,
            "emulated": worker.backend == "emulated" if worker else False}


# ---------------------------------------------------------------------- handlers
class APIHandler(web.RequestHandler):
    who = ("hub",)

    @property
    def pool(self) -> GPUPool:
        return self.settings["pool"]

    def check_xsrf_cookie(self):
        """Token-authenticated API: no cookies, no XSRF."""

    def prepare(self):
        header = self.request.headers.get("Authorization", "")
        token = header[6:].strip() if header.lower().startswith("token ") else ""
        secrets_by_role = {"hub": self.pool.api_token, "worker": self.pool.worker_token}
        for role in self.who:
            expected = secrets_by_role[role]
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
        self.send({"status": "ok"})


class WorkersHandler(APIHandler):
    who = ("worker",)

    def post(self):
        data = self.body()
        try:
            name, address, gpus = str(data["name"]), str(data["address"]), list(data["gpus"])
        except (KeyError, TypeError):
            raise web.HTTPError(400, "name, address and gpus are required") from None
        with self.pool.Session.begin() as db:
            w = db.get(Worker, name) or Worker(name=name)
            w.address, w.node, w.backend = address, str(data.get("node", "")), str(data.get("backend", "cuda"))
            w.status, w.last_seen = "up", time.time()
            db.add(w)
            known = {g.uuid: g for g in w.gpus}
            for g in gpus:
                row = known.get(g["uuid"]) or GPU(uuid=g["uuid"])
                row.index, row.model = int(g.get("index", 0)), str(g.get("model", ""))
                row.memory, row.emulated = int(g["memory"]), bool(g.get("emulated", False))
                row.capability = str(g.get("capability", ""))
                if row.uuid not in known:
                    w.gpus.append(row)
        log.info("worker %s registered at %s with %d GPU(s)", name, address, len(gpus))
        self.send({"name": name})


class HeartbeatHandler(APIHandler):
    who = ("worker",)

    def post(self, name):
        with self.pool.Session.begin() as db:
            w = db.get(Worker, name)
            if w is None:
                raise web.HTTPError(404, f"unknown worker {name}")
            if w.status != "up":
                log.info("worker %s is back", name)
            w.status, w.last_seen = "up", time.time()
            usage = self.body().get("sessions") or {}
            if isinstance(usage, dict):
                for a in db.scalars(select(Allocation).where(Allocation.worker_name == name,
                                                             Allocation.status == "active")):
                    a.used_vram = int(usage.get(token_hash(a.token), 0))
        self.send({})


class SessionTokenHandler(APIHandler):
    who = ("worker",)

    def post(self, name):
        token = str(self.body().get("token", ""))
        with self.pool.Session.begin() as db:
            a = db.scalars(select(Allocation).where(Allocation.token == token)).first()
            if a is None or a.worker_name != name or a.status != "active":
                raise web.HTTPError(404, "no active allocation with this token on this worker")
            self.send({"vram": a.vram, "compute": a.compute, "allocation": a.id, "user": a.user})


class AllocationsHandler(APIHandler):
    def post(self):
        spec = self.body()
        if not spec.get("user"):
            raise web.HTTPError(400, "user is required")
        try:
            alloc = self.pool.allocate(spec)
        except InvalidRequest as exc:
            raise web.HTTPError(400, str(exc)) from None
        except NoFit as exc:
            log.info("no room for %s: %s", spec.get("user"), exc)
            self.send({"status": 503, "message": str(exc)}, status=503)
            return
        with self.pool.Session() as db:
            data = allocation_json(alloc, db.get(Worker, alloc.worker_name))
        data["token"] = alloc.token
        self.send(data, status=201)

    def get(self):
        q = select(Allocation)
        if self.get_argument("user", None):
            q = q.where(Allocation.user == self.get_argument("user"))
        if self.get_argument("status", None):
            q = q.where(Allocation.status == self.get_argument("status"))
        with self.pool.Session() as db:
            workers = {w.name: w for w in db.scalars(select(Worker))}
            self.send([allocation_json(a, workers.get(a.worker_name)) for a in db.scalars(q.order_by(Allocation.id))])


class AllocationHandler(APIHandler):
    def get(self, alloc_id):
        with self.pool.Session() as db:
            a = db.get(Allocation, int(alloc_id))
            if a is None:
                raise web.HTTPError(404, f"no allocation {alloc_id}")
            self.send(allocation_json(a, db.get(Worker, a.worker_name)))

    def delete(self, alloc_id):
        if not self.pool.release(int(alloc_id)):
            raise web.HTTPError(404, f"no allocation {alloc_id}")
        self.set_status(204)
        self.finish()


class AvailabilityHandler(APIHandler):
    def post(self):
        specs = self.body().get("requests", [])
        if not isinstance(specs, list):
            raise web.HTTPError(400, "requests must be a list")
        self.send(self.pool.availability(specs))


def gpu_table(pool: GPUPool) -> list[dict]:
    with pool.Session.begin() as db:
        used = {s.uuid: s for s in pool.gpu_states(db)}
        rows = db.execute(select(GPU, Worker).join(Worker).order_by(Worker.name, GPU.index)).all()
        return [{"uuid": g.uuid, "worker": w.name, "worker_status": w.status, "model": g.model,
                 "memory": g.memory, "capability": g.capability, "emulated": g.emulated,
                 "used_vram": used[g.uuid].used_vram if g.uuid in used else 0,
                 "used_compute": used[g.uuid].used_compute if g.uuid in used else 0,
                 "sessions": used[g.uuid].sessions if g.uuid in used else 0} for g, w in rows]


def usage_table(pool: GPUPool) -> list[dict]:
    now = time.time()
    per_user: dict[str, dict] = {}
    with pool.Session() as db:
        for a in db.scalars(select(Allocation)):
            u = per_user.setdefault(a.user, {"user": a.user, "gpu_hours": 0.0, "active": 0})
            u["gpu_hours"] += a.gpu_hours(now)
            u["active"] += a.status == "active"
    return sorted(per_user.values(), key=lambda u: u["user"])


class GPUsHandler(APIHandler):
    def get(self):
        self.send(gpu_table(self.pool))


class UsageHandler(APIHandler):
    def get(self):
        self.send(usage_table(self.pool))


class DashboardHandler(HubOAuthenticated, web.RequestHandler):
    """The admin dashboard: GPUs, workers, sessions, GPU-hours per user."""

    @web.authenticated
    def get(self):
        user = self.get_current_user()
        pool: GPUPool = self.settings["pool"]
        if not (user.get("admin") or user["name"] in pool.admin_users):
            raise web.HTTPError(403, "the GPU pool dashboard is for hub admins")
        gpus = gpu_table(pool)
        with pool.Session() as db:
            workers = list(db.scalars(select(Worker).order_by(Worker.name)))
            sessions = list(db.scalars(select(Allocation).where(Allocation.status != "released")
                                       .order_by(Allocation.id)))
        self.finish(render_dashboard(gpus, workers, sessions, usage_table(pool)))


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_dashboard(gpus, workers, sessions, usage) -> str:
    gib = 2**30
    gpu_rows = [(g["worker"], g["model"] + (" (EMULATED test double)" if g["emulated"] else ""), g["capability"],
                 f"{g['used_vram'] / gib:.1f} / {g['memory'] / gib:.1f} GiB", f"{g['used_compute']}%",
                 g["sessions"], g["worker_status"]) for g in gpus]
    worker_rows = [(w.name, w.address, w.node, w.backend + (" (test double)" if w.backend == "emulated" else ""),
                    w.status, time.strftime("%H:%M:%S", time.localtime(w.last_seen))) for w in workers]
    session_rows = [(a.id, a.user, a.server_name or "(default)", a.profile, a.worker_name,
                     f"{a.vram / gib:.1f} GiB", f"{a.used_vram / 2**20:.0f} MiB", f"{a.compute}%", a.status,
                     "hot (no tiering yet)") for a in sessions]
    usage_rows = [(u["user"], f"{u['gpu_hours']:.3f}", u["active"]) for u in usage]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>gpulab GPU pool</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>gpulab GPU pool</h1>
<h2>GPUs</h2>{_table(["worker", "model", "compute capability", "VRAM promised", "compute promised", "sessions",
                      "status"], gpu_rows)}
<h2>Workers</h2>{_table(["name", "address", "node", "backend", "status", "last heartbeat"], worker_rows)}
<h2>Sessions</h2>{_table(["id", "user", "server", "profile", "worker", "quota", "VRAM in use", "compute", "status",
                          "tier"],
                         session_rows)}
<h2>GPU-hours per user</h2>{_table(["user", "GPU-hours", "active vGPUs"], usage_rows)}
</body></html>"""


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpulab-pool %(levelname)s %(message)s")
    app = GPUPool.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
