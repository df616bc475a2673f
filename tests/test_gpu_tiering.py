"""VRAM tiering on a REAL GPU (backend cuda): live numba-cuda and cuda.core programs compute, have their
memory moved to disk (cold) by the worker while they wait, are brought back by their next call, and
compute again with identical results at the same device addresses.

Skipped without a GPU; run `pytest -m gpu tests/test_gpu_tiering.py` on a GPU machine."""
from __future__ import annotations

import pytest

from workertools import LineProgram

pytestmark = pytest.mark.gpu

# Each program keeps its device arrays between commands: `run` computes on them and answers a digest of
# the result and the arrays' device addresses.
NUMBA = """
import hashlib, json, sys
import numpy as np
from numba import cuda

@cuda.jit
def step(x, y, k):
    i = cuda.grid(1)
    if i < x.size:
        y[i] = x[i] * k + y[i]

rng = np.random.default_rng(5)
x = cuda.to_device(rng.random(1 << 22, dtype=np.float32))
y = cuda.to_device(rng.random(1 << 22, dtype=np.float32))
print(json.dumps({"up": True}), flush=True)
for line in sys.stdin:
    step[(x.size + 255) // 256, 256](x, y, np.float32(0.5))
    out = y.copy_to_host()
    print(json.dumps({"digest": hashlib.sha256(out.tobytes()).hexdigest(),
                      "ptrs": [x.device_ctypes_pointer.value, y.device_ctypes_pointer.value]}), flush=True)
"""

CUDA_CORE = """
import ctypes, hashlib, json, sys
import numpy as np
from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch, LegacyPinnedMemoryResource
dev = Device(); dev.set_current()
src = 'extern "C" __global__ void twice_plus(float *x, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] = 2 * x[i] + 1; }'
kernel = Program(src, code_type="c++", options=ProgramOptions(arch=f"sm_{dev.arch}")).compile("cubin").get_kernel("twice_plus")
s = dev.create_stream()
n = 1 << 20
buf = dev.allocate(n * 4, stream=s)
host = LegacyPinnedMemoryResource().allocate(n * 4)
view = np.frombuffer((ctypes.c_char * (n * 4)).from_address(int(host.handle)), np.float32)
view[:] = np.linspace(0, 1, n, dtype=np.float32)
buf.copy_from(host, stream=s)
s.sync()
print(json.dumps({"up": True}), flush=True)
for line in sys.stdin:
    launch(s, LaunchConfig(grid=n // 256, block=256), kernel, buf, np.int32(n))
    buf.copy_to(host, stream=s)
    s.sync()
    print(json.dumps({"digest": hashlib.sha256(view.tobytes()).hexdigest(), "ptrs": [int(buf.handle)]}), flush=True)
"""


class Program(LineProgram):
    def __init__(self, w, code: str, env_extra=None):
        super().__init__(w, code, env_extra=env_extra)
        assert self.first == {"up": True}

    def run(self) -> dict:
        return self("run")


@pytest.fixture
def cuda_worker(make_worker):
    return make_worker(backend="cuda", extra=("--vram-quota", "2G"))


def offloaded_cold_then_restored(w, prog: Program, reference: Program | None = None) -> None:
    """One step on the GPU, the vGPU moved cold, the next step restores it: the results match a step of
    the same program that was never moved (``reference``), or the same figures computed twice."""
    first = prog.run()
    (vgpu,) = w.vgpus()
    assert vgpu["tiers"]["hot"] > 0, vgpu
    status, moved = w.api(f"/api/vgpus/{vgpu['id']}/offload", method="POST", body={"to": "cold"})
    assert status == 200 and moved["done"] and moved["tier"] == "cold", moved
    assert moved["tiers"]["hot"] == 0 and moved["tiers"]["cold"] > 0, moved
    second = prog.run()  # its launch touches the memory: restored first
    (after,) = w.vgpus()
    assert after["tier"] == "hot" and after["moves"]["restores"] >= 1 and after["moves"]["failures"] == 0, after
    assert second["ptrs"] == first["ptrs"]  # the program's pointers never changed
    if reference is not None:
        ref_first, ref_second = reference.run(), reference.run()
        assert (first["digest"], second["digest"]) == (ref_first["digest"], ref_second["digest"])
    else:
        assert second["digest"] != first["digest"]  # the step changed the data again (it really ran)


def test_numba_cuda_program_offloaded_cold_and_restored_on_touch(cuda_worker, make_worker):
    pytest.importorskip("numba.cuda")
    env = {"NUMBA_CUDA_USE_NVIDIA_BINDING": "1"}
    reference_worker = make_worker(backend="cuda", extra=("--vram-quota", "2G"))
    prog, ref = Program(cuda_worker, NUMBA, env), Program(reference_worker, NUMBA, env)
    try:
        offloaded_cold_then_restored(cuda_worker, prog, ref)
    finally:
        prog.close()
        ref.close()


def test_cuda_core_program_offloaded_cold_and_restored_on_touch(cuda_worker, make_worker):
    reference_worker = make_worker(backend="cuda", extra=("--vram-quota", "2G"))
    prog, ref = Program(cuda_worker, CUDA_CORE), Program(reference_worker, CUDA_CORE)
    try:
        offloaded_cold_then_restored(cuda_worker, prog, ref)
    finally:
        prog.close()
        ref.close()
