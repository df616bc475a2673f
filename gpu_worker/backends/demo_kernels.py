"""Host implementation of the demo's kernel, for a demo worker on the emulated backend."""
import numpy as np

from .emulated_kernels import kernel


@kernel("saxpy")
def saxpy(launch, a, x, y, out, n):
    xs, ys, zs = (launch.array(p, np.float32, n) for p in (x, y, out))
    zs[:] = np.float32(a) * xs + ys
