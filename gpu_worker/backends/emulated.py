"""The emulated backend: a TEST DOUBLE of a GPU for machines without one.

Real bytes in host memory, real handles, real errors; a kernel runs only if a host
implementation is registered for its PTX entry name (gpu_worker.backends.emulated_kernels).
Everything it reports names it as emulated, so no user mistakes it for a GPU.

It can stand for several of a worker's GPUs at once: a vGPU placed on GPUs 1 and 2 of an
emulated multi-GPU worker sees them as its devices 0 and 1, each with that GPU's uuid and
memory, so placement can be tested end to end without a GPU.

Kernel time: a kernel registered with a simulated duration (see emulated_kernels) "runs on the
device" after its host implementation: the launch takes the GPU's device lock (an fcntl lock on a
file descriptor the daemon shares among the executors of one GPU), sleeps the duration and lets go,
so kernels of all processes on one emulated GPU run one at a time, as on a real GPU; the durations
add up to kernel_time().  This is how CI tests pacing and compute shares without a GPU.  Unlike a
GPU, the launch returns when the kernel has run: kernel time is complete as soon as it is counted.

VRAM tiering: an allocation's bytes can be released (mem_release) while its address range stays
known, and remapped (mem_remap) zero-filled at the same address, as the cuda backend does with
virtual memory management; warm-tier host buffers are anonymous mmaps.  Touching a released range
is refused as a fault, which the session's restore-on-touch never lets happen.

Memory pools and stream-ordered allocation: emulated_pools.py (mixed in), with the reserve rule the
session charges the vGPU for.
"""
from __future__ import annotations

import bisect
import fcntl
import functools
import mmap
import secrets
import struct
import time
import uuid
from typing import TYPE_CHECKING

from ..api import errors as E
from .emulated_graphs import GraphCapture
from .emulated_pools import MemoryPools
from .emulated_kernels import DURATIONS, REGISTRY, Launch
from ..api.errors import CudaError, Refusal
from .ptx import looks_like_ptx, parse_entries, parse_globals

if TYPE_CHECKING:
    from .base import Backend

DEVICE_NAME = "gpulab emulated vGPU (test double, no GPU)"


def _installed_cuda_version(default: int = 13000) -> int:
    """The CUDA version of the cuda-bindings and NVRTC installed here, as cuDriverGetVersion encodes it.

    The emulated device reports a driver as new as these, because libraries compare the two: cuda.core
    warns that PTX from a newer NVRTC "will not be loadable" by an older driver. A real GPU reports
    its real driver (see DESIGN.md's pitfalls). Read from the packages' metadata: no library is loaded.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("cuda-bindings", "nvidia-cuda-nvrtc"):
        try:
            major, minor = (int(x) for x in version(dist).split(".")[:2])
        except (PackageNotFoundError, ValueError):
            continue
        found.append(1000 * major + 10 * minor)
    return max(found, default=default)


DRIVER_VERSION = _installed_cuda_version()


@functools.cache
def _attributes():
    """Device attributes of the emulated device, by enum name (values of a Hopper-class card)."""
    vals = {
        "MAX_THREADS_PER_BLOCK": 1024, "MAX_BLOCK_DIM_X": 1024, "MAX_BLOCK_DIM_Y": 1024, "MAX_BLOCK_DIM_Z": 64,
        "MAX_GRID_DIM_X": 2**31 - 1, "MAX_GRID_DIM_Y": 65535, "MAX_GRID_DIM_Z": 65535,
        "MAX_SHARED_MEMORY_PER_BLOCK": 49152, "SHARED_MEMORY_PER_BLOCK": 49152,
        "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 232448, "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 233472,
        "TOTAL_CONSTANT_MEMORY": 65536, "WARP_SIZE": 32, "MAX_PITCH": 2**31 - 1,
        "MAX_REGISTERS_PER_BLOCK": 65536, "REGISTERS_PER_BLOCK": 65536, "MAX_REGISTERS_PER_MULTIPROCESSOR": 65536,
        "CLOCK_RATE": 1755000, "TEXTURE_ALIGNMENT": 512, "GPU_OVERLAP": 1, "MULTIPROCESSOR_COUNT": 132,
        "KERNEL_EXEC_TIMEOUT": 0, "INTEGRATED": 0, "CAN_MAP_HOST_MEMORY": 0, "COMPUTE_MODE": 0,
        "CONCURRENT_KERNELS": 1, "ECC_ENABLED": 0, "PCI_BUS_ID": 0, "PCI_DEVICE_ID": 0, "PCI_DOMAIN_ID": 0,
        "TCC_DRIVER": 0, "MEMORY_CLOCK_RATE": 2619000, "GLOBAL_MEMORY_BUS_WIDTH": 5120,
        "L2_CACHE_SIZE": 52428800, "MAX_THREADS_PER_MULTIPROCESSOR": 2048, "ASYNC_ENGINE_COUNT": 2,
        "UNIFIED_ADDRESSING": 1, "COMPUTE_CAPABILITY_MAJOR": 9, "COMPUTE_CAPABILITY_MINOR": 0,
        "STREAM_PRIORITIES_SUPPORTED": 1, "GLOBAL_L1_CACHE_SUPPORTED": 1, "LOCAL_L1_CACHE_SUPPORTED": 1,
        "MANAGED_MEMORY": 0, "MULTI_GPU_BOARD": 0, "MAX_BLOCKS_PER_MULTIPROCESSOR": 32,
        "CONCURRENT_MANAGED_ACCESS": 0, "PAGEABLE_MEMORY_ACCESS": 0, "COOPERATIVE_LAUNCH": 1,
        "MEMORY_POOLS_SUPPORTED": 1, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED": 0, "HOST_REGISTER_SUPPORTED": 0,
        "CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM": 0, "DIRECT_MANAGED_MEM_ACCESS_FROM_HOST": 0,
        "RESERVED_SHARED_MEMORY_PER_BLOCK": 1024, "MAX_PERSISTING_L2_CACHE_SIZE": 0,
        "MAX_ACCESS_POLICY_WINDOW_SIZE": 0, "CLUSTER_LAUNCH": 1, "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED": 0,
    }
    from cuda.bindings import driver

    out = {}
    for name, value in vals.items():
        member = getattr(driver.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_" + name, None)
        if member is not None:
            out[int(member)] = value
    known = {int(m) for m in driver.CUdevice_attribute}
    return out, known


def _attribute(name: str) -> int:
    from cuda.bindings import driver

    return int(getattr(driver.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_" + name))


SPARE_MAX = 4 << 30  # host bytes of released allocations a session keeps for remaps (at most what it released)

class _Device:
    """One of the worker's GPUs as this backend emulates it, and the bytes allocated on it."""

    def __init__(self, gpu: dict, name: str, attrs: dict[int, int]):
        self.index = gpu["index"]  # the GPU's index on the worker, not the vGPU's device ordinal
        self.gpu_uuid = gpu["uuid"]  # as the worker names it ("GPU-..."): the key of its device lock
        self.uuid = uuid.UUID(gpu["uuid"].removeprefix("GPU-")).bytes
        self.name = name
        self.memory = gpu["memory"]
        self.capability = tuple(int(x) for x in gpu["capability"].split("."))
        self.pci_bus_id = f"0000:{self.index:02x}:00.0"
        self.attrs = {**attrs, _attribute("PCI_BUS_ID"): self.index,
                      _attribute("COMPUTE_CAPABILITY_MAJOR"): self.capability[0],
                      _attribute("COMPUTE_CAPABILITY_MINOR"): self.capability[1]}
        self.used = 0


class _Obj:
    """A handle target; each kind is a small record."""

    def __init__(self, kind, **kw):
        self.kind = kind
        self.__dict__.update(kw)


class EmulatedBackend(GraphCapture, MemoryPools):
    """Implements gpu_worker.backends.base.Backend, and every forwarded driver function, in host memory."""

    name = "emulated"

    def __init__(self, total_memory: int = 16 << 30, driver_version: int = DRIVER_VERSION,
                 gpus: list[dict] | None = None, device_locks: dict[str, int] | None = None):
        """``gpus``: the worker's GPUs this vGPU sees, in device order, as gpu_worker.daemon.gpus describes
        them; None is one device of ``total_memory`` bytes.  ``device_locks``: GPU uuid ("GPU-...") -> a
        file descriptor shared by every process on that GPU, locked while a kernel runs (a GPU without
        one runs each process's kernels alongside other processes')."""
        self.driver_version = driver_version
        attrs, self.known_attrs = _attributes()
        if gpus is None:
            default = {"uuid": "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, "gpulab-emulated-device-0")),
                       "index": 0, "memory": total_memory, "capability": "9.0"}
            self.devices = [_Device(default, DEVICE_NAME, attrs)]
        else:
            self.devices = [_Device(g, f"{DEVICE_NAME} #{g['index']}", attrs) for g in gpus]
        self.base = (0x200 + secrets.randbelow(0x1000)) << 32  # a different address range for each session
        self.next_addr = self.base
        self.mem: dict[int, bytearray | None] = {}  # None: released, its bytes offloaded by the session
        self.released: dict[int, int] = {}  # released allocation -> its size, its range still known
        self.spare: dict[int, list[bytearray]] = {}  # host memory of released allocations, by size, for remaps
        self.spare_bytes = 0
        self.starts: list[int] = []
        self.host: dict[int, tuple[memoryview, mmap.mmap]] = {}  # id of a host_buffer view -> it, its mmap
        self.home: dict[int, int] = {}  # allocation -> ordinal of the device it is on
        self.primary = {}
        self.current = None
        self.device_locks = dict(device_locks or {})
        self.kernel_seconds = 0.0
        self._pools_init()

    # ---------------------------------------------------------------- helpers
    def _dev(self, dev) -> _Device:
        if not 0 <= dev < len(self.devices):
            raise CudaError(E.INVALID_DEVICE, f"device {dev} does not exist (this vGPU sees {len(self.devices)})")
        return self.devices[dev]

    def _ctx(self):
        if self.current is None:
            raise CudaError(E.INVALID_CONTEXT, "no current context")
        return self.current

    def _size(self, base: int) -> int:
        buf = self.mem[base]
        return len(buf) if buf is not None else self.released[base]

    def view(self, ptr: int, n: int, illegal: bool = False) -> memoryview:
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i >= 0:
            base = self.starts[i]
            buf = self.mem[base]
            if buf is None and ptr < base + self.released[base]:
                raise Refusal(E.ILLEGAL_ADDRESS, f"it accessed {n} bytes at {ptr:#x} of the allocation at {base:#x}, "
                                                 "but its memory is offloaded (not on the device until restored)")
            if buf is not None and ptr + n <= base + len(buf):
                return memoryview(buf)[ptr - base:ptr - base + n]
        if illegal:  # a kernel's access: the worker tells the person, as a GPU's fault would not
            raise Refusal(E.ILLEGAL_ADDRESS, f"it accessed {n} bytes at {ptr:#x}, which is not in this vGPU's "
                                             "allocations")
        raise CudaError(E.INVALID_VALUE, f"{ptr:#x}+{n} is not device memory")

    def set_current(self, ctx):
        self.current = ctx

    def kernel_time(self) -> float:
        """Seconds of simulated device time of this backend's kernels, all complete."""
        return self.kernel_seconds

    def run_on_device(self, seconds: float) -> None:
        """Occupy the current context's GPU for ``seconds``, one kernel at a time across processes."""
        if seconds <= 0:
            return
        fd = self.device_locks.get(self.devices[self._ctx().device].gpu_uuid)
        if fd is None:
            time.sleep(seconds)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # a record lock: one holder per process, blocks the others
            try:
                time.sleep(seconds)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        self.kernel_seconds += seconds

    def close(self):
        self.mem.clear()
        self.released.clear()
        self.spare.clear()
        self.spare_bytes = 0
        self.starts.clear()
        self.home.clear()
        self._pools_init()
        for view, _m in list(self.host.values()):
            self.host_free(view)
        for device in self.devices:
            device.used = 0

    # ------------------------------------------------------------ device queries
    def cuInit(self, flags):
        if flags != 0:
            raise CudaError(E.INVALID_VALUE, "cuInit flags must be 0")

    def cuDriverGetVersion(self):
        return (self.driver_version,)

    def cuDeviceGet(self, ordinal):
        self._dev(ordinal)
        return (ordinal,)  # a device handle is its ordinal, as on the real driver

    def cuDeviceGetCount(self):
        return (len(self.devices),)

    def cuDeviceGetName(self, length, dev):
        return (self._dev(dev).name.encode(),)

    def cuDeviceGetUuid(self, dev):
        return (self._dev(dev).uuid,)

    def cuDeviceTotalMem(self, dev):
        return (self._dev(dev).memory,)

    def cuDeviceGetAttribute(self, attrib, dev):
        device = self._dev(dev)
        if attrib not in self.known_attrs:
            raise CudaError(E.INVALID_VALUE, f"unknown device attribute {attrib}")
        return (device.attrs.get(attrib, 0),)

    def cuDeviceComputeCapability(self, dev):
        return self._dev(dev).capability

    def cuDeviceGetPCIBusId(self, length, dev):
        return (self._dev(dev).pci_bus_id.encode(),)

    def cuDeviceCanAccessPeer(self, dev, peer):
        # no peer access: the worker serves none of the calls that would enable or use it
        self._dev(dev)
        self._dev(peer)
        return (0,)

    # ---------------------------------------------------------------- contexts
    def cuDevicePrimaryCtxRetain(self, dev):
        self._dev(dev)
        ctx = self.primary.setdefault(dev, _Obj("ctx", device=dev, flags=0, active=False, refs=0, limits={}))
        ctx.active = True
        ctx.refs += 1
        return (ctx,)

    def cuDevicePrimaryCtxRelease(self, dev):
        self._dev(dev)
        ctx = self.primary.get(dev)
        if ctx is None or ctx.refs == 0:
            raise CudaError(E.INVALID_CONTEXT, "primary context not retained")
        ctx.refs -= 1
        ctx.active = ctx.refs > 0

    def cuDevicePrimaryCtxReset(self, dev):
        self._dev(dev)

    def cuDevicePrimaryCtxGetState(self, dev):
        self._dev(dev)
        ctx = self.primary.get(dev)
        return (ctx.flags, int(ctx.active)) if ctx else (0, 0)

    def cuDevicePrimaryCtxSetFlags(self, dev, flags):
        self._dev(dev)
        self.primary.setdefault(dev, _Obj("ctx", device=dev, flags=0, active=False, refs=0, limits={})).flags = flags

    def cuCtxCreate(self, flags, dev):
        self._dev(dev)
        return (_Obj("ctx", device=dev, flags=flags, active=True, refs=1, limits={}),)

    def cuCtxDestroy(self, ctx):
        if ctx is None:
            raise CudaError(E.INVALID_CONTEXT)
        if self.current is ctx:
            self.current = None

    def cuCtxGetDevice(self):
        return (self._ctx().device,)

    def cuCtxGetDevice_v2(self, ctx):
        return ((ctx or self._ctx()).device,)

    # synchronizing points: memory pools give back what they hold above their release threshold
    def cuCtxSynchronize(self):
        self._ctx()
        self._release_pools()

    def cuCtxSynchronize_v2(self, ctx):
        ctx or self._ctx()
        self._release_pools()

    def cuCtxGetApiVersion(self, ctx):
        ctx or self._ctx()
        return (3020,)

    def cuCtxGetFlags(self):
        return (self._ctx().flags,)

    def cuCtxGetId(self, ctx):
        return (id(ctx or self._ctx()) & 0xFFFFFFFF,)

    def cuCtxGetLimit(self, limit):
        return (self._ctx().limits.get(limit, 1024),)

    def cuCtxSetLimit(self, limit, value):
        self._ctx().limits[limit] = value

    def cuCtxGetStreamPriorityRange(self):
        return (0, -5)

    def cuCtxGetCacheConfig(self):
        self._ctx()
        return (0,)

    def cuCtxSetCacheConfig(self, config):
        self._ctx()

    # ------------------------------------------------------------------ memory
    def mem_alloc(self, n: int) -> int:
        ordinal = self._ctx().device  # memory is allocated on the current context's device, as on a GPU
        device = self.devices[ordinal]
        if device.used + n > device.memory:
            raise CudaError(E.OUT_OF_MEMORY, "emulated device memory exhausted")
        device.used += n
        return self._place(n, ordinal)

    def _place(self, n: int, ordinal: int) -> int:
        """``n`` zeroed bytes at a new device address of device ``ordinal`` (its memory counted by the caller)."""
        ptr = self.next_addr
        self.next_addr += -(-n // 512) * 512 + 512  # a gap keeps off-by-one overruns outside any allocation
        self.mem[ptr] = bytearray(n)
        bisect.insort(self.starts, ptr)
        self.home[ptr] = ordinal
        return ptr

    def _unplace(self, ptr: int) -> tuple[bytearray | None, int]:
        """The address goes: its bytes (None: released) and device ordinal."""
        buf = self.mem.pop(ptr)
        self.starts.remove(ptr)
        return buf, self.home.pop(ptr)

    def mem_free(self, ptr: int) -> None:
        buf, ordinal = self._unplace(ptr)
        if buf is None:  # released: its device bytes were given back then
            del self.released[ptr]
        else:
            self.devices[ordinal].used -= len(buf)

    # --------------------------------------------------------- VRAM tiering
    def physical_size(self, n: int) -> int:
        return -(-n // 256) * 256

    def current_device(self) -> int:
        return self._ctx().device

    def synchronize_all(self) -> None:
        """Nothing is ever queued: every call here completes before it returns."""

    def mem_release(self, ptr: int) -> None:
        buf = self.mem[ptr]
        if buf is None:
            raise CudaError(E.INVALID_VALUE, f"the allocation at {ptr:#x} is already released")
        self.released[ptr] = len(buf)
        self.mem[ptr] = None
        self.devices[self.home[ptr]].used -= len(buf)
        # the released host memory is kept for the next remap of that size, as a GPU keeps its physical
        # memory: new host memory costs the kernel a fault and a zero-fill per page (several times a copy)
        if self.spare_bytes + len(buf) <= SPARE_MAX:
            self.spare.setdefault(len(buf), []).append(buf)
            self.spare_bytes += len(buf)

    def mem_remap(self, ptr: int) -> None:
        if self.mem[ptr] is not None:
            raise CudaError(E.INVALID_VALUE, f"the allocation at {ptr:#x} is not released")
        size = self.released[ptr]
        device = self.devices[self.home[ptr]]
        if device.used + size > device.memory:
            raise CudaError(E.OUT_OF_MEMORY, "emulated device memory exhausted")
        del self.released[ptr]
        kept = self.spare.get(size)
        if kept:  # memory released earlier: its old bytes are overwritten by the copy back, as on a GPU
            self.mem[ptr] = kept.pop()
            self.spare_bytes -= size
        else:
            self.mem[ptr] = bytearray(size)  # new memory: the session copies the bytes back
        device.used += size

    def copy_out(self, ptr: int, n: int, dst: memoryview) -> None:
        dst[:n] = self.view(ptr, n)

    def copy_in(self, ptr: int, n: int, src: memoryview) -> None:
        self.view(ptr, n)[:] = src[:n]

    def host_buffer(self, n: int) -> memoryview:
        if n == 0:
            return memoryview(bytearray())
        m = mmap.mmap(-1, n)
        view = memoryview(m)
        self.host[id(view)] = (view, m)
        return view

    def host_view(self, ptr: int, n: int) -> memoryview:
        return self.view(ptr, n)

    def host_free(self, view: memoryview) -> None:
        entry = self.host.pop(id(view), None)
        if entry is None:  # empty, or already freed by close()
            return
        view, m = entry
        try:
            view.release()  # unusable from now on
            m.close()
        except BufferError:  # a view of it still lives: the mapping goes with its last reference
            pass

    def cuMemGetInfo(self):
        device = self.devices[self._ctx().device]
        return (device.memory - device.used, device.memory)

    def write_target(self, ptr, n, stream):
        self._refuse_in_capture(stream, _HOST_COPY)
        return self.view(ptr, n), _no_commit

    def read_source(self, ptr, n, stream):
        self._refuse_in_capture(stream, _HOST_COPY)
        return self.view(ptr, n)

    def cuMemcpyDtoD(self, dst, src, n):
        self.view(dst, n)[:] = self.view(src, n)

    def cuMemcpyDtoDAsync(self, dst, src, n, stream):
        if self._captured(stream, lambda s: self.cuMemcpyDtoDAsync(dst, src, n, s)):
            return
        self.cuMemcpyDtoD(dst, src, n)

    def _fill(self, dst, value, count, width):
        v = self.view(dst, count * width)
        v[:] = struct.pack("<" + "BHxI"[width - 1], value & ((1 << (8 * width)) - 1)) * count

    def cuMemsetD8(self, dst, v, n):
        self._fill(dst, v, n, 1)

    def cuMemsetD16(self, dst, v, n):
        self._fill(dst, v, n, 2)

    def cuMemsetD32(self, dst, v, n):
        self._fill(dst, v, n, 4)

    def cuMemsetD8Async(self, dst, v, n, stream):
        if self._captured(stream, lambda s: self.cuMemsetD8Async(dst, v, n, s)):
            return
        self._fill(dst, v, n, 1)

    def cuMemsetD16Async(self, dst, v, n, stream):
        if self._captured(stream, lambda s: self.cuMemsetD16Async(dst, v, n, s)):
            return
        self._fill(dst, v, n, 2)

    def cuMemsetD32Async(self, dst, v, n, stream):
        if self._captured(stream, lambda s: self.cuMemsetD32Async(dst, v, n, s)):
            return
        self._fill(dst, v, n, 4)

    def cuPointerGetAttribute(self, attribute, ptr):
        from cuda.bindings import driver

        A = driver.CUpointer_attribute
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i < 0 or ptr >= self.starts[i] + self._size(self.starts[i]):
            raise CudaError(E.INVALID_VALUE, f"{ptr:#x} is not device memory")
        base = self.starts[i]
        values = {
            int(A.CU_POINTER_ATTRIBUTE_MEMORY_TYPE): struct.pack("<I", 2),  # CU_MEMORYTYPE_DEVICE
            int(A.CU_POINTER_ATTRIBUTE_DEVICE_POINTER): struct.pack("<Q", ptr),
            int(A.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL): struct.pack("<i", self.home[base]),
            int(A.CU_POINTER_ATTRIBUTE_IS_MANAGED): struct.pack("<I", 0),
            int(A.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR): struct.pack("<Q", base),
            int(A.CU_POINTER_ATTRIBUTE_RANGE_SIZE): struct.pack("<Q", self._size(base)),
            int(A.CU_POINTER_ATTRIBUTE_BUFFER_ID): struct.pack("<Q", base),
            int(A.CU_POINTER_ATTRIBUTE_MAPPED): struct.pack("<I", 1),
        }
        if attribute not in values:
            raise CudaError(E.NOT_SUPPORTED, f"pointer attribute {attribute} is not emulated")
        return (values[attribute],)

    # --------------------------------------------------------- modules/kernels
    def _load(self, image):
        self._ctx()
        data = bytes(image)
        if not looks_like_ptx(data):
            kind = {b"\x7fELF": "cubin", b"\x50\xed\x55\xba": "fatbin"}.get(data[:4], "unknown image")
            raise Refusal(E.NOT_SUPPORTED, f"the emulated device (a test double, no GPU) loads PTX only (got a "
                                           f"{len(data)}-byte {kind})")
        text = data.decode("utf-8", "replace")
        try:
            entries = parse_entries(text)
        except ValueError as exc:
            raise CudaError(E.INVALID_PTX, str(exc)) from None
        return _Obj("module", entries=entries, functions={}, globals=parse_globals(text), global_ptrs={})

    def cuModuleLoadData(self, image):
        return (self._load(image),)

    def cuModuleLoadDataEx(self, image):
        return (self._load(image),)

    def cuModuleLoadFatBinary(self, image):
        return (self._load(image),)

    def cuModuleUnload(self, mod):
        mod.entries = {}
        for ptr in mod.global_ptrs.values():  # a module's globals go with it, as on a GPU
            self.mem_free(ptr)
        mod.global_ptrs = {}

    cuLibraryUnload = cuModuleUnload  # a library is loaded as a module here

    def _function(self, mod, name):
        if name not in mod.entries:
            raise CudaError(E.NOT_FOUND, f"no kernel named {name!r} in the module")
        fn = mod.functions.get(name)
        if fn is None:
            fn = mod.functions[name] = _Obj("function", name=name, params=mod.entries[name], module=mod, attrs={})
        return fn

    def cuModuleGetFunction(self, mod, name):
        return (self._function(mod, name),)

    def cuModuleGetGlobal(self, mod, name):
        """A module-scope ``.global`` variable: zero-filled device memory, made on first request
        (initializers in the PTX are not emulated)."""
        size = mod.globals.get(name)
        if size is None:
            raise CudaError(E.NOT_FOUND, f"no global named {name!r} in the module")
        ptr = mod.global_ptrs.get(name)
        if ptr is None:
            ptr = mod.global_ptrs[name] = self.mem_alloc(size)
        return (ptr, size)

    def cuModuleGetLoadingMode(self):
        return (1,)  # CU_MODULE_EAGER_LOADING

    def cuLibraryLoadData(self, code):
        return (self._load(code),)

    def cuLibraryGetKernel(self, lib, name):
        return (self._function(lib, name),)

    def cuLibraryGetModule(self, lib):
        return (lib,)

    def cuKernelGetFunction(self, kernel):
        return (kernel,)

    def kernel_function(self, kernel):
        return kernel

    def function_module(self, func):
        return func.module

    def stream_context(self, stream):
        return stream.ctx if stream is not None else self._ctx()

    def _func_attr(self, attrib, func):
        from cuda.bindings import driver

        A = driver.CUfunction_attribute
        table = {int(A.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK): 1024, int(A.CU_FUNC_ATTRIBUTE_NUM_REGS): 32,
                 int(A.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES): 0, int(A.CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES): 0,
                 int(A.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES): 0, int(A.CU_FUNC_ATTRIBUTE_PTX_VERSION): 90,
                 int(A.CU_FUNC_ATTRIBUTE_BINARY_VERSION): 90,
                 int(A.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES): 49152}
        if attrib in func.attrs:
            return func.attrs[attrib]
        if attrib not in table:
            raise CudaError(E.INVALID_VALUE, f"function attribute {attrib} is not emulated")
        return table[attrib]

    def cuFuncGetAttribute(self, attrib, func):
        return (self._func_attr(attrib, func),)

    def cuKernelGetAttribute(self, attrib, kernel, dev):
        self._dev(dev)
        return (self._func_attr(attrib, kernel),)

    def cuFuncSetAttribute(self, func, attrib, value):
        func.attrs[attrib] = value

    def cuKernelSetAttribute(self, attrib, value, kernel, dev):
        self._dev(dev)
        kernel.attrs[attrib] = value

    def cuFuncSetCacheConfig(self, func, config):
        pass

    def param_layout(self, func):
        return [(p.offset, p.size) for p in func.params]

    def cuFuncGetParamInfo(self, func, index):
        if index >= len(func.params):
            raise CudaError(E.INVALID_VALUE, f"{func.name} has {len(func.params)} parameters")
        p = func.params[index]
        return (p.offset, p.size)

    def cuKernelGetParamInfo(self, kernel, index):
        return self.cuFuncGetParamInfo(kernel, index)

    def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, func, block_size, smem):
        if block_size <= 0 or block_size > 1024:
            raise CudaError(E.INVALID_VALUE, "block size out of range")
        return (max(1, min(32, 2048 // block_size)),)

    def cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(self, func, block_size, smem, flags):
        return self.cuOccupancyMaxActiveBlocksPerMultiprocessor(func, block_size, smem)

    def cuOccupancyMaxPotentialBlockSize(self, func, smem, limit):
        block = min(1024, limit) if limit > 0 else 1024
        return (132 * (2048 // block), block)

    def cuOccupancyAvailableDynamicSMemPerBlock(self, func, num_blocks, block_size):
        return (max(0, 233472 // max(num_blocks, 1) - 1024),)

    def launch(self, func, grid, block, shmem, stream, params, attrs, nattrs):
        self._ctx()
        if min(grid) == 0 or min(block) == 0 or block[0] * block[1] * block[2] > 1024:
            raise CudaError(E.INVALID_VALUE, f"launch shape grid={grid} block={block}")
        impl = REGISTRY.get(func.name)
        if impl is None:
            raise Refusal(E.NOT_SUPPORTED, f"the emulated device (a test double, no GPU) runs only kernels with a "
                                           f"registered host implementation, and {func.name!r} has none",
                          call=f"launch of kernel {func.name!r}")
        layout = func.params
        if layout and len(params) < layout[-1].offset + layout[-1].size:
            raise CudaError(E.INVALID_VALUE, "kernel parameter buffer shorter than the signature")
        args = [p.decode(params[p.offset:p.offset + p.size]) for p in layout]
        if stream is not None and self._capturing(stream):  # recorded into the graph, run when it is launched
            self._captured(stream, functools.partial(_replay_launch, self, func, grid, block, shmem, bytes(params),
                                                     attrs, nattrs))
            return
        launch = Launch(self, grid, block, shmem, args)
        try:
            impl(launch, *args)
        except Refusal as exc:
            raise Refusal(exc.code, f"kernel {func.name!r} faulted: {exc.why}", call="") from None
        if func.name in DURATIONS:  # most test kernels take no simulated time: no call on their path
            self.run_on_device(launch.duration(func.name))

    # ---------------------------------------------------------- streams/events
    def cuStreamCreate(self, flags):
        return (_Obj("stream", ctx=self._ctx(), flags=flags, priority=0),)

    def cuStreamCreateWithPriority(self, flags, priority):
        return (_Obj("stream", ctx=self._ctx(), flags=flags, priority=max(-5, min(0, priority))),)

    def cuStreamDestroy(self, stream):
        if stream is None:
            raise CudaError(E.INVALID_HANDLE, "cannot destroy the default stream")

    def cuStreamSynchronize(self, stream):
        self._refuse_in_capture(stream)
        self._ctx()
        self._release_pools()

    def cuStreamQuery(self, stream):
        self._refuse_in_capture(stream)
        self._ctx()

    def cuStreamWaitEvent(self, stream, event, flags):
        self._join_capture(stream, event)
        pass

    def cuStreamGetPriority(self, stream):
        return (stream.priority if stream else 0,)

    def cuStreamGetFlags(self, stream):
        return (stream.flags if stream else 0,)

    def cuStreamGetId(self, stream):
        return (id(stream) & 0xFFFFFFFF if stream else 0,)

    def cuEventCreate(self, flags):
        self._ctx()
        return (_Obj("event", flags=flags, t=None),)

    def cuEventDestroy(self, event):
        pass

    def cuEventRecord(self, event, stream):
        if self._capture_event_record(event, stream):
            return
        event.t = time.perf_counter()

    def cuEventRecordWithFlags(self, event, stream, flags):
        self.cuEventRecord(event, stream)

    def cuEventSynchronize(self, event):
        self._release_pools()

    def cuEventQuery(self, event):
        pass

    def cuEventElapsedTime(self, start, end):
        if start.flags & 2 or end.flags & 2:  # CU_EVENT_DISABLE_TIMING
            raise CudaError(E.INVALID_HANDLE, "event created with CU_EVENT_DISABLE_TIMING")
        if start.t is None or end.t is None:
            raise CudaError(E.INVALID_HANDLE, "event not recorded")
        return ((end.t - start.t) * 1000.0,)


_HOST_COPY = "a copy between host and device memory cannot be captured on a gpulab vGPU (the host memory is " \
             "in the client, the graph on the worker)"


def _replay_launch(backend, func, grid, block, shmem, params, attrs, nattrs, stream):
    """A captured launch, run when its graph is launched on ``stream``."""
    backend.launch(func, grid, block, shmem, stream, memoryview(params), attrs, nattrs)


def _no_commit(synchronous):
    """Bytes already landed in emulated device memory."""


if TYPE_CHECKING:
    _conforms: type[Backend] = EmulatedBackend  # a type checker holds the class to the protocol
