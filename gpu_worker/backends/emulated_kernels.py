"""Host implementations of kernels for the emulated backend (a test double).

The emulated device runs a launch only if a Python function is registered for the PTX
entry name; the worker imports modules named by ``--emulated-kernels`` to fill the
registry.  A kernel receives a :class:`Launch` and its parameters decoded from the PTX
``.entry`` signature (integers, floats, or bytes for ``.b8`` arrays)::

    from gpu_worker.backends.emulated_kernels import register

    @register("vec_add")
    def vec_add(launch, a, b, out, n):
        x, y, z = (launch.array(p, "float32", n) for p in (a, b, out))
        z[:] = x + y

A kernel may also declare a simulated duration, the time it "runs on the device": seconds, or a
function of the :class:`Launch` (its parameters are ``launch.args``).  The emulated backend sleeps
that long holding its GPU's device lock, so kernels of every process on one emulated GPU run one at
a time, as on a real GPU, and counts it as kernel time.  This is how CI tests pacing, compute shares
and their fairness without a GPU::

    @register("spin_ms", duration=lambda launch: launch.args[0] / 1000)
    def spin_ms(launch, ms):
        pass
"""
from __future__ import annotations

from typing import Callable, Union

REGISTRY: dict[str, Callable] = {}
Duration = Union[float, Callable[["Launch"], float]]
DURATIONS: dict[str, Duration] = {}  # entry name -> simulated duration; absent: the kernel takes no device time


def register(name: str, duration: Duration | None = None):
    """A decorator: ``fn`` is the host implementation of the PTX entry ``name``; ``duration`` its
    simulated device time in seconds, or a function of the launch giving it (None: none)."""

    def add(fn):
        REGISTRY[name] = fn
        if duration is None:
            DURATIONS.pop(name, None)
        else:
            DURATIONS[name] = duration
        return fn

    return add


kernel = register  # the name the kernel modules written before durations use


class Launch:
    """What a host kernel sees: the launch shape and bounds-checked device memory."""

    def __init__(self, device, grid, block, shared_mem, args=()):
        self._device = device
        self.grid = grid
        self.block = block
        self.shared_mem = shared_mem
        self.args = args  # the parameters as the kernel receives them, for a duration function

    def duration(self, name: str) -> float:
        """Seconds the kernel ``name`` runs on the device for this launch (0: no simulated duration)."""
        d = DURATIONS.get(name)
        if d is None:
            return 0.0
        return float(d(self) if callable(d) else d)

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


@register("gpulab_noop")
def _noop(launch, *args):
    """An empty kernel, for benchmarks of the launch path."""
