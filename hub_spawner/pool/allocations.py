"""The pool's book of GPUs and allocations: placing, releasing, availability, lost workers.

Everything here is database work; the web handlers (api.py) and the dashboard only ask it."""
from __future__ import annotations

import functools
import hmac
import json
import logging
import secrets
import time
from types import SimpleNamespace
from typing import NamedTuple

from sqlalchemy import Float, Row, and_, bindparam, case, cast, event, or_, select, text, update

from gpu_worker.client import LimitError, gpu_settings, token_hash

from .batch_plan import BatchPlan, live_gpus_in_order
from .changes import WorkerChanges
from .db import GPU, Allocation, Worker, close_quietly, make_sessionmaker, own_connection
from .scheduler import GPUState, InvalidRequest, Limits, NoFit, Request, place, ratios, validate

log = logging.getLogger("gpulab.pool")

# pg_advisory_xact_lock key that serialises placement across replicas on PostgreSQL (SQLite's BEGIN
# IMMEDIATE serialises every write): any 64-bit number no other program on the database uses
PLACEMENT_LOCK = 0x67707500706C6163
REFRESH_EVERY = 32   # registrations between two refreshes of PostgreSQL's statistics (AllocationBook.registered)
REVOKED_FOR = 3600.0  # seconds an ended allocation stays in its worker's heartbeat replies, with why
MAX_GROUPS = 256      # hub groups one allocation request may name
RELEASED = "this vGPU was released: its Jupyter server stopped"
NATIVE_BACKENDS = ("cuda", "emulated")  # workers whose local vGPUs may run natively (local_address)
MOVED = "gpulab_moved_workers"  # a session's info key: workers whose heartbeat answer its commit changes


class Beat(NamedTuple):
    """What the book answers a worker's heartbeat: its grants and the revocations of the last
    REVOKED_FOR seconds (the reply), and the uuids of the GPUs it registered."""
    grants: list[dict]
    revoked: dict[str, str]
    gpus: set[str]

    def reply(self) -> dict:
        return {"grants": self.grants, "revoked": self.revoked}


class KnownBeat(NamedTuple):
    """What this replica read of a worker for its last heartbeat, good while the worker's version is
    the same (AllocationBook.heartbeat): its GPUs' memory, its recent allocations as stored, the
    answer, when the oldest revocation in it expires, its credential's hash and its last_seen as
    this replica last read or wrote it."""
    version: int
    memory: dict[str, int]
    recent: list[SimpleNamespace]
    beat: Beat
    expires: float
    credential: str | None
    seen: float


class AllocationBook:
    """Allocations in the pool database, placed by one strategy under oversubscription limits."""

    def __init__(self, db_url: str, strategy: str, limits: Limits, write_every: float = 0.0,
                 listen: bool = True):
        self.engine, self.Session = make_sessionmaker(db_url)
        self.strategy = strategy
        self.limits = limits
        # A worker's last_seen is written by a heartbeat only when it is this many seconds old (most
        # heartbeats then write nothing); check_heartbeats allows for the lag, so a silent worker is found
        # up to this much later, never sooner.  0: every heartbeat writes it.
        self.write_every = write_every
        self._known: dict[str, KnownBeat] = {}  # worker name -> its last heartbeat as read here
        # the one read of the usual heartbeat, on a connection of its own in autocommit, with the driver's
        # own cursor: SQLAlchemy's execution, its pool's ping and rollback cost more than the read itself
        # (PostgreSQL: three round trips instead of one), and SQLite's transactions here take the write lock
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._version_sql = f"SELECT status, credential_hash, last_seen, version FROM workers WHERE name = {mark}"
        self._seen_sql = (f"UPDATE workers SET last_seen = {mark} WHERE name = {mark} AND version = {mark} "
                          f"AND status = 'up'")
        self._seen_moved_sql = (f"UPDATE workers SET last_seen = {mark}, version = version + 1 WHERE name = {mark} "
                                f"AND version = {mark} AND status = 'up'")
        self._kernel_sql = f"UPDATE allocations SET kernel_seconds = {mark}, kernel_time_seen = {mark} WHERE id = {mark}"
        self._begin_sql = "BEGIN IMMEDIATE" if self.engine.dialect.name == "sqlite" else "BEGIN"
        self._reader = self._cursor = None
        # PostgreSQL: the database tells which workers changed (changes.py), and the usual heartbeat reads
        # nothing; SQLite's read is in-process and cheap
        self._changes = (WorkerChanges(self.engine) if listen and self.engine.dialect.name == "postgresql"
                         else None)
        self._epoch = 0  # the listening epoch _known is good for
        event.listen(self.Session, "after_commit", self._forget_moved)
        event.listen(self.Session, "after_rollback", lambda db: db.info.pop(MOVED, None))
        self._registered = 0  # registrations since the planner's statistics were last refreshed here

    def gpu_states(self, db) -> list[GPUState]:
        """Every GPU with what active allocations promise of it (its kept figures), sorted by uuid.  Lost
        workers' GPUs are included so that the scheduler can say a worker was lost; it places nothing
        on them."""
        rows = db.execute(select(GPU.uuid, Worker.name, Worker.node, GPU.memory, GPU.promised_vram,
                                 GPU.promised_compute, GPU.sessions, Worker.status, Worker.last_seen)
                          .join(Worker).order_by(GPU.uuid)).all()
        return [GPUState(uuid, worker, node, memory, vram, compute, sessions, worker_status=status,
                         last_seen=seen) for uuid, worker, node, memory, vram, compute, sessions, status, seen in rows]

    def registered(self) -> None:
        """A worker registered.  PostgreSQL plans placement from table statistics that its autovacuum
        refreshes only a minute or more later: until then it sorted every GPU of a pool that had just
        grown from nothing (10 ms a placement at 1,000 workers instead of 0.05 ms).  Refresh them at the
        first registration and at every 32nd one after it."""
        self._registered += 1
        if self._registered % REFRESH_EVERY != 1 or self.engine.dialect.name != "postgresql":
            return
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE workers, gpus")
                conn.commit()
        except Exception as exc:  # the registration itself has been stored: say it and go on
            log.warning("could not refresh the database's statistics after a registration: %s", exc)

    def lock_placement(self, db) -> None:
        """Hold the placement lock until ``db``'s transaction ends.  Placing, and whatever changes which
        workers are up or what GPUs they offer, holds it, so that two replicas never place on the same
        free room nor on a worker being marked lost."""
        if db.get_bind().dialect.name == "postgresql":
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PLACEMENT_LOCK})

    def allocate(self, spec: dict) -> tuple[Allocation, str, Row]:
        """Place a request; the allocation, its session token, which the pool keeps only as a hash (the
        caller answers it once), and the worker it is on.  InvalidRequest or NoFit when it cannot be."""
        placed = self.allocate_many([spec])[0]
        if isinstance(placed, Exception):
            raise placed
        return placed

    def allocate_many(self, specs: list[dict]) -> list[tuple[Allocation, str, Row] | InvalidRequest | NoFit]:
        """Place requests in order in one transaction (a lab's first minute brings hundreds at once, and
        the transaction's begin, lock and commit are paid once): for each, what allocate() answers, or
        the InvalidRequest or NoFit that says why it was not placed.  The others are placed all the same;
        an error of the database fails them all."""
        out: list = []
        placed: list[tuple[int, Allocation, str]] = []
        parsed = []
        for spec in specs:
            try:
                req, burst = request_from(spec)
                parsed.append((spec, req, burst, groups_from(spec)))
            except InvalidRequest as exc:
                parsed.append(exc)
        with self.Session.begin() as db, db.no_autoflush:  # the new rows go in one INSERT at the commit
            self.lock_placement(db)
            simple = [p[1] for p in parsed if not isinstance(p, Exception) and _one_gpu_anywhere(p[1])]
            plan = BatchPlan(db.connection(), self.strategy, self.limits, simple) if len(simple) > 1 else None
            for item in parsed:
                if isinstance(item, Exception):
                    out.append(item)
                    continue
                spec, req, burst, groups = item
                got = plan.take(req) if plan is not None and _one_gpu_anywhere(req) else None
                chosen, promised = ([got], True) if got is not None else (None, False)
                if got is None:
                    if plan is not None:  # from here on, one by one, on what the plan placed
                        plan.flush(db.connection(), PROMISE)
                        plan = None
                    try:
                        chosen, promised = self._take(db, req)
                    except (InvalidRequest, NoFit) as exc:
                        out.append(exc)
                        continue
                token = secrets.token_urlsafe(24)
                alloc = Allocation(user=str(spec["user"]), server_name=str(spec.get("server_name", "")),
                                   profile=str(spec.get("profile", "")), worker_name=chosen[0][1],
                                   gpu_uuids=",".join(uuid for uuid, _ in chosen), vram=req.vram,
                                   compute=req.compute, count=req.count, mode=req.mode, qos=req.qos, burst=burst,
                                   groups=json.dumps(groups), token_hash=token_hash(token))
                db.add(alloc)
                if not promised:
                    _promise(db, alloc, +1)
                placed.append((len(out), alloc, token))
                out.append(None)
            if plan is not None:
                plan.flush(db.connection(), PROMISE)
            if placed and db.get_bind().dialect.name == "postgresql":
                # ids from the sequence in one statement: the rows then go in as one executemany (pipelined,
                # the statement parsed once) instead of one INSERT ... RETURNING of every row, whose
                # thousands of parameters the driver parsed anew each time (a quarter of a batch's time)
                ids = db.connection().execute(NEXT_IDS, {"n": len(placed)}).scalars()
                for (_, alloc, _), new_id in zip(placed, ids):
                    alloc.id = new_id
            # the workers' addresses and URLs for the answers, read beside the placements (with Core: no
            # flush of the new rows before the commit's one)
            names = sorted({alloc.worker_name for _, alloc, _ in placed})
            if names:  # their heartbeats' replies change (in name order, as every writer of several)
                db.connection().execute(TOUCH, [{"worker": n} for n in names])
                moved(db, *names)
            workers = {w.name: w for w in db.connection().execute(
                select(Worker.__table__).where(Worker.__table__.c.name.in_(names)))} if names else {}
        for i, alloc, token in placed:
            out[i] = (alloc, token, workers[alloc.worker_name])
            log.info("allocated %s for %s on %s (%d MiB, %d%%)", alloc.id, alloc.user, alloc.worker_name,
                     alloc.vram >> 20, alloc.compute)
        return out

    def _take(self, db, req: Request) -> tuple[list[tuple[str, str]], bool]:
        """_choose's GPUs for ``req``, and whether what it promises them is counted already: a vGPU of one
        GPU (the usual one) is chosen and promised by one statement (take_first: one round trip to the
        database, not two); others are chosen here and promised by the caller (_promise)."""
        if req.count == 1:
            row = db.connection().execute(take_first(self.strategy, req.mode == "local" and bool(req.node)),
                                          self._fit_params(req)).first()
            if row is not None:
                return [tuple(row)], True
        return self._choose(db, req), False

    def _fit_params(self, req: Request) -> dict:
        """The parameters of fitting_gpus (and take_first) for ``req``."""
        vram_ratio, compute_ratio = ratios(req, self.limits)
        return {"vram": req.vram, "compute": req.compute, "vram_ratio": float(vram_ratio),
                "compute_ratio": float(compute_ratio), "full": float(max(vram_ratio, compute_ratio)),
                "node": req.node, "sessions": 1}

    def _choose(self, db, req: Request) -> list[tuple[str, str]]:
        """(uuid, worker) of the GPUs ``req`` goes on: the GPUs that fit, asked of the database in the
        strategy's order (its load index), which is scheduler.place's choice without reading every GPU.
        When none fits, place() over the whole pool raises the NoFit that says why."""
        params = self._fit_params(req)
        q = fitting_gpus(self.strategy, req.mode == "local" and bool(req.node), req.count == 1)
        if req.count == 1:
            row = db.execute(q, params).first()
            if row is not None:
                return [tuple(row)]
        else:  # the first GPU in order whose worker has enough GPUs that fit: that worker's first ones
            rows = [tuple(r) for r in db.execute(q, params)]
            by_worker: dict[str, list[tuple[str, str]]] = {}
            for row in rows:
                by_worker.setdefault(row[1], []).append(row)
            for _, worker in rows:
                if len(by_worker[worker]) >= req.count:
                    return by_worker[worker][:req.count]
        placed = place(req, self.gpu_states(db), self.strategy, self.limits)  # raises NoFit: nothing fits
        log.error("placement: the database found no GPU for %s but the scheduler placed it on %s; using the "
                  "scheduler's choice", req, [g.uuid for g in placed])
        return [(g.uuid, g.worker) for g in placed]

    def release(self, alloc_id: int) -> bool:
        """The spawner gives a vGPU back (its server stopped, or was culled); idempotent."""
        with self.Session.begin() as db:
            self.lock_placement(db)  # every end of an allocation holds it: no GPU gets its figures back twice
            alloc = db.get(Allocation, alloc_id)
            if alloc is None:
                return False
            if alloc.status == "active" or alloc.status == "lost":
                _end(db, alloc, "released", alloc.ended or time.time())
        return True

    def revoke(self, alloc_id: int, message: str) -> tuple[Allocation | None, bool]:
        """An admin ends an active vGPU; its worker ends its sessions at its next heartbeat with
        ``message``.  The allocation (None: no such one) and whether it was revoked now: one that
        already ended is left as it was."""
        with self.Session.begin() as db:
            self.lock_placement(db)
            alloc = db.get(Allocation, alloc_id)
            if alloc is None or alloc.status != "active":
                return alloc, False
            _end(db, alloc, "revoked", time.time(), f"an admin revoked this vGPU: {message}")
        log.info("allocation %s of %s revoked by an admin: %s", alloc.id, alloc.user, message)
        return alloc, True

    def heartbeat(self, name: str, usage: dict | None, ended: dict | None = None,
                  kernel: dict | None = None, credential: str | None = None, _settled: bool = False):
        """A worker lives: end the active allocations it ended by itself (``ended``: {token hash: why},
        revoked with that sentence; others ignored), store what its vGPUs hold (``usage``: {token hash:
        (used, overhead)}, the whole truth; None leaves the figures alone), add what their kernels ran
        (``kernel``: {token hash: cumulative kernel seconds}, add_kernel_time) and answer its grants,
        recent revocations and registered GPUs.  None: no such worker; WRONG_CREDENTIAL: ``credential``
        (a credential's hash) is given and is not this worker's.  A figure beyond the memory of its
        allocation's GPUs is a worker's error: it is logged and held at that bound, and the rest of the
        heartbeat counts as usual.

        Heartbeats are the pool's most frequent request (1,000 workers every 5 s).  The usual one changes
        nothing: its worker's version is what this replica read at its last heartbeat, the memory figures
        are the same, and its last_seen is not yet write_every old.  That one is answered from what was
        read then (_known), after one read of the worker's row; kernel seconds alone wait for the next
        write (they are cumulative: nothing is lost, the stored figure lags by up to write_every).  The
        others are a few SQL statements without the ORM in one transaction; ending an allocation, which is
        rare, goes through _settle first."""
        now = time.time()
        listening = self.take_changes()
        known = self._known.get(name)
        if known is not None and not _settled:
            try:
                answer = self._known_answer(name, known, usage, ended, kernel, credential, now, listening)
            except Exception as exc:  # the database failed under the quick write: the usual way says so
                log.info("the heartbeat's quick write failed (%s): writing the usual way", exc)
                answer = None
            if answer is not None:
                return answer
        with self.engine.begin() as conn:
            w = conn.execute(BEAT_WORKER, {"name": name}).first()
            if w is None:
                self._known.pop(name, None)
                return None
            if credential is not None and not (w.credential_hash and hmac.compare_digest(w.credential_hash,
                                                                                           credential)):
                return WRONG_CREDENTIAL
            memory = dict(conn.execute(BEAT_GPUS, {"name": name}).all())
            recent = [_readout(row) for row in conn.execute(BEAT_RECENT, {"name": name, "since": now - REVOKED_FOR})]
            ending = [a for a in recent if a.status == "active" and (
                a.token_hash in (ended or {}) or any(memory.get(u, 0) < a.vram for u in a.gpu_list))]
            if not ending or _settled:
                return self._beat(conn, name, w, memory, recent, usage, kernel, now)
        self._settle(name, ended or {})
        return self.heartbeat(name, usage, None, kernel, credential, _settled=True)

    def take_changes(self) -> bool:
        """Forget what is known of the workers the database says changed (True), or say that it cannot
        say (False: not listening, and each heartbeat reads its worker's row).  When listening starts
        again everything known is forgotten: a change before it was not told."""
        if self._changes is None:
            return False
        changed = self._changes.moved()
        if changed is None:
            return False
        if self._changes.epoch != self._epoch:
            self._epoch = self._changes.epoch
            self._known.clear()
        for name, version in changed.items():
            known = self._known.get(name)
            # versions only grow: a notice of a version already known is this replica's own move, or one it
            # read after it happened
            if known is not None and (version < 0 or version > known.version):
                del self._known[name]
        return True

    def _forget_moved(self, db) -> None:
        """After a commit of this replica's that changed workers' answers (moved()): what was known of them
        is old, here at once (other replicas hear it from the database)."""
        for name in db.info.pop(MOVED, ()):
            self._known.pop(name, None)

    def _known_answer(self, name: str, known: KnownBeat, usage, ended, kernel, credential, now: float,
                      listening: bool):
        """The answer from what the last heartbeat read, or None when this heartbeat must go to the
        database: the worker's version moved, it is not up, a memory figure changed, it ended one of its
        active allocations, or a revocation in the answer expired.  Listening (take_changes), what is
        known is its row as it is; else one read of the row says.  When its last_seen is due, it is
        written here with the kernel seconds that waited (_write_seen), if its version is the one known."""
        if self.write_every <= 0:  # every heartbeat writes: nothing is answered from memory
            return None
        if listening:
            status, hashed, last_seen, version = "up", known.credential, known.seen, known.version
        else:
            try:
                row = self._read_version(name)
            except Exception as exc:  # e.g. the database restarted: this heartbeat goes the usual way
                log.info("the heartbeat's quick read failed (%s): reading the usual way", exc)
                self.close_reader()
                return None
            if row is None:
                return None
            status, hashed, last_seen, version = row
        if credential is not None and not (hashed and hmac.compare_digest(hashed, credential)):
            return WRONG_CREDENTIAL
        if version != known.version or status != "up" or now >= known.expires:
            return None
        for a in known.recent:
            if a.status != "active":
                continue
            if ended and a.token_hash in ended:
                return None
            if usage is not None and _memory_figures(a, usage, known.memory) != (a.used_vram, a.overhead_vram):
                return None
        if now - last_seen >= self.write_every and not self._write_seen(name, known, kernel, now):
            return None
        return known.beat

    def _write_seen(self, name: str, known: KnownBeat, kernel, now: float) -> bool:
        """Write that worker ``name`` was seen now, and the kernel seconds of its allocations that grew
        since they were stored, on the reading connection, if its row is still at the version read
        (False: it is not, and nothing was written).  With figures, the version moves on (so another
        replica reads them again before it counts more) and what is known here moves with it."""
        recent, figures = [], []
        for a in known.recent:
            if kernel and a.token_hash in kernel:
                a = SimpleNamespace(**vars(a))
                add_kernel_time(a, kernel[a.token_hash], now)
                figures.append((a.kernel_seconds, a.kernel_time_seen, a.id))
            recent.append(a)
        try:
            cursor = self._reading_cursor()
            if not figures:  # one statement: its own transaction
                cursor.execute(self._seen_sql, (now, name, known.version))
                if cursor.rowcount != 1:
                    return False
                self._known[name] = known._replace(seen=now)
                return True
            cursor.execute(self._begin_sql)
            cursor.execute(self._seen_moved_sql, (now, name, known.version))
            if cursor.rowcount != 1:
                cursor.execute("ROLLBACK")
                return False
            cursor.executemany(self._kernel_sql, figures)
            cursor.execute("COMMIT")
        except Exception:
            self.close_reader()  # an open transaction goes with it
            raise
        self._known[name] = known._replace(version=known.version + 1, recent=recent, seen=now)
        return True

    def _read_version(self, name: str):
        """(status, credential_hash, last_seen, version) of worker ``name``, or None."""
        cursor = self._reading_cursor()
        cursor.execute(self._version_sql, (name,))
        return cursor.fetchone()

    def _reading_cursor(self):
        """The cursor of the heartbeat's own connection (opened when first needed)."""
        if self._reader is None:
            fairy = own_connection(self.engine)
            self._reader, self._cursor = fairy, fairy.cursor()  # one cursor for all: each costs the driver
        return self._cursor

    def close_reader(self) -> None:
        """Close the heartbeat's reading connection (opened again when next needed)."""
        reader, self._reader, self._cursor = self._reader, None, None
        close_quietly(reader)

    def close(self) -> None:
        """Close the heartbeats' own connections and the engine's (a replica that stops)."""
        self.close_reader()
        if self._changes is not None:
            self._changes.close()
        self.engine.dispose()

    def _beat(self, conn, name, w, memory, recent, usage, kernel, now) -> Beat:
        """The heartbeat in the database: grants and ends from ``recent`` (its allocations, read), the
        figures of those whose figures changed written back (the worker's version moves with them, so
        that no replica counts kernel seconds from figures it read before); the worker up, and seen now
        when it was not up or its last_seen is write_every old.  What was read is kept for the next
        heartbeat (_known)."""
        grants = [grant_json(a) for a in recent if a.status == "active"]
        revoked = {a.token_hash: ended_reason(a) for a in recent if a.status != "active"}
        changed = []
        for a in recent:
            before = (a.used_vram, a.overhead_vram, a.kernel_seconds, a.kernel_time_seen)
            if usage is not None and a.status == "active":
                a.used_vram, a.overhead_vram = _memory_figures(a, usage, memory)
                reported = sum(usage.get(a.token_hash, (0, 0)))
                if reported > a.used_vram:  # held at the memory of its GPUs
                    log.warning("worker %s says allocation %s holds %d bytes, more than its GPUs' %d: "
                                "counted as %d", name, a.id, reported, a.used_vram, a.used_vram)
            if kernel and a.token_hash in kernel:
                # an allocation that ended lately still counts what its kernels ran before its worker
                # heard of the end
                add_kernel_time(a, kernel[a.token_hash], now)
            if (a.used_vram, a.overhead_vram, a.kernel_seconds, a.kernel_time_seen) != before:
                changed.append({"row": a.id, "used": a.used_vram, "overhead": a.overhead_vram,
                                "seconds": a.kernel_seconds, "seen": a.kernel_time_seen})
        beat = Beat(grants, revoked, set(memory))
        version = w.version + bool(changed)
        if changed:
            conn.execute(BEAT_FIGURES, changed)
        if w.status == "gone":  # its pod went: only a registration (a new pod) brings it back
            if changed:
                conn.execute(TOUCH, {"worker": name})
            self._known.pop(name, None)
            return beat
        if w.status != "up":
            log.info("worker %s is back", name)
        seen = w.last_seen
        if w.status != "up" or now - w.last_seen >= self.write_every or changed:
            conn.execute(BEAT_SEEN, {"worker": name, "now": now, "bump": int(bool(changed))})
            seen = now
        ends = [a.ended for a in recent if a.status != "active" and a.ended is not None]
        self._known[name] = KnownBeat(version, memory, recent, beat,
                                      min(ends) + REVOKED_FOR if ends else float("inf"), w.credential_hash, seen)
        return beat

    def _settle(self, name: str, ended: dict[str, str]) -> None:
        """End what a heartbeat of ``name`` ends: the active allocations it reports ended (revoked with its
        sentence) and those whose GPUs it no longer offers with room for their quota (_grants)."""
        with self.Session.begin() as db:
            self.lock_placement(db)
            now = time.time()
            memory = dict(db.execute(BEAT_GPUS, {"name": name}).all())
            recent = self._recent(db, name, now)
            for a in recent:
                if a.status == "active" and a.token_hash in ended:
                    _end(db, a, "revoked", now, ended[a.token_hash])
                    log.info("allocation %s of %s ended on worker %s: %s", a.id, a.user, name, a.message)
            self._grants(db, name, memory, recent, now)

    def grant(self, name: str, hashed: str) -> dict | None:
        """The grant of worker ``name``'s active allocation with this token hash, or None."""
        with self.Session.begin() as db:
            self.lock_placement(db)  # _grants may end an allocation that no longer fits
            if db.get(Worker, name) is None:
                return None
            now = time.time()
            memory = dict(db.execute(BEAT_GPUS, {"name": name}).all())
            grants = self._grants(db, name, memory, self._recent(db, name, now), now)[0]
            return next((g for g in grants if g["token_hash"] == hashed), None)

    @staticmethod
    def _recent(db, name: str, now: float) -> list[Allocation]:
        """Worker ``name``'s active allocations and those that ended in the last REVOKED_FOR seconds, as ORM
        objects (the heartbeat's own read, BEAT_RECENT, gives rows)."""
        return list(db.scalars(select(Allocation).where(RECENT), {"name": name, "since": now - REVOKED_FOR}))

    @staticmethod
    def _grants(db, name: str, memory: dict[str, int], recent: list[Allocation],
                now: float) -> tuple[list[dict], dict[str, str]]:
        """Every active allocation of ``recent`` as a grant, and {token hash: why} of those that ended.
        An allocation whose GPUs the worker no longer offers with room for its quota (``memory``: the
        GPUs it registered; it registered again with others) is revoked here: no grant exceeds its GPU."""
        grants, revoked = [], {}
        for a in recent:
            if a.status == "active":
                small = [u for u in a.gpu_list if memory.get(u, 0) < a.vram]
                if not small:
                    grants.append(grant_json(a))
                    continue
                _end(db, a, "revoked", now, f"this vGPU was revoked: worker {name} no longer offers GPU "
                                            f"{small[0]} with {a.vram} bytes of memory")
                log.warning("allocation %s: %s", a.id, a.message)
            revoked[a.token_hash] = ended_reason(a)
        return grants, revoked

    def availability(self, specs: list[dict]) -> list[dict]:
        """For each request: does it fit now, and how many such vGPUs could still be placed.  A request
        that does not fit carries the NoFit's constraint, numbers, ``reason`` (a phrase) and ``message``."""
        out = []
        with self.Session.begin() as db:
            states = self.gpu_states(db)
        # every request is checked before any is placed: one bad one makes the whole body a 400
        reqs = [request_from(spec, f"requests[{i}]")[0] for i, spec in enumerate(specs)]
        for req in reqs:
            trial = [GPUState(**vars(s)) for s in states]
            slots, nofit = 0, None
            while slots < 100:
                try:
                    for g in place(req, trial, self.strategy, self.limits):
                        g.used_vram += req.vram
                        g.used_compute += req.compute
                    slots += 1
                except NoFit as exc:
                    nofit = exc
                    break
            if slots:
                out.append({"fits": True, "slots": slots, "reason": ""})
            else:
                out.append({"fits": False, "slots": 0, **nofit.to_json()})
        return out

    def check_heartbeats(self, heartbeat_timeout: float) -> None:
        """Mark silent workers lost; their sessions' allocations become lost with a message.  last_seen
        lags a live worker's last heartbeat by up to write_every, so silent means for heartbeat_timeout
        beyond that.  The rows are locked (PostgreSQL), so a heartbeat committing meanwhile is seen."""
        cutoff = time.time() - heartbeat_timeout - self.write_every
        with self.Session.begin() as db:
            self.lock_placement(db)
            for w in db.scalars(select(Worker).where(Worker.status == "up", Worker.last_seen < cutoff)
                                .with_for_update()):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.last_seen))
                log.warning("worker %s stopped sending heartbeats (last at %s): marked lost", w.name, when)
                _lose(db, w, f"GPU worker {w.name} stopped responding at {when}")

    def mark_lost(self, name: str, why: str) -> bool:
        """Worker ``name`` is gone now (its pod was deleted or failed: ``why``, a clause), not after the
        heartbeat timeout; its active allocations become lost with a message saying so.  Its status is
        "gone": a heartbeat it still sends (a terminating pod's) does not bring it back, only a new
        registration does.  False when no such worker is up."""
        with self.Session.begin() as db:
            self.lock_placement(db)
            w = db.get(Worker, name, with_for_update=True)
            if w is None or w.status != "up":
                return False
            log.warning("worker %s is gone: %s; marked gone", name, why)
            _lose(db, w, f"GPU worker {name} is gone: {why}", status="gone")
        return True

    def worker_for_pod(self, pod: str, node: str) -> str | None:
        """The worker that registered from pod ``pod``; else the one worker on ``node`` that named no pod
        (a worker of an older version); None when there is none or several."""
        with self.Session() as db:
            name = db.scalars(select(Worker.name).where(Worker.pod == pod)).first()
            if name is not None or not node:
                return name
            names = list(db.scalars(select(Worker.name).where(Worker.pod == "", Worker.node == node)))
            return names[0] if len(names) == 1 else None

    def gpu_table(self) -> list[dict]:
        with self.Session.begin() as db:
            used = {s.uuid: s for s in self.gpu_states(db)}  # every GPU of a worker, as the rows below
            rows = db.execute(select(GPU, Worker).join(Worker).order_by(Worker.name, GPU.index)).all()
            return [{"uuid": g.uuid, "worker": w.name, "worker_status": w.status, "model": g.model,
                     "memory": g.memory, "capability": g.capability, "emulated": g.emulated,
                     "used_vram": used[g.uuid].used_vram, "used_compute": used[g.uuid].used_compute,
                     "sessions": used[g.uuid].sessions} for g, w in rows]

    def usage_report(self) -> dict:
        """GPU-hours per user and per hub group (an allocation counts for each group its user was in
        when it was placed): ``gpu_hours`` wall clock (count x time held), ``gpu_hours_weighted`` the
        kernel time its worker measured (what the share was used for), ``active`` allocations now."""
        now = time.time()
        per_user: dict[str, dict] = {}
        per_group: dict[str, dict] = {}
        with self.Session() as db:
            for a in db.scalars(select(Allocation)):
                rows = [per_user.setdefault(a.user, {"user": a.user, **_zero()})]
                for g in a.group_list:
                    rows.append(per_group.setdefault(g, {"group": g, **_zero(), "users": set()}))
                    rows[-1]["users"].add(a.user)
                for row in rows:
                    row["gpu_hours"] += a.gpu_hours(now)
                    row["gpu_hours_weighted"] += a.gpu_hours_weighted()
                    row["active"] += a.status == "active"
        groups = [{**g, "users": len(g["users"])} for g in per_group.values()]
        return {"users": sorted(per_user.values(), key=lambda u: u["user"]),
                "groups": sorted(groups, key=lambda g: g["group"])}

    def usage_table(self) -> list[dict]:
        """The per-user rows of usage_report (the dashboard's table)."""
        return self.usage_report()["users"]


def _lose(db, w: Worker, what: str, status: str = "lost") -> None:
    """Mark ``w`` lost (or gone) and its active allocations lost, each with a message that starts with
    ``what``."""
    w.status = status
    moved(db, w.name)
    now = time.time()
    for a in db.scalars(select(Allocation).where(Allocation.worker_name == w.name, Allocation.status == "active")):
        _end(db, a, "lost", now, f"Your vGPU was lost: {what}. Stop and start your server to get a new one.")


def moved(db, *workers: str) -> None:
    """Session ``db`` changes what these workers' heartbeats are answered: when it commits, the book
    forgets what it knew of them (AllocationBook._forget_moved)."""
    db.info.setdefault(MOVED, set()).update(workers)


def _end(db, a: Allocation, status: str, when: float, message: str | None = None) -> None:
    """``a`` ends as ``status`` (released, revoked or lost); what an active one promised its GPUs is free."""
    if a.status == "active":
        _promise(db, a, -1)
    db.connection().execute(TOUCH, {"worker": a.worker_name})  # its worker's reply changes
    moved(db, a.worker_name)
    a.status, a.ended = status, when
    if message is not None:
        a.message = message


def _promise(db, a: Allocation, sign: int) -> None:
    """Add (+1) or take back (-1) what ``a`` promises to each of its GPUs, in the database's own
    arithmetic (no read of the figures, so concurrent ends never lose one), GPUs in uuid order."""
    rows = [{"gpu": uuid, "vram": sign * a.vram, "compute": sign * a.compute, "sessions": sign}
            for uuid in sorted(a.gpu_list)]
    # one GPU, the usual vGPU: a plain execute (the driver's executemany costs PostgreSQL a pipeline)
    db.connection().execute(PROMISE, rows[0] if len(rows) == 1 else rows)


def _load(vram, compute, memory):
    """scheduler.place's load of a GPU, max(vram / memory, compute / 100), as a SQL expression."""
    by_memory, by_compute = cast(vram, Float) / memory, cast(compute, Float) / 100.0
    return case((by_memory > by_compute, by_memory), else_=by_compute)


_PROMISED = dict(  # a GPU's figures with a vGPU's promise added (vram, compute, sessions: negative to take it back)
    promised_vram=GPU.__table__.c.promised_vram + bindparam("vram"),
    promised_compute=GPU.__table__.c.promised_compute + bindparam("compute"),
    sessions=GPU.__table__.c.sessions + bindparam("sessions"),
    load=_load(GPU.__table__.c.promised_vram + bindparam("vram"), GPU.__table__.c.promised_compute
               + bindparam("compute"), GPU.__table__.c.memory))
PROMISE = update(GPU.__table__).where(GPU.__table__.c.uuid == bindparam("gpu")).values(**_PROMISED)


@functools.lru_cache(maxsize=None)
def fitting_gpus(strategy: str, local: bool, first_only: bool):
    """The statement that lists the GPUs of live workers a request fits on, in the strategy's order (an
    index: ix_gpus_busiest or ix_gpus_idlest), with the request as parameters (vram, compute, vram_ratio,
    compute_ratio, full, node: _fit_params); built once per kind of request."""
    g, w = GPU.__table__.c, Worker.__table__.c
    # a GPU a vGPU fits has room for more memory and compute (each > 0) than it is promised, so its load is
    # below the larger ratio ("full"): the index skips the full GPUs a lab's first minute leaves in front
    # of compact-first's order, or each placement would walk past all of them
    q = live_gpus_in_order(strategy, g.uuid, g.worker_name).where(
        g.memory >= bindparam("vram"),
        g.memory * bindparam("vram_ratio", type_=Float) - g.promised_vram >= bindparam("vram"),
        bindparam("compute_ratio", type_=Float) * 100 - g.promised_compute >= bindparam("compute"))
    if local:
        q = q.where(w.node == bindparam("node"))
    return q.limit(1) if first_only else q


@functools.lru_cache(maxsize=None)
def take_first(strategy: str, local: bool):
    """PROMISE on the first GPU fitting_gpus lists, in one statement: the uuid and worker of the GPU
    promised a vGPU of one GPU (parameters: fitting_gpus' and sessions=1), or no row when none fits."""
    g = GPU.__table__.c
    first = fitting_gpus(strategy, local, True).with_only_columns(g.uuid).scalar_subquery()
    return update(GPU.__table__).where(g.uuid == first).values(**_PROMISED).returning(g.uuid, g.worker_name)


def recount(conn, workers: list[str] | None = None) -> None:
    """Set what each GPU is promised (of ``workers``' GPUs, or all) from the active allocations: after
    a worker registers its GPUs again, and once when the figures were added to the schema."""
    gpus = GPU.__table__
    q = select(gpus.c.uuid, gpus.c.memory)
    alive = select(Allocation.gpu_uuids, Allocation.vram, Allocation.compute).where(Allocation.status == "active")
    if workers is not None:
        q = q.where(gpus.c.worker_name.in_(workers))
        alive = alive.where(Allocation.worker_name.in_(workers))
    totals = {uuid: [memory, 0, 0, 0] for uuid, memory in conn.execute(q)}
    for uuids, vram, compute in conn.execute(alive):
        for u in uuids.split(","):
            if u in totals:
                totals[u][1] += vram
                totals[u][2] += compute
                totals[u][3] += 1
    if totals:
        conn.execute(update(gpus).where(gpus.c.uuid == bindparam("gpu"))
                     .values(promised_vram=bindparam("vram"), promised_compute=bindparam("compute"),
                             sessions=bindparam("sessions"), load=bindparam("gpu_load")),
                     [{"gpu": u, "vram": v, "compute": c, "sessions": n, "gpu_load": max(v / m, c / 100)}
                      for u, (m, v, c, n) in totals.items()])


def _zero() -> dict:
    return {"gpu_hours": 0.0, "gpu_hours_weighted": 0.0, "active": 0}


# A heartbeat's statements (AllocationBook.heartbeat), built once, on the tables' own columns: no ORM work
# per heartbeat
_W, _G, _A = Worker.__table__.c, GPU.__table__.c, Allocation.__table__.c
# the worker's row first, locked (PostgreSQL): the order every other writer of a worker and its
# allocations keeps (_lose), so the two never wait for each other
BEAT_WORKER = select(_W.status, _W.credential_hash, _W.last_seen, _W.version).where(
    _W.name == bindparam("name")).with_for_update()
BEAT_GPUS = select(_G.uuid, _G.memory).where(_G.worker_name == bindparam("name"))
# a worker's active allocations and those ended since a time: what its heartbeat's reply is made of
RECENT = and_(_A.worker_name == bindparam("name"), or_(_A.status == "active", _A.ended >= bindparam("since")))
BEAT_RECENT = select(*[_A[c] for c in (
    "id", "user", "profile", "qos", "burst", "gpu_uuids", "vram", "compute", "count", "status", "ended", "message",
    "worker_name", "token_hash", "used_vram", "overhead_vram", "kernel_seconds", "kernel_time_seen", "created")]
).where(RECENT)
BEAT_FIGURES = update(Allocation.__table__).where(_A.id == bindparam("row")).values(
    used_vram=bindparam("used"), overhead_vram=bindparam("overhead"), kernel_seconds=bindparam("seconds"),
    kernel_time_seen=bindparam("seen"))
BEAT_SEEN = update(Worker.__table__).where(_W.name == bindparam("worker")).values(
    status="up", last_seen=bindparam("now"), version=_W.version + bindparam("bump"))
# PostgreSQL: n new allocation ids, in order (allocate_many)
NEXT_IDS = text("SELECT nextval(pg_get_serial_sequence('allocations', 'id')) FROM generate_series(1, :n)")
# a change a worker's heartbeat reply depends on (KnownBeat): its version moves on
TOUCH = update(Worker.__table__).where(_W.name == bindparam("worker")).values(version=_W.version + 1)
WRONG_CREDENTIAL = object()  # AllocationBook.heartbeat: the credential is not the worker's


def _readout(row) -> SimpleNamespace:
    """An allocation row as an object with the attributes the helpers here read (grant_json,
    ended_reason, add_kernel_time), gpu_list among them."""
    a = SimpleNamespace(**row._mapping)
    a.gpu_list = [u for u in a.gpu_uuids.split(",") if u]
    return a


def _one_gpu_anywhere(req: Request) -> bool:
    """A request a BatchPlan places: one GPU, on any node."""
    return req.count == 1 and not (req.mode == "local" and req.node)


def _memory_figures(a, usage: dict, memory: dict[str, int]) -> tuple[int, int]:
    """What active allocation ``a`` holds by a heartbeat's ``usage`` (absent: nothing), as stored: VRAM in
    use (used + overhead) and overhead, each held at the memory of its GPUs."""
    used, overhead = usage.get(a.token_hash, (0, 0))
    bound = sum(memory.get(u, 0) for u in a.gpu_list)
    return min(used + overhead, bound), min(overhead, bound)


def add_kernel_time(a: Allocation, figure: float, now: float) -> None:
    """Count a heartbeat's kernel_time of ``a``: the worker's cumulative seconds for this vGPU.  What
    grew since its last figure is added; a smaller figure means the worker started again from zero, so
    all of it is new.  More than its GPUs could run since it was placed is a worker's error: logged and
    held at that bound."""
    seen = a.kernel_time_seen or 0.0
    gained = figure - seen if figure >= seen else figure
    bound = a.count * max(0.0, now - a.created)
    if (a.kernel_seconds or 0.0) + gained > bound:
        log.warning("worker %s says allocation %s ran %.1f s of kernels, more than its %d GPU(s) could since "
                    "it was placed: counted up to %.1f s", a.worker_name, a.id, (a.kernel_seconds or 0.0) + gained,
                    a.count, bound)
        gained = max(0.0, bound - (a.kernel_seconds or 0.0))
    a.kernel_seconds = (a.kernel_seconds or 0.0) + gained
    a.kernel_time_seen = figure


def request_from(spec, where: str = "") -> tuple[Request, bool]:
    """A request body's GPU settings as integers (gpu_settings is the one validator of each kind) and
    whether the vGPU may burst (placement does not depend on it); InvalidRequest with a sentence naming
    the field when one is not valid."""
    prefix = f"{where}." if where else ""
    try:
        if not isinstance(spec, dict):
            raise LimitError(f"{where or 'the request'} must be a JSON object of GPU settings")
        node = spec.get("node", "")
        if not isinstance(node, str) or len(node) > 255:
            raise LimitError(f"{prefix}node must be a host name")
        settings = gpu_settings(spec, where)
        burst = settings.pop("burst")
        req = Request(**settings, node=node)
    except LimitError as exc:
        raise InvalidRequest(f"invalid GPU request: {exc}") from None
    validate(req)
    return req, burst


def groups_from(spec: dict) -> list[str]:
    """The user's hub groups as the spawner sends them ("groups", optional): distinct names, sorted."""
    groups = spec.get("groups", [])
    if not isinstance(groups, list) or len(groups) > MAX_GROUPS or not all(
            isinstance(g, str) and 0 < len(g) <= 255 for g in groups):
        raise InvalidRequest(f"groups must be a list of at most {MAX_GROUPS} hub group names, each 1 to 255 "
                             "characters")
    return sorted(set(groups))


def grant_json(a: Allocation) -> dict:
    """What a worker needs to admit a vGPU's sessions without asking the pool (docs/architecture.md)."""
    return {"token_hash": a.token_hash, "id": str(a.id), "user": a.user, "profile": a.profile, "qos": a.qos,
            "burst": a.burst, "gpus": a.gpu_list, "vram": a.vram, "compute": a.compute}


def ended_reason(a: Allocation) -> str:
    """Why an allocation ended, in a sentence its worker gives the vGPU's programs."""
    if a.status == "released":
        return RELEASED
    if a.status == "lost":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.ended or time.time()))
        return f"this vGPU was lost: GPU worker {a.worker_name} stopped responding (marked lost at {when})"
    return a.message  # revoked: the admin's message or why it no longer fits, in a sentence already


def local_address(a: Allocation, worker: Worker | None) -> str:
    """Where the server of ``a`` reaches its worker in native mode (unix:///path), or "" when it is forwarded.

    Native: a local vGPU (placed on the server's own node, or in Kubernetes, on the node its pod is then
    pinned to) on a worker that listens on a Unix socket.  The native libcuda.so.1 loads the node's
    driver, so the backend is cuda; the emulated one (a test double) qualifies too so that the path can
    be tested without a GPU, and the answer names the backend ("backend", "emulated")."""
    if a.mode != "local" or worker is None or not worker.unix_socket or worker.backend not in NATIVE_BACKENDS:
        return ""
    return f"unix://{worker.unix_socket}"


def allocation_json(a: Allocation, worker: Worker | None) -> dict:
    native = local_address(a, worker)
    return {"id": a.id, "user": a.user, "server_name": a.server_name, "profile": a.profile,
            "worker": a.worker_name, "address": worker.address if worker else "",
            "control_url": worker.control_url if worker else "",
            "node": worker.node if worker else "", "gpus": a.gpu_list,
            "vram": a.vram, "compute": a.compute, "count": a.count, "mode": a.mode, "qos": a.qos,
            "burst": a.burst, "groups": a.group_list, "status": a.status, "message": a.message,
            "used_vram": a.used_vram, "overhead_vram": a.overhead_vram, "kernel_seconds": a.kernel_seconds,
            "created": a.created, "ended": a.ended,
            "emulated": worker.backend == "emulated" if worker else False,
            "backend": worker.backend if worker else "", "native": bool(native), "local_address": native}
