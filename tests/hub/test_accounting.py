"""Share-weighted accounting and bursting on the pool's side (issue 10): heartbeats' cumulative
kernel_time summed per allocation (a worker restart counts nothing negative), GPU-hours per user and
per hub group, wall clock and weighted, and the `burst` GPU key (default by QoS, carried in grants).

The arithmetic against the allocation book in process; the wire (heartbeat fields and their bounds,
api/usage, grants) against a real pool process."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from types import SimpleNamespace

import pytest

from gpu_worker.client import LimitError, gpu_settings, token_hash
from hub_spawner.pool.allocations import AllocationBook
from hub_spawner.pool.db import GPU, Allocation, Worker
from hub_spawner.pool.scheduler import InvalidRequest, Limits
from hub_spawner.pool.worker_api import check_heartbeat, hold_shares
from hub_spawner.spawner.mixin import GPUSimpleLocalProcessSpawner, check_profile, describe_gpu
from hubtools import G, Pool

HOURS = 10  # how long ago the test allocations were placed: room for the kernel seconds they report


@pytest.fixture
def book(tmp_path):
    b = AllocationBook(f"sqlite:///{tmp_path / 'pool.sqlite'}", "compact-first", Limits())
    with b.Session.begin() as db:  # every allocation lands on w1; w2 is only another worker's name
        db.add(Worker(name="w1", address="tcp://10.0.0.1:7001", node="n1", backend="emulated",
                      gpus=[GPU(uuid=f"GPU-w1-{i}", index=i, memory=16 * G) for i in range(2)]))
        db.add(Worker(name="w2", address="tcp://10.0.0.1:7002", node="n1", backend="emulated"))
    return b


def place(book, user="ann", groups=(), hours_ago=HOURS, **gpu) -> tuple[int, str]:
    """An allocation placed ``hours_ago``: its id and token hash."""
    alloc, token, _ = book.allocate({"user": user, "vram": "1G", "compute": 25, "groups": list(groups), **gpu})
    with book.Session.begin() as db:
        db.get(Allocation, alloc.id).created = time.time() - hours_ago * 3600
    return alloc.id, token_hash(token)


def kernel_seconds(book, alloc_id) -> float:
    with book.Session() as db:
        return db.get(Allocation, alloc_id).kernel_seconds


def test_growing_kernel_time_gives_exact_weighted_hours(book):
    a, h = place(book, "ann")
    for figure in (0.0, 90.0, 900.0, 1800.0):
        book.heartbeat("w1", {h: (G, 0)}, kernel={h: figure})
    book.heartbeat("w1", {h: (G, 0)}, kernel={h: 1800.0})  # nothing new ran: nothing added
    assert kernel_seconds(book, a) == 1800.0
    [ann] = book.usage_report()["users"]
    assert ann["gpu_hours_weighted"] == 0.5  # 1800 s of kernels: half an hour of one GPU
    assert ann["gpu_hours"] == pytest.approx(HOURS, abs=0.01)  # wall clock, as before
    # a heartbeat without kernel_time (an older worker) leaves the count alone
    book.heartbeat("w1", {h: (G, 0)})
    assert kernel_seconds(book, a) == 1800.0


def test_a_worker_restart_counts_nothing_negative(book):
    a, h = place(book)
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 1000.0})
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 40.0})   # the worker started again: 40 s since then
    assert kernel_seconds(book, a) == 1040.0
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 100.0})
    assert kernel_seconds(book, a) == 1100.0
    # missing from a heartbeat (no process now) keeps the last figure: growth later is counted once
    book.heartbeat("w1", {}, kernel={})
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 160.0})
    assert kernel_seconds(book, a) == 1160.0


def test_more_kernel_time_than_the_gpus_could_run_is_held_at_that_bound(book, caplog):
    a, h = place(book, hours_ago=1, count=2)
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 5 * 3600.0})
    # two GPUs for an hour (and for the seconds this test has run: the bound grows with the clock)
    assert kernel_seconds(book, a) == pytest.approx(2 * 3600.0, abs=4.0)
    assert "more than its 2 GPU(s) could" in caplog.text
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 5 * 3600.0 + 10})
    assert kernel_seconds(book, a) == pytest.approx(2 * 3600.0, abs=4.0)  # the 10 s more are held too


def test_only_the_workers_own_and_recent_allocations_count(book):
    mine, h = place(book)
    other, h2 = place(book, user="bob")
    with book.Session.begin() as db:
        db.get(Allocation, other).worker_name = "w2"
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 100.0, h2: 100.0})
    assert (kernel_seconds(book, mine), kernel_seconds(book, other)) == (100.0, 0.0)
    # released: what ran before its worker heard of it still counts, within the hour of revocations
    book.release(mine)
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 130.0})
    assert kernel_seconds(book, mine) == 130.0
    with book.Session.begin() as db:
        db.get(Allocation, mine).ended = time.time() - 7200
    book.heartbeat("w1", {h: (0, 0)}, kernel={h: 500.0})
    assert kernel_seconds(book, mine) == 130.0


def test_usage_per_user_and_per_group(book):
    a1, h1 = place(book, "ann", groups=["physics", "staff", "physics"])
    a2, h2 = place(book, "bob", groups=["physics"])
    a3, h3 = place(book, "cy")
    book.heartbeat("w1", {}, kernel={h1: 3600.0, h2: 1800.0, h3: 900.0})
    book.release(a3)
    report = book.usage_report()
    weighted = {u["user"]: (u["gpu_hours_weighted"], u["active"]) for u in report["users"]}
    assert weighted == {"ann": (1.0, 1), "bob": (0.5, 1), "cy": (0.25, 0)}
    groups = {g["group"]: (g["gpu_hours_weighted"], g["active"], g["users"]) for g in report["groups"]}
    assert groups == {"physics": (1.5, 2, 2), "staff": (1.0, 1, 1)}  # ann counts once in physics
    assert [round(g["gpu_hours"]) for g in report["groups"]] == [2 * HOURS, HOURS]
    # the dashboard's rows
    assert [(u["user"], u["gpu_hours_weighted"]) for u in book.usage_table()] == [("ann", 1.0), ("bob", 0.5),
                                                                               ("cy", 0.25)]


def test_groups_must_be_a_list_of_names(book):
    for bad in ("physics", [""], [3], ["x" * 256]):
        with pytest.raises(InvalidRequest, match="groups must be a list of at most 256 hub group names"):
            book.allocate({"user": "ann", "vram": "1G", "groups": bad})


@pytest.mark.parametrize("qos, burst", [("high", True), ("medium", True), ("low", False)])
def test_burst_defaults_by_qos_and_grants_carry_it(book, qos, burst):
    assert gpu_settings({"vram": "1G", "qos": qos})["burst"] is burst
    _, h = place(book, qos=qos)
    _, h2 = place(book, qos=qos, burst=not burst)
    grants = {g["token_hash"]: g["burst"] for g in book.heartbeat("w1", None).grants}
    assert grants == {h: burst, h2: not burst}


def test_burst_must_be_true_or_false(book):
    for bad in ("yes", "true", 1, 0, None):
        with pytest.raises(LimitError, match=r"^gpu\.burst: .* is not true or false: burst says whether the vGPU "
                                             r"may use idle GPU time beyond its compute share$"):
            gpu_settings({"vram": "1G", "burst": bad})
        with pytest.raises(InvalidRequest, match=r"invalid GPU request: burst: .* is not true or false"):
            book.allocate({"user": "ann", "vram": "1G", "burst": bad})
    with pytest.raises(LimitError, match="burst: 'no' is not true or false"):
        check_profile({"slug": "p", "gpu": {"vram": "1G", "burst": "no"}})
    assert gpu_settings({"burst": False}, partial=True) == {"burst": False}


def test_an_older_database_gets_burst_by_qos(tmp_path, book):
    place(book, qos="low", burst=True)
    place(book, qos="high", burst=False)
    book.engine.dispose()
    db = sqlite3.connect(tmp_path / "pool.sqlite")
    for column in ("burst", "groups", "kernel_seconds", "kernel_time_seen"):
        db.execute(f"ALTER TABLE allocations DROP COLUMN {column}")
    # a database from before schema revisions: no revision, no lease, no pods, no promised figures
    db.execute("DROP TABLE alembic_version")
    db.execute("DROP TABLE leases")
    db.execute("ALTER TABLE workers DROP COLUMN pod")
    db.execute("ALTER TABLE workers DROP COLUMN version")
    db.execute("ALTER TABLE workers DROP COLUMN unix_socket")
    db.execute("DROP INDEX ix_gpus_busiest")
    db.execute("DROP INDEX ix_gpus_idlest")
    db.execute("DROP INDEX ix_gpus_worker_name")
    for column in ("promised_vram", "promised_compute", "sessions", "load"):
        db.execute(f"ALTER TABLE gpus DROP COLUMN {column}")
    db.commit()
    db.close()
    again = AllocationBook(f"sqlite:///{tmp_path / 'pool.sqlite'}", "compact-first", Limits())
    with again.Session() as s:
        assert [(a.qos, a.burst, a.group_list, a.kernel_seconds) for a in s.query(Allocation).order_by(Allocation.id)] \
            == [("low", False, [], 0.0), ("high", True, [], 0.0)]


def test_the_spawner_sends_the_users_groups_and_the_form_says_burst():
    user = SimpleNamespace(name="ann", groups=[SimpleNamespace(name="staff"), SimpleNamespace(name="physics")])
    s = GPUSimpleLocalProcessSpawner(user=user, gpu_profiles=[])
    sent = []

    async def pool_call(method, path, body=None):
        sent.append(body)
        return {"id": 1}

    s.pool_call = pool_call
    asyncio.run(s.allocate_gpu({"slug": "small"}, {"vram": G, "burst": False}))
    assert sent[0]["groups"] == ["physics", "staff"] and sent[0]["burst"] is False
    assert describe_gpu({"vram": G, "compute": 25}) == "1 GiB VRAM, 25% compute (more when the GPU is idle)"
    assert "idle" not in describe_gpu({"vram": G, "compute": 25, "qos": "low"})
    assert "idle" not in describe_gpu({"vram": G, "compute": 25, "burst": False})
    assert "idle" not in describe_gpu({"vram": G, "compute": 100})


# ------------------------------------------------------------------------------ the wire
def test_heartbeat_fields_usage_report_and_grants_over_http(tmp_path):
    # heartbeat_timeout 4 s: the pool writes a worker's kernel seconds at most every 1 s (a quarter of it)
    pool = Pool(str(tmp_path / "pool.sqlite"), timeout=4.0)
    pool.register(gpus=2)
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G", "compute": 25, "qos": "low",
                                                          "groups": ["physics"]})
    assert status == 201 and alloc["burst"] is False and alloc["groups"] == ["physics"]
    h = token_hash(alloc["token"])
    # placed just now: the wall clock bounds what its kernels can have run, so the test waits that long
    time.sleep(1.0)
    entry = {"id": str(alloc["id"]), "used": 0, "kernel_time": 0.25, "throttled_time": 3.0, "share_measured": 25.0,
             "queue_depth": 1}
    status, reply = pool.worker_call("POST", "api/workers/w1/heartbeat", {"vgpus": {h: entry}})
    assert status == 200 and reply["grants"][0]["burst"] is False
    status, reply = pool.worker_call("POST", "api/workers/w1/heartbeat", {"vgpus": {h: {**entry,
                                                                                        "kernel_time": 0.75}}})
    assert status == 200
    # cumulative kernel time waits for the worker's next write (its memory figures would not): the
    # 0.5 s more are stored by the first heartbeat after a quarter of the timeout, none lost
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["kernel_seconds"] == 0.25
    time.sleep(1.05)
    status, reply = pool.worker_call("POST", "api/workers/w1/heartbeat", {"vgpus": {h: {**entry,
                                                                                        "kernel_time": 0.75}}})
    assert status == 200
    status, usage = pool.call("GET", "api/usage")
    assert status == 200 and usage["users"][0]["user"] == "ann"
    assert usage["users"][0]["gpu_hours_weighted"] == 0.75 / 3600
    assert usage["groups"] == [{"group": "physics", "gpu_hours": usage["users"][0]["gpu_hours"],
                                "gpu_hours_weighted": 0.75 / 3600, "active": 1, "users": 1}]
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["kernel_seconds"] == 0.75
    for field, bad, why in [("kernel_time", -1, "kernel_time must be a number from 0 to 1e+11"),
                            ("throttled_time", "3", "throttled_time must be a number from 0 to 1e+11"),
                            ("share_measured", 1700, "share_measured must be a number from 0 to 1600"),
                            ("share_measured", True, "share_measured must be a number"),
                            ("queue_depth", 1.5, "queue_depth must be an integer")]:
        status, body = pool.worker_call("POST", "api/workers/w1/heartbeat", {"vgpus": {h: {**entry, field: bad}}})
        assert status == 400 and why in body["message"], body
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["kernel_seconds"] == 0.75  # nothing stored
    # an older worker's heartbeat (no compute-share figures, or nulls) is still good and adds nothing
    for old in ({"id": entry["id"], "used": 0}, {**entry, "kernel_time": None, "share_measured": None,
                                                 "queue_depth": None}):
        assert pool.worker_call("POST", "api/workers/w1/heartbeat", {"vgpus": {h: old}})[0] == 200
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["kernel_seconds"] == 0.75
    status, body = pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G", "burst": "yes"})
    assert status == 400 and "burst: 'yes' is not true or false" in body["message"]
    status, body = pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G", "groups": "physics"})
    assert status == 400 and "groups must be a list" in body["message"]


def test_a_measured_share_beyond_the_vgpus_gpus_is_held(caplog):
    body = check_heartbeat({"vgpus": {"h1": {"id": "7", "share_measured": 150.0},
                                      "h2": {"id": "8", "share_measured": 150.0}}})
    hold_shares("w1", body, [{"token_hash": "h1", "gpus": ["GPU-a"]}, {"token_hash": "h2", "gpus": ["a", "b"]}])
    assert [e["share_measured"] for e in body["vgpus"].values()] == [100, 150.0]
    assert "vGPU 7 used 150% of a GPU, more than its 1 GPU(s): counted as 100%" in caplog.text
