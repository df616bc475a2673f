"""Unmodified CUDA programs through the shim against a worker on a REAL GPU (backend cuda).

Skipped on machines without a GPU; run `pytest -m gpu` on a GPU machine.  Kernels are
compiled to cubin for the device's architecture: a worker whose driver is older than
NVRTC's PTX ISA could not JIT PTX (see docs/validation.md).
"""
from __future__ import annotations

import pytest

from workertools import PRELUDE

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu_worker(make_worker):
    return make_worker(backend="cuda", extra=("--vram-quota", "4G"))


def test_driver_api_vector_add_compiled_with_nvrtc(gpu_worker):
    r = gpu_worker.run(PRELUDE + """
from cuda.bindings import nvrtc
import ctypes
dev, ctx = setup()
A = d.CUdevice_attribute
major = ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
minor = ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
src = b'extern "C" __global__ void vadd(const float *a, const float *b, float *c, int n)' \\
      b'{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) c[i] = a[i] + b[i]; }'
err, prog = nvrtc.nvrtcCreateProgram(src, b"vadd.cu", 0, [], [])
assert nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=sm_{major}{minor}".encode()])[0] == 0
_, size = nvrtc.nvrtcGetCUBINSize(prog)
cubin = b" " * size
nvrtc.nvrtcGetCUBIN(prog, cubin)
mod = ok(d.cuModuleLoadData(cubin))
fn = ok(d.cuModuleGetFunction(mod, b"vadd"))
n = 1 << 20
a = np.random.rand(n).astype(np.float32); b = np.random.rand(n).astype(np.float32)
da, db, dc = (ok(d.cuMemAlloc(n * 4)) for _ in range(3))
ok(d.cuMemcpyHtoD(da, a, n * 4)); ok(d.cuMemcpyHtoD(db, b, n * 4))
stream = ok(d.cuStreamCreate(0))
start, end = ok(d.cuEventCreate(0)), ok(d.cuEventCreate(0))
ok(d.cuEventRecord(start, stream))
ok(d.cuLaunchKernel(fn, n // 256, 1, 1, 256, 1, 1, 0, stream,
                    ((da, db, dc, n), (None, None, None, ctypes.c_int)), 0))
ok(d.cuEventRecord(end, stream))
ok(d.cuStreamSynchronize(stream))
c = np.empty_like(a); ok(d.cuMemcpyDtoH(c, dc, n * 4))
free, total = ok(d.cuMemGetInfo())
done(match=bool(np.allclose(c, a + b)), ms=ok(d.cuEventElapsedTime(start, end)), total=total,
     name=ok(d.cuDeviceGetName(128, dev)).split(b"\\0")[0].decode())
""")
    res = r.result
    assert res["match"], res
    assert res["total"] == 4 << 30  # the quota, not the card
    assert "emulated" not in res["name"]
    assert res["ms"] > 0


def test_numba_cuda_kernel(gpu_worker):
    pytest.importorskip("numba.cuda")
    r = gpu_worker.run("""
import json
import numpy as np
from numba import cuda

@cuda.jit
def scale(x, out, k):
    i = cuda.grid(1)
    if i < x.size:
        out[i] = x[i] * k

x = np.arange(100000, dtype=np.float32)
dx = cuda.to_device(x)
dout = cuda.device_array_like(dx)
scale[(x.size + 255) // 256, 256](dx, dout, np.float32(3))
print(json.dumps({"match": bool(np.allclose(dout.copy_to_host(), x * 3))}))
""", env_extra={"NUMBA_CUDA_USE_NVIDIA_BINDING": "1"})
    assert r.result == {"match": True}


def test_cuda_core_program(gpu_worker):
    r = gpu_worker.run("""
import json, ctypes
import numpy as np
from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch, LegacyPinnedMemoryResource
dev = Device(); dev.set_current()
src = 'extern "C" __global__ void twice(float *x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= 2; }'
kernel = Program(src, code_type="c++", options=ProgramOptions(arch=f"sm_{dev.arch}")).compile("cubin").get_kernel("twice")
s = dev.create_stream()
n = 4096
buf = dev.allocate(n * 4, stream=s)
host = LegacyPinnedMemoryResource().allocate(n * 4)
view = np.frombuffer((ctypes.c_char * (n * 4)).from_address(int(host.handle)), np.float32)
view[:] = np.arange(n)
buf.copy_from(host, stream=s)
launch(s, LaunchConfig(grid=n // 256, block=256), kernel, buf, np.int32(n))
buf.copy_to(host, stream=s)
s.sync()
print(json.dumps({"match": bool(np.allclose(view, np.arange(n) * 2))}))
""")
    assert r.result == {"match": True}
