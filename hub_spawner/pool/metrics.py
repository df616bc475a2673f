"""The pool's Prometheus metrics: GPUs, capacity left, allocations by state, refusals, lost workers.

Served at ``GET <prefix>metrics`` on the service URL, for the pool's API token (``Authorization:
token <t>`` or ``Bearer <t>``, which is what Prometheus's ``authorization`` setting sends).  The
gauges are read from the database at scrape time, so they are the book's own figures; the two
counters count events as this process sees them (a counter starts again at 0 when the pool
restarts, which Prometheus's ``rate`` and ``increase`` expect).  A private registry keeps the
process's default collectors (and any other library's) out of the pool's page.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from .api import APIHandler
from .db import GPU, Allocation, Worker
from .scheduler import Request, free_vram

# The constraints a NoFit names (scheduler.place): each refusal counter exists from the start at 0, so
# that increase() sees the first refusal of a reason too.  test_pool_metrics checks this list against
# the scheduler's source.
REASONS = ("no-workers", "lost", "node", "size", "memory", "compute", "count")
STATES = ("active", "lost", "released", "revoked")
WORKER_STATUSES = ("up", "lost", "gone")
MEDIUM = Request(vram=1)  # capacity left is what a low- or medium-QoS vGPU may still be promised


class BookCollector:
    """Gauges read from the pool's book at each scrape."""

    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        book = self.pool.book
        gpus = GaugeMetricFamily("gpulab_pool_gpus", "GPUs registered with the pool, per worker; emulated=\"true\" "
                                 "for the emulated backend's test doubles", labels=["worker", "emulated"])
        left = GaugeMetricFamily("gpulab_pool_gpu_capacity_left_bytes", "Bytes of a GPU's memory that may still "
                                 "be promised to a low- or medium-QoS vGPU (memory x vram_oversubscription - "
                                 "promised; 0 on a lost worker's GPUs, which take nothing)", labels=["gpu", "worker"])
        count: dict[tuple[str, str], int] = {}
        with book.Session.begin() as db:
            states = book.gpu_states(db)
            emulated = dict(db.execute(select(GPU.uuid, GPU.emulated)).all())
            allocations = dict(db.execute(select(Allocation.status, func.count()).group_by(Allocation.status)).all())
            workers = dict(db.execute(select(Worker.status, func.count()).group_by(Worker.status)).all())
        for s in states:
            key = (s.worker, "true" if emulated.get(s.uuid) else "false")
            count[key] = count.get(key, 0) + 1
            up = s.worker_status == "up"
            left.add_metric([s.uuid, s.worker], max(0.0, free_vram(s, MEDIUM, book.limits)) if up else 0.0)
        for (worker, emu), n in sorted(count.items()):
            gpus.add_metric([worker, emu], n)
        by_state = GaugeMetricFamily("gpulab_pool_allocations", "Allocations (vGPUs) in the pool database by "
                                     "state", labels=["state"])
        for state in sorted(set(STATES) | set(allocations)):
            by_state.add_metric([state], allocations.get(state, 0))
        by_status = GaugeMetricFamily("gpulab_pool_workers", "Registered GPU workers by status", labels=["status"])
        for status in sorted(set(WORKER_STATUSES) | set(workers)):
            by_status.add_metric([status], workers.get(status, 0))
        return [gpus, left, by_state, by_status]


class PoolMetrics:
    """The pool's registry: the book's gauges and the refusal and lost-worker counters."""

    def __init__(self, pool):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BookCollector(pool))
        self.refusals = Counter("gpulab_pool_refusals", "Allocation requests refused because nothing fits, by the "
                                "constraint that failed (scheduler.NoFit)", ["reason"], registry=self.registry)
        for reason in REASONS:
            self.refusals.labels(reason)
        self.workers_lost = Counter("gpulab_pool_workers_lost", "Times a worker was marked lost (no heartbeat "
                                    "within heartbeat_timeout, or its Kubernetes pod gone), counted by the "
                                    "replica that led the pool then", registry=self.registry)
        self.leader = Gauge("gpulab_pool_leader", "1 on the pool replica that does the periodic work (heartbeat "
                            "checker, pod watch), else 0; the sum over replicas is 1 (leader.py)",
                            registry=self.registry)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def worker_lost(self) -> None:
        self.workers_lost.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsHandler(APIHandler):
    """``GET metrics``: the pool's metrics in Prometheus's text format, for the pool's API token."""

    def request_token(self) -> str:
        header = self.request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return super().request_token()

    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.pool.metrics.exposition())
