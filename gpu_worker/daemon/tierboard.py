"""The worker's tier board: device and host memory held by every executor, in one shared page set.

Why a board and not the ledgers: an executor sees only its own vGPU's ledger, yet whether a GPU
has room (emulated: its configured memory; any backend: how much eviction must free) and whether
the warm tier's host-RAM budget has room are questions about every vGPU on the worker.

The daemon creates the board before it forks any executor, so all inherit it.  Each executor
process has a row, claimed by the daemon at fork and released when it reaps the process: a
crashed executor's bytes stop counting at once, and a crash can garble nothing but its own row.
Charges that must not pass a limit (a GPU's capacity, the warm budget) are made under an
``fcntl`` record lock on the board, which the kernel drops if the holder dies; every change of a
row is made under it together with the board's totals, so a charge reads one figure.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading

MAX_GPUS = 16
ROWS = 2048
# warm budget (0: no warm tier, all goes cold), each GPU's capacity (0: the driver decides), then the
# totals over the live rows (warm bytes, hot bytes per GPU), kept with the rows under the lock so that a
# charge reads one figure instead of scanning every row
HEAD = struct.Struct(f"<Q{MAX_GPUS}QQ{MAX_GPUS}Q")
TOTALS_OFF = 8 + 8 * MAX_GPUS
ROW = struct.Struct(f"<IIQ{MAX_GPUS}Q")  # state, executor pid, warm bytes, hot bytes per worker GPU index
FREE, LIVE = 0, 1
U64 = struct.Struct("<Q")


class TierBoard:
    def __init__(self, capacities: list[int], warm_budget: int):
        if len(capacities) > MAX_GPUS:
            raise ValueError(f"a worker holds at most {MAX_GPUS} GPUs (got {len(capacities)})")
        self.size = HEAD.size + ROWS * ROW.size
        self.fd = os.memfd_create("gpulab-tier-board", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)
        caps = list(capacities) + [0] * (MAX_GPUS - len(capacities))
        HEAD.pack_into(self.map, 0, warm_budget, *caps, 0, *([0] * MAX_GPUS))
        self._threads = threading.Lock()  # fcntl locks are per process: this keeps a process's threads apart

    # ------------------------------------------------------------- locking
    @contextlib.contextmanager
    def _locked(self):
        with self._threads:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------- daemon
    def claim(self, pid: int = 0) -> int | None:
        """A free row, zeroed and live (before forking the executor that will use it); None if all are taken."""
        with self._locked():
            for i in range(ROWS):
                off = self._off(i)
                if struct.unpack_from("<I", self.map, off)[0] == FREE:
                    ROW.pack_into(self.map, off, LIVE, pid, 0, *([0] * MAX_GPUS))
                    return i
        return None

    def bind(self, row: int, pid: int) -> None:
        struct.pack_into("<I", self.map, self._off(row) + 4, pid)

    def release(self, row: int) -> None:
        """(daemon, the executor reaped) Its bytes no longer count."""
        with self._locked():
            off = self._off(row)
            _state, _pid, warm, *hot = ROW.unpack_from(self.map, off)
            self._add(TOTALS_OFF, -warm)
            for gpu, n in enumerate(hot):
                if n:
                    self._add(TOTALS_OFF + 8 + 8 * gpu, -n)
            struct.pack_into("<I", self.map, off, FREE)

    # ------------------------------------------------------------ readers
    @property
    def warm_budget(self) -> int:
        return U64.unpack_from(self.map, 0)[0]

    def capacity(self, gpu: int) -> int:
        """Bytes of GPU ``gpu`` the board lets executors hold (0: no limit here, the driver says when it is full)."""
        return U64.unpack_from(self.map, 8 + 8 * gpu)[0]

    def _off(self, row: int) -> int:
        return HEAD.size + row * ROW.size

    def hot_on(self, gpu: int) -> int:
        """Bytes held on GPU ``gpu`` by every live executor."""
        return U64.unpack_from(self.map, TOTALS_OFF + 8 + 8 * gpu)[0]

    def warm_total(self) -> int:
        return U64.unpack_from(self.map, TOTALS_OFF)[0]

    def row_figures(self, row: int) -> dict:
        _state, pid, warm, *hot = ROW.unpack_from(self.map, self._off(row))
        return {"pid": pid, "warm": warm, "hot": hot}

    # ----------------------------------------------------------- executor
    def _add(self, off: int, n: int) -> None:
        U64.pack_into(self.map, off, U64.unpack_from(self.map, off)[0] + n)

    def _charge(self, row_off: int, total_off: int, n: int, limit: int | None) -> bool:
        with self._locked():
            if limit is not None and U64.unpack_from(self.map, total_off)[0] + n > limit:
                return False
            self._add(row_off, n)
            self._add(total_off, n)
            return True

    def charge_hot(self, row: int, gpu: int, n: int) -> bool:
        """Count ``n`` more bytes on GPU ``gpu`` for this row; False (nothing counted) past the GPU's capacity."""
        return self._charge(self._off(row) + 16 + 8 * gpu, TOTALS_OFF + 8 + 8 * gpu, n, self.capacity(gpu) or None)

    def uncharge_hot(self, row: int, gpu: int, n: int) -> None:
        self._charge(self._off(row) + 16 + 8 * gpu, TOTALS_OFF + 8 + 8 * gpu, -n, None)

    def charge_warm(self, row: int, n: int) -> bool:
        """Count ``n`` more bytes of warm host memory; False (nothing counted) past the warm budget."""
        return self._charge(self._off(row) + 8, TOTALS_OFF, n, self.warm_budget)

    def force_warm(self, row: int, n: int) -> None:
        """Count ``n`` more bytes of warm host memory that are there already, past the budget or not."""
        self._charge(self._off(row) + 8, TOTALS_OFF, n, None)

    def uncharge_warm(self, row: int, n: int) -> None:
        self._charge(self._off(row) + 8, TOTALS_OFF, -n, None)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
