"""The pool's state in a database (SQLAlchemy): workers, their GPUs, and allocations.

SQLite by default; any SQLAlchemy URL (PostgreSQL) by configuration.  Allocations are
rows, so they survive restarts of the pool and of the hub.
"""
from __future__ import annotations

import time

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String, create_engine, event, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


class Base(DeclarativeBase):
    pass


class Worker(Base):
    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    node: Mapped[str] = mapped_column(String(255), default="")
    backend: Mapped[str] = mapped_column(String(32), default="cuda")
    status: Mapped[str] = mapped_column(String(16), default="up")  # up | lost
    last_seen: Mapped[float] = mapped_column(Float, default=time.time)
    # sha256 of the credential issued at enrolment (worker_api.py); None: the name may be enrolled
    credential_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    gpus: Mapped[list["GPU"]] = relationship(back_populates="worker", cascade="all, delete-orphan")


class GPU(Base):
    __tablename__ = "gpus"
    uuid: Mapped[str] = mapped_column(String(128), primary_key=True)
    worker_name: Mapped[str] = mapped_column(ForeignKey("workers.name"))
    index: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str] = mapped_column(String(255), default="")
    memory: Mapped[int] = mapped_column(BigInteger)
    capability: Mapped[str] = mapped_column(String(16), default="")  # CUDA compute capability, e.g. "9.0"
    emulated: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[Worker] = relationship(back_populates="gpus")


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
    token: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)  # active | lost | released
    used_vram: Mapped[int] = mapped_column(BigInteger, default=0)  # reported by the worker's heartbeats
    message: Mapped[str] = mapped_column(String(1024), default="")
    created: Mapped[float] = mapped_column(Float, default=time.time)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)

    @property
    def gpu_list(self) -> list[str]:
        return [u for u in self.gpu_uuids.split(",") if u]

    def gpu_hours(self, now: float) -> float:
        return self.count * ((self.ended or now) - self.created) / 3600.0


def make_sessionmaker(url: str):
    """An engine and session factory; SQLite gets a busy timeout and serialised writers."""
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            # take the write lock at the start: two pools placing at once cannot double book
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    Base.metadata.create_all(engine)
    _add_credential_column(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


def _add_credential_column(engine) -> None:
    """The pool has no migrations; this one column is added in place to a database made before
    per-worker credentials, whose workers then enrol again (their names are free until they do)."""
    if "credential_hash" not in {c["name"] for c in inspect(engine).get_columns("workers")}:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE workers ADD COLUMN credential_hash VARCHAR(64)")
