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

import logging
import os
import secrets
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler
from tornado import ioloop, web
from traitlets import Enum, Float, Set, Unicode, default
from traitlets.config import Application

from .allocations import AllocationBook
from .api import (AllocationHandler, AllocationsHandler, AvailabilityHandler, GPUsHandler, HealthHandler,
                  HeartbeatHandler, SessionTokenHandler, UsageHandler, WorkersHandler, log_request)
from .dashboard import DashboardHandler
from .scheduler import STRATEGIES, Limits

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
        self.book = AllocationBook(self.db_url, self.strategy,
                                   Limits(self.vram_oversubscription, self.compute_oversubscription))
        url = urlparse(self.bind_url)
        app = self.make_app()
        app.listen(url.port or 80, url.hostname or "127.0.0.1")
        ioloop.PeriodicCallback(lambda: self.book.check_heartbeats(self.heartbeat_timeout), max(self.heartbeat_timeout / 3, 0.2) * 1000).start()
        print(f"gpulab pool listening on {self.bind_url}{self.prefix} (database {self.db_url}, "
              f"strategy {self.strategy})", flush=True)
        ioloop.IOLoop.current().start()



def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpulab-pool %(levelname)s %(message)s")
    app = GPUPool.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
