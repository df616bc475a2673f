"""The worker's vGPUs: grants, their ledgers and processes, revocation, and what they report.

A vGPU exists on a worker because it was *granted*: by the pool (grants arrive with every
heartbeat reply and are cached, so a pool outage does not stop a lab from opening kernels) or
by the worker's own configuration (``c.GPUWorker.tokens``).  The daemon admits a session by
the hash of its token against the grants it holds; only a token it has never heard of makes it
ask the pool.  A grant that disappears, or an explicit revocation, ends the vGPU: its ledger is
marked with the reason and each of its executors is told (SIGUSR1) to free its memory and answer
every further call with that reason.

Thread-safe: the accept loop, the pool link and the control API all use it.
"""
from __future__ import annotations

import collections
import fcntl
import logging
import os
import re
import shutil
import signal
import threading
import time

from ..api import errors as E
from ..api.errors import Refusal
from ..client.tokens import token_hash
from ..client.units import format_size
from .ledger import Ledger
from .pacing import QOS_RANK, GPUBoard
from .tierboard import TierBoard
from .tiering import TierState, idle_clock, tier_name

log = logging.getLogger("gpulab.worker")

TRACE_KEEP = 1024          # calls a vGPU's trace keeps, over all its processes
REVOKED_KEEP = 24 * 3600   # seconds a revoked token stays refused with its reason
MEASURE_EVERY = 1.0        # seconds between measurements of the context overhead (cuda)
COUNTERS = ("calls", "launches", "bytes_in", "bytes_out", "kernel_time", "throttled_time")
# a vGPU's tier moves, summed over its processes, ended ones included (the ledger slot's names)
MOVES = ("offloads", "restores", "failures", "bytes_offloaded", "bytes_restored", "offload_seconds",
         "restore_seconds")
TIER_NAMES = ("hot", "warm", "cold")
SHARE_WINDOW = 10.0        # seconds over which a vGPU's measured share is taken


class VGPU:
    """One grant on this worker and what its processes did."""

    def __init__(self, grant: dict, slots: int, board: GPUBoard | None):
        self.grant = grant
        self.ledger = Ledger(slots, _ledger_quota(grant))
        self.board = board  # its first GPU's board: pacing (bursting) among the vGPUs there
        self.row = board.take(*_pacing(grant)) if board is not None else None
        self.ledger.set_pacing(*_ledger_pacing(grant))
        self.samples: collections.deque = collections.deque()  # (monotonic time, kernel time) for the share
        self.last_look: tuple[float, float] | None = None  # (monotonic time, kernel time) at publish_utilization
        self.procs: dict[int, int] = {}  # executor pid -> ledger slot (a native-mode process: its own pid)
        self.native: set[int] = set()    # which of them are native-mode processes (native.py), not executors
        self.rows: dict[int, int] = {}   # executor pid -> its row on the worker's tier board
        self.state, self.reason = "active", ""
        self.ended_at = 0.0
        self.retired = dict.fromkeys(COUNTERS, 0)  # from processes that ended
        self.retired_moves = dict.fromkeys(MOVES, 0)
        # the last tier asked of its processes (0 hot, 1 warm, 2 cold) and when (wall clock): the idle
        # policy asks for a tier once per idle spell, and a restore asked by hand counts as a touch
        self.asked: tuple[int, float] = (0, 0.0)
        self.errors: collections.Counter = collections.Counter()
        self.opened = 0
        self.trace: collections.deque = collections.deque(maxlen=TRACE_KEEP)
        self.seq = 0
        self.harvested: dict[int, tuple[int, int]] = {}  # slot -> (pid, records taken)

    @property
    def id(self) -> str:
        return self.grant["id"]


def _pacing(grant: dict) -> tuple[float, int, bool]:
    """The grant's share of each of its GPUs (a fraction), QoS rank and burst flag (default by QoS)."""
    qos = grant.get("qos") or "medium"
    burst = grant.get("burst")
    if burst is None:
        burst = qos in ("medium", "high")
    return grant.get("compute", 100) / 100.0, QOS_RANK.get(qos, 1), bool(burst)


def _ledger_pacing(grant: dict) -> tuple[float, int, bool]:
    """What the ledger's bucket refills at: the share of each GPU times its GPUs (the pool books the
    share on each), as the bucket is debited with the kernel time of all of them."""
    share, qos, burst = _pacing(grant)
    return share * max(len(grant["gpus"]), 1), qos, burst


def _lock_briefly(fd: int) -> bool:
    """Take a ledger's lock without ever blocking the daemon's loop for long; False if it stayed busy."""
    for _ in range(200):  # executors hold it for microseconds
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            time.sleep(0.0005)
    return False


def _ledger_quota(grant: dict) -> int | None:
    """The ledger's quota: the grant's VRAM on each of its GPUs (documented in docs/vgpu.md)."""
    vram = grant.get("vram")
    return None if vram is None else vram * max(len(grant["gpus"]), 1)


class VGPURegistry:
    def __init__(self, gpus: list[dict], kind: str, slots: int = 64, context_overhead: int = 0,
                 overhead_estimate: int = 512 << 20, warm_budget: int = 1 << 30, spool: str = ""):
        self.lock = threading.RLock()
        # device memory per GPU and warm host memory of every executor (tierboard.py); on the emulated
        # device the board enforces each GPU's memory, on a real one the driver does
        self.tierboard = TierBoard([g["memory"] if kind == "emulated" else 0 for g in gpus], warm_budget)
        self.spool = spool  # the cold tier's directory: <spool>/<vGPU id>/<executor pid>/
        self.gpu_list = gpus
        self.by_uuid = {g["uuid"]: g for g in gpus}
        self.kind = kind
        self.slots = slots
        self.context_overhead = context_overhead    # emulated: charged per process as configured
        self.overhead_estimate = overhead_estimate  # cuda: charged until NVML has measured a context
        self.measured = 0                           # largest context overhead measured so far (cuda)
        self.can_measure = False
        if kind == "cuda":
            from .gpus import nvml_available

            self.can_measure = nvml_available()
            if not self.can_measure:
                log.warning("NVML is not available: the device memory of CUDA contexts cannot be measured "
                            "and is not charged to vGPUs (GPUs may be overcommitted by it)")
        self._measured_at = 0.0
        self.table: dict[str, VGPU] = {}           # token hash -> vGPU
        self.pool_grants: set[str] = set()         # hashes the pool currently grants
        self.static: set[str] = set()              # hashes the worker's configuration grants
        self.looked_up: set[str] = set()           # hashes granted by a look-up since the last heartbeat reply
        self.revoked: dict[str, tuple[str, float]] = {}  # token hash -> (reason, when)
        self.by_pid: dict[int, VGPU] = {}
        self.boards = {g["uuid"]: GPUBoard() for g in gpus}
        # the emulated device runs one kernel at a time per GPU, over all processes: a lock per GPU
        self.device_locks = {g["uuid"]: os.memfd_create("gpulab-emulated-gpu", os.MFD_CLOEXEC) for g in gpus} \
            if kind == "emulated" else {}
        self.lookup = None
        self.native_tier = None  # native.py: moves a vGPU's native-mode processes (request_tier calls it)
        self.native_why_not = lambda pid: ""  # native.py: why a native process cannot be frozen, "" if it can
        # native.py: device memory its native processes hold on each of its GPUs
        self.native_hot_by_gpu = lambda v, movable=False: []
        # native.py: whether the warm budget now has the room it lacked for freezing one of its native processes
        self.native_budget_has_room = lambda v: False
        self.names = _function_names()

    # ------------------------------------------------------------------ grants
    def check_grant(self, grant: dict, where: str) -> dict:
        """A grant in shape, with its GPUs on this worker and a quota they can hold; ValueError says why."""
        if not isinstance(grant.get("token_hash"), str) or not grant["token_hash"] or "id" not in grant:
            raise ValueError(f"{where}: a grant needs a token_hash and an id")
        gpus = grant.get("gpus") or [self.gpu_list[0]["uuid"]]
        for u in gpus:
            if u not in self.by_uuid:
                raise ValueError(f"{where}: GPU {u} is not one of this worker's")
        vram = grant.get("vram")
        if vram is not None:
            smallest = min(self.by_uuid[u]["memory"] for u in gpus)
            if vram > smallest:
                raise ValueError(f"{where}: a quota of {format_size(vram)} is larger than its GPU's "
                                 f"{format_size(smallest)}")
        return {**grant, "gpus": list(gpus), "id": str(grant["id"])}

    def _add(self, grant: dict) -> VGPU:
        v = self.table.get(grant["token_hash"])
        if v is None or v.state != "active":
            v = self.table[grant["token_hash"]] = VGPU(grant, self.slots, self.boards.get(grant["gpus"][0]))
        elif v.grant != grant:
            v.grant = grant
            v.ledger.quota = _ledger_quota(grant)
            v.ledger.set_pacing(*_ledger_pacing(grant))
            if v.row is not None:
                v.board.update(v.row, *_pacing(grant))
        return v

    def set_static(self, grants: list[dict]) -> None:
        """Grants from this worker's configuration (checked by the caller)."""
        with self.lock:
            for g in grants:
                if g["token_hash"] not in self.revoked:
                    self.static.add(g["token_hash"])
                    self._add(g)

    def withdraw_static(self, token: str) -> None:
        """A configured token is no longer in the configuration (its tokens file changed): its vGPU ends."""
        h = token_hash(token)
        with self.lock:
            v = self.table.get(h)
            if h in self.static and v is not None and v.state == "active":
                self.static.discard(h)
                self._revoke(v, "this session token was removed from the worker's configuration")

    def set_lookup(self, fn) -> None:
        self.lookup = fn

    def apply_grants(self, grants: list[dict], revoked: dict[str, str]) -> None:
        """The pool's whole list for this worker: new ones are cached, vanished ones end."""
        with self.lock:
            now = time.time()
            fresh = set()
            # a reply may have been computed before a grant this worker just looked up existed: such a
            # grant ends only by name ("revoked") until the next reply, whose request left after it
            young, self.looked_up = self.looked_up, set()
            for g in grants:
                try:
                    if not isinstance(g, dict):
                        raise TypeError(f"{g!r:.60} is not an object")
                    g = self.check_grant(g, f"the pool's grant {g.get('id')}")
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("ignoring a grant: %s", exc)
                    continue
                if g["token_hash"] in self.revoked:
                    continue  # ended here (e.g. an admin on this worker): it stays ended
                fresh.add(g["token_hash"])
                self._add(g)
            for h in young - fresh:
                if h not in revoked:
                    fresh.add(h)
            for h in self.pool_grants - fresh:
                v = self.table.get(h)
                if v is not None and v.state == "active":
                    self._revoke(v, revoked.get(h) or "this vGPU is no longer granted to this worker")
            for h, why in revoked.items():
                self.revoked.setdefault(h, (why, now))
            self.pool_grants = fresh
            self._forget_old(now)

    def admit(self, token: str) -> dict | None:
        """The grant of a session token, or None; a Refusal (with the reason) for an ended vGPU.

        Only a token this worker holds no grant for makes it ask the pool (OSError if it cannot)."""
        h = token_hash(token)
        with self.lock:
            if h in self.revoked:
                raise Refusal(E.DEVICE_UNAVAILABLE, self.revoked[h][0])
            v = self.table.get(h)
            if v is not None and v.state == "active":
                return v.grant
        if self.lookup is None:
            return None
        grant = self.lookup(h)
        if grant is None:
            return None
        grant = self.check_grant(grant, f"the pool's grant {grant.get('id')}")
        with self.lock:
            self.pool_grants.add(h)
            self.looked_up.add(h)
            return self._add(grant).grant

    # ----------------------------------------------------------- processes
    def open_slot(self, grant: dict, client_pid: int, max_processes: int) -> tuple[VGPU, int]:
        """(daemon, before forking) A ledger slot for a new process, with its context charged."""
        with self.lock:
            v = self.table.get(grant["token_hash"])
            if v is None or v.state != "active":
                raise Refusal(E.DEVICE_UNAVAILABLE, v.reason if v else "this vGPU is not granted to this worker")
            if max_processes and len(v.procs) >= max_processes:
                raise Refusal(E.DEVICE_UNAVAILABLE, f"this vGPU already has {len(v.procs)} sessions (client "
                                                    "processes) open on this worker, the most one vGPU may have: "
                                                    "end one (e.g. shut down an idle kernel) and try again")
            if self.kind == "emulated":
                overhead = self.context_overhead
            else:  # charged up front, replaced by the measurement of this process
                overhead = (self.measured or self.overhead_estimate) if self.can_measure else 0
            slot = self._claim_within_quota(v, overhead)
            v.ledger.bind(slot, 0, client_pid, time.time(), overhead)
            return v, slot

    def _claim_within_quota(self, v: VGPU, overhead: int) -> int:
        """Claim a slot under the vGPU's lock, so that the context's memory is charged exactly."""
        if not _lock_briefly(v.ledger.fd):
            raise Refusal(E.DEVICE_UNAVAILABLE, "this vGPU's ledger is busy; try again")
        try:
            quota = v.ledger.quota
            if quota is not None and v.ledger.charged() + overhead > quota:
                raise Refusal(E.OUT_OF_MEMORY, f"this vGPU has no room for another process's CUDA context "
                                               f"({format_size(overhead)}): its quota of {format_size(quota)} is "
                                               f"in use by its other processes; end one (e.g. shut down an idle "
                                               "kernel) and try again")
            slot = v.ledger.claim()
            if slot is None:
                raise Refusal(E.DEVICE_UNAVAILABLE, "this vGPU has as many processes as its ledger holds")
            return slot
        finally:
            fcntl.lockf(v.ledger.fd, fcntl.LOCK_UN)

    def claim_row(self) -> int:
        """(daemon, before forking) The new executor's row on the tier board."""
        row = self.tierboard.claim()
        if row is None:
            raise Refusal(E.DEVICE_UNAVAILABLE, "this worker runs as many processes as it can track; try again "
                                                "when a session has ended")
        return row

    def spool_of(self, v: VGPU, pid: int) -> str:
        """The directory of one executor's cold allocations ('' when the worker has no spool)."""
        return os.path.join(self.spool, safe_name(v.id), str(pid)) if self.spool else ""

    def bind(self, v: VGPU, slot: int, pid: int, row: int | None = None) -> None:
        """(daemon, after forking) The executor that owns ``slot`` (and ``row`` of the tier board)."""
        with self.lock:
            if row is not None:
                self.tierboard.bind(row, pid)
                v.rows[pid] = row
            rec = v.ledger.read_slot(slot)
            v.ledger.bind(slot, pid, rec["client_pid"], rec["started"], rec["overhead"])
            v.procs[pid] = slot
            v.opened += 1
            self.by_pid[pid] = v

    def bind_native(self, v: VGPU, slot: int, pid: int) -> None:
        """(daemon) A native-mode process owns ``slot`` itself: no executor, no tier-board row; never signalled."""
        with self.lock:
            v.ledger.bind(slot, pid, pid, time.time(), v.ledger.read_slot(slot)["overhead"])
            v.procs[pid] = slot
            v.native.add(pid)
            v.opened += 1
            self.by_pid[pid] = v

    def cancel(self, v: VGPU, slot: int) -> None:
        """(daemon) The fork failed: the slot goes back."""
        with self.lock:
            v.ledger.release(slot)

    def reap(self, pid: int) -> None:
        """(daemon) An executor ended: keep its figures and calls, free its slot."""
        with self.lock:
            v = self.by_pid.pop(pid, None)
            if v is None:
                return
            self._harvest(v)  # while it is still among the processes: its last calls go into the trace
            slot = v.procs.pop(pid)
            v.native.discard(pid)
            final = v.ledger.read_slot(slot)
            if final is not None:
                for k in COUNTERS:
                    v.retired[k] += final[k]
                for k in MOVES:
                    v.retired_moves[k] += final[k]
                v.errors.update(final["errors"])
            # its kernel time moves from its slot to the ended processes' total in one step under the
            # lock, or a process settling its bucket between the two would count it twice
            locked = _lock_briefly(v.ledger.fd)
            try:
                if final is not None:
                    v.ledger.retire_kernel_time(final["kernel_time"])
                v.ledger.release(slot)
            finally:
                if locked:
                    fcntl.lockf(v.ledger.fd, fcntl.LOCK_UN)
            v.harvested.pop(slot, None)
            row = v.rows.pop(pid, None)
            if row is not None:
                self.tierboard.release(row)
            spool = self.spool_of(v, pid)
            if spool and os.path.isdir(spool):  # a crashed executor's cold allocations: nobody can use them now
                shutil.rmtree(spool, ignore_errors=True)

    # ----------------------------------------------------------------- tiers
    def request_tier(self, vgpu_id: str, want: int) -> tuple[int, list[int]] | None:
        """Ask each process of a vGPU to move its allocations to tier ``want`` (0 hot, 1 warm, 2 cold);
        the request's number and the executors told (SIGUSR2), or None for an unknown or ended vGPU."""
        with self.lock:
            v = self._by_id(vgpu_id)
            if v is None or v.state != "active":
                return None
            seq = v.ledger.request_tier(want)
            v.asked = (want, time.time())
            told = []
            for pid in v.procs:
                if pid in v.native:  # not an executor: native.py freezes and thaws it
                    continue
                try:
                    os.kill(pid, signal.SIGUSR2)
                    told.append(pid)
                except ProcessLookupError:
                    pass
            if v.native and self.native_tier is not None:
                self.native_tier(v, seq, want)
                told += sorted(v.native)
            return seq, told

    def _acted(self, vgpu_id: str) -> dict[int, tuple[int, int]] | None:
        """{executor pid: (last tier request acted on, its CUresult)} of a vGPU's live processes; None for an
        unknown vGPU."""
        with self.lock:
            v = self._by_id(vgpu_id)
            if v is None:
                return None
            recs = {pid: v.ledger.read_slot(slot) for pid, slot in v.procs.items()}
            return {pid: (r["done_seq"], r["done_result"]) for pid, r in recs.items() if r is not None}

    def tier_done(self, vgpu_id: str, seq: int) -> bool | None:
        """Whether every live process of a vGPU has acted on tier request ``seq``; None for an unknown vGPU."""
        acted = self._acted(vgpu_id)
        return None if acted is None else all(done >= seq for done, _result in acted.values())

    def tier_failures(self, vgpu_id: str, seq: int) -> dict[int, int]:
        """{executor pid: CUresult} of the live processes whose last tier move (request ``seq`` or a later one)
        failed; empty when every one that acted moved its memory."""
        acted = self._acted(vgpu_id) or {}
        return {pid: result for pid, (done, result) in acted.items() if done >= seq and result}

    def set_idle_hint(self, vgpu_id: str, since: float, now: float | None = None) -> bool:
        """Someone outside says the vGPU's program has been idle since ``since``; False for an unknown or
        ended vGPU."""
        with self.lock:
            v = self._by_id(vgpu_id)
            if v is None or v.state != "active":
                return False
            v.ledger.set_idle_hint(since, time.time() if now is None else now)
            return True

    def tier_state(self, v: VGPU) -> TierState:
        """(under the lock) What the idle policy and eviction need of a vGPU, from its ledger."""
        touches, started = [], []
        tiers = dict.fromkeys(TIER_NAMES, 0)
        for slot in v.procs.values():
            rec = v.ledger.read_slot(slot)
            if rec is None:
                continue
            touches.append(rec["last_touch"])
            started.append(rec["started"])
            for k in TIER_NAMES:
                tiers[k] += rec[k]
        return TierState(v.id, v.grant.get("qos") or "medium", touches, started, v.ledger.idle_hint(),
                         (tiers["hot"], tiers["warm"], tiers["cold"]), v.asked)

    # ------------------------------------------------------------ revocation
    def revoke(self, vgpu_id: str, reason: str) -> bool:
        with self.lock:
            v = self._by_id(vgpu_id)
            if v is None or v.state != "active":
                return False
            self._revoke(v, reason)
            return True

    def _revoke(self, v: VGPU, reason: str) -> None:
        v.state, v.reason, v.ended_at = "revoked", reason, time.time()
        if v.row is not None:  # it wants no kernel time any more
            v.board.give_back(v.row)
            v.row = None
        self.revoked[v.grant["token_hash"]] = (reason, v.ended_at)
        v.ledger.revoke(reason)
        for pid, slot in v.procs.items():
            if pid in v.native:  # the shim refuses its allocations and launches from now on, with the reason
                continue
            v.ledger.set_overhead(slot, 0)  # the executor closes its device: its context is gone
            try:
                os.kill(pid, signal.SIGUSR1)  # the executor frees its memory and refuses every call
            except ProcessLookupError:
                pass
        log.info("vGPU %s of %s ended (%d processes): %s", v.id, v.grant.get("user", "?"), len(v.procs), reason)

    def _forget_old(self, now: float) -> None:
        for h, (_why, when) in list(self.revoked.items()):
            if now - when > REVOKED_KEEP:
                del self.revoked[h]
        for h, v in list(self.table.items()):
            if v.state != "active" and not v.procs and now - v.ended_at > 3600:
                v.ledger.close()
                if v.row is not None:
                    v.board.give_back(v.row)
                del self.table[h]

    # --------------------------------------------------------------- reports
    def _by_id(self, vgpu_id: str) -> VGPU | None:
        """The vGPU with this id: the active one, else the one that ended last (ids may repeat, e.g.
        after the pool's database was replaced, while ended vGPUs are kept for an hour)."""
        same = [v for v in self.table.values() if v.id == str(vgpu_id)]
        return max(same, key=lambda v: (v.state == "active", v.ended_at), default=None)

    def _harvest(self, v: VGPU) -> None:
        """Move the calls the processes published into the vGPU's trace, numbered in order."""
        new = []
        for pid, slot in v.procs.items():
            seen_pid, taken = v.harvested.get(slot, (pid, 0))
            if seen_pid != pid:
                taken = 0
            records, count = v.ledger.read_trace(slot, taken)
            v.harvested[slot] = (pid, count)
            client = v.ledger.read_slot(slot)
            for start, duration, nbytes, op, _pad, result in records:
                new.append((start, duration, nbytes, op, result, client["client_pid"] if client else 0))
        new.sort()
        for start, duration, nbytes, op, result, client_pid in new:
            v.seq += 1
            v.trace.append({"seq": v.seq, "time": start, "pid": client_pid, "function": self.names.get(op, str(op)),
                            "duration": duration, "bytes": nbytes, "result": result,
                            "error": E.name_of(result) if result else ""})

    def publish_utilization(self) -> None:
        """(daemon, about once a second) Each vGPU's kernel time since the last look, as percent of one GPU's time,
        into its ledger: what the NVML stand-in reports as the GPU's utilization inside the session, so that
        nvidia-smi there shows the session's own work and not the other users' on the card."""
        now = time.monotonic()
        with self.lock:
            for v in self.table.values():
                kernel = v.ledger.kernel_total()
                if v.last_look is not None and now > v.last_look[0]:
                    t0, k0 = v.last_look
                    v.ledger.set_utilization(max(kernel - k0, 0.0) / (now - t0) * 100)
                v.last_look = (now, kernel)

    def _measure(self) -> None:
        """On a real GPU: the device memory NVML sees per executor beyond its allocations is its
        context overhead; charged in place of the estimate."""
        now = time.monotonic()
        if not self.can_measure or now - self._measured_at < MEASURE_EVERY or not self.by_pid:
            return
        self._measured_at = now
        try:
            from .gpus import nvml_process_memory

            per_pid = nvml_process_memory(list(self.by_uuid))
        except Exception as exc:  # NVML missing or failing: keep the estimate
            log.debug("cannot measure context overhead: %s", exc)
            return
        for v in self.table.values():
            for pid, slot in v.procs.items():
                if pid in per_pid:
                    rec = v.ledger.read_slot(slot)
                    overhead = max(per_pid[pid] - rec["used"], 0) if rec else 0
                    self.measured = max(self.measured, overhead)
                    v.ledger.set_overhead(slot, overhead)

    def _describe(self, v: VGPU) -> dict:
        self._harvest(v)
        procs = []
        totals = dict(v.retired)
        moves = dict(v.retired_moves)
        errors = collections.Counter(v.errors)
        for pid, slot in sorted(v.procs.items()):
            rec = v.ledger.read_slot(slot)
            if rec is None:
                continue
            for k in COUNTERS:
                totals[k] += rec[k]
            for k in MOVES:
                moves[k] += rec[k]
            errors.update(rec["errors"])
            proc = {"pid": pid, "client_pid": rec["client_pid"], "used": rec["used"],
                    "mode": "native" if pid in v.native else "forwarded",
                    "overhead": rec["overhead"], "started": rec["started"], "waiting": bool(rec["waiting"]),
                    **{k: rec[k] for k in COUNTERS}, "tiers": {k: rec[k] for k in TIER_NAMES},
                    "last_touch": rec["last_touch"] or None}
            if pid in v.native:  # where the shim charged its allocations, per GPU of the vGPU
                proc["on_gpus"] = rec["on_gpus"][:len(v.grant["gpus"])]
            procs.append(proc)
        state = self.tier_state(v)
        clock = idle_clock(state)
        g = v.grant
        share, _rank, burst = _pacing(g)
        return {"id": v.id, "token_hash": g["token_hash"], "user": g.get("user", ""), "profile": g.get("profile", ""),
                "qos": g.get("qos", ""), "gpus": list(g["gpus"]), "quota": v.ledger.quota,
                "compute": g.get("compute", 100), "state": v.state, "reason": v.reason,
                "used": sum(p["used"] for p in procs), "overhead": sum(p["overhead"] for p in procs),
                "processes": procs, **totals, "errors": {E.name_of(c): n for c, n in sorted(errors.items())},
                "sessions_opened": v.opened, "share": round(share * 100, 3), "burst": burst,
                "share_measured": _measured_share(v, totals["kernel_time"]),
                "queue_depth": sum(p["waiting"] for p in procs),
                "tier": tier_name(*state.tiers), "tiers": dict(zip(TIER_NAMES, state.tiers)), "moves": moves,
                "idle_seconds": None if clock is None else round(max(time.time() - clock, 0.0), 3)}

    def vgpus(self) -> list[dict]:
        with self.lock:
            self._measure()
            return [self._describe(v) for v in self.table.values()]

    def get(self, vgpu_id: str) -> dict | None:
        with self.lock:
            v = self._by_id(vgpu_id)
            return None if v is None else self._describe(v)

    def find_token(self, token: str) -> dict | None:
        """The vGPU of a session token, described now: a session's GET /api/vgpus answers with this, so
        the context overhead is measured here too (at most every MEASURE_EVERY seconds, on a real GPU)."""
        with self.lock:
            self._measure()
            v = self.table.get(token_hash(token))
            return None if v is None else self._describe(v)

    def trace(self, vgpu_id: str, since: int = 0, limit: int = 256, last: int = 0) -> tuple[list[dict], int]:
        """Records newer than ``since``, oldest first: the first ``limit``, or with ``last`` the newest ``last``."""
        with self.lock:
            v = self._by_id(vgpu_id)
            if v is None:
                return [], since
            self._harvest(v)
            out = [r for r in v.trace if r["seq"] > since]
            out = out[-last:] if last else out[:limit]
            return out, (out[-1]["seq"] if out else max(since, 0))

    def gpus(self) -> list[dict]:
        return [dict(g) for g in self.gpu_list]

    def held_on(self, v: VGPU, gpu: int) -> tuple[int, int]:
        """(lock held) Device memory of ``v`` that an eviction could move off the worker's GPU ``gpu``, and off
        all its GPUs: its executors' rows on the tier board and its native processes' memory, of those the
        driver's checkpoint can move (native.py, on the GPU the shim charged it on)."""
        rows = [self.tierboard.row_figures(r) for r in v.rows.values()]
        here, everywhere = sum(f["hot"][gpu] for f in rows), sum(sum(f["hot"]) for f in rows)
        if v.native:
            native = self.native_hot_by_gpu(v, movable=True)
            everywhere += sum(native)
            here += self.native_on(v, gpu, native)
        return here, everywhere

    def native_on(self, v: VGPU, gpu: int, by_gpu: list[int] | None = None) -> int:
        """Device memory of ``v``'s native processes on the worker's GPU ``gpu`` (``by_gpu``: native_hot_by_gpu's
        figures, when read already)."""
        indexes = self.gpu_indexes(v)
        if not v.native or gpu not in indexes:
            return 0
        by_gpu = self.native_hot_by_gpu(v) if by_gpu is None else by_gpu
        return by_gpu[indexes.index(gpu)] if by_gpu else 0

    def gpu_indexes(self, v: VGPU) -> list[int]:
        """The worker's indexes of the vGPU's GPUs, in its order."""
        return [self.by_uuid[u]["index"] for u in v.grant["gpus"]]

    def tier_figures(self) -> dict:
        """The tier board's totals: warm bytes held, the warm budget, and hot bytes per GPU uuid (with a real
        GPU's native processes; on the emulated device their driver double's executors hold them already)."""
        board = self.tierboard
        hot = {g["uuid"]: board.hot_on(i) for i, g in enumerate(self.gpu_list)}
        if self.kind == "cuda":
            with self.lock:
                for v in self.table.values():
                    for u, n in zip(v.grant["gpus"], self.native_hot_by_gpu(v) if v.native else ()):
                        hot[u] += n
        return {"warm": board.warm_total(), "warm_budget": board.warm_budget, "hot": hot}

    def gpu_facts(self) -> dict[str, dict]:
        """Per GPU: NVML's facts on a real GPU; on the emulated device, what its vGPUs hold."""
        if self.kind == "cuda":
            try:
                from .gpus import nvml_facts

                return nvml_facts(list(self.by_uuid))
            except Exception as exc:
                log.warning("cannot read GPU facts from NVML: %s", exc)
        held = dict.fromkeys(self.by_uuid, 0)
        with self.lock:
            for v in self.table.values():
                share = v.ledger.charged() // max(len(v.grant["gpus"]), 1)
                for u in v.grant["gpus"]:
                    held[u] += share
        return {u: {"memory_total": g["memory"], "memory_used": held[u] if self.kind == "emulated" else None,
                    "utilization": None, "temperature": None, "power": None, "sm_clock": None,
                    "emulated": self.kind == "emulated"} for u, g in self.by_uuid.items()}


def _measured_share(v: VGPU, kernel_time: float) -> float:
    """Percent of one GPU's time the vGPU's kernels took over the last SHARE_WINDOW seconds (from the
    kernel time seen at each report; 0 until two reports are some time apart)."""
    now = time.monotonic()
    v.samples.append((now, kernel_time))
    while len(v.samples) > 2 and now - v.samples[1][0] >= SHARE_WINDOW:
        v.samples.popleft()
    t0, k0 = v.samples[0]
    if now - t0 < 0.2:
        return 0.0
    return round(max(kernel_time - k0, 0.0) / (now - t0) * 100, 2)


def safe_name(name: str) -> str:
    """A name (a vGPU id, a worker's name) as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)) or "_"


def _function_names() -> dict[int, str]:
    """opcode -> driver function name, for the trace (the launch path forwards cuLaunchKernel and kin)."""
    from ..api.protocol import OP_LAUNCH, OP_PARAM_LAYOUT, OP_SET_CONTEXT
    from .dispatch_generated import OPS

    names = {op: name for op, (name, _mode, _factory) in OPS.items()}
    names.update({OP_LAUNCH: "cuLaunchKernel", OP_SET_CONTEXT: "cuCtxSetCurrent", OP_PARAM_LAYOUT: "cuFuncGetParamInfo"})
    return names
