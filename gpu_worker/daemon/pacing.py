"""Compute shares that hold: each vGPU's launches are paced by a token bucket of kernel time.

A vGPU's share is a fraction of one GPU's kernel time. Its bucket (in the vGPU's ledger, shared
by all its processes) fills at that rate up to ``DEPTH`` seconds of it and is debited with the
kernel time its kernels actually took (measured by the backend: events on a GPU, simulated
durations on the emulated device), so a vGPU over its share waits *in the worker* before its
next launch; the client keeps pipelining into the socket as before.

Bursting: a vGPU allowed to burst may use kernel time no other vGPU on its GPU wants. Each GPU
has a board (shared memory the daemon owns) where every vGPU on it notes its share, QoS and when
it last wanted to launch. The share of vGPUs that want nothing lately is spare; it is lent only to
vGPUs that may burst, the highest QoS first, evenly within one QoS.

Cost: the bucket is consulted at most once per ``CHECK_EVERY`` seconds per process (one clock read
per launch otherwise), and a vGPU whose share is the whole GPU is never consulted at all.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

from .ledger import Slot

CHECK_EVERY = 0.001   # seconds between two looks at the bucket by one process
DEPTH = 0.1           # the bucket holds this many seconds of wall time at the vGPU's share
BUSY_WITHIN = 0.05    # a vGPU that wanted to launch this recently is not idle
QOS_RANK = {"low": 0, "medium": 1, "high": 2}
ENTRY = struct.Struct("<IIIIdd")  # in use, QoS rank, burst, waiting for its share, share, last wanted (monotonic)
# the fields' offsets in a row, for native processes, which read the board and stamp it too (gpu_worker/shim/native)
QOS_OFF, BURST_OFF, WAITING_OFF, SHARE_OFF, WANTED_OFF = 4, 8, 12, 16, 24
ENTRIES = 256


class GPUBoard:
    """(daemon) One GPU's board: a row per vGPU placed on it; executors inherit the mapping."""

    def __init__(self):
        self.fd = os.memfd_create("gpulab-gpu-board", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, ENTRIES * ENTRY.size)
        self.map = mmap.mmap(self.fd, ENTRIES * ENTRY.size)

    def take(self, share: float, qos: int, burst: bool) -> int | None:
        for i in range(ENTRIES):
            if not struct.unpack_from("<I", self.map, i * ENTRY.size)[0]:
                ENTRY.pack_into(self.map, i * ENTRY.size, 1, qos, int(burst), 0, share, 0.0)
                return i
        return None

    def update(self, row: int, share: float, qos: int, burst: bool) -> None:
        last = ENTRY.unpack_from(self.map, row * ENTRY.size)[5]
        ENTRY.pack_into(self.map, row * ENTRY.size, 1, qos, int(burst), 0, share, last)

    def give_back(self, row: int) -> None:
        struct.pack_into("<I", self.map, row * ENTRY.size, 0)

    def wanted(self, row: int, now: float) -> None:
        struct.pack_into("<d", self.map, row * ENTRY.size + WANTED_OFF, now)

    def native_layout(self, row: int) -> dict[str, int]:
        """What a native process of ``row``'s vGPU needs to stamp its row and to work out what `lent` does (sent
        with this board's memfd at its attach)."""
        return {"board_size": ENTRIES * ENTRY.size, "board_rows": ENTRIES, "board_entry": ENTRY.size,
                "board_row": row, "board_qos_off": QOS_OFF, "board_burst_off": BURST_OFF,
                "board_waiting_off": WAITING_OFF, "board_share_off": SHARE_OFF, "board_wanted_off": WANTED_OFF,
                "board_busy_within_us": round(BUSY_WITHIN * 1e6)}

    def waiting(self, row: int, flag: bool) -> None:
        """The vGPU wants more kernel time than it gets (it borrows before lower QoS then)."""
        struct.pack_into("<I", self.map, row * ENTRY.size + WAITING_OFF, int(flag))

    def lent(self, row: int, now: float) -> float:
        """The share lent to ``row`` now: the spare share (that of rows wanting nothing lately), split
        among the busy burst rows of its QoS; nothing while a busy burst row of higher QoS is still
        waiting for more."""
        me = ENTRY.unpack_from(self.map, row * ENTRY.size)
        busy_share, top, peers = me[4], me[1], 1
        for i in range(ENTRIES):
            if i == row:
                continue
            used, qos, burst, waiting, share, last = ENTRY.unpack_from(self.map, i * ENTRY.size)
            if not used or now - last > BUSY_WITHIN:
                continue
            busy_share += share
            if burst:
                if qos > top and waiting:
                    return 0.0  # a higher QoS borrows first
                peers += qos == top
        return max(1.0 - busy_share, 0.0) / peers

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Pacer:
    """(executor) Paces this process's launches for its vGPU; ``admit`` before each launch."""

    def __init__(self, slot: Slot, backend, board: GPUBoard | None, row: int | None, enforce: bool = True,
                 gpus: int = 1):
        self.enforce = enforce  # off: kernel time is measured and published, nothing waits
        self.gpus = gpus  # the ledger's share is per GPU times this: all of them is the whole of each
        self.slot = slot
        self.ledger = slot.ledger
        self.backend = backend
        self.board, self.row = (board, row) if row is not None else (None, None)  # a full board: no burst
        self.next_check = 0.0
        self.kernel_time = 0.0
        self.throttled = 0.0

    def admit(self) -> None:
        """Wait while the vGPU is over its share (cheap unless a look is due)."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + CHECK_EVERY
        self.kernel_time = self.backend.kernel_time()
        share, burst, _qos, *_ = self.ledger.pacing()
        if self.board is not None:
            self.board.wanted(self.row, now)
        if share >= self.gpus or share <= 0.0 or not self.enforce:
            self.slot.set_pacing_figures(self.kernel_time, self.throttled, False)
            if self.ledger.pacing()[4]:  # a bucket from a smaller share: it starts afresh if one comes back
                self.ledger.set_bucket(0.0, 0.0, 0.0)
            return
        waiting = False
        while True:
            tokens = self._settle(now, share, burst, waiting)
            if tokens >= 0:
                break
            if not waiting:
                waiting = True
                self.slot.set_pacing_figures(self.kernel_time, self.throttled, True)
                if self.board is not None:
                    self.board.waiting(self.row, True)
            pause = min(max(-tokens / share, 0.001), 0.02)
            time.sleep(pause)
            later = time.monotonic()
            self.throttled += later - now
            now = later
            if self.board is not None:
                self.board.wanted(self.row, now)
            self.kernel_time = self.backend.kernel_time()
        if waiting and self.board is not None:
            self.board.waiting(self.row, False)
        self.slot.set_pacing_figures(self.kernel_time, self.throttled, False)

    def publish(self) -> None:
        """The kernel time of kernels that completed since the last launch (at the session's end)."""
        self.slot.set_pacing_figures(self.backend.kernel_time(), self.throttled, False)

    def _settle(self, now: float, share: float, burst: int, waiting: bool) -> float:
        """Refill the vGPU's bucket for the time passed, debit the kernel time used; the tokens left."""
        rate = share + (self.board.lent(self.row, now) if burst and self.board is not None else 0.0)
        self.slot.set_pacing_figures(self.kernel_time, self.throttled, waiting)
        fd = self.ledger.fd
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            _s, _b, _q, tokens, last, seen, _retired = self.ledger.pacing()
            total = self.ledger.kernel_total()
            if last == 0.0:  # a new bucket starts full
                tokens, last, seen = share * DEPTH, now, total
            tokens = min(tokens + rate * max(now - last, 0.0), max(rate, share) * DEPTH) - max(total - seen, 0.0)
            self.ledger.set_bucket(tokens, now, total)
            return tokens
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
