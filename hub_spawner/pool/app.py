"""The GPU pool: a JupyterHub service that knows the workers and places vGPUs on their GPUs.

REST API (JSON, ``Authorization: token <secret>``).  On the worker listener (``worker_bind_url``,
internal; the hub's proxy does not route it), at its root (worker_api.py):

==========================================  =======  ==============================================
``POST   api/workers``                       worker   enrol (enrolment secret: a new name, answers
                                                      the worker's own credential) or register again
                                                      (that credential); name, address, node, gpus
``POST   api/workers/<name>/heartbeat``      worker   keep-alive with its vGPUs' and GPUs' figures; answers
                                                      its grants and recent revocations; a worker silent
                                                      for ``heartbeat_timeout`` is marked lost
``GET    api/workers/<name>/heartbeats``     worker   WebSocket: the same heartbeats as messages on one
                                                      connection, each answered in turn
``POST   api/workers/<name>/grants``         worker   the grant of one of its allocations, by token hash
                                                      (one placed since its last heartbeat)
==========================================  =======  ==============================================

On the service URL (``bind_url``, which the hub's proxy publishes), under the service prefix;
the worker routes above answer 404 there:

==========================================  =======  ==============================================
``DELETE api/workers/<name>/credential``    hub      release a worker name to enrol it again
``POST   api/allocations``                   hub      place a vGPU request; 201 or 503 with a reason
``GET    api/allocations[/<id>]``            hub      allocations (``?user=``, ``?status=``)
``DELETE api/allocations/<id>``              hub      release (idempotent)
``POST   api/allocations/<id>/revoke``       hub      an admin ends a vGPU: {"message": why}
``POST   api/availability``                  hub      how many of each request would fit now
``GET    api/gpus``, ``api/usage``           hub      GPUs with their load; GPU-hours per user
                                                      and group, wall clock and weighted
``GET    metrics``                           hub      Prometheus metrics (metrics.py); the API token
                                                      as ``token <t>`` or ``Bearer <t>``
``GET    /``                                 admin    the dashboard (JupyterHub OAuth)
==========================================  =======  ==============================================
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import time
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler
from alembic.util.exc import CommandError
from sqlalchemy import make_url, select
from sqlalchemy.exc import SQLAlchemyError
from tornado import ioloop, web
from traitlets import Bool, Enum, Float, Set, TraitError, Unicode, default, validate
from traitlets.config import Application

from .allocations import AllocationBook
from .heap import HeapKeeper
from .api import (AllocationHandler, AllocationsHandler, AvailabilityHandler, GPUsHandler, HealthHandler,
                  RevokeHandler, UsageHandler, log_request)
from .worker_api import (MAX_SOCKET_MESSAGE, GrantHandler, HeartbeatHandler, HeartbeatSocket, NotHereHandler,
                         WorkerCredentialHandler, WorkersHandler)
from .dashboard import DashboardHandler
from .live import LiveFacts
from .db import GPU, Worker, engine_url
from .leader import LeaderLease
from .placer import BatchPlacer
from .metrics import MetricsHandler, PoolMetrics
from .scheduler import STRATEGIES, Limits

log = logging.getLogger("gpulab.pool")

LISTEN_BACKLOG = 1024  # connections waiting to be accepted (tornado's default is 128)


class GPUPool(Application):
    """Configuration and state of the pool service (``c.GPUPool.*``)."""

    name = "gpulab-pool"
    description = """The gpulab GPU pool: a JupyterHub service that knows the workers and places vGPUs.

    Workers register and send heartbeats; the hub's spawner asks it for a vGPU at every
    server start and releases it at stop; admins see a dashboard at its prefix. Run it as a
    managed JupyterHub service (`gpulab up` does), which sets its URL, prefix and hub token.
    Secrets come from the environment: $GPULAB_POOL_API_TOKEN (the hub's) and
    $GPULAB_POOL_WORKER_TOKEN (the workers' enrolment secret; each worker then gets its own
    credential). Workers talk to a second, internal listener (--worker-bind-url), which the
    hub's proxy does not route. SIGINT or SIGTERM stops it.
    """
    examples = """
GPULAB_POOL_API_TOKEN=... GPULAB_POOL_WORKER_TOKEN=... gpulab pool --bind-url http://0.0.0.0:8765 --worker-bind-url http://10.0.0.5:8766
gpulab pool --db-url postgresql://pool:pw@db/pool --strategy low-load-first --vram-oversubscription 2
"""

    db_url = Unicode("sqlite:///gpulab-pool.sqlite", help="SQLAlchemy URL of the pool database "
                     "(SQLite file by default; e.g. postgresql://user:pw@host/db).").tag(config=True)
    strategy = Enum(list(STRATEGIES), "compact-first", help="Placement strategy: 'compact-first' packs vGPUs "
                    "onto the busiest GPU that fits; 'low-load-first' spreads them.").tag(config=True)
    vram_oversubscription = Float(1.0, help="How many times a GPU's memory may be promised (>1 relies on "
                                  "tiering idle sessions out of VRAM).").tag(config=True)
    compute_oversubscription = Float(1.0, help="How many times 100% of a GPU's compute may be promised."
                                     ).tag(config=True)
    heartbeat_timeout = Float(30.0, help="Seconds without a heartbeat before a worker is marked lost (the "
                              "leader checks every third of it; a heartbeat writes the worker's last_seen only "
                              "when it is a quarter of this old, and the check allows for that, so a silent "
                              "worker is marked lost after 1 to about 1.6 times this).").tag(config=True)
    listen_for_worker_changes = Bool(True, help="PostgreSQL: learn which workers changed from the database "
                                     "(LISTEN/NOTIFY on channel gpulab_workers) and answer the usual heartbeat "
                                     "without reading its worker's row. Turn off behind a connection pooler in "
                                     "transaction mode (PgBouncer), where LISTEN does not reach this replica: each "
                                     "heartbeat then reads its worker's row. No effect on SQLite, whose heartbeats "
                                     "read it in-process.").tag(config=True)
    api_token = Unicode(help="Secret the hub (spawner) uses for the allocation API "
                        "(default: $GPULAB_POOL_API_TOKEN).").tag(config=True)
    worker_token = Unicode(help="Enrolment secret of the workers (default: $GPULAB_POOL_WORKER_TOKEN). It "
                           "only claims a worker name nobody holds yet; the pool answers a credential of that "
                           "worker's own, kept here as a hash, which alone may register that name again, send "
                           "its heartbeats and look up its sessions.").tag(config=True)
    worker_bind_url = Unicode("http://127.0.0.1:8766", help="URL of the internal listener that serves the "
                              "worker API at its root. Keep it off the hub's proxy: the service URL (bind_url) "
                              "answers 404 to worker routes. Listen on an address the workers reach, e.g. "
                              "http://0.0.0.0:8766 in a cluster (a network policy limits who reaches it)."
                              ).tag(config=True)
    lease_period = Float(15.0, help="Seconds within which another replica takes over the periodic work (the "
                         "heartbeat checker, the Kubernetes pod watch) when the replica doing it dies. Replicas "
                         "on one database hold a lease in it: the leader renews it every quarter of this, each "
                         "renewal valid for half of it. From 1 to 3600.").tag(config=True)
    replica_name = Unicode(help="This replica's name in the leader lease and in api/health (default: the host "
                           "name and process id; in Kubernetes the pod name).").tag(config=True)
    pod_watch = Enum(["auto", "on", "off"], "auto", help="Watch the worker DaemonSet's pods through the Kubernetes "
                     "API, so that a deleted or failed worker pod is marked lost at once rather than after "
                     "heartbeat_timeout, and cross-check each worker's GPUs with its node's GPU feature "
                     "discovery labels. 'auto': when the pool runs in a cluster ($KUBERNETES_SERVICE_HOST) or "
                     "kubeconfig is set. Needs the RBAC of deploy/kubernetes/rbac.yaml.").tag(config=True)
    kubeconfig = Unicode("", help="A kubeconfig file for the pod watch (default: the pod's service account "
                         "when in a cluster).").tag(config=True)
    kubernetes_namespace = Unicode(help="Namespace of the worker pods (default: $POD_NAMESPACE, else the "
                                   "service account's namespace, else 'default').").tag(config=True)
    worker_pod_selector = Unicode("app.kubernetes.io/name=gpulab-worker", help="Label selector of the worker "
                                  "pods (deploy/kubernetes/worker.yaml).").tag(config=True)
    admin_users = Set(Unicode(), help="Hub users who may see the dashboard (hub admins always may)."
                      ).tag(config=True)
    bind_url = Unicode(help="URL to listen on (default: $JUPYTERHUB_SERVICE_URL or http://127.0.0.1:8765)."
                       ).tag(config=True)
    prefix = Unicode(help="URL prefix (default: $JUPYTERHUB_SERVICE_PREFIX or /).").tag(config=True)

    config_file = Unicode("", help="A traitlets config file (Python: `c.GPUPool.strategy = 'low-load-first'`) "
                          "loaded before the command line, whose options win.").tag(config=True)

    # Secrets have no alias on purpose: a command line is visible to every user of the host.
    aliases = {"db-url": "GPUPool.db_url", "strategy": "GPUPool.strategy", "bind-url": "GPUPool.bind_url",
               "worker-bind-url": "GPUPool.worker_bind_url",
               "prefix": "GPUPool.prefix", "heartbeat-timeout": "GPUPool.heartbeat_timeout",
               "vram-oversubscription": "GPUPool.vram_oversubscription",
               "compute-oversubscription": "GPUPool.compute_oversubscription",
               "admin-users": "GPUPool.admin_users", "config": "GPUPool.config_file",
               "lease-period": "GPUPool.lease_period", "replica-name": "GPUPool.replica_name",
               "pod-watch": "GPUPool.pod_watch", "kubeconfig": "GPUPool.kubeconfig"}
    flags = {"show-config": Application.flags["show-config"]}

    def initialize(self, argv=None):
        super().initialize(argv)
        if self.config_file:
            path = os.path.abspath(self.config_file)
            if not os.path.isfile(path):
                print(f"gpulab pool: config file {self.config_file} not found", file=sys.stderr)
                self.exit(2)
            self.load_config_file(os.path.basename(path), os.path.dirname(path))

    @validate("vram_oversubscription", "compute_oversubscription", "heartbeat_timeout", "lease_period")
    def _finite_in_range(self, proposal):
        """A ratio below 1 or an infinite timeout would silently break placement or loss detection."""
        name, value = proposal["trait"].name, proposal["value"]
        low, high = {"heartbeat_timeout": (0.1, 3600.0), "lease_period": (1.0, 3600.0)}.get(name, (1.0, 100.0))
        if not (low <= value <= high):  # also false for nan
            raise TraitError(f"c.GPUPool.{name}: {value!r} is not a number from {low:g} to {high:g}")
        return value

    @default("api_token")
    def _api_token(self):
        return os.environ.get("GPULAB_POOL_API_TOKEN", "")

    @default("worker_token")
    def _worker_token(self):
        return os.environ.get("GPULAB_POOL_WORKER_TOKEN", "")

    @default("replica_name")
    def _replica_name(self):
        return f"{socket.gethostname()}-{os.getpid()}"

    @default("kubernetes_namespace")
    def _kubernetes_namespace(self):
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                account = f.read().strip()
        except OSError:
            account = ""
        return os.environ.get("POD_NAMESPACE") or account or "default"

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
            (p + r"api/workers/([^/]+)/credential", WorkerCredentialHandler),
            (p + r"api/workers(/.*)?", NotHereHandler),  # every worker route, the heartbeat socket too
            (p + "api/allocations", AllocationsHandler),
            (p + r"api/allocations/(\d+)", AllocationHandler),
            (p + r"api/allocations/(\d+)/revoke", RevokeHandler),
            (p + "api/availability", AvailabilityHandler),
            (p + "api/gpus", GPUsHandler),
            (p + "api/usage", UsageHandler),
            (p + "metrics", MetricsHandler),
        ]
        settings = {"pool": self, "log_function": log_request}
        if os.environ.get("JUPYTERHUB_API_TOKEN"):  # running as a hub service: the dashboard uses hub OAuth
            routes += [(p, DashboardHandler), (p + "oauth_callback", HubOAuthCallbackHandler)]
            settings["cookie_secret"] = os.environ.get("JUPYTERHUB_COOKIE_SECRET") or secrets.token_bytes(32)
        return web.Application(routes, **settings)

    def make_worker_app(self) -> web.Application:
        """The worker API on its own listener, so that publishing the service does not publish it."""
        routes = [
            ("/api/health", HealthHandler),
            ("/api/workers", WorkersHandler),
            (r"/api/workers/([^/]+)/heartbeat", HeartbeatHandler),
            (r"/api/workers/([^/]+)/heartbeats", HeartbeatSocket),
            (r"/api/workers/([^/]+)/grants", GrantHandler),
        ]
        return web.Application(routes, pool=self, log_function=log_request,
                               websocket_max_message_size=MAX_SOCKET_MESSAGE)

    def open_state(self) -> None:
        """What the handlers read: the book (the database), the metrics and the workers' last heartbeats."""
        # last_seen written when a quarter of heartbeat_timeout old; the check allows for that lag
        self.book = AllocationBook(self.db_url, self.strategy,
                                   Limits(self.vram_oversubscription, self.compute_oversubscription),
                                   write_every=self.heartbeat_timeout / 4,
                                   listen=self.listen_for_worker_changes)
        self.metrics = PoolMetrics(self)
        self.live = LiveFacts()  # the workers' last heartbeats: vGPU processes, GPU facts (live.py)
        self.lease = LeaderLease(self.book.Session, self.replica_name, self.lease_period)
        self.placer = BatchPlacer(self.book)  # requests that arrive together, placed in one transaction
        self.pod_watcher = None  # kube.PodWatch while this replica leads, where pod_watch is on
        self.node_labels: dict[str, dict] = {}  # node -> its GPU feature discovery labels (the pod watch's)
        self.compared: dict[str, tuple] = {}    # worker -> the GPUs compared with its node's labels

    @property
    def leader(self) -> bool:
        return self.lease.leader

    def lead(self) -> None:
        """Take or renew the leader lease; start or stop what only the leader runs."""
        was = self.pod_watcher is not None
        now = self.lease.hold()
        self.metrics.leader.set(1 if now else 0)
        if now and not was:
            self.start_pod_watch()
        elif was and not now:
            self.stop_pod_watch()

    def periodic_work(self) -> None:
        """What one replica does for all, on the leader only.  When this replica's own event loop was held
        up (the callback comes late by more than half a period), heartbeats may be waiting unread in its
        sockets: the check waits one more period rather than call their workers lost."""
        now, period = time.monotonic(), self.periodic_interval
        lag = now - self._last_periodic - period
        self._last_periodic = now
        if not self.leader:
            return
        try:
            if lag > period / 2 and self._periodic_ran:
                log.warning("the pool's event loop was held up for %.1f s: the heartbeat check waits a period", lag)
            else:
                self.check_heartbeats()
            self._periodic_ran = True
            self.compare_nodes()  # workers that registered at another replica too
        except SQLAlchemyError as exc:  # the database is out of reach: said once, tried again next period
            if not self._periodic_failing:
                log.error("the periodic work could not reach the pool database: %s", exc)
            self._periodic_failing = True
            return
        if self._periodic_failing:
            log.info("the periodic work reaches the pool database again")
        self._periodic_failing = False

    @property
    def periodic_interval(self) -> float:
        """Seconds between two runs of the periodic work."""
        return max(self.heartbeat_timeout / 3, 0.2)

    def check_heartbeats(self) -> None:
        """Mark silent workers lost, counting each worker that becomes so and forgetting its live facts.
        The two reads and the check run in one callback of the event loop, between which no heartbeat can
        bring a worker back."""
        before = self.lost_workers()
        self.book.check_heartbeats(self.heartbeat_timeout)
        for name in sorted(self.lost_workers() - before):
            self.metrics.worker_lost()
            self.live.forget(name)

    def lost_workers(self) -> set[str]:
        with self.book.Session() as db:
            return set(db.scalars(select(Worker.name).where(Worker.status == "lost")))

    # ------------------------------------------------------------ Kubernetes
    def pod_watch_wanted(self) -> bool:
        if self.pod_watch == "auto":
            return bool(self.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST"))
        return self.pod_watch == "on"

    def start_pod_watch(self) -> None:
        if not self.pod_watch_wanted():
            return
        from .kube import PodWatch, api_client  # imported at start (start()), not on the event loop now
        try:
            client = api_client(self.kubeconfig)
        except Exception as exc:
            log.error("the pod watch cannot start (c.GPUPool.kubeconfig=%r): %s; workers are marked lost by "
                      "their heartbeats only", self.kubeconfig, exc)
            self.pod_watch = "off"  # said once, not at every renewal of the lease
            return
        loop = ioloop.IOLoop.current()
        self.pod_watcher = PodWatch(
            client, self.kubernetes_namespace, self.worker_pod_selector,
            on_gone=lambda pod, node, why: loop.add_callback(self.pod_gone, pod, node, why),
            on_node=lambda node, labels: loop.add_callback(self.node_facts, node, labels))
        self.pod_watcher.start()

    def stop_pod_watch(self) -> None:
        if self.pod_watcher is not None:
            self.pod_watcher.stop()
            self.pod_watcher = None

    def pod_gone(self, pod: str, node: str, why: str) -> None:
        """The pod watch saw a worker's pod deleted or failed: mark that worker lost now."""
        if not self.leader:  # queued by a watch this replica ran while it led
            return
        name = self.book.worker_for_pod(pod, node)
        if name is not None and self.book.mark_lost(name, why):
            self.metrics.worker_lost()
            self.live.forget(name)

    def node_facts(self, node: str, labels: dict) -> None:
        """The pod watch read a worker node's GPU feature discovery labels: keep them and compare them with
        what the node's workers registered."""
        self.node_labels[node] = labels
        self.compare_nodes([node], again=True)

    def compare_nodes(self, nodes: list[str] | None = None, again: bool = False) -> None:
        """Log where a worker's registered GPUs disagree with its node's labels (kube.compare_node): each
        worker once per set of GPUs it registered (``again``: its node's labels changed), so a worker that
        registers after its pod ran is compared too."""
        nodes = [n for n in (self.node_labels if nodes is None else nodes) if n in self.node_labels]
        if not nodes:
            return
        from .kube import compare_node
        with self.book.Session() as db:
            rows = db.execute(select(Worker.name, Worker.node, GPU.model, GPU.memory).join(GPU)
                              .where(Worker.node.in_(nodes)).order_by(Worker.name, GPU.index)).all()
        registered: dict[tuple[str, str], list[dict]] = {}
        for name, node, model, memory in rows:
            registered.setdefault((name, node), []).append({"model": model, "memory": memory})
        for (name, node), gpus in registered.items():
            seen = (node, tuple((g["model"], g["memory"]) for g in gpus))
            if self.compared.get(name) == seen and not again:
                continue
            self.compared[name] = seen
            for sentence in compare_node(self.node_labels[node], gpus):
                log.warning("worker %s on node %s: %s", name, node, sentence)

    def stop(self) -> None:
        """A clean stop: the pod watch ends and another replica may lead at once."""
        self.stop_pod_watch()
        self.lease.give_up()
        ioloop.IOLoop.current().stop()

    def start(self):
        # JupyterHub stops a managed service with SIGINT: end quietly, with no KeyboardInterrupt trace.
        loop = ioloop.IOLoop.current().asyncio_loop
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s gpulab-pool %(levelname)s %(message)s")
        if self.pod_watch_wanted():
            try:  # the kubernetes client takes a while to import: at start, not on the loop when leading
                from . import kube  # noqa: F401
            except ImportError as exc:
                log.error("the pod watch needs the kubernetes package (pip install 'gpulab[kubernetes]'): %s; "
                          "workers are marked lost by their heartbeats only", exc)
                self.pod_watch = "off"
        try:
            self.open_state()
        except (SQLAlchemyError, CommandError) as exc:
            where = make_url(engine_url(self.db_url)).render_as_string(hide_password=True)
            print(f"gpulab pool: cannot open the pool database {where}: {str(exc).splitlines()[0]}", file=sys.stderr)
            self.exit(2)
        url = urlparse(self.bind_url)
        app = self.make_app()
        # a lab's first minute opens hundreds of connections at once: room for them in the listen queue
        app.listen(url.port or 80, url.hostname or "127.0.0.1", backlog=LISTEN_BACKLOG)
        wurl = urlparse(self.worker_bind_url)
        self.make_worker_app().listen(wurl.port or 80, wurl.hostname or "127.0.0.1", backlog=LISTEN_BACKLOG)
        self.lead()
        # what start-up made (modules, classes, the tables' metadata: some 100,000 objects) and what survives
        # each full collection (the workers' connections) are kept out of the next ones (heap.py)
        HeapKeeper(ioloop.IOLoop.current().asyncio_loop).start()
        ioloop.PeriodicCallback(self.lead, self.lease.interval * 1000).start()
        self._last_periodic, self._periodic_ran, self._periodic_failing = time.monotonic(), False, False
        ioloop.PeriodicCallback(self.periodic_work, self.periodic_interval * 1000).start()
        # notices of changed workers are read at each heartbeat, and at least every second: a listener that
        # left them unread would hold back PostgreSQL's notification queue, shared by the whole server
        ioloop.PeriodicCallback(self.book.take_changes, 1000).start()
        print(f"gpulab pool listening on {self.bind_url}{self.prefix}, workers on {self.worker_bind_url} "
              f"(database {make_url(engine_url(self.db_url)).render_as_string(hide_password=True)}, strategy {self.strategy}, replica {self.replica_name}"
              f"{', leader' if self.leader else ''})", flush=True)
        ioloop.IOLoop.current().start()


def main(argv=None):
    app = GPUPool.instance()
    app.initialize(argv)  # a bad setting ends here with its sentence (traitlets' catch_config_error)
    app.start()


if __name__ == "__main__":
    main()
