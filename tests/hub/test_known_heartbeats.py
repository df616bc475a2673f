"""The usual heartbeat is answered from what the replica read at the worker's last one (AllocationBook's
KnownBeat): after one read of the worker's row (SQLite; PostgreSQL with listen_for_worker_changes off), or
with no read at all while the replica listens for the database's notices of changed workers (PostgreSQL).
These tests show that the answer is not stale across replicas (two books on one database) once a change
was committed (and, listening, its notice came), that nothing is written while nothing is due, and that
kernel seconds are neither lost nor counted twice when a worker's heartbeats move between replicas."""
import time

import pytest
from sqlalchemy import event

from gpu_worker.client import token_hash
from hub_spawner.pool.allocations import WRONG_CREDENTIAL, AllocationBook, moved
from hub_spawner.pool.db import GPU, Allocation, Worker
from hub_spawner.pool.scheduler import Limits
from hub_spawner.pool.worker_api import credential_hash

G = 1 << 30
WRITE_EVERY = 60.0  # a worker's last_seen is written when this old: within a test, only the first beat writes
CREDENTIAL = credential_hash("w1's credential")


def add_w1(book) -> None:
    """Worker w1, up, with two 16 GiB GPUs."""
    with book.Session.begin() as db:
        db.add(Worker(name="w1", address="tcp://10.0.0.1:7001", node="n1", backend="emulated",
                      credential_hash=CREDENTIAL, last_seen=time.time(),
                      gpus=[GPU(uuid=f"GPU-w1-{i}", index=i, memory=16 * G) for i in range(2)]))


def two_books(request, tmp_path):
    """Two books on one database, as two pool replicas hold them, and worker w1 with two 16 GiB GPUs.
    PostgreSQL: listening for changed workers, or not (each heartbeat reads its worker's row)."""
    url = (f"sqlite:///{tmp_path / 'pool.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    listen = request.param == "postgresql"
    a = AllocationBook(url, "compact-first", Limits(), write_every=WRITE_EVERY, listen=listen)
    b = AllocationBook(url, "compact-first", Limits(), write_every=WRITE_EVERY, listen=listen)
    add_w1(a)
    yield a, b
    for book in (a, b):
        book.close()


replicas = pytest.fixture(params=["sqlite", "postgresql", "postgresql-reading"])(two_books)
# books that read the worker's row at each heartbeat (a listening one reads nothing: see its own tests)
reading_replicas = pytest.fixture(params=["sqlite", "postgresql-reading"])(two_books)


def beat(book, usage=None, kernel=None, ended=None):
    return book.heartbeat("w1", usage, ended or {}, kernel, credential=CREDENTIAL)


def heard(book) -> None:
    """A listening book: wait until the notice of a change the other replica committed made it forget w1
    (notices come after the commit, a moment later; an older one may come first).  Reading books read the
    row at the next heartbeat: nothing to wait for."""
    if book._changes is None:
        return
    deadline = time.monotonic() + 5.0
    while True:
        assert book.take_changes(), "the book is not listening"
        if "w1" not in book._known:
            return
        assert time.monotonic() < deadline, "no notice of the other replica's change came within 5 s"
        book._changes.wait(deadline - time.monotonic())


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
    heard(a)
    assert [g["token_hash"] for g in beat(a).grants] == [token_hash(token)]
    b.revoke(alloc.id, "the lab is over")
    heard(a)
    answer = beat(a)
    assert answer.grants == [] and answer.revoked == {token_hash(token): "an admin revoked this vGPU: the lab is over"}
    other, token2, _ = b.allocate({"user": "bob", "vram": "4G", "compute": 25})
    b.release(other.id)
    heard(a)
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
    heard(a)
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
    heard(a)
    beat(a)
    with a.Session() as db:
        assert db.get(Worker, "w1").status == "up"
    # an admin released its credential: the next heartbeat with it is refused
    with b.Session.begin() as db:
        db.get(Worker, "w1").credential_hash = None
    heard(a)
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
    heard(a)
    time.sleep(0.35)
    beat(a, {h: (G, 0)}, {h: 20.0})  # a's reading is old (b moved the version): a reads again, adds 4
    assert stored(a, alloc.id) == (G, 20.0)


def terminate(book, fairy) -> None:
    """Kill one of ``book``'s own connections: PostgreSQL's server process for it is terminated, as at a
    database restart; SQLite's is closed."""
    if book.engine.dialect.name == "postgresql":
        pid = fairy.dbapi_connection.info.backend_pid
        with book.engine.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar() is True
        time.sleep(0.2)
    else:
        fairy.dbapi_connection.close()


def test_a_broken_reading_connection_costs_one_heartbeat_the_usual_way(reading_replicas):
    """The quick read's own connection dies: that heartbeat is answered the usual way, correctly, and the
    next one reads on a new connection."""
    a, b = reading_replicas
    alloc, token, _ = b.allocate({"user": "ann", "vram": "4G", "compute": 25})
    beat(a)
    beat(a)  # the reading connection is open now
    dead = a._reader
    terminate(a, dead)
    b.revoke(alloc.id, "the lab is over")
    answer = beat(a)
    assert answer.grants == [] and token_hash(token) in answer.revoked
    assert a._reader is None  # given up; the next quick read opens another
    beat(a)
    assert a._reader is not None and a._reader is not dead


@pytest.fixture
def listeners(postgres_url):
    """Two listening books on PostgreSQL, worker w1 as in ``replicas``, and a count of the statements
    book a sends (through its engine, and on its heartbeats' own reading connection)."""
    a = AllocationBook(postgres_url, "compact-first", Limits(), write_every=WRITE_EVERY)
    b = AllocationBook(postgres_url, "compact-first", Limits(), write_every=WRITE_EVERY)
    add_w1(a)
    sent = []
    event.listen(a.engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    yield a, b, sent
    for book in (a, b):
        book.close()


def quiet(book, sent, *args) -> tuple:
    """A heartbeat of w1 to ``book``, its answer and the statements it sent to the database."""
    del sent[:]
    answer = beat(book, *args)
    return answer, list(sent) + (["a read on the heartbeats' connection"] if book._reader is not None else [])


def test_a_listening_replica_answers_the_usual_heartbeat_without_the_database(listeners):
    a, b, sent = listeners
    alloc, token, _ = a.allocate({"user": "ann", "vram": "4G", "compute": 25})
    h = token_hash(token)
    with a.Session.begin() as db:
        db.get(Allocation, alloc.id).created = time.time() - 3600
    beat(a, {h: (G, 0)}, {h: 10.0})  # the first reads and writes
    for seconds in (11.0, 12.0, 13.0):
        answer, statements = quiet(a, sent, {h: (G, 0)}, {h: seconds})
        assert [g["token_hash"] for g in answer.grants] == [h] and statements == [], statements
    # a change of its own (memory figures written: the version moves) is known here: its notice, when it
    # comes, does not send the next heartbeat to the database
    beat(a, {h: (2 * G, 0)}, {h: 14.0})
    assert stored(a, alloc.id) == (2 * G, 14.0)
    assert a._changes.wait(5.0)
    answer, statements = quiet(a, sent, {h: (2 * G, 0)}, {h: 15.0})
    assert len(answer.grants) == 1 and statements == [], statements
    # another replica's change: its notice, and the next heartbeat reads
    b.revoke(alloc.id, "the lab is over")
    heard(a)
    answer, statements = quiet(a, sent, {h: (2 * G, 0)}, {h: 16.0})
    assert answer.grants == [] and answer.revoked == {h: "an admin revoked this vGPU: the lab is over"}
    assert statements, "the heartbeat after another replica's change did not read the database"
    assert stored(a, alloc.id) == (2 * G, 16.0)


def test_an_older_notice_does_not_unsettle_what_was_read_after_it(listeners):
    """Notices come a moment after their commit: one of a version this replica has already read past
    (its own older move, another replica's) leaves what it knows alone; a newer one, or -1, does not."""
    a, b, sent = listeners
    alloc, _, _ = b.allocate({"user": "ann", "vram": "4G", "compute": 25})
    b.release(alloc.id)  # the worker's version is 2 now
    beat(a)
    version = a._known["w1"].version
    assert version == 2
    for payload, forgets in ((f"w1 {version - 1}", False), (f"w1 {version}", False),
                             (f"w1 {version + 1}", True)):
        with b.engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_notify('gpulab_workers', '{payload}')")
            conn.commit()
        assert a._changes.wait(5.0)
        answer, statements = quiet(a, sent)
        assert bool(statements) == forgets, (payload, statements)


def test_a_lost_notice_is_caught_when_last_seen_is_next_written(listeners):
    """A change whose notice never comes (the trigger off, as if a pooler kept notices from this replica)
    is answered at the worker's next due write of last_seen, which finds the version moved."""
    a, b, sent = listeners
    a.write_every = 0.3
    assert beat(a).grants == []
    with b.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE workers DISABLE TRIGGER workers_moved")
    try:
        alloc, token, _ = b.allocate({"user": "ann", "vram": "4G", "compute": 25})
    finally:
        with b.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE workers ENABLE TRIGGER workers_moved")
    assert not a._changes.wait(0.2)
    answer, statements = quiet(a, sent)
    assert answer.grants == [] and statements == []  # not told: stale until the write is due
    time.sleep(0.35)
    assert [g["token_hash"] for g in beat(a).grants] == [token_hash(token)]


def test_this_replicas_own_changes_are_in_its_next_answer_without_a_notice(listeners):
    """What this replica changes, it forgets at its commit: no wait for the database's notice (here none
    comes: the trigger is off)."""
    a, b, sent = listeners
    assert beat(a).grants == []
    with a.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE workers DISABLE TRIGGER workers_moved")
    try:
        alloc, token, _ = a.allocate({"user": "ann", "vram": "4G", "compute": 25})
        assert [g["token_hash"] for g in beat(a).grants] == [token_hash(token)]
        a.revoke(alloc.id, "the lab is over")
        assert beat(a).grants == []
        assert beat(a).grants == [] and beat(a).revoked  # known again, from memory
        with a.Session.begin() as db:  # released by an admin: WorkerCredentialHandler's change
            db.get(Worker, "w1").credential_hash = None
            moved(db, "w1")
        assert beat(a) is WRONG_CREDENTIAL
    finally:
        with a.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE workers ENABLE TRIGGER workers_moved")


def test_a_broken_listening_connection_reads_until_listening_again(listeners):
    a, b, sent = listeners
    a._changes.retry_after = 0.5
    alloc, token, _ = b.allocate({"user": "ann", "vram": "4G", "compute": 25})
    assert len(beat(a).grants) == 1
    dead = a._changes._fairy
    terminate(a, dead)
    b.revoke(alloc.id, "the lab is over")  # its notice is lost with the connection
    answer, statements = quiet(a, sent)
    assert answer.grants == [] and statements  # not listening: read, and answered right
    assert a._changes._fairy is None
    answer, statements = quiet(a, sent)  # reading the row until the retry is due
    assert answer.grants == [] and statements == ["a read on the heartbeats' connection"], statements
    time.sleep(0.5)
    answer, statements = quiet(a, sent)  # listening again: what was known is forgotten and read anew
    assert a._changes._fairy not in (None, dead) and answer.grants == [] and statements
    a.close_reader()
    answer, statements = quiet(a, sent)
    assert answer.grants == [] and statements == []
