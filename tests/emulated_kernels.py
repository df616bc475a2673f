"""Host implementations of the test kernels, for workers on the emulated backend."""
import numpy as np

from gpu_worker.backends.emulated_kernels import kernel, register


@kernel("vec_add")
def vec_add(launch, a, b, out, n):
    x, y, z = (launch.array(p, np.float32, n) for p in (a, b, out))
    z[:] = x + y


@kernel("axpy_mixed")
def axpy_mixed(launch, alpha, x, y, n, offset):
    """y[i] = alpha * x[i] + y[i] + offset for i < n: float, pointer, pointer, int, double."""
    xs = launch.array(x, np.float32, n)
    ys = launch.array(y, np.float32, n)
    ys[:] = np.float32(alpha) * xs + ys + np.float32(offset)


@kernel("scale_inplace")
def scale_inplace(launch, data, factor, n):
    d = launch.array(data, np.int32, n)
    d *= factor


@kernel("sleep_ms")
def sleep_ms(launch, ms):
    """A long-running kernel: the worker is busy (and alive) for ``ms`` milliseconds."""
    import time

    time.sleep(ms / 1000)


@register("spin_ms", duration=lambda launch: launch.args[0] / 1000)
def spin_ms(launch, ms):
    """Occupies the emulated GPU for ``ms`` milliseconds of kernel time (the GPU tests' kernel of the same
    name spins that long on the globaltimer)."""


@register("spin_20ms", duration=0.020)
def spin_20ms(launch):
    """Occupies the emulated GPU for 20 ms of kernel time: a kernel of fixed duration."""


@kernel("add_inplace")
def add_inplace(launch, data, value, n):
    """data[i] += value for i < n (int32): a launch whose effect counts how often it ran."""
    d = launch.array(data, np.int32, n)
    d += np.int32(value)
