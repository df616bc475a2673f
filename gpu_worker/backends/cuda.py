"""The cuda backend: real driver calls with cuda-python (``cuda.bindings.driver``).

Most functions are forwarded generically: the generated dispatch has already turned
handle ids into the driver's handle objects, so a call is ``driver.<name>(*args)`` with
its CUresult checked.  Only calls whose Python signature differs from the C one, and the
data paths (pinned staging buffers for bulk copies, launches by parameter buffer), are
written out here.

Kernel time is measured by events, not sampled: see _KernelTimer.

Allocations are served with virtual memory management (reserve an address range, create physical
memory, map it, grant the device access) so that VRAM tiering can give the physical memory back and
map new memory at the same address later: a program's pointers never change.  The range is rounded
up to the allocation granularity (physical_size); what the program asked for is what it is told
(cuPointerGetAttribute here, cuMemGetAddressRange in the session).  A device whose driver offers no
virtual memory management (a gpulab vGPU itself, when workers are chained) gets plain cuMemAlloc
memory, which stays on the GPU.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import logging
import mmap
import os
import struct
from collections import deque
from typing import TYPE_CHECKING

from cuda.bindings import driver as drv

from ..api import errors as E
from ..api.errors import CudaError, Refusal
from ..api.protocol import MEMPOOL_PROPS, pool_attribute_bytes, pool_attribute_value
from ..api.table import MEMPOOL_ATTR_SIZES

if TYPE_CHECKING:
    from .base import Backend

log = logging.getLogger("gpulab.worker")

_ELF = b"\x7fELF"
_FATBIN = (0xBA55ED50).to_bytes(4, "little")


def _check(res):
    err = res[0]
    if err != drv.CUresult.CUDA_SUCCESS:
        raise CudaError(int(err), f"driver returned {err.name}")
    return res[1:]


def _forward(fn, *args):
    """A driver call as the wire wants its results: CUresult checked, plain values."""
    return tuple(_plain(v) for v in _check(fn(*args)))


def _plain(v):
    """Driver results as the wire wants them: devices as ints, names as bytes."""
    if isinstance(v, drv.CUdevice):
        return int(v)
    if isinstance(v, bytes):
        return v.split(b"\0", 1)[0]
    return v


def _release(handle, ptr: int) -> None:
    """cuMemRelease of a handle already unmapped from ``ptr``: a failure is logged, not raised (the range
    is unmapped either way, and the move or free that unmapped it must count as done: its bytes were
    copied, or are no longer wanted)."""
    err = drv.cuMemRelease(handle)[0]
    if err != drv.CUresult.CUDA_SUCCESS:
        log.warning("cuda: cuMemRelease of the memory unmapped at %#x failed (%s); it is leaked until the "
                    "process ends", ptr, E.name_of(int(err)))


class _Staging:
    """A page-locked host buffer reused for bulk copies (grown on demand)."""

    def __init__(self):
        self.addr = 0
        self.size = 0

    def get(self, n: int) -> int:
        if n > self.size:
            if self.addr:
                _check(drv.cuMemFreeHost(self.addr))
            self.size = max(n, 1 << 20)
            (ptr,) = _check(drv.cuMemAllocHost(self.size))
            self.addr = int(ptr)
        return self.addr

    def view(self, n: int) -> memoryview:
        return memoryview((ctypes.c_char * n).from_address(self.get(n))).cast("B")


class _Vmm:
    """How allocations are made on one device: pinned device memory, read-write for that device and for
    each of the session's other devices that can reach it (``peers``): a mapping made with virtual memory
    management is reachable only where cuMemSetAccess says, whatever cuCtxEnablePeerAccess did."""

    def __init__(self, ordinal: int, peers=()):
        self.prop = drv.CUmemAllocationProp()
        self.prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.prop.location.id = ordinal
        (granularity,) = _check(drv.cuMemGetAllocationGranularity(
            self.prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        self.granularity = int(granularity)
        self.access = []
        for dev in (ordinal, *peers):
            access = drv.CUmemAccessDesc()
            access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = dev
            access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            self.access.append(access)

    def span(self, n: int) -> int:
        return -(-n // self.granularity) * self.granularity

    def map(self, ptr: int, span: int) -> drv.CUmemGenericAllocationHandle:
        """New physical memory mapped read-write at ``ptr``; on failure nothing is left behind."""
        (handle,) = _check(drv.cuMemCreate(span, self.prop, 0))
        try:
            _check(drv.cuMemMap(ptr, span, 0, handle, 0))
            try:
                _check(drv.cuMemSetAccess(ptr, span, self.access, len(self.access)))
            except CudaError:
                drv.cuMemUnmap(ptr, span)
                raise
        except CudaError:
            drv.cuMemRelease(handle)
            raise
        return handle


class _Allocation:
    """An allocation made by mem_alloc: its reserved range and, while on the GPU, its physical memory."""

    __slots__ = ("size", "span", "ordinal", "handle", "buffer_id")

    def __init__(self, size: int, span: int, ordinal: int, handle):
        self.size = size  # what the program asked for, and is told
        self.span = span  # the reserved and mapped range, rounded to the granularity
        self.ordinal = ordinal
        self.handle = handle  # None while released (offloaded)
        self.buffer_id = None  # the driver's, kept once asked so that it survives a remap


class _KernelTimer:
    """Kernel time by events: a start and a stop event recorded on the launch's stream around each launch.

    The pairs wait in launch order until the GPU passes their stop event; poll() adds the elapsed time of
    the complete ones, oldest first, stopping at the first still pending (cuEventQuery never blocks).
    Events are made per context (one is recorded only on a stream of its own context) and reused.  At most
    MAX_PENDING pairs are in flight: beyond, a launch first waits for the oldest to complete, as the driver
    itself holds a launch when its queue is full.  A pair whose events fail (a context that faulted) is
    dropped and its time not counted.
    """

    MAX_PENDING = 512

    def __init__(self):
        self.pending: deque[tuple[int, drv.CUevent, drv.CUevent]] = deque()  # (context, start, stop)
        self.free: dict[int, list[tuple[drv.CUevent, drv.CUevent]]] = {}  # context -> pairs not in flight
        self.seconds = 0.0

    def start(self, stream) -> tuple[int, drv.CUevent, drv.CUevent] | None:
        """Record the start event before a launch on ``stream``; None: this launch goes untimed."""
        if len(self.pending) >= self.MAX_PENDING:
            self.poll()
            if len(self.pending) >= self.MAX_PENDING:
                drv.cuEventSynchronize(self.pending[0][2])
                self.poll()
        err, ctx = drv.cuCtxGetCurrent()
        key = int(ctx) if err == drv.CUresult.CUDA_SUCCESS and ctx is not None else 0
        if not key:
            return None  # no context: the launch fails with the driver's own error
        free = self.free.setdefault(key, [])
        if free:
            begin, end = free.pop()
        else:
            e1, begin = drv.cuEventCreate(drv.CUevent_flags.CU_EVENT_DEFAULT)
            e2, end = drv.cuEventCreate(drv.CUevent_flags.CU_EVENT_DEFAULT)
            if e1 != drv.CUresult.CUDA_SUCCESS or e2 != drv.CUresult.CUDA_SUCCESS:
                for e, ev in ((e1, begin), (e2, end)):
                    if e == drv.CUresult.CUDA_SUCCESS:
                        drv.cuEventDestroy(ev)
                return None
        if drv.cuEventRecord(begin, stream)[0] != drv.CUresult.CUDA_SUCCESS:
            free.append((begin, end))
            return None
        return key, begin, end

    def stop(self, pair: tuple[int, drv.CUevent, drv.CUevent], stream, launched: bool) -> None:
        """Record the stop event after the launch (``launched``: it was accepted) and queue the pair."""
        key, begin, end = pair
        if launched and drv.cuEventRecord(end, stream)[0] == drv.CUresult.CUDA_SUCCESS:
            self.pending.append(pair)
        else:
            self.free[key].append((begin, end))

    def poll(self) -> float:
        """The cumulative seconds of the launches complete so far."""
        while self.pending:
            key, begin, end = self.pending[0]
            err = drv.cuEventQuery(end)[0]
            if err == drv.CUresult.CUDA_ERROR_NOT_READY:
                break
            self.pending.popleft()
            if err == drv.CUresult.CUDA_SUCCESS:
                err, ms = drv.cuEventElapsedTime(begin, end)
                if err == drv.CUresult.CUDA_SUCCESS:
                    self.seconds += ms / 1000.0
                self.free[key].append((begin, end))
        return self.seconds

    def forget(self, key: int) -> None:
        """The context ``key`` is gone and its events with it (poll before destroying it: its events
        cannot be queried after)."""
        self.pending = deque(p for p in self.pending if p[0] != key)
        self.free.pop(key, None)

    def close(self) -> None:
        """Destroy every event (one still pending is released by the driver when it completes)."""
        self.poll()
        for _key, begin, end in self.pending:
            drv.cuEventDestroy(begin)
            drv.cuEventDestroy(end)
        for pairs in self.free.values():
            for begin, end in pairs:
                drv.cuEventDestroy(begin)
                drv.cuEventDestroy(end)
        self.pending.clear()
        self.free.clear()


class CudaBackend:
    """Implements gpu_worker.backends.base.Backend; driver functions not written here are forwarded by name."""

    name = "cuda"

    def __init__(self, visible: list[str] | None = None):
        """``visible``: uuids of the worker's GPUs this vGPU is placed on; None shows every GPU."""
        if visible is not None:
            # The driver reads CUDA_VISIBLE_DEVICES once, in cuInit, and then enumerates exactly the GPUs
            # named there as devices 0..n-1: a vGPU cannot even name another GPU of the worker. It works
            # only because the executor is a freshly forked process whose parent never initialised CUDA.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
        _check(drv.cuInit(0))
        self.staging = _Staging()
        self.layouts: dict[int, list[tuple[int, int]]] = {}
        self.timer = _KernelTimer()
        self.primary: dict[int, int] = {}  # device -> its primary context, whose events a reset destroys
        self.contexts: dict[int, tuple[drv.CUcontext, int]] = {}  # made or retained here -> (it, device)
        self.vmm: dict[int, _Vmm | None] = {}  # device -> how to allocate there (None: plain cuMemAlloc)
        self.allocations: dict[int, _Allocation] = {}
        self.bases: list[int] = []  # sorted keys of allocations, to find the one holding a pointer
        self.own_ids = 0  # buffer ids given where the driver gives none
        self.host: dict[int, tuple[memoryview, int, mmap.mmap | None]] = {}  # id of a host_buffer view -> it
        self.made_pools: dict[int, drv.CUmemoryPool] = {}  # pools cuMemPoolCreate made here, destroyed at close
        self.used_pools: dict[int, drv.CUmemoryPool] = {}  # devices' pools handed out here, trimmed at close

    def __getattr__(self, name):
        if not name.startswith("cu"):
            raise AttributeError(name)
        fn = getattr(drv, name)

        def call(*args):
            return _forward(fn, *args)

        call.__name__ = name
        setattr(self, name, call)
        return call

    def close(self):
        self.timer.close()
        if self.staging.addr:
            drv.cuMemFreeHost(self.staging.addr)
            self.staging.addr = 0
        for view, _addr, _m in list(self.host.values()):
            with contextlib.suppress(CudaError):
                self.host_free(view)
        for ptr in list(self.allocations):  # the session freed its own; what is left must not leak
            with contextlib.suppress(CudaError):
                self.mem_free(ptr)
        for pool in self.made_pools.values():  # (the session gave their allocations back first)
            drv.cuMemPoolDestroy(pool)
        for pool in self.used_pools.values():  # a device's pool outlives the session: its reserve goes
            drv.cuMemPoolTrimTo(pool, 0)
        self.made_pools.clear()
        self.used_pools.clear()

    # -------------------------------------------------------------- contexts
    def set_current(self, ctx):
        _check(drv.cuCtxSetCurrent(ctx if ctx is not None else drv.CUcontext(0)))

    # the contexts made or retained here are the ones synchronize_all waits for
    def cuCtxCreate(self, flags, dev):
        (ctx,) = _check(drv.cuCtxCreate(None, flags, dev))
        self.contexts[int(ctx)] = (ctx, int(dev))
        return (ctx,)

    # a context's events go with it: the kernel timer counts what completed first, then forgets them
    def cuCtxDestroy(self, ctx):
        self.timer.poll()
        _check(drv.cuCtxDestroy(ctx))
        self.timer.forget(int(ctx))
        self.contexts.pop(int(ctx), None)

    def cuDevicePrimaryCtxReset(self, dev):
        self.timer.poll()
        _check(drv.cuDevicePrimaryCtxReset(dev))
        self.timer.forget(self.primary.get(dev, 0))

    def cuDevicePrimaryCtxRelease(self, dev):
        self.timer.poll()
        _check(drv.cuDevicePrimaryCtxRelease(dev))
        _flags, active = _check(drv.cuDevicePrimaryCtxGetState(dev))
        if not active:  # the last retain: the driver destroyed the context
            self.timer.forget(self.primary.get(dev, 0))
            self.contexts.pop(self.primary.get(dev, 0), None)

    def cuCtxGetDevice_v2(self, ctx):
        return tuple(_plain(v) for v in _check(drv.cuCtxGetDevice_v2(ctx if ctx is not None else drv.CUcontext(0))))

    def cuCtxSynchronize_v2(self, ctx):
        _check(drv.cuCtxSynchronize_v2(ctx if ctx is not None else drv.CUcontext(0)))

    # the session wraps these: written out so that the Backend protocol can hold them to a signature
    def cuMemGetInfo(self):
        return _forward(drv.cuMemGetInfo)

    def cuDeviceTotalMem(self, dev):
        return _forward(drv.cuDeviceTotalMem, dev)

    def cuDeviceGetAttribute(self, attrib, dev):
        return _forward(drv.cuDeviceGetAttribute, attrib, dev)

    def cuDevicePrimaryCtxRetain(self, dev):
        (ctx,) = _forward(drv.cuDevicePrimaryCtxRetain, dev)
        self.primary[dev] = int(ctx)
        self.contexts[int(ctx)] = (ctx, int(dev))
        return (ctx,)

    def cuDeviceGetUuid(self, dev):
        (u,) = _check(drv.cuDeviceGetUuid(dev))
        return (bytes(u.bytes)[:16],)

    def stream_context(self, stream):
        (ctx,) = _check(drv.cuStreamGetCtx(stream if stream is not None else drv.CUstream(0)))
        return ctx

    def function_module(self, func):
        (mod,) = _check(drv.cuFuncGetModule(func))
        return mod

    def kernel_function(self, kernel):
        (fn,) = _check(drv.cuKernelGetFunction(kernel))
        return fn

    # ---------------------------------------------------------------- memory
    def _vmm_of(self, ordinal: int) -> _Vmm | None:
        if ordinal not in self.vmm:
            attr = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
            (supported,) = _check(drv.cuDeviceGetAttribute(attr, ordinal))
            self.vmm[ordinal] = _Vmm(ordinal, self._peers_of(ordinal)) if supported else None
        return self.vmm[ordinal]

    @staticmethod
    def _peers_of(ordinal: int) -> list[int]:
        """The session's other devices that can read and write device ``ordinal``'s memory."""
        (count,) = _check(drv.cuDeviceGetCount())
        return [dev for dev in range(count)
                if dev != ordinal and _check(drv.cuDeviceCanAccessPeer(dev, ordinal))[0]]

    def mem_alloc(self, n: int) -> int:
        ordinal = self.current_device()  # as cuMemAlloc: on the current context's device
        vmm = self._vmm_of(ordinal)
        if vmm is None:
            (ptr,) = _check(drv.cuMemAlloc(n))
            return int(ptr)
        span = vmm.span(n)
        (addr,) = _check(drv.cuMemAddressReserve(span, 0, 0, 0))
        ptr = int(addr)
        try:
            handle = vmm.map(ptr, span)
        except CudaError:
            drv.cuMemAddressFree(ptr, span)
            raise
        self.allocations[ptr] = _Allocation(n, span, ordinal, handle)
        bisect.insort(self.bases, ptr)
        return ptr

    def mem_free(self, ptr: int) -> None:
        a = self.allocations.get(ptr)
        if a is None:
            _check(drv.cuMemFree(ptr))
            return
        if a.handle is not None:
            # cuMemFree waits for the work that may still use the memory; an unmap does not always
            if not getattr(self, "captures", 0):  # (nor may a capture be invalidated by waiting)
                with contextlib.suppress(CudaError):  # a faulted context runs nothing more
                    self._synchronize(a.ordinal)
            _check(drv.cuMemUnmap(ptr, a.span))  # the physical memory is freed with its last mapping ...
            a.handle, handle = None, a.handle
            _release(handle, ptr)  # ... and its handle
        _check(drv.cuMemAddressFree(ptr, a.span))
        del self.allocations[ptr]
        self.bases.remove(ptr)

    # ---------------------------------------------------------- memory pools
    # The driver's own pools, reached through cuda-python as the rest: what a pool holds reserved is what the
    # session charges the vGPU (RESERVED_MEM_CURRENT, read after each call that may change it).  Pool memory
    # is the driver's and stays on the GPU (the VRAM tiers move only mem_alloc's allocations).
    def cuDeviceGetDefaultMemPool(self, dev):
        (pool,) = _check(drv.cuDeviceGetDefaultMemPool(dev))
        self.used_pools.setdefault(int(pool), pool)
        return (pool,)

    def cuDeviceGetMemPool(self, dev):
        (pool,) = _check(drv.cuDeviceGetMemPool(dev))
        if int(pool) not in self.made_pools:
            self.used_pools.setdefault(int(pool), pool)
        return (pool,)

    def cuMemPoolCreate(self, props):
        alloc_type, handle_types, loc_type, loc_id, _win32, max_size, usage, _rdma = \
            MEMPOOL_PROPS.unpack(props)
        p = drv.CUmemPoolProps()
        try:
            p.allocType = drv.CUmemAllocationType(alloc_type)
            p.handleTypes = drv.CUmemAllocationHandleType(handle_types)
            p.location.type = drv.CUmemLocationType(loc_type)
        except ValueError:  # a value the driver's enums do not have: the driver's answer to it
            raise CudaError(E.INVALID_VALUE, f"pool properties: allocation type {alloc_type}, handle types "
                                             f"{handle_types}, location type {loc_type}") from None
        p.location.id = loc_id
        p.maxSize = max_size
        p.usage = usage
        (pool,) = _check(drv.cuMemPoolCreate(p))
        self.made_pools[int(pool)] = pool
        return (pool,)

    def cuMemPoolDestroy(self, pool):
        _check(drv.cuMemPoolDestroy(pool))
        self.made_pools.pop(int(pool), None)

    def cuMemPoolTrimTo(self, pool, keep):
        _check(drv.cuMemPoolTrimTo(pool, keep))

    def cuMemPoolGetAttribute(self, pool, attr):
        (value,) = _check(drv.cuMemPoolGetAttribute(pool, _pool_attribute(attr)))
        return (pool_attribute_bytes(attr, int(value)),)

    def cuMemPoolSetAttribute(self, pool, attr, data):
        value = pool_attribute_value(attr, data)
        if MEMPOOL_ATTR_SIZES[attr] == 8:
            value = drv.cuuint64_t(value)
        _check(drv.cuMemPoolSetAttribute(pool, _pool_attribute(attr), value))

    def pool_alloc(self, pool, n, stream):
        (ptr,) = _check(drv.cuMemAllocFromPoolAsync(n, pool, _stream(stream)))
        return int(ptr)

    def pool_free(self, ptr, stream):
        _check(drv.cuMemFreeAsync(ptr, _stream(stream)))

    def pool_reserved(self, pool):
        attr = drv.CUmemPool_attribute.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT
        (value,) = _check(drv.cuMemPoolGetAttribute(pool, attr))
        return int(value)

    # --------------------------------------------------------- VRAM tiering
    def physical_size(self, n: int) -> int:
        vmm = self._vmm_of(self.current_device())
        return vmm.span(n) if vmm is not None else -(-n // 256) * 256

    def current_device(self) -> int:
        (dev,) = _check(drv.cuCtxGetDevice())
        return int(dev)

    def synchronize_all(self) -> None:
        if getattr(self, "captures", 0):  # synchronizing would invalidate the program's capture
            raise CudaError(E.STREAM_CAPTURE_UNSUPPORTED, "a stream capture is open in this process: its work "
                                                          "cannot be waited for until the capture ends")
        self._synchronize(None)

    def _synchronize(self, ordinal: int | None) -> None:
        """Wait for the work of every context made or retained here on device ``ordinal`` (None: all)."""
        err, current = drv.cuCtxGetCurrent()
        try:
            for ctx, dev in list(self.contexts.values()):
                if ordinal is None or dev == ordinal:
                    _check(drv.cuCtxSetCurrent(ctx))
                    _check(drv.cuCtxSynchronize())
        finally:
            if err == drv.CUresult.CUDA_SUCCESS:
                drv.cuCtxSetCurrent(current)

    def _movable(self, ptr: int) -> _Allocation:
        a = self.allocations.get(ptr)
        if a is None:
            raise CudaError(E.NOT_SUPPORTED, f"the allocation at {ptr:#x} was not made with virtual memory "
                                             "management (its GPU's driver offers none): it cannot leave the GPU")
        return a

    def mem_release(self, ptr: int) -> None:
        a = self._movable(ptr)
        if a.handle is None:
            raise CudaError(E.INVALID_VALUE, f"the allocation at {ptr:#x} is already released")
        if a.buffer_id is None:  # the driver cannot answer for an unmapped range: asked while it can
            a.buffer_id = self._buffer_id(ptr)
        _check(drv.cuMemUnmap(ptr, a.span))  # the range stays reserved: no other allocation can take it
        a.handle, handle = None, a.handle
        _release(handle, ptr)

    def mem_remap(self, ptr: int) -> None:
        a = self._movable(ptr)
        if a.handle is not None:
            raise CudaError(E.INVALID_VALUE, f"the allocation at {ptr:#x} is not released")
        a.handle = self.vmm[a.ordinal].map(ptr, a.span)

    @contextlib.contextmanager
    def _context_on(self, ordinal: int | None):
        """A context of device ``ordinal`` (None: any) current for what follows, the program's restored
        after: a copy between the tiers may come while another device's context, or none, is current."""
        err, current = drv.cuCtxGetCurrent()
        have = err == drv.CUresult.CUDA_SUCCESS and int(current) != 0
        if have and (ordinal is None or self.current_device() == ordinal):
            yield
            return
        ctx = next((c for c, dev in self.contexts.values() if ordinal is None or dev == ordinal), None)
        if ctx is None:  # none known: the driver answers with its own error
            yield
            return
        _check(drv.cuCtxSetCurrent(ctx))
        try:
            yield
        finally:
            drv.cuCtxSetCurrent(current if have else drv.CUcontext(0))

    def _holding(self, ptr: int) -> tuple[int, _Allocation] | tuple[None, None]:
        """The allocation made here that ``ptr`` is in (within what the program asked for), and its base."""
        i = bisect.bisect_right(self.bases, ptr) - 1
        if i >= 0:
            base = self.bases[i]
            a = self.allocations[base]
            if ptr < base + a.size:
                return base, a
        return None, None

    def _ordinal(self, ptr: int) -> int | None:
        _base, a = self._holding(ptr)  # copies come a chunk at a time: ptr may be inside the allocation
        return a.ordinal if a is not None else None

    def copy_out(self, ptr: int, n: int, dst: memoryview) -> None:
        _fits(dst, n)
        with self._context_on(self._ordinal(ptr)):
            _check(drv.cuMemcpyDtoH(dst, ptr, n))  # the buffer's own address: page-locked if from host_buffer

    def copy_in(self, ptr: int, n: int, src: memoryview) -> None:
        _fits(src, n)
        with self._context_on(self._ordinal(ptr)):
            _check(drv.cuMemcpyHtoD(ptr, src, n))

    def host_buffer(self, n: int) -> memoryview:
        """Page-locked for every context (portable); plain pageable memory when the driver has no more to
        lock, which copies slower but as well."""
        if n == 0:
            return memoryview(bytearray())
        with self._context_on(None):
            err, addr = drv.cuMemHostAlloc(n, drv.CU_MEMHOSTALLOC_PORTABLE)
        if err == drv.CUresult.CUDA_SUCCESS:
            view = memoryview((ctypes.c_char * n).from_address(int(addr))).cast("B")
            self.host[id(view)] = (view, int(addr), None)
        else:
            m = mmap.mmap(-1, n)
            view = memoryview(m)
            self.host[id(view)] = (view, 0, m)
        return view

    def host_view(self, ptr: int, n: int) -> None:
        """Device memory is not the host's: cold moves go through page-locked staging buffers."""
        return None

    def host_free(self, view: memoryview) -> None:
        entry = self.host.pop(id(view), None)
        if entry is None:  # empty, or already freed by close()
            return
        view, addr, m = entry
        with contextlib.suppress(BufferError):  # unusable from now on, as far as Python can tell
            view.release()
        if m is not None:
            with contextlib.suppress(BufferError):
                m.close()
            return
        with self._context_on(None):
            _check(drv.cuMemFreeHost(addr))

    def write_target(self, ptr, n, stream):
        view = self.staging.view(n)
        addr = self.staging.addr
        s = stream if stream is not None else drv.CUstream(0)

        def commit(synchronous):
            # pageable semantics: the bytes are in place when the call returns
            with _HostCopyInCapture():
                _check(drv.cuMemcpyHtoDAsync(ptr, addr, n, s))
                _check(drv.cuStreamSynchronize(s))

        return view, commit

    def read_source(self, ptr, n, stream):
        view = self.staging.view(n)
        s = stream if stream is not None else drv.CUstream(0)
        with _HostCopyInCapture():
            _check(drv.cuMemcpyDtoHAsync(self.staging.addr, ptr, n, s))
            _check(drv.cuStreamSynchronize(s))
        return view

    def cuPointerGetAttribute(self, attribute, ptr):
        A = drv.CUpointer_attribute
        formats = {int(A.CU_POINTER_ATTRIBUTE_MEMORY_TYPE): "<I", int(A.CU_POINTER_ATTRIBUTE_DEVICE_POINTER): "<Q",
                   int(A.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL): "<i", int(A.CU_POINTER_ATTRIBUTE_IS_MANAGED): "<I",
                   int(A.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR): "<Q", int(A.CU_POINTER_ATTRIBUTE_RANGE_SIZE): "<Q",
                   int(A.CU_POINTER_ATTRIBUTE_BUFFER_ID): "<Q", int(A.CU_POINTER_ATTRIBUTE_MAPPED): "<I"}
        if attribute not in formats:
            raise CudaError(E.NOT_SUPPORTED, f"pointer attribute {attribute} is not forwarded")
        value = self._allocation_attribute(attribute, ptr)
        if value is None:
            (value,) = _check(drv.cuPointerGetAttribute(A(attribute), ptr))
        return (struct.pack(formats[attribute], int(value)),)

    def _allocation_attribute(self, attribute: int, ptr: int) -> int | None:
        """A pointer attribute of an allocation made here, as cuMemAlloc memory would answer it (the
        driver sees the rounded range, or nothing mapped while offloaded); None: the driver's answer."""
        base, a = self._holding(ptr)
        if a is None:
            return None
        A = drv.CUpointer_attribute
        if attribute == A.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
            return base
        if attribute == A.CU_POINTER_ATTRIBUTE_RANGE_SIZE:
            return a.size
        if attribute == A.CU_POINTER_ATTRIBUTE_BUFFER_ID:  # one id for the allocation's life, across remaps
            if a.buffer_id is None:
                a.buffer_id = self._buffer_id(base)
            return a.buffer_id
        if a.handle is not None:
            return None
        # offloaded: answered as if on the GPU, where the program's next touch brings it back
        return {A.CU_POINTER_ATTRIBUTE_MEMORY_TYPE: int(drv.CUmemorytype.CU_MEMORYTYPE_DEVICE),
                A.CU_POINTER_ATTRIBUTE_DEVICE_POINTER: ptr, A.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: a.ordinal,
                A.CU_POINTER_ATTRIBUTE_IS_MANAGED: 0, A.CU_POINTER_ATTRIBUTE_MAPPED: 1}.get(A(attribute))

    def _buffer_id(self, base: int) -> int:
        """The driver's buffer id of a mapped allocation; one of ours, never reused, where it has none."""
        err, value = drv.cuPointerGetAttribute(drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_BUFFER_ID, base)
        if err == drv.CUresult.CUDA_SUCCESS:
            return int(value)
        self.own_ids += 1
        return (1 << 63) | self.own_ids

    # ------------------------------------------------------ modules, kernels
    @staticmethod
    def _image(image) -> bytes:
        data = bytes(image)
        if data[:4] in (_ELF, _FATBIN):
            return data
        return data + b"\0"  # PTX travels without its NUL terminator

    def cuModuleLoadData(self, image):
        return _check(drv.cuModuleLoadData(self._image(image)))

    def cuModuleLoadDataEx(self, image):
        return _check(drv.cuModuleLoadDataEx(self._image(image), 0, [], []))

    def cuModuleLoadFatBinary(self, image):
        return _check(drv.cuModuleLoadFatBinary(self._image(image)))

    def cuLibraryLoadData(self, code):
        return _check(drv.cuLibraryLoadData(self._image(code), [], [], 0, [], [], 0))

    def cuModuleGetFunction(self, mod, name):
        return _check(drv.cuModuleGetFunction(mod, name.encode()))

    def cuModuleGetGlobal(self, mod, name):
        ptr, size = _check(drv.cuModuleGetGlobal(mod, name.encode()))
        return int(ptr), int(size)

    def cuLibraryGetKernel(self, lib, name):
        return _check(drv.cuLibraryGetKernel(lib, name.encode()))

    def cuOccupancyMaxPotentialBlockSize(self, func, smem, limit):
        return _check(drv.cuOccupancyMaxPotentialBlockSize(func, None, smem, limit))

    def param_layout(self, func):
        key = int(func)
        layout = self.layouts.get(key)
        if layout is None:
            layout = []
            while True:
                err, off, size = drv.cuFuncGetParamInfo(func, len(layout))
                if err != drv.CUresult.CUDA_SUCCESS:
                    break
                layout.append((int(off), int(size)))
            self.layouts[key] = layout
        return layout

    def launch(self, func, grid, block, shmem, stream, params, attrs, nattrs):
        if nattrs:
            raise Refusal(E.NOT_SUPPORTED, "launch attributes (cluster dimensions, priority, ...) are not supported "
                                           "on a gpulab vGPU yet", call="kernel launch")
        layout = self.param_layout(func)
        buf = ctypes.create_string_buffer(bytes(params), max(len(params), 1))
        base = ctypes.addressof(buf)
        ptrs = (ctypes.c_void_p * max(len(layout), 1))(*[base + off for off, _ in layout])
        s = _stream(stream)
        self._timed(s, drv.cuLaunchKernel, func, *grid, *block, shmem, s, ctypes.addressof(ptrs), 0)

    def _timed(self, stream, fn, *args) -> None:
        """Call the launch ``fn(*args)`` between the kernel timer's events on ``stream``; a launch being
        captured into a graph is not run now (its time counts when the graph is launched)."""
        err, status = drv.cuStreamIsCapturing(stream)
        runs_now = err == drv.CUresult.CUDA_SUCCESS and int(status) == 0  # not captured, nor refused in a capture
        timed = self.timer.start(stream) if runs_now else None
        res = fn(*args)
        if timed is not None:
            self.timer.stop(timed, stream, res[0] == drv.CUresult.CUDA_SUCCESS)
        _check(res)

    def kernel_time(self) -> float:
        # while a capture is open (global mode) the driver refuses event queries from this thread, and
        # would invalidate the capture: the figure waits for the capture's end
        if getattr(self, "captures", 0):
            return self.timer.seconds
        return self.timer.poll()

    # ---------------------------------------------------------------- graphs
    # A launch on a capturing stream is captured by the driver itself (launch() passes the stream it was
    # given); graphs and graph execs are driver handles the session maps to the client's ids.
    def cuStreamBeginCapture(self, stream, mode):
        try:
            mode = drv.CUstreamCaptureMode(mode)
        except ValueError:
            raise CudaError(E.INVALID_VALUE, f"capture mode {mode}") from None
        _check(drv.cuStreamBeginCapture(_stream(stream), mode))
        self.captures = getattr(self, "captures", 0) + 1

    def cuStreamEndCapture(self, stream):
        try:
            return _check(drv.cuStreamEndCapture(_stream(stream)))
        finally:  # ended either way: a capture that failed is over too
            self.captures = max(getattr(self, "captures", 0) - 1, 0)

    def cuStreamIsCapturing(self, stream):
        (status,) = _check(drv.cuStreamIsCapturing(_stream(stream)))
        return (int(status),)

    def graph_launch(self, graph_exec, stream):
        s = _stream(stream)
        self._timed(s, drv.cuGraphLaunch, graph_exec, s)  # the graph's kernel time as a whole


def _fits(buf: memoryview, n: int) -> None:
    """The driver copies ``n`` bytes at the buffer's address whatever its length: never past its end."""
    if memoryview(buf).nbytes < n:
        raise CudaError(E.INVALID_VALUE, f"a host buffer of {memoryview(buf).nbytes} bytes for a copy of {n}")


def _stream(stream):
    return stream if stream is not None else drv.CUstream(0)


def _pool_attribute(attr: int):
    try:
        return drv.CUmemPool_attribute(attr)
    except ValueError:
        raise CudaError(E.INVALID_VALUE, f"unknown memory pool attribute {attr}") from None


class _HostCopyInCapture:
    """A copy through the staging buffer cannot be captured: the driver refuses the synchronize (and
    invalidates the capture), and the person is told why."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, CudaError) and not isinstance(exc, Refusal) and exc.code in (
                E.STREAM_CAPTURE_UNSUPPORTED, E.STREAM_CAPTURE_INVALIDATED):
            raise Refusal(exc.code, "a copy between host and device memory cannot be captured on a gpulab vGPU "
                                    "(the host memory is in the client, the graph on the worker); the capture is "
                                    "now invalid") from None
        return False


if TYPE_CHECKING:
    _conforms: type[Backend] = CudaBackend  # a type checker holds the class to the protocol
