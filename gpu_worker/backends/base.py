"""The one interface every device backend implements: what the session and the daemon call on it.

Two parts, each owned by one place.  Declared here: the hypervisor's own hooks (memory, bulk data
paths, VRAM tiering, launches, handle look-ups) and the driver functions the session wraps (quota, hidden
attributes, fixed primary-context ids).  Not repeated here: the rest of the forwarded driver API,
which the generated dispatch reaches by name (``Session.impl``); gpu_worker/api/table.py lists it.
tests/test_backend_protocol.py holds both backends to both parts.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

# Backend objects (contexts, streams, functions, kernels, modules) are opaque to the session:
# it maps client ids to them and hands them back.
Handle = Any


class Backend(Protocol):
    name: str
    """Told to the client in the handshake and written in the worker's log ("cuda", "emulated")."""

    def close(self) -> None:
        """The session ended: release what the backend holds besides allocations (freed before)."""

    def set_current(self, ctx: Handle | None) -> None:
        """Make a context current for the calls that follow (None: no context)."""

    # ----------------------------------------------------------- handle look-ups
    def kernel_function(self, kernel: Handle) -> Handle:
        """The function of a library kernel, for a kernel id used where a function is expected."""

    def function_module(self, func: Handle) -> Handle:
        """The module a function came from (cuFuncGetModule answers with the client's id of it)."""

    def stream_context(self, stream: Handle | None) -> Handle:
        """The context of a stream (cuStreamGetCtx answers with the client's id of it)."""

    # -------------------------------------------------------------------- memory
    def mem_alloc(self, n: int) -> int:
        """Device memory of ``n`` bytes; the session has already charged it to the quota."""

    def mem_free(self, ptr: int) -> None:
        """Free an allocation made by mem_alloc."""

    def write_target(self, ptr: int, n: int, stream: Handle | None) -> tuple[memoryview, Callable[[bool], None]]:
        """A buffer the socket reads ``n`` bytes into, and ``commit(synchronous)`` that lands them at ``ptr``."""

    def read_source(self, ptr: int, n: int, stream: Handle | None) -> memoryview:
        """``n`` bytes from ``ptr``, complete when returned (the reply is sent from this view)."""

    # -------------------------------------------------------------- memory pools
    # Stream-ordered allocations come from a pool; the session charges the vGPU what the pool holds reserved
    # (gpu_worker/daemon/pools.py), asking the backend for that figure after each call that may change it.
    def pool_alloc(self, pool: Handle, n: int, stream: Handle | None) -> int:
        """``n`` bytes from ``pool`` (cuMemAllocFromPoolAsync); the session has charged the reserve's growth."""

    def pool_free(self, ptr: int, stream: Handle | None) -> None:
        """Give an allocation made by pool_alloc back to its pool (cuMemFreeAsync)."""

    def pool_reserved(self, pool: Handle) -> int:
        """Bytes ``pool`` holds reserved on its device (CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)."""

    # -------------------------------------------------------------- VRAM tiering
    # An owned allocation can leave the GPU and come back at the same address: the session copies it
    # out, releases its physical memory, and later remaps and copies it back (docs/vgpu.md).
    def physical_size(self, n: int) -> int:
        """Device bytes an allocation of ``n`` takes on the current device: what the GPU's capacity is
        charged (cuda: rounded up to the virtual memory granularity; emulated: to 256)."""

    def current_device(self) -> int:
        """Ordinal of the current context's device: which of the vGPU's GPUs an allocation lands on."""

    def synchronize_all(self) -> None:
        """Wait for all queued work of every context this process made: nothing may still read or
        write an allocation being copied out."""

    def mem_release(self, ptr: int) -> None:
        """Give back the physical memory of the allocation at ``ptr``, keeping its address range
        reserved so that no other allocation takes it; touching it until mem_remap is a fault."""

    def mem_remap(self, ptr: int) -> None:
        """New physical memory at the released allocation's own address, with the same access, so
        that the program's pointers stay valid.  CudaError(OUT_OF_MEMORY) when the device is full,
        with nothing changed."""

    def copy_out(self, ptr: int, n: int, dst: memoryview) -> None:
        """Copy ``n`` bytes from device memory at ``ptr`` into ``dst``, complete when returned."""

    def copy_in(self, ptr: int, n: int, src: memoryview) -> None:
        """Copy ``n`` bytes of ``src`` to device memory at ``ptr``, complete when returned."""

    def host_buffer(self, n: int) -> memoryview:
        """Host memory of ``n`` bytes for the warm tier, the fastest the backend can copy to and from
        (cuda: page-locked)."""

    def host_free(self, view: memoryview) -> None:
        """Free a buffer from host_buffer; ``view`` is unusable after (one close() freed is ignored)."""

    def host_view(self, ptr: int, n: int) -> memoryview | None:
        """The allocation's bytes as host memory, where the device's memory is the host's (the emulated
        device), so that a cold move reads and writes files there without a staging copy; None on a GPU."""

    # ------------------------------------------------------------------ launches
    def param_layout(self, func: Handle) -> list[tuple[int, int]]:
        """(offset, size) of each kernel parameter in the buffer the client packs."""

    def launch(self, func: Handle, grid: tuple[int, int, int], block: tuple[int, int, int], shmem: int,
               stream: Handle | None, params: memoryview, attrs: bytes, nattrs: int) -> None:
        """Launch with the parameter buffer as laid out by param_layout."""

    def graph_launch(self, graph_exec: Handle, stream: Handle | None) -> None:
        """Launch an instantiated graph (cuGraphLaunch) on a stream: the session's one way to run a graph."""

    def kernel_time(self) -> float:
        """Cumulative seconds the device spent running this backend's kernels that have completed, never
        blocking: what pacing charges to the vGPU.  Cuda: events recorded around each launch, polled with
        cuEventQuery (kernels still running count later); emulated: the kernels' simulated durations."""

    # ---------------------------------------- driver functions the session wraps
    def cuMemGetInfo(self) -> tuple[int, int]:
        """(free, total) of the device, for a session without a quota."""

    def cuDeviceTotalMem(self, dev: int) -> tuple[int]:
        ...

    def cuDeviceGetAttribute(self, attrib: int, dev: int) -> tuple[int]:
        ...

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple[Handle]:
        ...

    def cuDeviceGetDefaultMemPool(self, dev: int) -> tuple[Handle]:
        ...

    def cuDeviceGetMemPool(self, dev: int) -> tuple[Handle]:
        ...

    def cuMemPoolCreate(self, props: memoryview) -> tuple[Handle]:
        """A pool from a CUmemPoolProps as the program laid it out (gpu_worker.api.protocol.MEMPOOL_PROPS)."""

    def cuMemPoolDestroy(self, pool: Handle) -> None:
        ...

    def cuMemPoolTrimTo(self, pool: Handle, keep: int) -> None:
        ...

    def cuModuleGetGlobal(self, hmod: Handle, name: str) -> tuple[int, int]:
        """(device pointer, size) of a module global; the session admits that range to copies."""
