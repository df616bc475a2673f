"""The cuda backend: real driver calls with cuda-python (``cuda.bindings.driver``).

Most functions are forwarded generically: the generated dispatch has already turned
handle ids into the driver's handle objects, so a call is ``driver.<name>(*args)`` with
its CUresult checked.  Only calls whose Python signature differs from the C one, and the
data paths (pinned staging buffers for bulk copies, launches by parameter buffer), are
written out here.
"""
from __future__ import annotations

import ctypes
import os
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
        if self.staging.addr:
            drv.cuMemFreeHost(self.staging.addr)
            self.staging.addr = 0

    # -------------------------------------------------------------- contexts
    def set_current(self, ctx):
        _check(drv.cuCtxSetCurrent(ctx if ctx is not None else drv.CUcontext(0)))

    def cuCtxCreate(self, flags, dev):
        return _check(drv.cuCtxCreate(None, flags, dev))

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
        return _forward(drv.cuDevicePrimaryCtxRetain, dev)

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
            _check(drv.cuMemcpyHtoDAsync(ptr, addr, n, s))
            _check(drv.cuStreamSynchronize(s))

        return view, commit

    def read_source(self, ptr, n, stream):
        view = self.staging.view(n)
        s = stream if stream is not None else drv.CUstream(0)
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
        _check(drv.cuLaunchKernel(func, *grid, *block, shmem, stream if stream is not None else drv.CUstream(0),
                                  ctypes.addressof(ptrs), 0))


if TYPE_CHECKING:
    _conforms: type[Backend] = CudaBackend  # a type checker holds the class to the protocol
