"""The cuda backend: real driver calls with cuda-python (``cuda.bindings.driver``).

Most functions are forwarded generically: the generated dispatch has already turned
handle ids into the driver's handle objects, so a call is ``driver.<name>(*args)`` with
its CUresult checked.  Only calls whose Python signature differs from the C one, and the
data paths (pinned staging buffers for bulk copies, launches by parameter buffer), are
written out here.

Kernel time is measured by events, not sampled: see _KernelTimer.
"""
from __future__ import annotations

import ctypes
import os
from collections import deque
from typing import TYPE_CHECKING

from cuda.bindings import driver as drv

from ..api import errors as E
from ..api.errors import CudaError, Refusal

if TYPE_CHECKING:
    from .base import Backend

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

    # -------------------------------------------------------------- contexts
    def set_current(self, ctx):
        _check(drv.cuCtxSetCurrent(ctx if ctx is not None else drv.CUcontext(0)))

    def cuCtxCreate(self, flags, dev):
        return _check(drv.cuCtxCreate(None, flags, dev))

    # a context's events go with it: the kernel timer counts what completed first, then forgets them
    def cuCtxDestroy(self, ctx):
        self.timer.poll()
        _check(drv.cuCtxDestroy(ctx))
        self.timer.forget(int(ctx))

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
    def mem_alloc(self, n: int) -> int:
        (ptr,) = _check(drv.cuMemAlloc(n))
        return int(ptr)

    def mem_free(self, ptr: int) -> None:
        _check(drv.cuMemFree(ptr))

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
        import struct

        (value,) = _check(drv.cuPointerGetAttribute(A(attribute), ptr))
        return (struct.pack(formats[attribute], int(value)),)

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


def _stream(stream):
    return stream if stream is not None else drv.CUstream(0)


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
