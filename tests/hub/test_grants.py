"""Grants, not look-ups: the pool keeps only hashes of session tokens, answers every heartbeat with
the worker's grants and what ended (released, revoked by an admin, lost), and a worker's pool link
keeps the last grants so that a restart during a pool outage still admits its vGPUs' sessions.
Real pool processes on real SQLite files; the worker side against a small stand-in registry."""
from __future__ import annotations

import os
import sqlite3
import time

import pytest
from sqlalchemy.exc import IntegrityError

from gpu_worker.client import token_hash
from hub_spawner.pool.db import Allocation, make_sessionmaker
from hub_spawner.pool.live import LiveFacts
from hubtools import G, WORKER_TOKEN, Pool, registration


def beat(pool, body=None, worker="w1"):
    status, reply = pool.worker_call("POST", f"api/workers/{worker}/heartbeat", body or {}, worker=worker)
    assert status == 200, reply
    return reply


def allocate(pool, vram="4G", **spec):
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "profile": "quarter", "vram": vram,
                                                          "compute": 10, **spec})
    assert status == 201, alloc
    return alloc, token_hash(alloc["token"])


def test_the_database_keeps_only_token_hashes(pool, tmp_path):
    pool.register()
    allocs = [allocate(pool)[0] for _ in range(3)]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("pool.sqlite*"))  # the file and its WAL
    assert raw and all(a["token"].encode() not in raw for a in allocs)
    db = sqlite3.connect(tmp_path / "pool.sqlite")
    assert "token" not in {row[1] for row in db.execute("PRAGMA table_info(allocations)")}
    assert {row[0] for row in db.execute("SELECT token_hash FROM allocations")} == \
        {token_hash(a["token"]) for a in allocs}
    # the token is answered once: no later answer carries it
    assert all("token" not in a for a in pool.call("GET", "api/allocations")[1])
    assert "token" not in pool.call("GET", f"api/allocations/{allocs[0]['id']}")[1]


def test_a_heartbeat_answers_the_grants_and_what_was_released(pool):
    pool.register()
    assert beat(pool) == {"grants": [], "revoked": {}}
    alloc, h = allocate(pool, compute=25, qos="high")
    reply = beat(pool)
    assert reply == {"grants": [{"token_hash": h, "id": str(alloc["id"]), "user": "ann", "profile": "quarter",
                                 "qos": "high", "burst": True, "gpus": ["GPU-w1-0"], "vram": 4 * G,
                                 "compute": 25}],
                     "revoked": {}}
    assert pool.call("DELETE", f"api/allocations/{alloc['id']}")[0] == 204  # the server stopped (or was culled)
    assert beat(pool) == {"grants": [], "revoked": {h: "this vGPU was released: its Jupyter server stopped"}}


def test_an_admin_revokes_a_vgpu_with_a_message(pool):
    pool.register()
    alloc, h = allocate(pool)
    other, h2 = allocate(pool)
    path = f"api/allocations/{alloc['id']}/revoke"
    assert pool.call("POST", path, {"message": "maintenance"}, token=WORKER_TOKEN)[0] == 403
    for bad in ({}, {"message": ""}, {"message": 5}, {"message": "x" * 501}):
        status, body = pool.call("POST", path, bad)
        assert status == 400 and "message must say why" in body["message"], body
    status, body = pool.call("POST", path, {"message": "GPU maintenance at noon"})
    assert status == 200 and body["status"] == "revoked" and body["ended"]
    assert body["message"] == "an admin revoked this vGPU: GPU maintenance at noon"
    reply = beat(pool)
    assert [g["token_hash"] for g in reply["grants"]] == [h2]
    assert reply["revoked"] == {h: "an admin revoked this vGPU: GPU maintenance at noon"}
    status, body = pool.call("POST", path, {"message": "again"})
    assert status == 409 and "already ended (revoked)" in body["message"]
    assert pool.call("POST", "api/allocations/999/revoke", {"message": "x"})[0] == 404
    # the spawner releases it when the server stops: it stays revoked, with the admin's reason
    assert pool.call("DELETE", f"api/allocations/{alloc['id']}")[0] == 204
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["status"] == "revoked"
    assert beat(pool)["revoked"][h].startswith("an admin revoked this vGPU")
    # what a revoked vGPU held is free again
    assert pool.call("GET", "api/gpus")[1][0]["used_vram"] == 4 * G


def test_a_lost_workers_allocations_are_revoked_when_it_returns(tmp_path):
    p = Pool(str(tmp_path / "pool.sqlite"), timeout=1.0)
    try:
        p.register()
        alloc, h = allocate(p)
        p.wait_lost()
        reply = beat(p)  # back: its lost allocations are not granted, and it hears why
        assert reply["grants"] == []
        assert reply["revoked"][h].startswith("this vGPU was lost: GPU worker w1 stopped responding"), reply
        fresh, h2 = allocate(p)  # up again: placed on it and granted
        assert [g["token_hash"] for g in beat(p)["grants"]] == [h2]
    finally:
        p.stop()


def test_grant_look_up_answers_only_the_workers_own_active_allocations(pool):
    pool.register("w1", node="n1")
    pool.register("w2", node="n2")
    alloc, h = allocate(pool, mode="local", node="n1")
    status, grant = pool.worker_call("POST", "api/workers/w1/grants", {"token_hash": h})
    assert status == 200 and grant == beat(pool)["grants"][0]
    status, body = pool.worker_call("POST", "api/workers/w2/grants", {"token_hash": h}, worker="w2")
    assert status == 404 and body["message"] == "no active allocation with this token hash on this worker"
    for bad in ({}, {"token_hash": 5}, {"token_hash": ""}):
        assert pool.worker_call("POST", "api/workers/w1/grants", bad)[0] == 400
    pool.call("DELETE", f"api/allocations/{alloc['id']}")
    assert pool.worker_call("POST", "api/workers/w1/grants", {"token_hash": h})[0] == 404


def test_no_grant_exceeds_the_memory_of_its_gpu(tmp_path):
    """Oversubscription promises a GPU's memory to several vGPUs, never more of it to one; a worker
    that registers again with smaller GPUs loses the grants that no longer fit, with why."""
    p = Pool(str(tmp_path / "pool.sqlite"), extra=["--GPUPool.vram_oversubscription=2"])
    try:
        p.register(memory=16 * G)
        status, body = p.call("POST", "api/allocations", {"user": "ann", "vram": "20G"})
        assert status == 503 and body["constraint"] == "size" and "largest GPU here offers 16 GiB" in body["message"]
        big, h = allocate(p, vram="12G")
        small, h2 = allocate(p, vram="12G")  # two fit: 24 of the 32 GiB promised
        assert len(beat(p)["grants"]) == 2  # read: its next heartbeats are answered from that while nothing changes
        p.register(memory=8 * G)  # the same worker comes back with less memory
        reply = beat(p)
        assert reply["grants"] == []
        assert reply["revoked"][h] == ("this vGPU was revoked: worker w1 no longer offers GPU GPU-w1-0 with "
                                       f"{12 * G} bytes of memory")
        assert all(g["vram"] <= 8 * G for g in reply["grants"])
        assert p.call("GET", f"api/allocations/{big['id']}")[1]["status"] == "revoked"
    finally:
        p.stop()


def test_heartbeat_figures_reach_the_allocation(pool):
    pool.register()
    alloc, h = allocate(pool)
    entry = {"id": str(alloc["id"]), "used": 3 << 20, "overhead": 500 << 20,
             "processes": [{"pid": 10, "client_pid": 20, "used": 3 << 20, "overhead": 500 << 20, "calls": 7}],
             "calls": 7, "launches": 1, "bytes_in": 64, "bytes_out": 0, "errors": 1,
             "last_calls": [{"seq": 7, "time": time.time(), "pid": 20, "function": "cuMemAlloc", "duration": 1e-5,
                             "bytes": 3 << 20, "result": 2, "error": "CUDA_ERROR_OUT_OF_MEMORY"}]}
    gpus = {"GPU-w1-0": {"memory_total": 16 * G, "memory_used": 503 << 20, "utilization": 0.5,
                         "temperature": None, "power": None, "sm_clock": None, "emulated": True}}
    beat(pool, {"pid": 1, "vgpus": {h: entry}, "gpus": gpus})
    a = pool.call("GET", f"api/allocations/{alloc['id']}")[1]
    assert (a["used_vram"], a["overhead_vram"]) == (503 << 20, 500 << 20)
    beat(pool, {"vgpus": {}})  # the whole truth: it holds nothing now
    a = pool.call("GET", f"api/allocations/{alloc['id']}")[1]
    assert (a["used_vram"], a["overhead_vram"]) == (0, 0)


def test_live_facts_keep_the_latest_and_an_hour_of_history():
    live = LiveFacts()
    body = {"vgpus": {"h1": {"id": "1", "used": 5}}, "gpus": {"GPU-a": {"memory_used": 5, "utilization": 0.1}}}
    live.record("w1", body, {"h1"}, {"GPU-a"}, now=1000.0)
    assert live.vgpu("h1")["used"] == 5 and live.vgpu("h1")["worker"] == "w1" and live.vgpu("nope") is None
    for t in range(1001, 1100):  # one point per 10 s at most
        live.record("w1", {"gpus": {"GPU-a": {"memory_used": t, "utilization": 0.2}}}, {"h1"}, {"GPU-a"},
                    now=float(t))
    assert [p[0] for p in live.history("GPU-a", now=1100.0)] == [1000.0 + 10 * i for i in range(10)]
    assert live.gpu("GPU-a")["memory_used"] == 1099 and live.vgpu("h1")["used"] == 5  # no "vgpus": kept
    live.record("w1", {"vgpus": {}}, {"h1"}, {"GPU-a"}, now=5000.0)
    assert live.vgpu("h1") is None and live.history("GPU-a", now=5000.0) == []


def test_live_facts_keep_only_what_the_worker_owns():
    """A worker's heartbeat cannot fill another worker's panels, nor the pool's memory with made-up
    uuids; a GPU its worker no longer has loses its facts and history."""
    live = LiveFacts()
    live.record("w1", {"vgpus": {"h1": {"used": 1}}, "gpus": {"GPU-a": {"memory_used": 1}}}, {"h1"}, {"GPU-a"},
                now=1000.0)
    made_up = {f"GPU-{i}": {"memory_used": 9} for i in range(50)}
    live.record("w2", {"vgpus": {"h1": {"used": 9}, "h2": {"used": 2}}, "gpus": {"GPU-a": {"memory_used": 9},
                       "GPU-b": {"memory_used": 2}, **made_up}}, {"h2"}, {"GPU-b"}, now=1000.0)
    assert live.vgpu("h1")["used"] == 1 and live.vgpu("h1")["worker"] == "w1" and live.vgpu("h2")["used"] == 2
    assert live.gpu("GPU-a")["memory_used"] == 1 and live.gpu("GPU-a")["worker"] == "w1"
    assert live.gpu("GPU-b")["worker"] == "w2" and live.gpu("GPU-0") is None and live.history("GPU-0") == []
    assert len(live._gpus) == len(live._history) == 2  # nothing of the made-up uuids is kept
    live.record("w1", {"vgpus": {"h1": {"used": 1}}}, {"h1"}, set(), now=1010.0)  # GPU-a is no longer its
    assert live.gpu("GPU-a") is None and live.history("GPU-a", now=1010.0) == []
    assert live.history("GPU-b", now=1010.0) != []  # another worker's GPU is untouched
    live.forget("w2")  # marked lost: nothing of it is live, its history stays
    assert live.vgpu("h2") is None and live.gpu("GPU-b") is None and live.history("GPU-b", now=1010.0) != []
    live.forget("w2", {"GPU-c"})  # registered again with another GPU: GPU-b's history goes
    assert live.history("GPU-b", now=1010.0) == [] and live.vgpu("h1")["used"] == 1


def test_a_figure_beyond_its_gpus_is_held_at_the_bound_and_the_heartbeat_counts(pool):
    """One allocation's impossible figure (a worker's bug) does not cost the worker its heartbeat: the
    figure is held at its GPUs' memory, the others are stored, what it ended ends, the grants come."""
    pool.register(memory=16 * G)
    big, h = allocate(pool)
    small, h2 = allocate(pool)
    ended, h3 = allocate(pool)
    status, reply = pool.worker_call("POST", "api/workers/w1/heartbeat", {
        "vgpus": {h: {"used": 20 * G, "overhead": 1 * G}, h2: {"used": 1 * G, "overhead": 0}},
        "ended": {h3: "the session revoked it"}})
    assert status == 200, reply
    assert [g["token_hash"] for g in reply["grants"]] == [h, h2] and list(reply["revoked"]) == [h3]
    figures = {a["id"]: (a["used_vram"], a["overhead_vram"], a["status"])
               for a in pool.call("GET", "api/allocations")[1]}
    assert figures == {big["id"]: (16 * G, 1 * G, "active"), small["id"]: (1 * G, 0, "active"),
                       ended["id"]: (0, 0, "revoked")}
    assert pool.call("GET", "api/gpus")[1][0]["worker_status"] == "up"


OLD_SCHEMA = """
CREATE TABLE workers (name VARCHAR(255) NOT NULL, address VARCHAR(255) NOT NULL, node VARCHAR(255) NOT NULL,
    backend VARCHAR(32) NOT NULL, status VARCHAR(16) NOT NULL, last_seen FLOAT NOT NULL,
    credential_hash VARCHAR(64), PRIMARY KEY (name), UNIQUE (credential_hash));
CREATE TABLE gpus (uuid VARCHAR(128) NOT NULL, worker_name VARCHAR(255) NOT NULL, "index" INTEGER NOT NULL,
    model VARCHAR(255) NOT NULL, memory BIGINT NOT NULL, capability VARCHAR(16) NOT NULL, emulated BOOLEAN NOT NULL,
    PRIMARY KEY (uuid), FOREIGN KEY(worker_name) REFERENCES workers (name));
CREATE TABLE allocations (id INTEGER NOT NULL, user VARCHAR(255) NOT NULL, server_name VARCHAR(255) NOT NULL,
    profile VARCHAR(255) NOT NULL, worker_name VARCHAR(255) NOT NULL, gpu_uuids VARCHAR(2048) NOT NULL,
    vram BIGINT NOT NULL, compute INTEGER NOT NULL, count INTEGER NOT NULL, mode VARCHAR(16) NOT NULL,
    qos VARCHAR(16) NOT NULL, token VARCHAR(128) NOT NULL, status VARCHAR(16) NOT NULL, used_vram BIGINT NOT NULL,
    message VARCHAR(1024) NOT NULL, created FLOAT NOT NULL, ended FLOAT, PRIMARY KEY (id), UNIQUE (token));
CREATE INDEX ix_allocations_worker_name ON allocations (worker_name);
CREATE INDEX ix_allocations_user ON allocations (user);
CREATE INDEX ix_allocations_status ON allocations (status);
"""


def test_a_database_with_plain_tokens_is_migrated_in_place(tmp_path):
    """A pool database from before token hashes: its allocations keep working (by the tokens' hashes),
    the tokens are gone from the file, and the new columns are there."""
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.execute("INSERT INTO workers VALUES ('w1', 'tcp://10.0.0.1:7001', 'n1', 'emulated', 'up', ?, NULL)",
                (time.time(),))
    old.execute("INSERT INTO gpus VALUES ('GPU-w1-0', 'w1', 0, 'test GPU', ?, '9.0', 1)", (16 * G,))
    tokens = ["plain-session-token-number-one", "plain-session-token-number-two"]
    for i, (token, status) in enumerate(zip(tokens, ["active", "released"])):
        old.execute("INSERT INTO allocations VALUES (?, 'ann', '', 'quarter', 'w1', 'GPU-w1-0', ?, 25, 1, 'any', "
                    "'medium', ?, ?, 0, '', ?, ?)", (i + 1, 4 * G, token, status, time.time(), None if i == 0 else
                                                     time.time()))
    old.commit()
    old.close()
    p = Pool(str(path))
    try:
        raw = b"".join(f.read_bytes() for f in tmp_path.glob("old.sqlite*"))
        assert all(t.encode() not in raw for t in tokens)
        assert p.call("GET", "api/allocations/1")[1]["status"] == "active"
        status, body = p.worker_call("POST", "api/workers", registration("w1"), WORKER_TOKEN)  # it enrols again
        assert status == 200
        p.credentials["w1"] = body["credential"]
        reply = beat(p)
        assert [g["token_hash"] for g in reply["grants"]] == [token_hash(tokens[0])]
        assert list(reply["revoked"]) == [token_hash(tokens[1])]
        assert p.worker_call("POST", "api/workers/w1/grants", {"token_hash": token_hash(tokens[0])})[0] == 200
        assert allocate(p)[0]["id"] == 3  # new allocations go on from the old ones
    finally:
        p.stop()
    db = sqlite3.connect(path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(allocations)")}
    assert "token" not in columns and {"token_hash", "overhead_vram"} <= columns
    assert "control_url" in {row[1] for row in db.execute("PRAGMA table_info(workers)")}
    assert {row[1] for row in db.execute("PRAGMA index_list(allocations)")} >= {"ix_allocations_user"}
    Pool(str(path)).stop()  # a second start finds nothing to migrate


# ------------------------------------------------------------------ the worker's pool link
class Registry:
    """What PoolLink uses of the worker's VGPURegistry (gpu_worker/daemon/vgpus.py)."""

    def __init__(self):
        self.applied: list[tuple[list, dict]] = []
        self.lookup = None
        self.figures: list[dict] = []

    def apply_grants(self, grants, revoked):
        self.applied.append((grants, revoked))

    def set_lookup(self, fn):
        self.lookup = fn

    def vgpus(self):
        return self.figures

    def gpu_facts(self):
        return {"GPU-wl-0": {"memory_total": 16 * G, "memory_used": 0, "utilization": None, "temperature": None,
                             "power": None, "sm_clock": None, "emulated": True}}

    def trace(self, vgpu_id, since=0, limit=256):
        calls = [{"seq": n, "time": 1e9 + n, "pid": 20, "function": "cuLaunchKernel", "duration": 1e-5,
                  "bytes": 0, "result": 0, "error": ""} for n in range(1, 9)]
        return calls[:limit], 8


def figures(grant, used):
    return {"id": grant["id"], "token_hash": grant["token_hash"], "state": "active", "used": used, "overhead": 0,
            "processes": [{"pid": 10, "client_pid": 20, "used": used, "overhead": 0, "calls": 8, "launches": 8,
                           "bytes_in": 0, "bytes_out": 0, "started": 1e9}],
            "calls": 8, "launches": 8, "bytes_in": 0, "bytes_out": 0, "errors": {"CUDA_ERROR_INVALID_VALUE": 2}}


def test_token_hashes_are_unique_after_a_migration(tmp_path):
    """Where the migration added token_hash with ALTER TABLE (which cannot declare it unique) and dropped
    the tokens, as it does on PostgreSQL, the pool makes the hashes unique as the model says."""
    path = tmp_path / "migrated.sqlite"
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA.replace(", UNIQUE (token)", "").replace("token VARCHAR(128) NOT NULL",
                                                                        "token_hash VARCHAR(64)"))
    old.close()
    engine, Session = make_sessionmaker(f"sqlite:///{path}")
    row = {"user": "ann", "worker_name": "w1", "gpu_uuids": "GPU-w1-0", "vram": G, "compute": 10,
           "token_hash": token_hash("one")}
    with Session.begin() as db:
        db.add(Allocation(**row))
    with pytest.raises(IntegrityError):
        with Session.begin() as db:
            db.add(Allocation(**row))
    engine.dispose()
    make_sessionmaker(f"sqlite:///{path}")[0].dispose()  # once is enough: a second start adds nothing


def test_pool_link_applies_saves_and_restores_its_grants(tmp_path):
    from gpu_worker.daemon.pool_link import PoolLink

    credential = tmp_path / "state" / "worker-wl.credential"

    def link(pool_url, registry):
        return PoolLink(pool_url, WORKER_TOKEN, "wl", "tcp://10.0.0.2:7000", "n1", "emulated", registration("wl")["gpus"],
                        credential_file=str(credential), registry=registry, control_url="http://10.0.0.2:7100")

    pool = Pool(str(tmp_path / "pool.sqlite"))
    registry = Registry()
    try:
        first = link(pool.worker_url, registry)
        first.register()
        alloc, h = allocate(pool)
        assert alloc["control_url"] == "http://10.0.0.2:7100"
        first.heartbeat()
        grants, revoked = registry.applied[-1]
        assert [g["token_hash"] for g in grants] == [h] and revoked == {}
        grants_file = tmp_path / "state" / "worker-wl.grants"
        assert grants_file.stat().st_mode & 0o777 == 0o600
        # the figures go to the pool in the heartbeat's form; the pool takes them
        registry.figures = [figures(grants[0], 3 << 20)]
        body = first.heartbeat_body(first.vgpu_figures())
        assert body["vgpus"][h]["errors"] == 2 and [c["seq"] for c in body["vgpus"][h]["last_calls"]] == [4, 5, 6, 7, 8]
        first.heartbeat(body)
        assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["used_vram"] == 3 << 20
        # a vGPU placed since the last heartbeat: the registry asks the pool for it
        later, h2 = allocate(pool)
        assert registry.lookup(h2)["id"] == str(later["id"]) and registry.lookup(token_hash("forged")) is None
    finally:
        pool.stop()
    with pytest.raises(OSError):
        registry.lookup(token_hash("anything"))  # the pool is down: the registry says so to the session
    # the worker restarts while the pool is down: its grants are back before it reaches the pool
    again = Registry()
    link(pool.worker_url, again)
    assert [g["token_hash"] for g in again.applied[0][0]] == [h]
    assert sorted(os.listdir(tmp_path / "state")) == ["worker-wl.credential", "worker-wl.grants"]  # no temporaries
