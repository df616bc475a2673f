"""One vGPU's ledger: shared memory the daemon owns, one slot per client process.

Every process presenting a vGPU's token gets an executor of its own (fault isolation), yet
they share one quota.  The ledger is a memfd the daemon creates when the vGPU's first session
opens; executors forked later inherit it.  Each executor writes only its own slot; the daemon
hands slots out at fork and frees them when it reaps the executor, so a crashed executor's
memory stops counting the moment it is reaped, and a crash can garble nothing but its own slot,
which is then dropped.

Exactness: an executor charges an allocation under an ``fcntl`` lock on the memfd (a POSIX
record lock: per process, released by the kernel when the process dies, so a crash never leaves
it held).  Under the lock it sums the live slots (used + context overhead) and writes its own
``used`` only if the sum stays within the quota.  Two processes can therefore never pass the
quota together, whatever their timing.

Counters and the call trace are written by the executor's flush thread a few times a second
(not on the hot path); the daemon reads them for the control API, metrics and heartbeats.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct

MAGIC = 0x67707531  # "gpu1"
HEADER = struct.Struct("<IIQI")  # magic, revoked, quota (0: none), reason length
HEADER_SIZE = 1024
# compute pacing (pacing.py): share (fraction of one GPU), burst, QoS rank, then the token bucket (seconds of
# kernel time, the monotonic time of its last refill, the vGPU's kernel time at the last debit) and the kernel
# time of processes that ended; the bucket changes only under the ledger's lock
PACE = struct.Struct("<dIIdddd")
PACE_OFF = 24
# VRAM tiering (tiers.py, tiering.py): the tier the daemon last asked the vGPU's processes to take (0 hot,
# 1 warm, 2 cold) and the request's sequence number, then an idle hint from outside (its "idle since", and
# when it came; wall-clock seconds)
TIER_HEAD = struct.Struct("<IIdd")
TIER_HEAD_OFF = 72
# how busy the vGPU's kernels kept its GPUs over the daemon's last look (about a second): percent of one GPU's
# time, the daemon's figure for the NVML stand-in's utilization (f64; written only by the daemon)
UTILIZATION_OFF = 96
REASON_OFF = 128
MAX_REASON = HEADER_SIZE - REASON_OFF

# a process slot: state, client pid, executor pid, error-table entries used, then u64 figures, then start time
SLOT_HEAD = struct.Struct("<IIII6Qd")  # state, client pid, pid, nerrors, used, overhead, calls, launches, in, out, started
USED_OFF, OVERHEAD_OFF = 16, 24
ERRORS = 16                      # distinct CUresults a slot counts; more are folded into the last entry
ERROR = struct.Struct("<II")     # CUresult, count
TRACE_LEN = 128                  # calls each process keeps in its ring
RECORD = struct.Struct("<ddQHHI")  # start (epoch), duration (s), bytes, opcode, unused, CUresult
KERNEL_OFF = 200                 # kernel time (s), throttled time (s), waiting in pacing (0/1)
PACING = struct.Struct("<ddI")
TIER_OFF = 224                   # VRAM tiers of the process's own allocations (TIERS)
# bytes hot, warm, cold; offloads, restores, failed moves, the last tier request acted on and its CUresult (0: it
# worked), 4 bytes of padding; bytes offloaded and restored; seconds spent offloading and restoring; the last call
# that touched device memory (wall clock).  Each field has one writer and is written alone (pack_into at its own
# offset): the keepalive thread stamps last_touch while the main thread counts moves.
TIERS = struct.Struct("<3Q4II4x2Q3d")
# offsets in TIERS of the fields written one by one. T_FROZEN is in the padding after T_RESULT, for native-mode
# processes: its byte is the daemon's "frozen" flag (native.py sets it before freezing the process, the shim reads
# it at every call), the next byte the shim's reasons not to freeze it (native.py's UVM, IPC bits)
T_OFFLOADS, T_RESTORES, T_FAILURES, T_DONE, T_RESULT, T_FROZEN = 24, 28, 32, 36, 40, 44
T_BYTES_OUT, T_BYTES_IN, T_SECONDS_OUT, T_SECONDS_IN, T_TOUCH = 48, 56, 64, 72, 80
RING_OFF = TIER_OFF + TIERS.size
# after the ring (its write count, then its records): a native-mode process's bytes on each of the vGPU's GPUs, in
# the grant's order, written by the shim with ``used`` (an executor's are on the tier board instead)
VGPU_GPUS = 8
ON_GPU = struct.Struct(f"<{VGPU_GPUS}Q")
ON_GPU_OFF = RING_OFF + 8 + TRACE_LEN * RECORD.size
SLOT_SIZE = ON_GPU_OFF + ON_GPU.size
FREE, LIVE = 0, 1
U64 = struct.Struct("<Q")


def native_layout() -> dict[str, int]:
    """Where the native-mode shim finds what it reads and writes in these pages (sent at its attach, so this
    file stays the layout's one owner): header offsets, then offsets within a slot."""
    return {"header": HEADER_SIZE, "slot_size": SLOT_SIZE, "revoked_off": 4, "quota_off": 8, "reason_len_off": 16,
            "pace_off": PACE_OFF, "reason_off": REASON_OFF, "used_off": USED_OFF, "overhead_off": OVERHEAD_OFF,
            "calls_off": 32, "launches_off": 40, "kernel_off": KERNEL_OFF, "tier_off": TIER_OFF,
            "frozen_off": TIER_OFF + T_FROZEN, "touch_off": TIER_OFF + T_TOUCH, "pid_off": 8,
            "on_gpu_off": ON_GPU_OFF, "on_gpus": VGPU_GPUS, "utilization_off": UTILIZATION_OFF}


class Ledger:
    """The shared pages of one vGPU (created in the daemon, used by its executors)."""

    def __init__(self, slots: int, quota: int | None):
        self.slots = slots
        self.size = HEADER_SIZE + slots * SLOT_SIZE
        self.fd = os.memfd_create("gpulab-vgpu-ledger", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)
        HEADER.pack_into(self.map, 0, MAGIC, 0, quota or 0, 0)
        self._used = struct.Struct(f"<{slots}Q")

    # ------------------------------------------------------------- header
    @property
    def quota(self) -> int | None:
        return HEADER.unpack_from(self.map, 0)[2] or None

    @quota.setter
    def quota(self, value: int | None) -> None:
        struct.pack_into("<Q", self.map, 8, value or 0)

    def revoke(self, reason: str) -> None:
        """Mark the vGPU ended, reason first: an executor that sees the flag finds the sentence."""
        data = reason.encode()[:MAX_REASON]
        self.map[REASON_OFF:REASON_OFF + len(data)] = data
        struct.pack_into("<I", self.map, 16, len(data))
        struct.pack_into("<I", self.map, 4, 1)

    @property
    def revoked(self) -> str | None:
        _magic, flag, _quota, n = HEADER.unpack_from(self.map, 0)
        if not flag:
            return None
        return bytes(self.map[REASON_OFF:REASON_OFF + n]).decode("utf-8", "replace")

    # ------------------------------------------------------------- pacing
    def set_pacing(self, share: float, qos: int, burst: bool) -> None:
        """(daemon) The grant's compute share, its QoS rank, and whether it may burst."""
        _s, _b, _q, tokens, last, seen, retired = PACE.unpack_from(self.map, PACE_OFF)
        PACE.pack_into(self.map, PACE_OFF, share, int(burst), qos, tokens, last, seen, retired)

    def pacing(self) -> tuple:
        """share, burst, qos, tokens, last refill, kernel time at the last debit, kernel time of ended processes."""
        return PACE.unpack_from(self.map, PACE_OFF)

    def set_bucket(self, tokens: float, last: float, seen: float) -> None:
        struct.pack_into("<ddd", self.map, PACE_OFF + 16, tokens, last, seen)

    def retire_kernel_time(self, seconds: float) -> None:
        """(daemon, at reap) An ended process's kernel time stays in the vGPU's total."""
        off = PACE_OFF + 40
        struct.pack_into("<d", self.map, off, struct.unpack_from("<d", self.map, off)[0] + seconds)

    def kernel_total(self) -> float:
        """Seconds of kernel time of the vGPU: live processes and ended ones."""
        total = PACE.unpack_from(self.map, PACE_OFF)[6]
        for i in range(self.slots):
            off = self._slot_off(i)
            if struct.unpack_from("<I", self.map, off)[0] == LIVE:
                total += struct.unpack_from("<d", self.map, off + KERNEL_OFF)[0]
        return total

    def set_utilization(self, percent: float) -> None:
        """(daemon) Percent of one GPU's time the vGPU's kernels took over the last look (kernel_total's change)."""
        struct.pack_into("<d", self.map, UTILIZATION_OFF, percent)

    # -------------------------------------------------------------- tiers
    def request_tier(self, want: int) -> int:
        """(daemon) Ask every process of the vGPU to move its allocations to tier ``want``; the request's number."""
        _want, seq, since, received = TIER_HEAD.unpack_from(self.map, TIER_HEAD_OFF)
        TIER_HEAD.pack_into(self.map, TIER_HEAD_OFF, want, seq + 1, since, received)
        return seq + 1

    def tier_request(self) -> tuple[int, int]:
        """The tier last asked for and the request's number (0: none yet)."""
        return TIER_HEAD.unpack_from(self.map, TIER_HEAD_OFF)[:2]

    def set_idle_hint(self, since: float, received: float) -> None:
        """(daemon) Someone outside (the Jupyter server) says the program has been idle since ``since``."""
        want, seq, _s, _r = TIER_HEAD.unpack_from(self.map, TIER_HEAD_OFF)
        TIER_HEAD.pack_into(self.map, TIER_HEAD_OFF, want, seq, since, received)

    def idle_hint(self) -> tuple[float, float]:
        """(since, received) of the last idle hint; (0, 0) when none came."""
        return TIER_HEAD.unpack_from(self.map, TIER_HEAD_OFF)[2:]

    # -------------------------------------------------------------- slots
    def _slot_off(self, i: int) -> int:
        return HEADER_SIZE + i * SLOT_SIZE

    def claim(self) -> int | None:
        """(daemon, before forking) A free slot, zeroed and marked live; None when all are taken."""
        for i in range(self.slots):
            off = self._slot_off(i)
            if U64.unpack_from(self.map, off)[0] & 0xFFFFFFFF == FREE:
                self.map[off:off + SLOT_SIZE] = bytes(SLOT_SIZE)
                struct.pack_into("<I", self.map, off, LIVE)
                return i
        return None

    def bind(self, i: int, pid: int, client_pid: int, started: float, overhead: int) -> None:
        """(daemon, after forking) Whose slot it is, and the context overhead charged up front."""
        off = self._slot_off(i)
        struct.pack_into("<II", self.map, off + 4, client_pid, pid)
        U64.pack_into(self.map, off + OVERHEAD_OFF, overhead)
        struct.pack_into("<d", self.map, off + 64, started)

    def set_overhead(self, i: int, overhead: int) -> None:
        U64.pack_into(self.map, self._slot_off(i) + OVERHEAD_OFF, overhead)

    def release(self, i: int) -> None:
        """(daemon, the executor reaped) The slot no longer counts."""
        struct.pack_into("<I", self.map, self._slot_off(i), FREE)

    def read_slot(self, i: int) -> dict | None:
        off = self._slot_off(i)
        state, client_pid, pid, nerr, used, overhead, calls, launches, bin_, bout, started = \
            SLOT_HEAD.unpack_from(self.map, off)
        if state != LIVE:
            return None
        errors = {}
        for k in range(min(nerr, ERRORS)):
            code, count = ERROR.unpack_from(self.map, off + SLOT_HEAD.size + k * ERROR.size)
            errors[code] = count
        kernel_time, throttled, waiting = PACING.unpack_from(self.map, off + KERNEL_OFF)
        (hot, warm, cold, offloads, restores, failures, done, result, moved_out, moved_in, out_s, in_s,
         touch) = TIERS.unpack_from(self.map, off + TIER_OFF)
        tiers = {"hot": hot, "warm": warm, "cold": cold, "offloads": offloads, "restores": restores,
                 "failures": failures, "done_seq": done, "done_result": result, "bytes_offloaded": moved_out,
                 "bytes_restored": moved_in, "offload_seconds": out_s, "restore_seconds": in_s, "last_touch": touch}
        on_gpus = list(ON_GPU.unpack_from(self.map, off + ON_GPU_OFF))
        return {**tiers, "slot": i, "pid": pid, "client_pid": client_pid, "used": used, "overhead": overhead,
                "on_gpus": on_gpus,
                "calls": calls, "launches": launches, "bytes_in": bin_, "bytes_out": bout, "started": started,
                "errors": errors, "kernel_time": kernel_time, "throttled_time": throttled, "waiting": waiting}

    def read_trace(self, i: int, after: int) -> tuple[list[tuple], int]:
        """Records of slot ``i`` written after the ``after``-th, and the count written so far."""
        ring = self._slot_off(i) + RING_OFF
        (count,) = U64.unpack_from(self.map, ring)
        first = max(after, count - TRACE_LEN)
        out = [RECORD.unpack_from(self.map, ring + 8 + (k % TRACE_LEN) * RECORD.size) for k in range(first, count)]
        return out, count

    def set_frozen(self, i: int, frozen: bool) -> None:
        """(daemon) A native-mode process is being frozen (its next CUDA call asks for a thaw), or is not."""
        self.map[self._slot_off(i) + TIER_OFF + T_FROZEN] = int(frozen)

    def frozen(self, i: int) -> bool:
        return bool(self.map[self._slot_off(i) + TIER_OFF + T_FROZEN])

    def charged(self) -> int:
        """Bytes charged over the live slots (used + overhead), read without the lock."""
        total = 0
        for i in range(self.slots):
            off = self._slot_off(i)
            if struct.unpack_from("<I", self.map, off)[0] == LIVE:
                used, overhead = struct.unpack_from("<QQ", self.map, off + USED_OFF)
                total += used + overhead
        return total

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Slot:
    """An executor's own slot in its vGPU's ledger (created in the executor after the fork)."""

    def __init__(self, ledger: Ledger, index: int):
        self.ledger = ledger
        self.map = ledger.map
        self.fd = ledger.fd
        self.index = index
        self.off = ledger._slot_off(index)
        self.used = 0
        self.errors: dict[int, int] = {}

    def charge(self, n: int) -> int | None:
        """Add ``n`` bytes to this process's use if the vGPU's quota allows; else the bytes free (>= 0).

        None means charged.  The sum over the other processes is taken under the vGPU's lock, so
        processes allocating at the same moment see each other."""
        quota = self.ledger.quota
        if quota is None:
            self._set_used(self.used + n)
            return None
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            charged = self.ledger.charged()
            if charged + n > quota:
                return max(quota - charged, 0)
            self._set_used(self.used + n)
            return None
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def uncharge(self, n: int) -> None:
        """Fewer bytes in use: never refused, so no lock (a reader sees the old or the new figure)."""
        self._set_used(self.used - n)

    def _set_used(self, value: int) -> None:
        self.used = value
        U64.pack_into(self.map, self.off + USED_OFF, value)

    def set_pacing_figures(self, kernel_time: float, throttled: float, waiting: bool) -> None:
        PACING.pack_into(self.map, self.off + KERNEL_OFF, kernel_time, throttled, int(waiting))

    @property
    def overhead(self) -> int:
        """The context overhead the daemon charges to this process."""
        return U64.unpack_from(self.map, self.off + OVERHEAD_OFF)[0]

    def vgpu_charged(self) -> int:
        return self.ledger.charged()

    def publish(self, calls: int, launches: int, bytes_in: int, bytes_out: int, records) -> None:
        """Counters and the newest calls, from the executor's flush thread."""
        struct.pack_into("<4Q", self.map, self.off + 32, calls, launches, bytes_in, bytes_out)
        if records:
            ring = self.off + RING_OFF
            (count,) = U64.unpack_from(self.map, ring)
            for rec in records[-TRACE_LEN:]:
                RECORD.pack_into(self.map, ring + 8 + (count % TRACE_LEN) * RECORD.size, *rec)
                count += 1
            U64.pack_into(self.map, ring, count)  # last: a reader never sees a record not yet written

    # ------------------------------------------------------------ tiers
    def set_tiers(self, hot: int, warm: int, cold: int) -> None:
        """Bytes of this process's own allocations in each tier."""
        struct.pack_into("<3Q", self.map, self.off + TIER_OFF, hot, warm, cold)

    def _add(self, fmt: str, at: int, amount) -> None:
        """Add to one TIERS field, leaving the others (written by other threads) alone."""
        off = self.off + TIER_OFF + at
        struct.pack_into(fmt, self.map, off, struct.unpack_from(fmt, self.map, off)[0] + amount)

    def count_move(self, kind: str, nbytes: int = 0, seconds: float = 0.0) -> None:
        """One more offload or restore (its bytes and duration), or a failed move."""
        if kind == "offload":
            self._add("<I", T_OFFLOADS, 1)
            self._add("<Q", T_BYTES_OUT, nbytes)
            self._add("<d", T_SECONDS_OUT, seconds)
        elif kind == "restore":
            self._add("<I", T_RESTORES, 1)
            self._add("<Q", T_BYTES_IN, nbytes)
            self._add("<d", T_SECONDS_IN, seconds)
        else:
            self._add("<I", T_FAILURES, 1)

    def set_done(self, seq: int, result: int = 0) -> None:
        """The tier request numbered ``seq`` has been acted on by this process, with CUresult ``result`` (0: the
        memory moved).  The result is written first: a reader that sees the number finds its result."""
        struct.pack_into("<I", self.map, self.off + TIER_OFF + T_RESULT, result)
        struct.pack_into("<I", self.map, self.off + TIER_OFF + T_DONE, seq)

    def set_touch(self, when: float) -> None:
        """The last call that needed this process's device memory (wall clock)."""
        struct.pack_into("<d", self.map, self.off + TIER_OFF + T_TOUCH, when)

    def count_error(self, code: int) -> None:
        """One more call answered with ``code`` (rare: written at once).  A slot has room for
        ERRORS distinct codes; a further one is counted with the last of them."""
        if code not in self.errors and len(self.errors) == ERRORS:
            code = list(self.errors)[-1]
        self.errors[code] = self.errors.get(code, 0) + 1
        k = list(self.errors).index(code)
        ERROR.pack_into(self.map, self.off + SLOT_HEAD.size + k * ERROR.size, code, self.errors[code])
        struct.pack_into("<I", self.map, self.off + 12, len(self.errors))
