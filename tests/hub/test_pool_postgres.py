"""The pool on a real PostgreSQL server (tools/postgres_server.py, loopback only, a fresh database per
test): allocations survive a restart, two replicas on one database never double book, and exactly one
replica leads (runs the heartbeat checker); a killed leader's place is taken within a lease period, a
stopped one gives its lease up."""
from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, text

from gpu_worker.client import token_hash
from hubtools import G, Pool
from test_pool_metrics import scrape
from workertools import load_script

LEASE = 2.0  # seconds: --GPUPool.lease_period of the failover tests (15 s by default)
server = load_script("gpulab_postgres_server", "tools/postgres_server.py")
try:
    server.find_binaries()
    MISSING = ""
except server.PostgresMissing as exc:
    MISSING = str(exc)
# as the `postgres` fixture (conftest.py): skipped without Debian's package, except in CI
pytestmark = pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"), reason=MISSING)


def test_temporary_postgres_leaves_nothing_behind():
    with server.TemporaryPostgres() as pg:  # PostgreSQL's own durable settings
        where, port = pg.dir, pg.port
        assert (where / "data" / "postmaster.pid").exists()
        url = pg.create_database("second")
        assert url == f"postgresql+psycopg://gpulab@127.0.0.1:{port}/second"
        for u in (pg.url, url):
            engine = create_engine(u)
            with engine.connect() as db:
                assert db.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
            engine.dispose()
    assert not where.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_missing_postgresql_is_a_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(server, "DEBIAN_BINARIES", str(tmp_path / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(server.PostgresMissing, match=r"Debian's postgresql package is not installed: run `make test`"):
        server.TemporaryPostgres().start()


def test_allocations_survive_a_restart(postgres_url):
    p = Pool(postgres_url)
    try:
        p.register()
        status, alloc = p.call("POST", "api/allocations", {"user": "ann", "vram": "12G", "compute": 50})
        assert status == 201, alloc
    finally:
        p.stop()  # SIGKILL: nothing is written on the way out
    credentials, p = p.credentials, Pool(postgres_url)
    p.credentials = credentials  # the worker keeps its credential across the pool's restart
    try:
        _, rows = p.call("GET", "api/allocations")
        assert [(a["id"], a["user"], a["status"]) for a in rows] == [(alloc["id"], "ann", "active")]
        status, grant = p.worker_call("POST", "api/workers/w1/grants", {"token_hash": token_hash(alloc["token"])})
        assert status == 200 and grant["vram"] == 12 * G and grant["id"] == str(alloc["id"])
        status, body = p.call("POST", "api/allocations", {"user": "bob", "vram": "8G", "compute": 50})
        assert status == 503 and body["constraint"] == "memory"  # the 12 GiB of 16 are still promised
        assert p.call("POST", "api/allocations", {"user": "bob", "vram": "4G", "compute": 50})[0] == 201
    finally:
        p.stop()


def test_200_concurrent_allocations_on_two_replicas_never_double_book(postgres_url):
    """The first minute of a lab: 200 requests over 50 connections, spread over two pool processes on
    one database; 4 workers x 2 GPUs x 16 GiB hold 64 vGPUs of 2 GiB."""
    a = Pool(postgres_url)
    b = Pool(postgres_url)
    try:
        for w in range(4):
            a.register(f"w{w}", gpus=2, node=f"n{w}")
        with ThreadPoolExecutor(50) as ex:
            results = list(ex.map(lambda i: (a if i % 2 else b).call(
                "POST", "api/allocations", {"user": f"u{i}", "vram": "2G", "compute": 10}), range(200)))
        codes = [s for s, _ in results]
        assert codes.count(201) == 64 and codes.count(503) == 136, sorted(codes)
        assert all(isinstance(r["message"], str) and r["message"] for s, r in results if s == 503)
        _, gpus = b.call("GET", "api/gpus")
        assert len(gpus) == 8
        assert all(g["used_vram"] <= g["memory"] for g in gpus), gpus
        assert [g["used_vram"] for g in gpus] == [16 * G] * 8
        tokens = {r["token"] for s, r in results if s == 201}
        assert len(tokens) == 64
        _, active = a.call("GET", "api/allocations?status=active")
        assert sorted(x["id"] for x in active) == sorted(r["id"] for s, r in results if s == 201)
        booked = {}  # counted from the allocations themselves, not from the GPUs' kept figures
        for x in active:
            for uuid in x["gpus"]:
                booked[uuid] = booked.get(uuid, 0) + x["vram"]
        assert booked == {g["uuid"]: g["used_vram"] for g in gpus}
    finally:
        a.stop()
        b.stop()


# ------------------------------------------------------------------ the leader lease


def replica(url: str, name: str) -> Pool:
    # heartbeat_timeout 1.5 s: the heartbeat checker shows itself within the test
    return Pool(url, timeout=1.5, extra=[f"--GPUPool.lease_period={LEASE}", f"--GPUPool.replica_name={name}"])


def health(p: Pool) -> dict:
    status, body = p.call("GET", "api/health")
    assert status == 200, body
    return body


def wait_leader(p: Pool, since: float, limit: float) -> float:
    """Seconds from `since` (time.monotonic()) until `p` says it leads; fails after `limit` s."""
    while not health(p)["leader"]:
        assert time.monotonic() - since < limit, f"{health(p)['replica']} did not take the lease:\n{p.output()}"
        time.sleep(0.05)
    return time.monotonic() - since


def one_leader(*replicas: Pool) -> tuple[Pool, Pool]:
    """(leader, follower) once exactly one of two replicas leads (within two lease periods of start)."""
    start = time.monotonic()
    while True:
        leads = [health(p)["leader"] for p in replicas]
        if leads.count(True) == 1:
            break
        assert time.monotonic() - start < 2 * LEASE, f"leaders: {leads}"
        time.sleep(0.05)
    time.sleep(LEASE / 2)  # and it stays so: the follower does not take a held lease
    assert [health(p)["leader"] for p in replicas] == leads
    leader = replicas[leads.index(True)]
    return leader, next(p for p in replicas if p is not leader)


def test_health_names_the_replica_and_whether_it_leads(postgres_url):
    a, b = replica(postgres_url, "replica-a"), replica(postgres_url, "replica-b")
    try:
        leader, follower = one_leader(a, b)
        assert health(a) == {"status": "ok", "replica": "replica-a", "leader": leader is a}
        assert health(b) == {"status": "ok", "replica": "replica-b", "leader": leader is b}
        # the worker listener answers the same
        status, body = follower.worker_call("GET", "api/health", token="none")
        assert status == 200 and body == health(follower)
        assert scrape(leader)[("gpulab_pool_leader", ())] == 1
        assert scrape(follower)[("gpulab_pool_leader", ())] == 0
    finally:
        a.stop()
        b.stop()


def test_killed_leader_is_replaced_within_a_lease_period(postgres_url):
    a, b = replica(postgres_url, "replica-a"), replica(postgres_url, "replica-b")
    try:
        leader, survivor = one_leader(a, b)
        leader.stop()  # SIGKILL: the lease is not given up, it runs out
        took = wait_leader(survivor, time.monotonic(), LEASE + 3)
        assert took < LEASE + 1.0, f"the survivor took the lease {took:.2f} s after the leader was killed"
        # the survivor runs the heartbeat checker now: a worker that never beats is marked lost
        survivor.register()
        survivor.wait_lost(timeout=10)
    finally:
        a.stop()
        b.stop()


def lease_row(url: str) -> tuple[str, float, float]:
    """(holder, expires, now) of the pool's leader lease, times by the database's clock."""
    engine = create_engine(url)
    try:
        with engine.connect() as db:
            holder, expires, now = db.execute(text(
                "SELECT holder, expires, extract(epoch FROM clock_timestamp()) FROM leases "
                "WHERE name = 'pool-leader'")).one()
    finally:
        engine.dispose()
    return holder, float(expires), float(now)


def test_stopped_leader_gives_the_lease_up(postgres_url):
    """SIGTERM (a rolling update) ends the leader's lease at once: with the other replica frozen meanwhile,
    the lease it finds on waking has no time left, and it leads well within a lease period."""
    a, b = replica(postgres_url, "replica-a"), replica(postgres_url, "replica-b")
    try:
        leader, survivor = one_leader(a, b)
        name = health(leader)["replica"]
        survivor.proc.send_signal(signal.SIGSTOP)
        try:
            holder, held_until, now = lease_row(postgres_url)
            assert holder == name and held_until > now  # a leader renews before its lease runs out
            leader.stop(signal.SIGTERM, timeout=15)
            assert leader.proc.returncode == 0, leader.output()
            # given up: free now, and sooner than it would have run out (renewing only moves it later)
            holder, expires, now = lease_row(postgres_url)
            assert holder == name and expires <= now and expires < held_until, (expires, now, held_until)
        finally:
            survivor.proc.send_signal(signal.SIGCONT)
        took = wait_leader(survivor, time.monotonic(), LEASE + 3)
        assert took < LEASE / 2, f"the survivor took a free lease only after {took:.2f} s"
    finally:
        a.stop()
        b.stop()
