"""Host implementations of kernels for the emulated backend (a test double).

The emulated device runs a launch only if a Python function is registered for the PTX
entry name; the worker imports modules named by ``--emulated-kernels`` to fill the
registry.  A kernel receives a :class:`Launch` and its parameters decoded from the PTX
``.entry`` signature (integers, floats, or bytes for ``.b8`` arrays)::

    from gpu_worker.backends.emulated_kernels import kernel

    @kernel("vec_add")
    def vec_add(launch, a, b, out, n):
        x, y, z = (launch.array(p, "float32", n) for p in (a, b, out))
        z[:] = x + y
"""
from __future__ import annotations

from typing import Callable

REGISTRY: dict[str, Callable] = {}


def kernel(name: str):
    """Register ``fn`` as the host implementation of the PTX entry ``name``."""

    def register(fn):
        REGISTRY[name] = fn
        return fn

    return register


class Launch:
    """What a host kernel sees: the launch shape and bounds-checked device memory."""

    def __init__(self, device, grid, block, shared_mem):
        self._device = device
        self.grid = grid
        self.block = block
        self.shared_mem = shared_mem

    @property
    def threads(self) -> int:
        g, b = self.grid, self.block
        return g[0] * g[1] * g[2] * b[0] * b[1] * b[2]

    def array(self, ptr: int, dtype, count: int):
        """A writable numpy view of ``count`` elements at device address ``ptr``.

        An address outside the session's memory raises the emulated equivalent of an
        illegal memory access (CUDA_ERROR_ILLEGAL_ADDRESS, sticky as on a GPU).
        """
        import numpy as np

        dt = np.dtype(dtype)
        view = self._device.view(ptr, dt.itemsize * count, illegal=True)
        return np.frombuffer(view, dtype=dt, count=count)


@kernel("gpulab_noop")
def _noop(launch, *args):
    """An empty kernel, for benchmarks of the launch path."""
