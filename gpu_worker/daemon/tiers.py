"""An executor's VRAM tiers: where each of its process's own allocations is, and the moves between them.

hot: on the GPU.  warm: a host buffer of the worker (page-locked on a GPU; the worker's ``warm_budget``
over all executors, counted on the tier board).  cold: a file ``<base hex>.cold`` in this executor's
spool directory, with a CRC-32 of each chunk.  Only the allocations the program made with cuMemAlloc
move; module globals are the driver's and stay on the GPU.  An allocation keeps its address in every tier: the
backend releases its physical memory but keeps the range (``mem_release``) and maps new memory there
to bring it back (``mem_remap``).

The executor asks: ``allocate`` for cuMemAlloc, ``free`` for cuMemFree, ``offload`` and ``restore``
for a tier request or a touching call while ``off`` (a plain bool, read on every touching call),
``close`` at the end.  Device memory is reserved on the tier board first; when the GPU is full (the
board says so on the emulated device, the driver on a GPU) the executor asks the daemon over its
eviction link to move other vGPUs off that GPU, and tries again, a few rounds within one deadline
(``eviction_wait`` and a margin for the answer); then the call fails with CUDA_ERROR_OUT_OF_MEMORY
and the reason, never a hang and never a lost byte.  Bytes that
cannot come back (a cold file damaged or removed) fail the restore with CUDA_ERROR_ECC_UNCORRECTABLE
and a sentence naming the allocation; the allocation is then back on the GPU, zero-filled, so that
the program's other memory goes on working.

Figures (the process's ledger slot): bytes per tier, counted as the GPU charges them
(``physical_size``, as ``used`` is); one offload or restore per operation with its bytes (those
copied) and seconds; failed restores.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import socket
import time
import zlib

from ..api import errors as E
from ..api.errors import CudaError, Refusal
from ..client.units import format_size

log = logging.getLogger("gpulab.worker")

HOT, WARM, COLD = 0, 1, 2
EVICTION_ROUNDS = 3      # asks to the daemon for room before an allocation or a restore fails
EVICTION_MARGIN = 5.0    # seconds past eviction_wait for the daemon's last answer to arrive
CHUNK = 8 << 20          # bytes per write or read of a cold file, per staged copy and per CRC-32
CRC_THREADS = max(1, min(4, os.cpu_count() or 1))  # zlib.crc32 runs at 1-2 GB/s a core: a disk is faster
# Host buffers a restore emptied are kept a while for the next offload (new host memory costs a fault and
# a zero-fill per page, page-locking it more: several times the copy itself): up to POOL_MAX bytes per
# process, outside the warm budget (they hold no vGPU's bytes), freed at the first call or move
# POOL_KEEP seconds after the last move.
POOL_MAX = 1 << 30
POOL_KEEP = 10.0


class _Alloc:
    __slots__ = ("size", "phys", "gpu", "tier", "host", "path", "crcs", "chunk")

    def __init__(self, size: int, phys: int, gpu: int):
        self.size, self.phys, self.gpu = size, phys, gpu
        self.tier = HOT
        self.host = None  # warm: the backend's host buffer holding the bytes
        self.path = ""    # cold: the file holding them
        self.crcs = ()    # cold: the CRC-32 of each chunk of the file
        self.chunk = 0    # cold: the chunk size they were taken over


class _Lost(Exception):
    """The bytes of a cold allocation cannot come back (why, in words)."""


class TierStore:
    """One executor's allocations and their tiers (one per executor process)."""

    def __init__(self, backend, slot, board=None, row: int | None = None, gpus=(0,), spool: str = "",
                 evict_sock: socket.socket | None = None, eviction_wait: float = 10.0):
        self.backend, self.slot, self.board, self.row = backend, slot, board, row
        self.gpus = list(gpus)      # device ordinal of the backend -> the worker's GPU index
        self.spool = spool          # this executor's spool directory ('' : no cold tier)
        self.evict_sock = evict_sock
        self.eviction_wait = eviction_wait  # the worker's: how long the daemon may take to make room
        self.allocs: dict[int, _Alloc] = {}
        self.bytes = [0, 0, 0]      # physical bytes hot, warm, cold
        self.away = 0               # allocations not hot
        self.off = False            # any allocation not hot: the executor restores before a touching call
        self.touched = 0.0          # wall clock of the last touching call (the executor stamps it)
        self._crc_pool = None
        # warm buffers a restore emptied, freed once the call that restored has been answered (unpinning
        # gigabytes takes a while; the program need not wait for it); counted in the warm budget until then
        self.spent: list[tuple] = []
        self.spent_files: list[str] = []  # cold files a restore emptied, deleted after the answer too
        self.pool: dict[int, list] = {}  # size -> host buffers kept for the next move (counted as warm)
        self.pool_bytes = 0
        self.stage: list = []            # staging buffers of the last cold move, kept with the pool
        self.moved_at = 0.0              # monotonic time of the last move
        self.held: dict[int, int] = {}   # GPU index -> device bytes held outside the allocations (pools' reserves)

    # ------------------------------------------------------------ the figures
    def _moved(self, a: _Alloc, tier: int) -> None:
        self.bytes[a.tier] -= a.phys
        self.bytes[tier] += a.phys
        self.away += (tier != HOT) - (a.tier != HOT)
        a.tier = tier
        self.off = self.away > 0

    def _publish(self) -> None:
        self.slot.set_tiers(*self.bytes)

    def figures(self) -> tuple[int, int, int]:
        """Bytes (hot, warm, cold) of this process's allocations."""
        return tuple(self.bytes)

    # --------------------------------------------------- device memory: room
    def _charge_hot(self, gpu: int, n: int) -> bool:
        if self.board is None or self.row is None:
            return True
        return self.board.charge_hot(self.row, gpu, n)

    def _uncharge_hot(self, gpu: int, n: int) -> None:
        if self.board is not None and self.row is not None:
            self.board.uncharge_hot(self.row, gpu, n)

    def _with_room(self, gpu: int, n: int, attempt, ask: int = 0):
        """attempt() once ``n`` bytes of GPU ``gpu`` are counted for this process, asking the daemon to
        move other vGPUs off the GPU while it is full (room for ``ask`` bytes: more when more will follow);
        Refusal(OUT_OF_MEMORY) when nothing more can move.  Every ask of one call shares one deadline:
        ``eviction_wait`` for the daemon (it is told what is left of it) and EVICTION_MARGIN for its answer."""
        why = ""
        deadline = time.monotonic() + self.eviction_wait + EVICTION_MARGIN
        for round_ in range(EVICTION_ROUNDS + 1):
            if self._charge_hot(gpu, n):
                try:
                    return attempt()
                except CudaError as exc:
                    self._uncharge_hot(gpu, n)
                    if isinstance(exc, Refusal) or exc.code != E.OUT_OF_MEMORY:
                        raise
                except BaseException:
                    self._uncharge_hot(gpu, n)
                    raise
            if round_ == EVICTION_ROUNDS:
                why = why or f"other vGPUs' memory was moved off it {EVICTION_ROUNDS} times and it is still full"
                break
            freed, why = self._ask_eviction(gpu, max(n, ask), deadline)
            if not freed:
                break
        raise Refusal(E.OUT_OF_MEMORY, self._full(gpu, n, why))

    def _ask_eviction(self, gpu: int, need: int, deadline: float) -> tuple[int, str]:
        """Ask the daemon to make ``need`` bytes of room on GPU ``gpu`` by ``deadline`` (monotonic): (bytes
        freed, why none was)."""
        sock = self.evict_sock
        if sock is None:
            return 0, "no worker daemon can move other vGPUs' memory here"
        wait = deadline - EVICTION_MARGIN - time.monotonic()
        if wait <= 0:
            return 0, f"other vGPUs did not make room within {self.eviction_wait:g} s"
        try:
            sock.setblocking(False)
            while True:  # an answer that came after an earlier ask gave up is stale
                if not sock.recv(4096):
                    return 0, "the worker is stopping"
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return 0, f"the worker's eviction link failed ({exc.strerror or exc})"
        try:
            sock.settimeout(wait + EVICTION_MARGIN)
            sock.send(json.dumps({"gpu": gpu, "need": need, "wait": round(wait, 3)}).encode())
            msg = sock.recv(4096)
        except socket.timeout:
            return 0, f"the worker did not answer the request for room within {self.eviction_wait:g} s"
        except OSError as exc:
            return 0, f"the worker's eviction link failed ({exc.strerror or exc})"
        if not msg:
            return 0, "the worker is stopping"
        try:
            reply = json.loads(msg)
        except ValueError:
            return 0, "the worker answered the request for room with something unreadable"
        freed = int(reply.get("freed", 0) or 0)
        if freed > 0:
            return freed, ""
        return 0, str(reply.get("refused") or "no other vGPU's memory could move off it")

    def _full(self, gpu: int, n: int, why: str) -> str:
        """GPU ``gpu`` is full: its figures (said here only: the daemon's answer is the cause alone), and
        why nothing (more) could move."""
        mine = format_size(sum(a.phys for a in self.allocs.values() if a.gpu == gpu and a.tier == HOT))
        cap = self.board.capacity(gpu) if self.board is not None else 0
        if cap:
            held = f"{format_size(self.board.hot_on(gpu))} of its {format_size(cap)} held by vGPUs ({mine} by this process)"
        else:
            held = f"the driver has no room left ({mine} held by this process)"
        return f"GPU {gpu} is full: {held}, {format_size(n)} more wanted; {why}"

    # ----------------------------------------------------- allocations
    def _gpu_of(self, ordinal: int) -> int:
        return self.gpus[ordinal] if ordinal < len(self.gpus) else ordinal

    def allocate(self, n: int, phys: int) -> int:
        """cuMemAlloc: device memory of ``n`` bytes (``phys`` on the GPU), room made for it if the GPU is full."""
        gpu = self._gpu_of(self.backend.current_device())
        ptr = self._with_room(gpu, phys, lambda: self.backend.mem_alloc(n))
        self.allocs[ptr] = _Alloc(n, phys, gpu)
        self.bytes[HOT] += phys
        self._publish()
        return ptr

    def hold(self, ordinal: int, n: int) -> None:
        """``n`` more bytes of device ``ordinal`` held outside the allocations, where they stay (a memory pool's
        reserve, daemon/pools.py): counted on the GPU, room made if it is full, as for an allocation."""
        gpu = self._gpu_of(ordinal)
        self._with_room(gpu, n, lambda: None)
        self.held[gpu] = self.held.get(gpu, 0) + n

    def let_go(self, ordinal: int, n: int) -> None:
        """``n`` bytes held with hold() are given back."""
        gpu = self._gpu_of(ordinal)
        self.held[gpu] -= n
        self._uncharge_hot(gpu, n)

    def free(self, base: int) -> None:
        """cuMemFree (the backend has freed it): its GPU bytes, host copy or file go too, without a restore."""
        a = self.allocs.pop(base, None)
        if a is None:
            return
        self._drop(a)
        self.bytes[a.tier] -= a.phys
        if a.tier != HOT:
            self.away -= 1
            self.off = self.away > 0
        self._publish()

    def _drop(self, a: _Alloc) -> None:
        if a.tier == HOT:
            self._uncharge_hot(a.gpu, a.phys)
        elif a.tier == WARM:
            self._free_warm(a)
        else:
            _unlink(a.path)
            a.path = ""

    def _free_warm(self, a: _Alloc) -> None:
        self._free_host(a.host, a.size)
        a.host = None

    def _free_host(self, buf, size: int) -> None:
        self.backend.host_free(buf)
        if self.board is not None and self.row is not None:
            self.board.uncharge_warm(self.row, size)

    def free_spent(self) -> None:
        """After a restore's call is answered (the executor calls this): the emptied warm buffers leave the
        warm budget and are kept for the next offload within POOL_MAX; the emptied cold files go."""
        spent, self.spent = self.spent, []
        files, self.spent_files = self.spent_files, []
        for path in files:
            _unlink(path)
        for buf, size in spent:
            if self.pool_bytes + size <= POOL_MAX:
                self.pool.setdefault(size, []).append(buf)
                self.pool_bytes += size
                self._uncharge_warm(size)
            else:
                self._free_host(buf, size)

    def _uncharge_warm(self, n: int) -> None:
        if self.board is not None and self.row is not None:
            self.board.uncharge_warm(self.row, n)

    def trim(self, now: float | None = None) -> None:
        """Free the kept host buffers once no move needed them for POOL_KEEP seconds (cheap to call)."""
        if not (self.pool_bytes or self.stage):
            return
        if (time.monotonic() if now is None else now) - self.moved_at < POOL_KEEP:
            return
        self._empty_pool()

    def _empty_pool(self) -> None:
        pool, self.pool, self.pool_bytes = self.pool, {}, 0
        for bufs in pool.values():
            for buf in bufs:
                self.backend.host_free(buf)
        stage, self.stage = self.stage, []
        for buf in stage:
            self.backend.host_free(buf)

    def _warm_buffer(self, n: int):
        """A host buffer of ``n`` bytes counted in the warm budget, or None when the budget has no room."""
        board = self.board is not None and self.row is not None
        if board and not self.board.charge_warm(self.row, n):
            return None
        kept = self.pool.get(n)
        if kept:
            self.pool_bytes -= n
            return kept.pop()
        try:
            return self.backend.host_buffer(n)
        except BaseException:
            self._uncharge_warm(n)
            raise

    # ----------------------------------------------------------- offload
    def offload(self, want: int) -> int:
        """Move every hot allocation to ``want`` (WARM or COLD; warm past the warm budget goes cold), and
        warm ones too when ``want`` is COLD; the bytes moved.  An allocation that cannot move stays where
        it was (logged)."""
        todo = [(b, a) for b, a in sorted(self.allocs.items()) if a.tier < want]
        if not todo:
            return 0
        t0 = time.perf_counter()
        if any(a.tier == HOT for _b, a in todo):
            self.backend.synchronize_all()  # nothing queued may still read or write what is copied out
        moved = 0
        staging = None
        try:
            for base, a in todo:
                try:
                    if a.tier == HOT:
                        if want == WARM and self._to_warm(base, a):
                            moved += a.size
                            continue
                        if not self.spool:  # no cold tier on this worker: it stays hot
                            continue
                        if staging is None:
                            staging = self._staging(min(CHUNK, max(a.size for _b, a in todo)))
                        self._hot_to_cold(base, a, staging)
                    else:
                        if not self.spool:
                            continue
                        self._warm_to_cold(base, a)
                    moved += a.size
                except (OSError, CudaError, MemoryError) as exc:
                    log.error("tiers: the allocation at %#x (%s) could not move %s: %s", base, format_size(a.size),
                              "to disk" if want == COLD or a.tier == WARM else "off the GPU", exc)
        finally:
            if want == COLD:  # kept host buffers not needed for a while go now (a process going cold is idle)
                self.trim()
            self.moved_at = time.monotonic()
            if moved:
                self.slot.count_move("offload", moved, time.perf_counter() - t0)
            self._publish()
        return moved

    def _to_warm(self, base: int, a: _Alloc) -> bool:
        """Hot -> warm; False (nothing changed) when the warm budget or host memory has no room."""
        try:
            buf = self._warm_buffer(a.size)
        except (CudaError, MemoryError, OSError) as exc:
            log.warning("tiers: no host buffer of %s for the allocation at %#x (%s): it goes cold",
                        format_size(a.size), base, exc)
            return False
        if buf is None:
            return False
        try:
            self.backend.copy_out(base, a.size, buf)
            self.backend.mem_release(base)
        except BaseException:
            self._free_host(buf, a.size)
            raise
        a.host = buf
        self._uncharge_hot(a.gpu, a.phys)
        self._moved(a, WARM)
        return True

    def _staging(self, n: int) -> list:
        """Host buffers of ``n`` bytes each (a chunk, or less), one per checksum in flight and one more;
        kept with the pool after the move."""
        if self.stage and len(self.stage[0]) >= n:
            return self.stage
        for buf in self.stage:
            self.backend.host_free(buf)
        self.stage = []
        for _ in range(CRC_THREADS + 1):
            self.stage.append(self.backend.host_buffer(n))
        return self.stage

    def _path(self, base: int) -> str:
        os.makedirs(self.spool, mode=0o700, exist_ok=True)
        return os.path.join(self.spool, f"{base:x}.cold")

    def _hot_to_cold(self, base: int, a: _Alloc, staging: tuple) -> None:
        path = self._path(base)
        direct = self.backend.host_view(base, a.size)  # the emulated device: straight from its memory
        crc = _Crc(self._pool(), 0 if direct is not None else len(staging))
        try:
            with open(path, "wb", buffering=0) as f:
                for k, off in enumerate(range(0, a.size, CHUNK)):
                    n = min(CHUNK, a.size - off)
                    if direct is not None:
                        view = direct[off:off + n]
                    else:
                        view = staging[k % len(staging)][:n]
                        crc.wait_before_reuse(k)
                        self.backend.copy_out(base + off, n, view)
                    crc.add(view)
                    _write_all(f, view)
            a.crcs, a.chunk = crc.values(), CHUNK
            self.backend.mem_release(base)
        except BaseException:
            crc.settle()
            _unlink(path)
            raise
        a.path = path
        self._uncharge_hot(a.gpu, a.phys)
        self._moved(a, COLD)

    def _warm_to_cold(self, base: int, a: _Alloc) -> None:
        path = self._path(base)
        crc = _Crc(self._pool(), 0)
        try:
            with open(path, "wb", buffering=0) as f:
                for off in range(0, a.size, CHUNK):
                    view = a.host[off:off + CHUNK]
                    crc.add(view)
                    _write_all(f, view)
            a.crcs, a.chunk = crc.values(), CHUNK
        except BaseException:
            crc.settle()
            _unlink(path)
            raise
        self._free_warm(a)
        a.path = path
        self._moved(a, COLD)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._crc_pool is None:  # made in the executor process (after the fork), on first need
            self._crc_pool = concurrent.futures.ThreadPoolExecutor(CRC_THREADS, thread_name_prefix="gpulab-crc")
        return self._crc_pool

    # ----------------------------------------------------------- restore
    def restore(self) -> int:
        """Bring every allocation back to the GPU at its address; the bytes restored.

        Room is made as for an allocation; when there is none, Refusal(OUT_OF_MEMORY) with the reason and
        the allocations not yet back stay where they are (nothing is lost).  One whose bytes cannot be
        copied back once its memory is mapped again (a copy, a host buffer) is released again and stays
        where it was: a Refusal naming it and the cause (the driver's code where there is one).  A cold
        allocation whose bytes are lost comes back zero-filled and the restore fails with
        CUDA_ERROR_ECC_UNCORRECTABLE, whatever else failed with it (the program must hear of the loss)."""
        if not self.off:
            return 0
        t0 = time.perf_counter()
        moved = 0
        lost = []
        failed = None  # (code, what failed) that stopped the restore, the rest left where it is
        staging = None
        rest: dict[int, int] = {}  # bytes still to come back, per GPU: one ask for room covers them all
        for a in self.allocs.values():
            if a.tier != HOT:
                rest[a.gpu] = rest.get(a.gpu, 0) + a.phys
        try:
            for base, a in sorted(self.allocs.items()):
                if a.tier == HOT:
                    continue
                try:
                    self._with_room(a.gpu, a.phys, lambda: self.backend.mem_remap(base), rest[a.gpu])
                except Refusal as exc:
                    failed = (exc.code, f"cannot come back now: {exc.why}")
                    break
                except CudaError as exc:
                    failed = (exc.code, f"cannot come back now: the allocation at {base:#x} could not be mapped "
                                        f"on the GPU again ({exc})")
                    break
                try:
                    staging = self._copy_back(base, a, staging, lost)
                except BaseException as exc:
                    self._release_again(base, a)
                    if not isinstance(exc, Exception):
                        raise
                    failed = (_code_of(exc), f"cannot come back now: the allocation at {base:#x} "
                                             f"({format_size(a.size)}) could not be copied back to the GPU "
                                             f"({str(exc) or type(exc).__name__})")
                    break
                moved += a.size
                rest[a.gpu] -= a.phys
                self._moved(a, HOT)
        finally:
            self.moved_at = time.monotonic()
            if moved:
                self.slot.count_move("restore", moved - sum(a.size for _b, a, _w in lost), time.perf_counter() - t0)
            for base, a, why in lost:
                self.slot.count_move("failure")
                log.error("tiers: the bytes of the allocation at %#x (%s) were lost in the cold tier: %s",
                          base, format_size(a.size), why)
            self._publish()
        if lost:
            base, a, why = lost[0]
            more = f" (and {len(lost) - 1} more allocations)" if len(lost) > 1 else ""
            also = f"; the rest of this process's memory {failed[1]}; it is kept: try again later" if failed else ""
            raise Refusal(E.ECC_UNCORRECTABLE, f"the bytes of the allocation at {base:#x} ({format_size(a.size)})"
                                               f"{more} were lost in the cold tier ({why}); it is back on the GPU, "
                                               f"zero-filled{also}")
        if failed:
            raise Refusal(failed[0], f"this process's memory was moved off the GPU and {failed[1]}; nothing was "
                                     "lost: try again later")
        return moved

    def _copy_back(self, base: int, a: _Alloc, staging, lost: list):
        """The bytes of ``a`` (warm or cold) into its memory, mapped again; the staging buffers (made on first
        need).  Lost cold bytes are zero-filled and added to ``lost``."""
        if a.tier == WARM:
            self.backend.copy_in(base, a.size, a.host)
            self.spent.append((a.host, a.size))
            a.host = None
            return staging
        if staging is None:
            staging = self._staging(max(min(c.chunk, c.size) for c in self.allocs.values() if c.tier == COLD))
        try:
            self._cold_in(base, a, staging)
        except _Lost as exc:
            self._zero(base, a.size, staging[0])  # never half-right bytes
            lost.append((base, a, str(exc)))
        self.spent_files.append(a.path)  # deleted once the call is answered
        a.path = ""
        return staging

    def _release_again(self, base: int, a: _Alloc) -> None:
        """A restore mapped ``a`` again but could not copy its bytes back: the memory goes again (the bytes
        are still in the host buffer or the file) and the GPU's board forgets it."""
        try:
            self.backend.mem_release(base)
        except CudaError as exc:  # still mapped: still counted on the board
            log.error("tiers: the allocation at %#x could not be released after a failed restore: %s", base, exc)
            return
        self._uncharge_hot(a.gpu, a.phys)

    def _cold_in(self, base: int, a: _Alloc, staging: tuple) -> None:
        """A cold file's bytes into the allocation (remapped), its checksum verified; _Lost if they cannot."""
        direct = self.backend.host_view(base, a.size)  # the emulated device: straight into its memory
        crc = _Crc(self._pool(), 0 if direct is not None else len(staging))
        try:
            with open(a.path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != a.size:
                    raise _Lost(f"its file holds {size} bytes, not {a.size}")
                for k, off in enumerate(range(0, a.size, a.chunk)):
                    n = min(a.chunk, a.size - off)
                    if direct is not None:
                        view = direct[off:off + n]
                        _read_all(f, view)
                        crc.add(view)
                        continue
                    view = staging[k % len(staging)][:n]
                    crc.wait_before_reuse(k)
                    _read_all(f, view)
                    crc.add(view)
                    self.backend.copy_in(base + off, n, view)
            got = crc.values()
        except FileNotFoundError:
            raise _Lost("its file is gone") from None
        except OSError as exc:
            raise _Lost(f"its file cannot be read: {exc.strerror or exc}") from None
        finally:
            crc.settle()  # no checksum may still read a staging buffer once it is reused or freed
        bad = [k for k, (x, y) in enumerate(zip(got, a.crcs)) if x != y]
        if bad or len(got) != len(a.crcs):
            k = bad[0] if bad else min(len(got), len(a.crcs))
            raise _Lost(f"the CRC-32 of its bytes {k * a.chunk}..{min((k + 1) * a.chunk, a.size)} does not match: "
                        "the file was changed")

    def _zero(self, base: int, size: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))
        for off in range(0, size, len(buf)):
            n = min(len(buf), size - off)
            self.backend.copy_in(base + off, n, buf[:n])

    # --------------------------------------------------------------- end
    def close(self) -> None:
        """The session ended: host copies freed, files and this process's spool directory deleted, the
        board uncharged (the backend frees the device memory)."""
        for a in self.allocs.values():
            try:
                self._drop(a)
            except Exception:  # a buffer the backend already closed
                log.debug("tiers: dropping an allocation at the end failed", exc_info=True)
        self.allocs.clear()
        for gpu, n in self.held.items():
            self._uncharge_hot(gpu, n)
        self.held.clear()
        self.free_spent()
        self._empty_pool()
        self.bytes = [0, 0, 0]
        self.away = 0
        self.off = False
        if self.spool:
            shutil.rmtree(self.spool, ignore_errors=True)
        if self._crc_pool is not None:
            self._crc_pool.shutdown(wait=False)
            self._crc_pool = None
        self._publish()


class _Crc:
    """The CRC-32 of each chunk of a stream, computed by helper threads while the caller moves the next
    chunks (zlib.crc32 and file or device I/O release the GIL)."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, buffers: int):
        self.pool = pool
        self.buffers = buffers  # staging buffers used in turn (0: the chunks are not reused)
        self.futures: list = []

    def add(self, view) -> None:
        self.futures.append(self.pool.submit(zlib.crc32, view))

    def wait_before_reuse(self, k: int) -> None:
        """Chunk ``k`` goes into the buffer an earlier chunk used: its checksum must be done first."""
        if self.buffers and k >= self.buffers:
            self.futures[k - self.buffers].result()

    def values(self) -> tuple:
        return tuple(f.result() for f in self.futures)

    def settle(self) -> None:
        """Wait for every chunk's checksum, whatever became of it (on the way out of a failed move)."""
        concurrent.futures.wait(self.futures)


def _write_all(f, view) -> None:
    while view:
        n = f.write(view)
        view = view[n:]


def _read_all(f, view) -> None:
    while view:
        n = f.readinto(view)
        if not n:
            raise _Lost("its file is shorter than the allocation")
        view = view[n:]


def _code_of(exc: Exception) -> int:
    """The CUresult for a failed copy: the driver's own, else out of memory for host memory or I/O."""
    if isinstance(exc, CudaError):
        return exc.code
    return E.OUT_OF_MEMORY if isinstance(exc, (MemoryError, OSError)) else E.UNKNOWN


def _unlink(path: str) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
