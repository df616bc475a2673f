"""Memory pools and stream-ordered allocation through the shim against a worker on a REAL GPU (backend cuda):
the driver's own pools, and the vGPU's quota charged what they hold reserved, as the driver reports it.

Skipped on machines without a GPU; run `pytest -m gpu` on a GPU machine (tests/test_forwarded_pools.py runs
the same path on the emulated device, and the cuda backend's code through a chained worker, in CI).
"""
from __future__ import annotations

import pytest

from workertools import PRELUDE

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.fixture
def gpu_worker(make_worker):
    return make_worker(backend="cuda", extra=("--vram-quota", "512M"))


def test_pools_on_a_gpu_charge_the_drivers_reserve(gpu_worker):
    r = gpu_worker.run(PRELUDE + """
dev, ctx = setup()
A = d.CUmemPool_attribute
def attr(pool, a): return int(ok(d.cuMemPoolGetAttribute(pool, a)))
def free_now(): return ok(d.cuMemGetInfo())[0]
s = ok(d.cuStreamCreate(0))
default = ok(d.cuDeviceGetDefaultMemPool(dev))
start = free_now()
src = np.arange(4 << 18, dtype=np.uint32)
p = ok(d.cuMemAllocAsync(src.nbytes, s))
ok(d.cuMemcpyHtoDAsync(p, src, src.nbytes, s))
back = np.zeros_like(src)
ok(d.cuMemcpyDtoHAsync(back, p, src.nbytes, s)); ok(d.cuStreamSynchronize(s))
charged_default = start - free_now()
reserved_default = attr(default, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
ok(d.cuMemFreeAsync(p, s)); ok(d.cuStreamSynchronize(s))
after_sync = start - free_now()
reserved_after_sync = attr(default, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)

props = d.CUmemPoolProps()
props.allocType = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
props.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
props.location.id = 0
pool = ok(d.cuMemPoolCreate(props))
ok(d.cuMemPoolSetAttribute(pool, A.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, d.cuuint64_t(1 << 30)))
q = ok(d.cuMemAllocFromPoolAsync(64 << 20, pool, s))
ok(d.cuMemFreeAsync(q, s)); ok(d.cuStreamSynchronize(s))
kept = start - free_now()
reserved_kept = attr(pool, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
over = name(d.cuMemAllocFromPoolAsync(600 << 20, pool, s))
ok(d.cuMemPoolTrimTo(pool, 0))
trimmed = start - free_now()
ok(d.cuMemPoolDestroy(pool))
done(same=bool((back == src).all()), charged_default=charged_default, reserved_default=reserved_default,
     after_sync=after_sync, reserved_after_sync=reserved_after_sync, kept=kept, reserved_kept=reserved_kept,
     over=over, trimmed=trimmed, bad=name(d.cuMemPoolTrimTo(pool, 0)))
""")
    res = r.result
    assert res["same"]
    # what the vGPU is charged is what the driver's pools hold reserved, at every step
    assert res["charged_default"] == res["reserved_default"] >= 4 * MiB
    assert res["after_sync"] == res["reserved_after_sync"]
    assert res["kept"] == res["reserved_after_sync"] + res["reserved_kept"] and res["reserved_kept"] >= 64 * MiB
    assert res["over"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert "gpulab: cuMemAllocFromPoolAsync(600.0 MiB) refused: this vGPU's quota is 512.0 MiB" in r.stderr
    assert res["trimmed"] == res["reserved_after_sync"]
    assert res["bad"] == "CUDA_ERROR_INVALID_VALUE"
