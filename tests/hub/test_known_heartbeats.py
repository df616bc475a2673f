"""The usual heartbeat is answered from what the replica read at the worker's last one (AllocationBook's
KnownBeat), after one read of the worker's row: these tests show that the answer is never stale across
replicas (two books on one database, SQLite and PostgreSQL), that nothing is written while nothing is due,
and that kernel seconds are neither lost nor counted twice when a worker's heartbeats move between
replicas."""
import time

import pytest

from gpu_worker.client import token_hash
from hub_spawner.pool.allocations import WRONG_CREDENTIAL, AllocationBook
from hub_spawner.pool.db import GPU, Allocation, Worker
from hub_spawner.pool.scheduler import Limits
from hub_spawner.pool.worker_api import credential_hash

G = 1 << 30
WRITE_EVERY = 60.0  # a worker's last_seen is written when this old: within a test, only the first beat writes
CREDENTIAL = credential_hash("w1's credential")


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request, tmp_path):
    """Two books on one database, as two pool replicas hold them, and worker w1 with two 16 GiB GPUs."""
    url = (f"sqlite:///{tmp_path / 'pool.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    a = AllocationBook(url, "compact-first", Limits(), write_every=WRITE_EVERY)
    b = AllocationBook(url, "compact-first", Limits(), write_every=WRITE_EVERY)
    with a.Session.begin() as db:
        db.add(Worker(name="w1", address="tcp://10.0.0.1:7001", node="n1", backend="emulated",
                      credential_hash=CREDENTIAL, last_seen=time.time(),
                      gpus=[GPU(uuid=f"GPU-w1-{i}", index=i, memory=16 * G) for i in range(2)]))
    yield a, b
    for book in (a, b):
        book.close_reader()
        book.engine.dispose()


def beat(book, usage=None, kernel=None, ended=None):
    return book.heartbeat("w1", usage, ended or {}, kernel, credential=CREDENTIAL)


def stored(book, alloc_id) -> tuple:
    with book.Session() as db:
        a = db.get(Allocation, alloc_id)
        return a.used_vram, a.kernel_seconds


def worker_row(book) -> tuple:
    with book.Session() as db:
        w = db.get(Worker, "w1")
        return w.last_seen, w.version


def test_a_placement_or_an_end_at_the_other_replica_is_in_the_next_answer(replicas):
    a, b = replicas
    assert beat(a).grants == []
    before = worker_row(a)
    assert beat(a).grants == [] and worker_row(a) == before  # answered from what was read: nothing written
    alloc, token, _ = b.allocate({"user": "ann", "vram": "4G", "compute": 25})
    assert [g["token_hash"] for g in beat(a).grants] == [token_hash(token)]
    b.revoke(alloc.id, "the lab is over")
    answer = beat(a)
    assert answer.grants == [] and answer.revoked == {token_hash(token): "an admin revoked this vGPU: the lab is over"}
    other, token2, _ = b.allocate({"user": "bob", "vram": "4G", "compute": 25})
    b.release(other.id)
    assert token_hash(token2) in beat(a).revoked


def test_memory_figures_are_written_at_once_and_kernel_seconds_at_the_next_write(replicas):
    a, _ = replicas
    alloc, token, _ = a.allocate({"user": "ann", "vram": "4G", "compute": 25})
    h = token_hash(token)
    with a.Session.begin() as db:  # placed an hour ago: its kernels may have run that long
        db.get(Allocation, alloc.id).created = time.time() - 3600
    beat(a, {h: (G, 0)}, {h: 10.0})
    assert stored(a, alloc.id) == (G, 10.0)
    version = worker_row(a)[1]
    beat(a, {h: (G, 0)}, {h: 25.0})  # kernel time alone: nothing written yet
    assert stored(a, alloc.id) == (G, 10.0) and worker_row(a)[1] == version
    beat(a, {h: (2 * G, 0)}, {h: 30.0})  # memory moved: written now, with all the kernel time so far
    assert stored(a, alloc.id) == (2 * G, 30.0) and worker_row(a)[1] == version + 1


def test_kernel_seconds_are_counted_once_when_beats_move_between_replicas(replicas):
    a, b = replicas
    alloc, token, _ = a.allocate({"user": "ann", "vram": "4G", "compute": 25})
    h = token_hash(token)
    with a.Session.begin() as db:
        db.get(Allocation, alloc.id).created = time.time() - 3600
    beat(a, {h: (G, 0)}, {h: 10.0})   # a reads and writes: 10 s
    beat(b, {h: (G, 0)}, {h: 40.0})   # b had read nothing: it writes 40 s, and the worker's version moves
    beat(a, {h: (G, 0)}, {h: 45.0})   # a's reading is old: a reads again, and adds 5 s, not 35 s
    assert stored(a, alloc.id) == (G, 45.0)


def test_a_released_credential_a_lost_worker_and_an_ended_vgpu_are_not_answered_from_memory(replicas):
    a, b = replicas
    alloc, token, _ = b.allocate({"user": "ann", "vram": "4G", "compute": 25})
    h = token_hash(token)
    assert len(beat(a, {h: (G, 0)}).grants) == 1
    # the worker ends the vGPU by itself: revoked at once, with its sentence
    answer = beat(a, {}, ended={h: "its programs were stopped by the worker's admin"})
    assert answer.grants == [] and answer.revoked == {h: "its programs were stopped by the worker's admin"}
    # marked lost by the other replica (the leader): the next heartbeat brings it back
    with b.Session.begin() as db:
        db.get(Worker, "w1").status = "lost"
    beat(a)
    with a.Session() as db:
        assert db.get(Worker, "w1").status == "up"
    # an admin released its credential: the next heartbeat with it is refused
    with b.Session.begin() as db:
        db.get(Worker, "w1").credential_hash = None
    assert beat(a) is WRONG_CREDENTIAL


def test_a_due_heartbeat_writes_last_seen_and_the_kernel_seconds_that_waited(replicas):
    a, b = replicas
    a.write_every = b.write_every = 0.3
    alloc, token, _ = a.allocate({"user": "ann", "vram": "4G", "compute": 25})
    h = token_hash(token)
    with a.Session.begin() as db:
        db.get(Allocation, alloc.id).created = time.time() - 3600
    beat(a, {h: (G, 0)}, {h: 10.0})
    seen, version = worker_row(a)
    beat(a, {h: (G, 0)}, {h: 12.0})
    assert stored(a, alloc.id) == (G, 10.0) and worker_row(a) == (seen, version)
    time.sleep(0.35)
    assert len(beat(a, {h: (G, 0)}, {h: 15.0}).grants) == 1
    assert stored(a, alloc.id) == (G, 15.0)
    later, moved = worker_row(a)
    assert later > seen and moved == version + 1
    beat(b, {h: (G, 0)}, {h: 16.0})  # the other replica reads 15 s as stored and adds 1
    time.sleep(0.35)
    beat(a, {h: (G, 0)}, {h: 20.0})  # a's reading is old (b moved the version): a reads again, adds 4
    assert stored(a, alloc.id) == (G, 20.0)


def test_a_broken_reading_connection_costs_one_heartbeat_the_usual_way(replicas):
    """The quick read's own connection dies (PostgreSQL: its server process is terminated, as at a
    database restart; SQLite: it is closed): that heartbeat is answered the usual way, correctly, and
    the next one reads on a new connection."""
    a, b = replicas
    alloc, token, _ = b.allocate({"user": "ann", "vram": "4G", "compute": 25})
    beat(a)
    beat(a)  # the reading connection is open now
    dead = a._reader
    if a.engine.dialect.name == "postgresql":
        pid = dead.dbapi_connection.info.backend_pid
        with b.engine.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar() is True
        time.sleep(0.2)
    else:
        dead.dbapi_connection.close()
    b.revoke(alloc.id, "the lab is over")
    answer = beat(a)
    assert answer.grants == [] and token_hash(token) in answer.revoked
    assert a._reader is None  # given up; the next quick read opens another
    beat(a)
    assert a._reader is not None and a._reader is not dead
