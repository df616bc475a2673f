#!/usr/bin/env python
"""How the pool's cost grows with the pool: allocation latency under a lab's burst and CPU per heartbeat,
at 10, 100 and 1,000 simulated workers of 8 GPUs, on SQLite and on PostgreSQL, in one run.

    python benchmarks/pool_scale.py [--quick] [--sizes 10,100,1000] [--databases sqlite,postgresql]
                                    [--heartbeat-interval S] [--window S] [--burst N] [--bursts K]
                                    [--replicas N] [--http-heartbeats] [--json FILE] [--profile PREFIX]

For each database and size a fresh database and a fresh pool process (``python -m hub_spawner.pool``, as
tests/hub/hubtools.Pool starts it, on free loopback ports; SQLite in a temporary file, PostgreSQL a database of
its own on one temporary server from tools/postgres_server.py; with ``--replicas N``, N pool processes on that
PostgreSQL database, the workers' heartbeats and the burst's requests spread over them in turn, their CPU added):

1. N simulated workers enrol with the worker secret (registration bodies of 8 GPUs of 80 GiB, backend
   "emulated") and keep the credential the pool issues each.
2. Every worker heartbeats every ``--heartbeat-interval`` seconds (default: the worker's, PoolLink's 5 s), the
   workers spread evenly over the interval, from the start to the end of the run, each as real workers do: a
   message on a WebSocket of its own to ``api/workers/<name>/heartbeats``, kept open (tornado's
   websocket_connect, authenticated at the upgrade), each message answered in turn.  ``--http-heartbeats``: by
   ``POST api/workers/<name>/heartbeat`` instead, each worker on a keep-alive connection of its own, to compare
   the two (older workers POST too, though on a new connection per beat).  A body is what a worker
   sends: its 8 GPUs' facts, and for each grant of its last reply (its active allocations) a vGPU entry with
   used/overhead, one process, counters and cumulative kernel time.
3. Once every worker's first heartbeat was answered (at least one interval after they began; at 1,000 workers
   on a small machine the first round, a WebSocket handshake and a full read each, can take longer, and a burst
   inside it would measure a pool's restart rather than a lab's first minute; the time it took is printed) and
   one more interval (for the beats a slow first round delayed), the bursts.  Burst: ``--burst`` (200) POST
   api/allocations issued at once, a connection each; latency from each request's connect to its answer; 201s
   and 503s counted.  The first burst's allocations stay for one heartbeat interval (every worker learns its
   grants) and then the heartbeat window (``--window``, 20 s): the pool's CPU (utime + stime from
   /proc/<pid>/stat) over it, divided by the heartbeats answered in it, is its CPU per heartbeat; over the
   window's length, the percent of one core heartbeats at that interval take; the heartbeats' latencies in the
   window give p50/p95.  Then they are released (DELETE) and the other bursts follow (``--bursts``, 3 in all),
   each released before the next, latencies pooled over bursts.

The load generator is this one process (asyncio: tornado's WebSocket client, or streams for HTTP): its own CPU
over the window is printed beside the pool's, as this machine has only two cores.

Printed: for each database and size, a line with each burst's p95 beside the pooled one (on a small machine one
slow burst of three sets the pooled p95); a table per database (workers, GPUs, allocation p50/p95/max ms,
201/503, CPU ms per heartbeat, % of one core, heartbeat p50/p95 ms), the exponent of the fit of log(allocation
p95) and log(CPU per heartbeat) against log(workers) (least squares over the sizes: 1 is linear growth), and the
targets at 1,000 workers: allocation p95 < 250 ms under the burst and heartbeats < 20% of one core, MET or
MISSED per database.
``--profile PREFIX`` runs each pool under cProfile, written to PREFIX-<database>-<workers>.prof when it stops.

Requests that fail otherwise (not 201/503, a heartbeat not 200 or a socket the pool closed or would not open, a
connect that timed out because the pool's listen queue was full) are part of the measure: counted and printed with
the first of them, and workers the pool marked lost in the run (no heartbeat read within its heartbeat_timeout) are
counted from its log.  The exit status is 0 whether or not the targets are met (a benchmark, not a test) and
non-zero when it could not run (a pool that did not start).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "hub"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from hubtools import HUB_TOKEN, WORKER_TOKEN, free_port, registration, tree  # noqa: E402
from tornado import httpclient, websocket  # noqa: E402

from gpu_worker.daemon.pool_link import PoolLink  # noqa: E402

G = 1 << 30
MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
GPUS = 8
REQUEST = {"vram": "10G", "compute": 25}  # a lab's vGPU: 8 fit an 80 GiB GPU by memory, 4 by compute
TARGET_P95_MS = 250.0
TARGET_CORE_PERCENT = 20.0
TARGET_WORKERS = 1000
FIRST_ROUND_LIMIT = 120.0  # seconds for every worker's first heartbeat to be answered before the bursts
HEARTBEAT_TIMEOUT = 60.0  # the pool's default is 30 s: twice that, so a slow pool shows as slow first


def default_interval() -> float:
    """The worker's heartbeat interval (PoolLink's default): the figure the pool must carry."""
    import inspect

    return inspect.signature(PoolLink.__init__).parameters["interval"].default


def process_ticks(pid: int) -> int:
    """CPU ticks (user + system) of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): the exponent of y ~ x^k (nan under two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else float("nan")


class Connection:
    """One HTTP/1.1 keep-alive connection over asyncio streams: a load generator cheap enough to
    drive a thousand workers from one process."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.reader = self.writer = None

    async def call(self, method: str, path: str, body=None) -> tuple[int, object]:
        for attempt in (0, 1):  # a keep-alive connection the server closed meanwhile: open another, once
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            data = json.dumps(body).encode() if body is not None else b""
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAuthorization: token {self.token}"
                    f"\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
            try:
                self.writer.write(head + data)
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("closed")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
                continue
            status = int(status_line.split()[1])
            length = 0
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b""):
                    break
                key, _, value = line.decode().partition(":")
                if key.lower() == "content-length":
                    length = int(value)
            raw = await self.reader.readexactly(length) if length else b""
            return status, (json.loads(raw) if raw else None)
        raise AssertionError("unreachable")

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class PoolProcess:
    """A pool process on ``db_url`` with its own listeners (hubtools.Pool's command line); ``profile``: under
    cProfile, written there when it stops (SIGTERM ends its loop, so the profiler gets to write)."""

    def __init__(self, db_url: str, log_path: Path, profile: str = ""):
        self.port, self.worker_port = free_port(), free_port()
        env = dict(os.environ, GPULAB_POOL_API_TOKEN=HUB_TOKEN, GPULAB_POOL_WORKER_TOKEN=WORKER_TOKEN)
        env.pop("JUPYTERHUB_API_TOKEN", None)
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, *prof, "-m", "hub_spawner.pool", f"--GPUPool.db_url={db_url}",
             f"--GPUPool.bind_url=http://127.0.0.1:{self.port}",
             f"--GPUPool.worker_bind_url=http://127.0.0.1:{self.worker_port}/",
             f"--GPUPool.heartbeat_timeout={HEARTBEAT_TIMEOUT}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.time() + 60
        while "listening" not in log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("the pool did not start:\n" + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class SimulatedWorker:
    """A worker's heartbeats: its credential, its grants (from the last reply) and what its vGPUs report;
    sent on its WebSocket, or with ``http`` by POST on its keep-alive connection."""

    def __init__(self, index: int, credential: str, port: int, http: bool = False):
        self.name = f"w{index:04d}"
        self.index = index
        self.port, self.credential, self.http = port, credential, http
        self.conn = Connection(port, credential)
        self.socket: websocket.WebSocketClientConnection | None = None
        self.grants: list[dict] = []
        self.kernel: dict[str, float] = {}

    async def beat(self) -> tuple[int, object]:
        """One heartbeat: (status, reply) as the HTTP route answers it.  The socket is opened at the first beat
        and again after the pool closed it (that beat failed: ConnectionError)."""
        if self.http:
            return await self.conn.call("POST", f"/api/workers/{self.name}/heartbeat", self.body())
        if self.socket is None:
            self.socket = await websocket.websocket_connect(httpclient.HTTPRequest(
                f"ws://127.0.0.1:{self.port}/api/workers/{self.name}/heartbeats",
                headers={"Authorization": f"token {self.credential}"}))
        await self.socket.write_message(json.dumps(self.body()))
        answer = await self.socket.read_message()
        if answer is None:
            closed, self.socket = self.socket, None
            raise ConnectionError(f"the pool closed the heartbeat socket ({closed.close_code} {closed.close_reason})")
        reply = json.loads(answer)
        return reply.pop("status"), reply

    def close(self):
        self.conn.close()
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def body(self) -> dict:
        vgpus = {}
        for n, g in enumerate(self.grants):
            h = g["token_hash"]
            self.kernel[h] = self.kernel.get(h, 0.0) + 1.25
            used = g["vram"] // 2
            vgpus[h] = {"id": g["id"], "used": used, "overhead": 300 * MiB,
                        "processes": [{"pid": 40000 + n, "client_pid": 30000 + n, "used": used,
                                       "overhead": 300 * MiB, "calls": 1200}],
                        "calls": 1200, "launches": 800, "bytes_in": 4 * G, "bytes_out": G, "errors": 0,
                        "kernel_time": self.kernel[h], "throttled_time": 0.5, "share_measured": 22.5,
                        "queue_depth": 0, "last_calls": [], "tier": "hot", "tiers": {"hot": used, "warm": 0, "cold": 0}}
        gpus = {f"GPU-{self.name}-{i}": {"memory_total": 80 * G, "memory_used": 2 * G + i * MiB, "utilization": 0.3,
                                         "temperature": 55.0, "power": 250.0, "sm_clock": 1.98e9, "emulated": True}
                for i in range(GPUS)}
        return {"pid": 1000 + self.index, "vgpus": vgpus, "gpus": gpus}


class Heartbeats:
    """Every worker beats every ``interval`` s, spread evenly; latencies and counts of the current window."""

    def __init__(self, workers: list[SimulatedWorker], interval: float):
        self.workers, self.interval = workers, interval
        self.latencies: list[float] = []
        self.answered = 0
        self.first_answered: set[str] = set()  # workers whose first heartbeat (and socket) the pool answered
        self.errors: list[str] = []
        self.stopping = False
        self.tasks: list[asyncio.Task] = []

    def start(self):
        t0 = time.monotonic()
        n = len(self.workers)
        self.tasks = [asyncio.ensure_future(self.beat(w, t0 + self.interval * i / n))
                      for i, w in enumerate(self.workers)]

    def reset(self):
        self.latencies, self.answered = [], 0

    async def beat(self, w: SimulatedWorker, at: float):
        while not self.stopping:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if self.stopping:
                break
            t = time.monotonic()
            try:
                status, reply = await w.beat()
            except Exception as exc:  # counted and shown: a pool that drops heartbeats is part of the result
                self.errors.append(f"{w.name}: {exc!r}")
                status, reply = 0, None
            if status == 200:
                w.grants = reply["grants"]
                self.first_answered.add(w.name)
                self.latencies.append(time.monotonic() - t)
                self.answered += 1
            elif status:
                self.errors.append(f"{w.name}: heartbeat answered {status}: {str(reply)[:200]}")
            at += self.interval
            if at < time.monotonic():  # the pool fell behind: the next beat goes now, none are made up
                at = time.monotonic()

    async def stop(self):
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.workers:
            w.close()


async def enrol(worker_port: int, n: int, beat_ports: list[int], http: bool = False) -> list[SimulatedWorker]:
    """N workers enrolled with the worker secret, 8 connections at a time; each keeps its credential and beats
    to one of ``beat_ports`` (the replicas' worker listeners), in turn (``http``: by POST)."""
    workers: list[SimulatedWorker | None] = [None] * n
    todo = list(range(n))

    async def lane():
        conn = Connection(worker_port, WORKER_TOKEN)
        while todo:
            i = todo.pop()
            name = f"w{i:04d}"
            body = registration(name, address=f"tcp://10.{i // 250}.{i % 250}.1:7000", gpus=GPUS, memory=80 * G,
                                node=f"node{i:04d}")
            status, answer = await conn.call("POST", "/api/workers", body)
            if status != 200 or not answer.get("credential"):
                raise RuntimeError(f"enrolment of {name} answered {status}: {answer}")
            workers[i] = SimulatedWorker(i, answer["credential"], beat_ports[i % len(beat_ports)], http)
        conn.close()

    await asyncio.gather(*(lane() for _ in range(8)))
    return workers


async def burst(ports: list[int], size: int) -> dict:
    """``size`` POST api/allocations at once, a connection each, to the replicas in turn: latencies (s), ids
    placed, 201s and 503s."""
    async def one(i: int):
        conn = Connection(ports[i % len(ports)], HUB_TOKEN)
        t = time.monotonic()
        try:
            status, answer = await conn.call("POST", "/api/allocations", {"user": f"student{i:03d}", **REQUEST})
        except OSError as exc:  # e.g. a connect that timed out: the pool's listen queue was full
            status, answer = 0, repr(exc)
        finally:
            conn.close()
        return time.monotonic() - t, status, answer

    results = await asyncio.gather(*(one(i) for i in range(size)))
    out = {"latencies": [r[0] for r in results], "ids": [r[2]["id"] for r in results if r[1] == 201],
           "201": sum(r[1] == 201 for r in results), "503": sum(r[1] == 503 for r in results),
           "other": [f"{r[1]}: {str(r[2])[:200]}" for r in results if r[1] not in (201, 503)]}
    return out


async def release(port: int, ids: list[int], lanes: int = 20) -> None:
    """DELETE each allocation, ``lanes`` keep-alive connections at a time (a spawner stops many servers at once;
    one at a time would wait behind the heartbeats' queue once per allocation when the pool is saturated)."""
    todo = list(ids)

    async def lane():
        conn = Connection(port, HUB_TOKEN)
        while todo:
            i = todo.pop()
            status, answer = await conn.call("DELETE", f"/api/allocations/{i}")
            if status != 204:
                raise RuntimeError(f"DELETE api/allocations/{i} answered {status}: {answer}")
        conn.close()

    await asyncio.gather(*(lane() for _ in range(lanes)))


async def measure(pools: list[PoolProcess], n: int, args, server=None) -> dict:
    """One size on ``pools`` (replicas of one database): the heartbeats and the bursts go to them in turn, and
    the pool's CPU is theirs together."""
    pool = pools[0]
    workers = await enrol(pool.worker_port, n, [p.worker_port for p in pools], args.http_heartbeats)
    beats = Heartbeats(workers, args.heartbeat_interval)
    beats.start()
    try:
        # every worker has beaten once: its socket opened and its first beat read in full.  At 1,000 workers
        # that round can outlast the interval on a small machine, and a burst inside it measures a pool's
        # restart (every worker connecting at once), not the lab's first minute
        t0 = time.monotonic()
        await asyncio.sleep(args.heartbeat_interval)
        while len(beats.first_answered) < n and time.monotonic() - t0 < FIRST_ROUND_LIMIT:
            await asyncio.sleep(0.1)
        first_round = time.monotonic() - t0
        if len(beats.first_answered) < n:
            raise RuntimeError(f"only {len(beats.first_answered)} of {n} workers had a heartbeat answered in "
                               f"{FIRST_ROUND_LIMIT:.0f} s")
        # and one more interval: beats the first round delayed (they go at once, none made up) are answered
        await asyncio.sleep(args.heartbeat_interval)
        latencies, placed, refused, other, burst_p95 = [], 0, 0, [], []
        window = {}
        for k in range(args.bursts):
            result = await burst([p.port for p in pools], args.burst)
            latencies += result["latencies"]
            burst_p95.append(percentile(result["latencies"], 95) * 1000)
            placed, refused, other = placed + result["201"], refused + result["503"], other + result["other"]
            if k == 0:  # with the first burst's vGPUs active: every worker learns its grants, then the window
                await asyncio.sleep(args.heartbeat_interval)
                beats.reset()
                ticks, db, mine, t0 = (sum(process_ticks(p.proc.pid) for p in pools), server_ticks(server),
                                       time.process_time(), time.monotonic())
                await asyncio.sleep(args.window)
                took = time.monotonic() - t0
                cpu = (sum(process_ticks(p.proc.pid) for p in pools) - ticks) / TICK
                window = {"seconds": took, "pool_cpu_s": cpu, "generator_cpu_s": time.process_time() - mine,
                          "db_cpu_s": (server_ticks(server) - db) / TICK,
                          "beats": beats.answered, "hb_latencies": list(beats.latencies),
                          "vgpus_reported": sum(len(w.grants) for w in workers)}
            await release(pool.port, result["ids"])
    finally:
        await beats.stop()
    # failures are part of the measure (a pool too busy to accept connections), shown and counted
    per_beat = window["pool_cpu_s"] / window["beats"] * 1000 if window["beats"] else float("nan")
    return {"workers": n, "gpus": n * GPUS, "replicas": len(pools), "first_round_s": first_round,
            "alloc_p50_ms": percentile(latencies, 50) * 1000,
            "alloc_p95_ms": percentile(latencies, 95) * 1000, "alloc_max_ms": max(latencies) * 1000,
            "burst_p95_ms": burst_p95,
            "allocations": len(latencies), "201": placed, "503": refused, "alloc_failed": other,
            "hb_failed": list(beats.errors),
            "hb_cpu_ms_per_beat": per_beat, "hb_core_percent": window["pool_cpu_s"] / window["seconds"] * 100,
            "hb_p50_ms": percentile(window["hb_latencies"], 50) * 1000,
            "hb_p95_ms": percentile(window["hb_latencies"], 95) * 1000,
            "beats": window["beats"], "beats_expected": round(n * window["seconds"] / args.heartbeat_interval),
            "vgpus_reported": window["vgpus_reported"],
            "generator_core_percent": window["generator_cpu_s"] / window["seconds"] * 100,
            "db_core_percent": window["db_cpu_s"] / window["seconds"] * 100 if server is not None else None}


def postgres_server():
    """tools/postgres_server.py's temporary server, started (PostgreSQL's own durable settings, as in production)."""
    from tools.postgres_server import TemporaryPostgres

    return TemporaryPostgres().start()


def database_url(kind: str, tmp: Path, n: int, server) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'pool-{n}.sqlite'}"
    return server.create_database(f"scale_{n}")


def server_ticks(server) -> int:
    """CPU ticks of the PostgreSQL server: its postmaster and every process below it (0 without one)."""
    if server is None:
        return 0
    postmaster = int((server.dir / "data" / "postmaster.pid").read_text().split()[0])
    total = 0
    for pid in [postmaster, *tree(postmaster)]:
        try:
            total += process_ticks(pid)
        except OSError:  # a backend that ended meanwhile
            pass
    return total


def print_table(kind: str, rows: list[dict]) -> None:
    replicas = rows[0]["replicas"] if rows else 1
    print(f"\n{kind}{f', {replicas} replicas' if replicas > 1 else ''}:")
    print(f"{'workers':>7} {'GPUs':>5} | {'alloc p50':>9} {'p95':>7} {'max':>7} ms | {'201':>4} {'503':>4} | "
          f"{'hb CPU ms/beat':>14} {'% core':>7} | {'hb p50':>7} {'p95 ms':>7} | {'beats':>11} | {'gen % core':>10}"
          f"{' | PostgreSQL % core' if kind == 'postgresql' else ''}")
    for r in rows:
        print(f"{r['workers']:>7} {r['gpus']:>5} | {r['alloc_p50_ms']:>9.1f} {r['alloc_p95_ms']:>7.1f} "
              f"{r['alloc_max_ms']:>7.1f} ms | {r['201']:>4} {r['503']:>4} | {r['hb_cpu_ms_per_beat']:>14.2f} "
              f"{r['hb_core_percent']:>7.1f} | {r['hb_p50_ms']:>7.1f} {r['hb_p95_ms']:>7.1f} | "
              f"{r['beats']:>5}/{r['beats_expected']:<5} | {r['generator_core_percent']:>10.1f}"
              + ("" if r["db_core_percent"] is None else f" | {r['db_core_percent']:>17.1f}"))


def print_fit_and_targets(kind: str, rows: list[dict]) -> dict:
    xs = [r["workers"] for r in rows]
    fit = {"alloc_p95": slope(xs, [r["alloc_p95_ms"] for r in rows]),
           "hb_cpu_per_beat": slope(xs, [r["hb_cpu_ms_per_beat"] for r in rows])}
    print(f"{kind} fit over {','.join(map(str, xs))} workers: allocation p95 ~ workers^{fit['alloc_p95']:.2f}, "
          f"CPU per heartbeat ~ workers^{fit['hb_cpu_per_beat']:.2f}")
    at = next((r for r in rows if r["workers"] == TARGET_WORKERS), None)
    if at is None:
        print(f"{kind} targets at {TARGET_WORKERS} workers: not measured (sizes {','.join(map(str, xs))})")
        return {"fit": fit}
    p95_met = at["alloc_p95_ms"] < TARGET_P95_MS
    hb_met = at["hb_core_percent"] < TARGET_CORE_PERCENT
    print(f"{kind} target at {TARGET_WORKERS} workers, allocation p95 < {TARGET_P95_MS:g} ms under the burst: "
          f"{at['alloc_p95_ms']:.1f} ms: {'MET' if p95_met else 'MISSED'}")
    print(f"{kind} target at {TARGET_WORKERS} workers, heartbeats < {TARGET_CORE_PERCENT:g}% of one core: "
          f"{at['hb_core_percent']:.1f}%: {'MET' if hb_met else 'MISSED'}")
    return {"fit": fit, "alloc_p95_met": p95_met, "heartbeat_met": hb_met}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 and 20 workers, bursts of 20, 3 s window, "
                                                         "1 s heartbeats (a smoke run)")
    ap.add_argument("--sizes", default=None, help="workers per run, comma-separated (default 10,100,1000)")
    ap.add_argument("--databases", default="sqlite,postgresql", help="sqlite, postgresql or both (default)")
    ap.add_argument("--heartbeat-interval", type=float, default=None,
                    help=f"seconds between a worker's heartbeats (default the worker's, {default_interval():g})")
    ap.add_argument("--window", type=float, default=None, help="seconds of the heartbeat window (default 20)")
    ap.add_argument("--burst", type=int, default=None, help="concurrent allocations per burst (default 200)")
    ap.add_argument("--bursts", type=int, default=3, help="bursts per size (default 3)")
    ap.add_argument("--replicas", type=int, default=1, help="pool replicas on the PostgreSQL database, the heartbeats "
                                                            "and bursts spread over them (default 1; SQLite: 1)")
    ap.add_argument("--http-heartbeats", action="store_true", help="heartbeats by POST on keep-alive connections "
                                                                    "rather than on each worker's WebSocket")
    ap.add_argument("--json", default="", help="write the results to this file")
    ap.add_argument("--profile", default="", help="run each pool under cProfile: PREFIX-<database>-<workers>.prof")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("5,20" if args.quick else "10,100,1000")).split(",")]
    args.heartbeat_interval = args.heartbeat_interval or (1.0 if args.quick else default_interval())
    args.window = args.window or (3.0 if args.quick else 20.0)
    args.burst = args.burst or (20 if args.quick else 200)
    kinds = [k.strip() for k in args.databases.split(",") if k.strip()]
    if set(kinds) - {"sqlite", "postgresql"}:
        ap.error("--databases: sqlite and/or postgresql")
    print(f"pool scale: {','.join(map(str, sizes))} workers x {GPUS} GPUs of 80 GiB; heartbeats every "
          f"{args.heartbeat_interval:g} s, window {args.window:g} s; {args.bursts} bursts of {args.burst} "
          f"allocations ({REQUEST['vram']}, {REQUEST['compute']}% compute); heartbeats "
          f"{'by HTTP POST' if args.http_heartbeats else 'on WebSockets'}; databases {','.join(kinds)}", flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="gpulab-scale-") as tmp:
        for kind in kinds:
            server = postgres_server() if kind == "postgresql" else None
            rows = []
            try:
                for n in sizes:
                    url, pools = database_url(kind, Path(tmp), n, server), []
                    try:
                        for i in range(args.replicas if kind == "postgresql" else 1):
                            profile = f"{args.profile}-{kind}-{n}-{i}.prof" if args.profile else ""
                            pools.append(PoolProcess(url, Path(tmp) / f"pool-{kind}-{n}-{i}.log", profile))
                        t0 = time.monotonic()
                        rows.append(asyncio.run(measure(pools, n, args, server)))
                    except Exception:
                        for pool in pools:
                            print(pool.log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
                        raise
                    finally:
                        for pool in pools:
                            pool.stop()
                    r = rows[-1]
                    # a pool too busy to read heartbeats for its heartbeat_timeout marks workers lost
                    r["marked_lost"] = sum(p.log_path.read_text(errors="replace").count("marked lost") for p in pools)
                    print(f"  {kind} {n} workers, {len(pools)} replica(s): done in {time.monotonic() - t0:.0f} s (allocation p50/p95/max "
                          f"{r['alloc_p50_ms']:.1f}/{r['alloc_p95_ms']:.1f}/{r['alloc_max_ms']:.1f} ms, each burst's p95 "
                          f"{'/'.join(f'{v:.0f}' for v in r['burst_p95_ms'])} ms, {r['201']} placed; {r['hb_cpu_ms_per_beat']:.2f} ms CPU per heartbeat, {r['hb_core_percent']:.1f}% "
                          f"of a core, heartbeat p95 {r['hb_p95_ms']:.1f} ms, {r['beats']}/{r['beats_expected']} "
                          f"beats; {r['vgpus_reported']} vGPUs reported; {r['marked_lost']} marked lost; every worker's "
                          f"first heartbeat answered {r['first_round_s']:.1f} s after they began)", flush=True)
                    if args.json:  # what is measured so far, should a later size not finish
                        Path(args.json).write_text(json.dumps({"args": vars(args), "results": {**results, kind: {
                            "rows": rows}}}, indent=1) + "\n")
            finally:
                if server is not None:
                    server.stop()
            results[kind] = {"rows": rows}
        for kind in kinds:
            print_table(kind, results[kind]["rows"])
        print()
        for kind in kinds:
            print(f"{kind}: workers marked lost by the pool during the run (no heartbeat read within its "
                  f"heartbeat_timeout, {HEARTBEAT_TIMEOUT:g} s): " +
                  ", ".join(f"{r['workers']} workers: {r['marked_lost']}" for r in results[kind]["rows"]))
        for kind in kinds:
            for r in results[kind]["rows"]:
                if r["alloc_failed"] or r["hb_failed"]:
                    print(f"{kind}, {r['workers']} workers: {len(r['alloc_failed'])} allocation requests and "
                          f"{len(r['hb_failed'])} heartbeats failed (not 201/503, not 200); first: "
                          f"{(r['alloc_failed'] + r['hb_failed'])[0]}")
        for kind in kinds:
            results[kind].update(print_fit_and_targets(kind, results[kind]["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
