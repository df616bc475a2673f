"""The pool's state in a database (SQLAlchemy): workers, their GPUs, allocations and the leader's lease.

SQLite by default; PostgreSQL (psycopg 3) by configuration, on which several pool replicas share
one database.  Allocations are rows, so they survive restarts of the pool and of the hub.  The
schema is kept by Alembic revisions (migrations/): every pool brings the database to the newest
at start, so an upgrade keeps what the database holds.
"""
from __future__ import annotations

import json
import logging
import time

from sqlalchemy import (BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, create_engine, event,
                        inspect, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from gpu_worker.client import QOS, default_burst, token_hash

log = logging.getLogger("gpulab.pool")


class Base(DeclarativeBase):
    pass


class Worker(Base):
    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    node: Mapped[str] = mapped_column(String(255), default="")
    backend: Mapped[str] = mapped_column(String(32), default="cuda")
    status: Mapped[str] = mapped_column(String(16), default="up")  # up | lost | gone (its pod went)
    last_seen: Mapped[float] = mapped_column(Float, default=time.time)
    # sha256 of the credential issued at enrolment (worker_api.py); None: the name may be enrolled
    credential_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    control_url: Mapped[str] = mapped_column(String(255), default="")  # its control API, http://host:port
    # its Kubernetes pod ("" outside a cluster): the pool's pod watch marks it lost when the pod goes
    pod: Mapped[str] = mapped_column(String(253), default="", server_default="")
    # the path of its Unix socket ("" for none): a local vGPU's server on its node reaches it there in
    # native mode (allocations.allocation_json)
    unix_socket: Mapped[str] = mapped_column(String(255), default="", server_default="")
    # one more at every change a heartbeat's reply depends on (its allocations placed or ended, its GPUs
    # registered, their figures written): a replica that read this version answers the worker's next
    # heartbeat from what it read, after one read of this row (AllocationBook.heartbeat)
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    gpus: Mapped[list["GPU"]] = relationship(back_populates="worker", cascade="all, delete-orphan")


class GPU(Base):
    __tablename__ = "gpus"
    uuid: Mapped[str] = mapped_column(String(128), primary_key=True)
    worker_name: Mapped[str] = mapped_column(ForeignKey("workers.name"), index=True)
    index: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str] = mapped_column(String(255), default="")
    memory: Mapped[int] = mapped_column(BigInteger)
    capability: Mapped[str] = mapped_column(String(16), default="")  # CUDA compute capability, e.g. "9.0"
    emulated: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the active allocations on it promise, changed in the transaction that starts or ends each one
    # (allocations.py), so that placing reads a few GPUs, not every GPU and allocation of the pool.
    # load is the larger of the two fractions; the strategies' orders (load, then uuid) are indexes.
    promised_vram: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    promised_compute: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    sessions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    load: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    worker: Mapped[Worker] = relationship(back_populates="gpus")

    __table_args__ = (Index("ix_gpus_busiest", load.desc(), "uuid"),   # compact-first
                      Index("ix_gpus_idlest", "load", "uuid"))          # low-load-first


class Allocation(Base):
    __tablename__ = "allocations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    server_name: Mapped[str] = mapped_column(String(255), default="")
    profile: Mapped[str] = mapped_column(String(255), default="")
    worker_name: Mapped[str] = mapped_column(String(255), index=True)
    gpu_uuids: Mapped[str] = mapped_column(String(2048))  # comma-separated
    vram: Mapped[int] = mapped_column(BigInteger)        # per vGPU
    compute: Mapped[int] = mapped_column(Integer)        # percent per vGPU
    count: Mapped[int] = mapped_column(Integer, default=1)
    mode: Mapped[str] = mapped_column(String(16), default="any")
    qos: Mapped[str] = mapped_column(String(16), default="medium")
    burst: Mapped[bool] = mapped_column(Boolean, default=True)  # may use idle GPU time beyond its share
    # the user's hub groups when it was placed (a JSON list): usage is reported per group as well
    groups: Mapped[str] = mapped_column(Text, default="[]")
    # gpu_worker.client.token_hash of the session token; the token itself is answered once, at allocation
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)  # active|lost|released|revoked
    # reported by the worker's heartbeats: used_vram includes overhead_vram, the CUDA contexts' memory
    used_vram: Mapped[int] = mapped_column(BigInteger, default=0)
    overhead_vram: Mapped[int] = mapped_column(BigInteger, default=0)
    # seconds its GPUs spent running its kernels, summed from the heartbeats' cumulative kernel_time;
    # kernel_time_seen is the worker's last figure, the base of the next increase
    kernel_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    kernel_time_seen: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(String(1024), default="")
    created: Mapped[float] = mapped_column(Float, default=time.time)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)

    @property
    def gpu_list(self) -> list[str]:
        return [u for u in self.gpu_uuids.split(",") if u]

    @property
    def group_list(self) -> list[str]:
        return json.loads(self.groups or "[]")

    def gpu_hours(self, now: float) -> float:
        """Wall clock: every GPU of it for as long as it was held, used or not."""
        return self.count * ((self.ended or now) - self.created) / 3600.0

    def gpu_hours_weighted(self) -> float:
        """What it used: the kernel time its worker measured, in hours of one GPU."""
        return self.kernel_seconds / 3600.0


class Lease(Base):
    """Periodic work that one replica does for all (leader.py): who holds it and until when, in
    seconds of the database's clock."""
    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires: Mapped[float] = mapped_column(Float)
    acquired: Mapped[float] = mapped_column(Float)


def engine_url(url: str) -> str:
    """The URL SQLAlchemy opens: plain ``postgresql://`` URLs run on psycopg 3, the driver the pool
    depends on (SQLAlchemy's default for that scheme is psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_sessionmaker(url: str):
    """An engine and session factory over a database brought to the newest schema; SQLite gets a busy
    timeout and serialised writers."""
    url = engine_url(url)
    kwargs = {}
    if url.startswith("postgresql"):
        # two replicas, each with a burst of requests and a heartbeat stream: connections stay open
        kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # a commit waits for no fsync (the WAL is synced at checkpoints): a crash of the pool loses
            # nothing, a power cut may undo the last moments' writes; without it each placement waited
            # for the disk under the write lock (docs/configuration.md)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            # take the write lock at the start: two pools placing at once cannot double book
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    from .migrations import upgrade  # the revisions import this module's models
    upgrade(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


# Columns added before the pool kept its schema with Alembic, as (table, column, SQL type and default).
# A database made by such a pool is brought to revision 0001 in place (bring_to_first_revision), then
# upgraded by the revisions like any other.
ADDED_COLUMNS = [
    # per-worker credentials: workers of an older database enrol again (their names are free until they do)
    ("workers", "credential_hash", "VARCHAR(64)"),
    ("workers", "control_url", "VARCHAR(255) DEFAULT '' NOT NULL"),
    ("allocations", "overhead_vram", "BIGINT DEFAULT 0 NOT NULL"),
    ("allocations", "token_hash", "VARCHAR(64)"),
    # compute shares (issue 10): an older allocation's burst follows its QoS, as a new one's default does
    ("allocations", "burst", "BOOLEAN DEFAULT TRUE NOT NULL"),
    ("allocations", "groups", "TEXT DEFAULT '[]' NOT NULL"),
    ("allocations", "kernel_seconds", "FLOAT DEFAULT 0 NOT NULL"),
    ("allocations", "kernel_time_seen", "FLOAT DEFAULT 0 NOT NULL"),
]


def own_connection(engine):
    """A connection of the caller's own, outside the engine's pool until close_quietly(), in autocommit on
    PostgreSQL (the heartbeats' quick reads and writes, the notices' listener): SQLAlchemy's execution, its
    pool's ping and rollback would cost more than what these connections do."""
    fairy = engine.raw_connection()
    try:
        fairy.detach()
        if engine.dialect.name == "postgresql":
            fairy.dbapi_connection.rollback()  # the pool's ping opened a transaction
            fairy.dbapi_connection.autocommit = True
    except Exception:
        close_quietly(fairy)
        raise
    return fairy


def close_quietly(fairy) -> None:
    """Close an own_connection() whatever became of it (a broken one has nothing more to close)."""
    if fairy is not None:
        try:
            fairy.close()
        except Exception:
            pass


def bring_to_first_revision(engine) -> None:
    """A database from before Alembic: add the columns it lacks, replace its plain session tokens by
    their hashes and make the hashes unique; it then has revision 0001's schema."""
    for table, column, sql in ADDED_COLUMNS:
        if column not in _columns(engine, table):
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql}")
                if (table, column) == ("allocations", "burst"):
                    conn.execute(text("UPDATE allocations SET burst = :burst WHERE qos = :qos"),
                                 [{"burst": default_burst(q), "qos": q} for q in QOS])
    if "token" in _columns(engine, "allocations"):
        _hash_plain_tokens(engine)
    _unique_token_hashes(engine)


def _columns(engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def _unique_token_hashes(engine) -> None:
    """token_hash is unique, as the model declares; ALTER TABLE ADD COLUMN could not say so, so where the
    column was added (and filled) the database gets a unique index on it."""
    look = inspect(engine)
    unique = [c["column_names"] for c in look.get_unique_constraints("allocations")]
    unique += [i["column_names"] for i in look.get_indexes("allocations") if i["unique"]]
    if ["token_hash"] not in unique:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE UNIQUE INDEX uq_allocations_token_hash ON allocations (token_hash)")


def _hash_plain_tokens(engine) -> None:
    """A database from before token hashes: keep each token's hash and drop the tokens, in one
    transaction.  SQLite cannot drop a UNIQUE column, so there the table is rebuilt."""
    with engine.begin() as conn:
        rows = conn.exec_driver_sql("SELECT id, token FROM allocations").all()
        if rows:
            conn.execute(text("UPDATE allocations SET token_hash = :hash WHERE id = :id"),
                         [{"hash": token_hash(token), "id": alloc_id} for alloc_id, token in rows])
        if engine.dialect.name != "sqlite":
            conn.exec_driver_sql("ALTER TABLE allocations DROP COLUMN token")
            return
        keep = ", ".join(conn.dialect.identifier_preparer.quote(c.name) for c in Allocation.__table__.columns)
        conn.exec_driver_sql("ALTER TABLE allocations RENAME TO allocations_plain")
        for index in inspect(conn).get_indexes("allocations_plain"):
            conn.exec_driver_sql(f"DROP INDEX {index['name']}")
        Allocation.__table__.create(conn)
        conn.exec_driver_sql(f"INSERT INTO allocations ({keep}) SELECT {keep} FROM allocations_plain")
        conn.exec_driver_sql("DROP TABLE allocations_plain")
    if engine.dialect.name == "sqlite":
        # the dropped table's pages still hold the tokens' bytes: rewrite the file without them
        raw = engine.raw_connection()
        try:
            raw.cursor().execute("VACUUM")
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
    log.info("the pool database kept %d session tokens in plain text: only their hashes are kept now", len(rows))
