"""What the person running a program reads when a call fails (the notebook cell is stderr).

Real cuda.bindings / cuda.core programs through the built shim against real emulated workers:
the exact CUresult still reaches the program, the worker's reason is printed once as one
`gpulab: ...` line, GPULAB_QUIET=1 silences it, and a successful program prints nothing at all."""
from __future__ import annotations

import pytest

from workertools import PRELUDE, PTX_FILE

GiB = 1 << 30

# A cuda.core program whose kernel the emulated worker has no host implementation for.
CUDA_CORE_UNREGISTERED = """
import json
import numpy as np
from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch
dev = Device()
dev.set_current()
src = 'extern "C" __global__ void my_kernel(float* out) { out[threadIdx.x] = 1.0f; }'
kernel = Program(src, code_type="c++", options=ProgramOptions(arch=f"compute_{dev.arch}")).compile("ptx") \\
    .get_kernel("my_kernel")
stream = dev.create_stream()
buf = dev.allocate(1024, stream=stream)
launch(stream, LaunchConfig(grid=1, block=32), kernel, buf)
try:
    stream.sync()
    error = None
except Exception as exc:
    error = str(exc)
print(json.dumps({"error": error}))
"""


def lines(stderr: str) -> list[str]:
    return stderr.splitlines()


@pytest.fixture
def quota_worker(make_worker):
    return make_worker(extra=("--vram-quota", "2G"))


def test_quota_refusal_says_the_quota_and_what_is_free(quota_worker):
    r = quota_worker.run(PRELUDE + """
setup()
held = ok(d.cuMemAlloc(100 << 20))
over = name(d.cuMemAlloc(3 << 30))
done(over=over)
""")
    assert r.result == {"over": "CUDA_ERROR_OUT_OF_MEMORY"}
    assert lines(r.stderr) == ["gpulab: cuMemAlloc(3.0 GiB) refused: this vGPU's quota is 2.0 GiB, 1.9 GiB free"]


def test_a_reason_repeated_in_a_loop_is_printed_once(quota_worker):
    r = quota_worker.run(PRELUDE + """
setup()
codes = {name(d.cuMemAlloc(3 << 30)) for _ in range(200)}
other = name(d.cuMemAlloc(5 << 30))  # a different reason is news: printed too
done(codes=sorted(codes), other=other)
""")
    assert r.result == {"codes": ["CUDA_ERROR_OUT_OF_MEMORY"], "other": "CUDA_ERROR_OUT_OF_MEMORY"}
    assert lines(r.stderr) == ["gpulab: cuMemAlloc(3.0 GiB) refused: this vGPU's quota is 2.0 GiB, 2.0 GiB free",
                               "gpulab: cuMemAlloc(5.0 GiB) refused: this vGPU's quota is 2.0 GiB, 2.0 GiB free"]


def test_foreign_pointers_are_named_as_not_this_vgpus(worker):
    r = worker.run(PRELUDE + """
setup()
mine = int(ok(d.cuMemAlloc(4096)))
foreign = mine + (1 << 36)
buf = np.zeros(8192, np.uint8)
read = name(d.cuMemcpyDtoH(buf, foreign, 4096))
overrun = name(d.cuMemcpyHtoD(mine + 4000, buf, 4096))
free = name(d.cuMemFree(foreign))   # pipelined: returns at once ...
sync = name(d.cuCtxSynchronize())  # ... and its error (and reason) come with the next synchronizing call
done(read=read, overrun=overrun, free=free, sync=sync, mine=mine, foreign=foreign)
""")
    res = r.result
    assert [res[k] for k in ("read", "overrun", "free", "sync")] == [
        "CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_INVALID_VALUE", "CUDA_SUCCESS", "CUDA_ERROR_INVALID_VALUE"]
    mine, foreign = res["mine"], res["foreign"]
    assert lines(r.stderr) == [
        f"gpulab: cuMemcpyDtoH refused: device address {foreign:#x} is not in this vGPU's allocations",
        f"gpulab: cuMemcpyHtoD refused: 4.0 KiB at {mine + 4000:#x} run 4000 bytes past the end of its 4.0 KiB "
        f"allocation at {mine:#x}",
        f"gpulab: cuMemFree({foreign:#x}) refused: the address is not in this vGPU's allocations",
    ]


def test_kernel_without_host_implementation_on_the_emulated_device(worker):
    r = worker.run(CUDA_CORE_UNREGISTERED)
    assert "CUDA_ERROR_NOT_SUPPORTED" in r.result["error"]
    assert lines(r.stderr) == [
        "gpulab: launch of kernel 'my_kernel' refused: the emulated device (a test double, no GPU) runs only "
        "kernels with a registered host implementation, and 'my_kernel' has none"]


def test_unsupported_function_is_named_once(worker):
    r = worker.run(PRELUDE + """
setup()
codes = {name(d.cuMemAllocManaged(64, 1)) for _ in range(5)}
done(codes=sorted(codes))
""")
    assert r.result == {"codes": ["CUDA_ERROR_NOT_SUPPORTED"]}
    assert lines(r.stderr) == ["gpulab: cuMemAllocManaged refused: a gpulab vGPU does not support this function "
                               "(CUDA_ERROR_NOT_SUPPORTED)"]


def test_a_kernel_fault_says_where_and_then_how_to_recover(worker):
    r = worker.run(PRELUDE + f"""
import ctypes
setup()
mod = ok(d.cuModuleLoadData(open({str(PTX_FILE)!r}, "rb").read()))
vec = ok(d.cuModuleGetFunction(mod, b"vec_add"))
buf = int(ok(d.cuMemAlloc(1024)))
P = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
launched = name(d.cuLaunchKernel(vec, 1, 1, 1, 32, 1, 1, 0, 0, ((buf, buf, buf, 1024), P), 0))
later = [name(d.cuCtxSynchronize()) for _ in range(3)] + [name(d.cuMemAlloc(16))]
done(launched=launched, later=later, buf=buf)
""")
    assert r.result["launched"] == "CUDA_SUCCESS"
    assert r.result["later"] == ["CUDA_ERROR_ILLEGAL_ADDRESS"] * 4  # sticky, as on a GPU
    assert lines(r.stderr) == [
        f"gpulab: kernel 'vec_add' faulted: it accessed 4096 bytes at {r.result['buf']:#x}, which is not in this "
        "vGPU's allocations",
        "gpulab: the vGPU's context is unusable after CUDA_ERROR_ILLEGAL_ADDRESS (sticky, as on a GPU): every CUDA "
        "call fails until the program restarts (in Jupyter: restart the kernel)"]


def test_gpulab_quiet_prints_nothing(quota_worker):
    r = quota_worker.run(PRELUDE + """
setup()
over = name(d.cuMemAlloc(3 << 30))
foreign = name(d.cuMemsetD8(1 << 44, 0, 16))
managed = name(d.cuMemAllocManaged(64, 1))
done(codes=[over, foreign, managed])
""", env_extra={"GPULAB_QUIET": "1"})
    assert r.result == {"codes": ["CUDA_ERROR_OUT_OF_MEMORY", "CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_SUPPORTED"]}
    assert r.stderr == ""
    r = quota_worker.run(CUDA_CORE_UNREGISTERED, env_extra={"GPULAB_QUIET": "1"})
    assert "CUDA_ERROR_NOT_SUPPORTED" in r.result["error"] and r.stderr == ""


# A successful program printing nothing at all: test_remote_driver.test_cuda_core_program_unmodified.
