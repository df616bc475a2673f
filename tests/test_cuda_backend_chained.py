"""The cuda backend's code, run without a GPU: its libcuda.so.1 is the shim, talking to an
emulated worker upstream.  client -> shim -> worker(cuda backend) -> shim -> worker(emulated).

This exercises everything the cuda backend does with cuda-python (generic forwarding, staging
buffers, kernelParams built from cuFuncGetParamInfo, NUL-terminated PTX, handle mapping); it
does not show anything about a real GPU (tests/test_gpu.py does that, on a GPU machine)."""
from __future__ import annotations


import pytest

from gpu_worker.client import shim_env
from workertools import PRELUDE, PTX_FILE


@pytest.fixture
def chained(make_worker):
    upstream = make_worker(extra=("--vram-quota", "1G"))
    env = shim_env(upstream.unix, upstream.token)
    env["GPULAB_CHAIN_TO_WORKER"] = "1"
    middle = make_worker(token="middle-token", backend="cuda", extra=("--vram-quota", "64M"), env=env)
    return upstream, middle


def test_copies_quota_and_queries_through_the_cuda_backend(chained):
    upstream, middle = chained
    r = middle.run(PRELUDE + """
dev, ctx = setup()
dev_name = ok(d.cuDeviceGetName(128, dev)).split(b"\\0")[0].decode()
total = ok(d.cuDeviceTotalMem(dev))
cc = ok(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
rng = np.random.default_rng(5)
src = rng.integers(0, 256, 5 << 20, dtype=np.uint8)
p = ok(d.cuMemAlloc(src.nbytes)); q = ok(d.cuMemAlloc(src.nbytes))
ok(d.cuMemcpyHtoD(p, src, src.nbytes))
ok(d.cuMemcpyDtoD(q, p, src.nbytes))
s = ok(d.cuStreamCreate(0))
back = np.zeros_like(src)
ok(d.cuMemcpyDtoHAsync(back, q, src.nbytes, s)); ok(d.cuStreamSynchronize(s))
ok(d.cuMemsetD32(p, 7, 16))
small = np.zeros(16, np.uint32); ok(d.cuMemcpyDtoH(small, p, 64))
over = name(d.cuMemAlloc(60 << 20))
e1, e2 = ok(d.cuEventCreate(0)), ok(d.cuEventCreate(0))
ok(d.cuEventRecord(e1, s)); ok(d.cuEventRecord(e2, s)); ok(d.cuEventSynchronize(e2))
ms = ok(d.cuEventElapsedTime(e1, e2))
done(name=dev_name, total=total, cc=cc, same=bool((back == src).all()), memset=bool((small == 7).all()),
     over=over, ms=ms)
""")
    res = r.result
    assert "emulated" in res["name"] and res["cc"] == 9
    assert res["total"] == 64 << 20  # the middle worker's quota, not upstream's
    assert res["same"] and res["memset"] and res["over"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert res["ms"] >= 0


def test_module_and_mixed_parameter_launch_through_the_cuda_backend(chained):
    upstream, middle = chained
    r = middle.run(PRELUDE + f"""
import ctypes
setup()
mod = ok(d.cuModuleLoadData(open({str(PTX_FILE)!r}, "rb").read()))
fn = ok(d.cuModuleGetFunction(mod, b"axpy_mixed"))
n = 777
x = np.arange(n, dtype=np.float32); y = np.ones(n, np.float32)
dx = ok(d.cuMemAlloc(x.nbytes)); dy = ok(d.cuMemAlloc(y.nbytes))
ok(d.cuMemcpyHtoD(dx, x, x.nbytes)); ok(d.cuMemcpyHtoD(dy, y, y.nbytes))
ok(d.cuLaunchKernel(fn, 7, 1, 1, 128, 1, 1, 0, 0,
                    ((3.0, dx, dy, n, 0.5), (ctypes.c_float, None, None, ctypes.c_int, ctypes.c_double)), 0))
ok(d.cuCtxSynchronize())
out = np.zeros(n, np.float32); ok(d.cuMemcpyDtoH(out, dy, out.nbytes))
lib = ok(d.cuLibraryLoadData(open({str(PTX_FILE)!r}, "rb").read(), [], [], 0, [], [], 0))
kern = ok(d.cuLibraryGetKernel(lib, b"vec_add"))
attr = ok(d.cuFuncGetAttribute(d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fn))
done(match=bool(np.allclose(out, 3.0 * x + 1.0 + 0.5)), attr=attr)
""")
    assert r.result == {"match": True, "attr": 1024}


def test_cuda_core_through_the_cuda_backend(chained):
    upstream, middle = chained
    r = middle.run("""
import json, numpy as np
from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch
dev = Device(); dev.set_current()
src = 'extern "C" __global__ void vec_add(const float* a, const float* b, float* o, int n)' \\
      '{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) o[i] = a[i] + b[i]; }'
k = Program(src, code_type="c++", options=ProgramOptions(arch=f"compute_{dev.arch}")).compile("ptx").get_kernel("vec_add")
s = dev.create_stream()
from cuda.bindings import driver as d
n = 1000
a = np.random.rand(n).astype(np.float32); b = np.random.rand(n).astype(np.float32)
bufs = [dev.allocate(a.nbytes, stream=s) for _ in range(3)]
d.cuMemcpyHtoD(int(bufs[0].handle), a, a.nbytes); d.cuMemcpyHtoD(int(bufs[1].handle), b, b.nbytes)
launch(s, LaunchConfig(grid=(n + 255) // 256, block=256), k, *bufs, np.int32(n))
s.sync()
out = np.empty_like(a); d.cuMemcpyDtoH(out, int(bufs[2].handle), out.nbytes)
print(json.dumps({"match": bool(np.allclose(out, a + b))}))
""")
    assert r.result == {"match": True}
