"""The pool database's schema revisions (hub_spawner/pool/migrations) on SQLite and on a real PostgreSQL:
an empty database gets the model's schema, a database of the last pool before revisions is upgraded
with what it holds, two replicas starting at once upgrade it once, and the leader lease works on both."""
import subprocess
import sys
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        create_engine, inspect, select)

from gpu_worker.client import token_hash
from hub_spawner.pool.allocations import AllocationBook
from hub_spawner.pool.db import GPU, Allocation, Base, Worker, engine_url, make_sessionmaker
from hub_spawner.pool.leader import LeaderLease
from hub_spawner.pool.migrations import current, head
from hub_spawner.pool.scheduler import Limits

G = 1 << 30

# The tables as the last pool before revisions made them (Base.metadata.create_all of its models).
PREVIOUS = MetaData()
Table("workers", PREVIOUS,
      Column("name", String(255), primary_key=True), Column("address", String(255), nullable=False),
      Column("node", String(255), nullable=False), Column("backend", String(32), nullable=False),
      Column("status", String(16), nullable=False), Column("last_seen", Float, nullable=False),
      Column("credential_hash", String(64), unique=True), Column("control_url", String(255), nullable=False))
Table("gpus", PREVIOUS,
      Column("uuid", String(128), primary_key=True),
      Column("worker_name", String(255), ForeignKey("workers.name"), nullable=False),
      Column("index", Integer, nullable=False), Column("model", String(255), nullable=False),
      Column("memory", BigInteger, nullable=False), Column("capability", String(16), nullable=False),
      Column("emulated", Boolean, nullable=False))
Table("allocations", PREVIOUS,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("user", String(255), nullable=False, index=True), Column("server_name", String(255), nullable=False),
      Column("profile", String(255), nullable=False),
      Column("worker_name", String(255), nullable=False, index=True),
      Column("gpu_uuids", String(2048), nullable=False), Column("vram", BigInteger, nullable=False),
      Column("compute", Integer, nullable=False), Column("count", Integer, nullable=False),
      Column("mode", String(16), nullable=False), Column("qos", String(16), nullable=False),
      Column("burst", Boolean, nullable=False), Column("groups", Text, nullable=False),
      Column("token_hash", String(64), nullable=False, unique=True),
      Column("status", String(16), nullable=False, index=True), Column("used_vram", BigInteger, nullable=False),
      Column("overhead_vram", BigInteger, nullable=False), Column("kernel_seconds", Float, nullable=False),
      Column("kernel_time_seen", Float, nullable=False), Column("message", String(1024), nullable=False),
      Column("created", Float, nullable=False), Column("ended", Float))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pool.sqlite'}"
    return request.getfixturevalue("postgres_url")


def schema_drift(engine) -> list:
    """What differs between the database and the models (alembic's autogenerate comparison)."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_an_empty_database_gets_the_models_schema_at_the_newest_revision(db_url):
    engine, _ = make_sessionmaker(db_url)
    try:
        with engine.connect() as conn:
            assert current(conn) == head() == "0006"
        assert schema_drift(engine) == []
    finally:
        engine.dispose()


def test_a_database_of_the_previous_pool_is_upgraded_with_its_allocations(db_url):
    old = create_engine(engine_url(db_url))
    PREVIOUS.create_all(old)
    now = time.time()
    with old.begin() as conn:
        conn.execute(PREVIOUS.tables["workers"].insert(), [dict(
            name="w1", address="tcp://10.0.0.1:7000", node="n1", backend="emulated", status="up", last_seen=now,
            credential_hash="c" * 64, control_url="")])
        conn.execute(PREVIOUS.tables["gpus"].insert(), [dict(
            uuid="GPU-w1-0", worker_name="w1", index=0, model="test GPU", memory=16 * G, capability="9.0",
            emulated=True)])
        conn.execute(PREVIOUS.tables["allocations"].insert(), [dict(
            user=user, server_name="", profile="quarter", worker_name="w1", gpu_uuids="GPU-w1-0", vram=4 * G,
            compute=25, count=1, mode="any", qos="medium", burst=True, groups='["physics"]',
            token_hash=token_hash(user), status=status, used_vram=G, overhead_vram=0, kernel_seconds=3.5,
            kernel_time_seen=3.5, message="", created=now, ended=None if status == "active" else now)
            for user, status in [("ann", "active"), ("bob", "released")]])
    old.dispose()

    book = AllocationBook(db_url, "compact-first", Limits())
    try:
        with book.engine.connect() as conn:
            assert current(conn) == "0006"
        assert schema_drift(book.engine) == []
        with book.Session() as db:
            kept = [(a.id, a.user, a.status, a.token_hash, a.used_vram, a.kernel_seconds, a.group_list)
                    for a in db.scalars(select(Allocation).order_by(Allocation.id))]
            w1 = db.get(Worker, "w1")  # no Unix socket until it registers again (revision 0006): forwarded
            assert (w1.pod, w1.version, w1.unix_socket) == ("", 0, "")
            gpu = db.get(GPU, "GPU-w1-0")  # revision 0003 counted the active allocation onto its GPU
            assert (gpu.promised_vram, gpu.promised_compute, gpu.sessions, gpu.load) == (4 * G, 25, 1, 0.25)
        assert kept == [(1, "ann", "active", token_hash("ann"), G, 3.5, ["physics"]),
                        (2, "bob", "released", token_hash("bob"), G, 3.5, ["physics"])]
        # what it holds still counts: 12 of the 16 GiB are free, and new ids go on from the old ones
        alloc, _, _ = book.allocate({"user": "cat", "vram": "12G", "compute": 10})
        assert alloc.id == 3
        with pytest.raises(Exception, match="free memory"):
            book.allocate({"user": "dan", "vram": "1G", "compute": 10})
        assert LeaderLease(book.Session, "replica-a", 10).hold()
    finally:
        book.engine.dispose()
    again, _ = make_sessionmaker(db_url)  # a second start finds nothing to do
    again.dispose()


def test_two_replicas_starting_together_upgrade_once(db_url):
    """Two processes open an empty database at the same moment: one upgrades it, the other finds it done."""
    code = ("import sys; from hub_spawner.pool.db import make_sessionmaker; sys.stdin.readline(); "
            "make_sessionmaker(sys.argv[1])[0].dispose(); print('ok')")
    starts = [subprocess.Popen([sys.executable, "-c", code, db_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in starts:  # both have imported everything: the upgrades begin together
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in starts:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    engine = create_engine(engine_url(db_url))
    try:
        with engine.connect() as conn:
            assert current(conn) == "0006"
            assert set(inspect(conn).get_table_names()) >= {"workers", "gpus", "allocations", "leases"}
    finally:
        engine.dispose()


def test_one_leader_at_a_time_and_a_dead_leaders_lease_runs_out(db_url):
    engine, Session = make_sessionmaker(db_url)
    try:
        a, b = LeaderLease(Session, "a", 1.0), LeaderLease(Session, "b", 1.0)
        assert a.hold() and a.leader
        assert not b.hold() and not b.leader
        assert a.hold()  # renewing
        started = time.monotonic()
        while not b.hold():  # a stops renewing, as a killed replica does
            assert time.monotonic() - started < 1.0, "the lease did not run out within the lease period"
            time.sleep(b.interval)
        assert not a.leader  # its last renewal has run out too: never two leaders
        assert not a.hold()
        b.give_up()
        assert a.hold()  # at once, not after the lease would have run out
    finally:
        engine.dispose()
