"""The cuda backend's VRAM tiering hooks on a REAL GPU (`-m gpu`): allocations made with virtual
memory management leave the GPU and come back at the same address with the same bytes.

Without a GPU, the same hooks run against the gpulab shim in place of libcuda (a chained worker,
as tests/test_cuda_backend_chained.py does): its devices offer no virtual memory management, so
allocations are plain and stay on the GPU, but every other call the hooks make reaches cuda-python
with the arguments it takes.  Each script runs in a fresh process, as an executor does.
The emulated backend's hooks are tested in tests/test_backend_protocol.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.api import errors as E
from gpu_worker.client import shim_env

ROOT = Path(__file__).resolve().parent.parent

TIERING = r'''
import ctypes, json, os
from cuda.bindings import driver as d
from gpu_worker.backends.cuda import CudaBackend

b = CudaBackend()
(ctx,) = b.cuDevicePrimaryCtxRetain(0)
b.set_current(ctx)
A = d.CUpointer_attribute
prop = d.CUmemAllocationProp()
prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
prop.location.id = 0
err, granularity = d.cuMemGetAllocationGranularity(
    prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)
assert err == d.CUresult.CUDA_SUCCESS, err


def attribute(name, ptr):
    (raw,) = b.cuPointerGetAttribute(int(getattr(A, "CU_POINTER_ATTRIBUTE_" + name)), ptr)
    return int.from_bytes(raw, "little", signed=True)


def fill(ptr, data):  # the session's own path for a program's cuMemcpyHtoD
    view, commit = b.write_target(ptr, len(data), None)
    view[:] = data
    commit(True)


out = {"granularity": int(granularity), "physical_1000": b.physical_size(1000), "device": b.current_device(),
       "cases": []}
for n in (64 << 20, 1000):
    data = os.urandom(n)
    ptr = b.mem_alloc(n)
    fill(ptr, data)
    host = b.host_buffer(n)
    cptr = ctypes.c_char.from_buffer(host)
    pinned = d.cuMemHostGetFlags(ctypes.addressof(cptr))[0] == d.CUresult.CUDA_SUCCESS
    del cptr
    buffer_id = attribute("BUFFER_ID", ptr)
    b.synchronize_all()
    b.copy_out(ptr, n, host)
    free_hot = b.cuMemGetInfo()[0]
    b.mem_release(ptr)
    free_off = b.cuMemGetInfo()[0]
    offloaded = {name: attribute(name, ptr + n // 2) for name in
                 ("RANGE_START_ADDR", "RANGE_SIZE", "DEVICE_ORDINAL", "MEMORY_TYPE", "MAPPED", "BUFFER_ID")}
    b.mem_remap(ptr)
    half = n // 2  # in two pieces, as the cold tier copies a chunk at a time
    b.copy_in(ptr, half, host[:half])
    b.copy_in(ptr + half, n - half, host[half:])
    back = bytes(b.read_source(ptr, n, None))
    err, base, _size = d.cuMemGetAddressRange(ptr)  # the driver's own view: mapped again where it was
    b.host_free(host)
    out["cases"].append({"size": n, "freed": free_off - free_hot, "physical": b.physical_size(n),
                         "identical": back == data, "pinned": pinned, "mapped_at_ptr": int(base) == ptr,
                         "range_size": attribute("RANGE_SIZE", ptr), "range_start": attribute("RANGE_START_ADDR",
                                                                                               ptr + n - 1) == ptr,
                         "offloaded": {k: (v == ptr if k == "RANGE_START_ADDR" else v) for k, v in offloaded.items()},
                         "same_buffer_id": offloaded["BUFFER_ID"] == buffer_id == attribute("BUFFER_ID", ptr)})
    free_before = b.cuMemGetInfo()[0]
    b.mem_free(ptr)
    out["cases"][-1]["freed_by_free"] = b.cuMemGetInfo()[0] - free_before
b.close()
b.cuDevicePrimaryCtxRelease(0)
print(json.dumps(out))
'''


def run(script: str, env=None) -> dict:
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
def test_cuda_allocations_leave_the_gpu_and_come_back_at_the_same_address():
    r = run(TIERING)
    g = r["granularity"]
    assert r["device"] == 0 and g > 0 and r["physical_1000"] == g
    for case in r["cases"]:
        n = case["size"]
        assert case["physical"] == -(-n // g) * g
        assert case["identical"] and case["mapped_at_ptr"] and case["pinned"], case
        assert case["freed"] >= case["physical"], case  # the physical memory really went back
        assert case["freed_by_free"] >= case["physical"], case
        assert case["range_size"] == n and case["range_start"], case  # as cuMemAlloc answers, not the rounded range
        assert case["offloaded"] == {"RANGE_START_ADDR": True, "RANGE_SIZE": n, "DEVICE_ORDINAL": 0,
                                     "MEMORY_TYPE": 2, "MAPPED": 1, "BUFFER_ID": case["offloaded"]["BUFFER_ID"]}
        assert case["same_buffer_id"], case


CHAINED = r'''
import json, os
from cuda.bindings import driver as d
from gpu_worker.api.errors import CudaError
from gpu_worker.backends.cuda import CudaBackend

b = CudaBackend()
(ctx,) = b.cuDevicePrimaryCtxRetain(0)
b.set_current(ctx)
out = {"device": b.current_device(), "physical": b.physical_size(1000)}
data = os.urandom(1000)
ptr = b.mem_alloc(1000)
view, commit = b.write_target(ptr, 1000, None)
view[:] = data
commit(True)
host = b.host_buffer(1000)
b.synchronize_all()
b.copy_out(ptr, 1000, host)
out["copied_out"] = bytes(host) == data
try:
    b.mem_release(ptr)
except CudaError as exc:
    out["release"] = [exc.code, str(exc)]
b.copy_in(ptr, 1000, memoryview(data[::-1]))
out["copied_in"] = bytes(b.read_source(ptr, 1000, None)) == data[::-1]
b.set_current(None)  # a copy between calls may find no context current: one of the backend's serves
b.copy_out(ptr, 600, host[:600])
b.copy_out(ptr + 600, 400, host[600:])  # inside the allocation: a chunk of the cold tier's copies
out["without_current"] = bytes(host) == data[::-1]
try:
    b.copy_out(ptr, 1000, host[:999])
except CudaError as exc:
    out["short"] = exc.code
out["current_after"] = int(d.cuCtxGetCurrent()[1])
b.set_current(ctx)
b.host_free(host)
b.mem_free(ptr)
b.close()
print(json.dumps(out))
'''


def test_cuda_tier_hooks_through_the_shim_without_a_gpu(make_worker):
    upstream = make_worker(extra=("--vram-quota", "64M"))
    r = run(CHAINED, env=shim_env(upstream.unix, upstream.token))
    assert r["device"] == 0 and r["physical"] == 1024  # no virtual memory management: as cuMemAlloc rounds
    assert r["copied_out"] and r["copied_in"] and r["without_current"], r
    assert r["current_after"] == 0  # the program's (no context) restored
    assert r["short"] == E.INVALID_VALUE  # never a copy past the end of a host buffer
    code, why = r["release"]
    assert code == E.NOT_SUPPORTED and "cannot leave the GPU" in why
