"""The one interface every device backend implements: what the session and the daemon call on it.

Two parts, each owned by one place.  Declared here: the hypervisor's own hooks (memory, bulk data
paths, launches, handle look-ups) and the driver functions the session wraps (quota, hidden
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

    def cuModuleGetGlobal(self, hmod: Handle, name: str) -> tuple[int, int]:
        """(device pointer, size) of a module global; the session admits that range to copies."""
