"""Stream-ordered allocation and memory pools through the whole forwarded path: a cuda-python program,
the shim, a real worker (emulated backend; the cuda backend's code through a chained worker), and the
vGPU's quota charged what the pools hold reserved (gpu_worker/daemon/pools.py)."""
from __future__ import annotations

import json

from gpu_worker.client import shim_env
from workertools import PRELUDE

MiB = 1 << 20

POOLS = PRELUDE + """
A = d.CUmemPool_attribute

def attr(pool, a):
    return int(ok(d.cuMemPoolGetAttribute(pool, a)))

def free_now():
    return ok(d.cuMemGetInfo())[0]

def new_pool(threshold=0):
    props = d.CUmemPoolProps()
    props.allocType = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    props.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    props.location.id = 0
    pool = ok(d.cuMemPoolCreate(props))
    ok(d.cuMemPoolSetAttribute(pool, A.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, d.cuuint64_t(threshold)))
    return pool
"""

ROUND_TRIP = POOLS + """
dev, ctx = setup()
s = ok(d.cuStreamCreate(0))
rng = np.random.default_rng(7)
src = rng.integers(0, 256, 3 * (1 << 20) + 5, dtype=np.uint8)
p = ok(d.cuMemAllocAsync(src.nbytes, s))
ok(d.cuMemcpyHtoDAsync(p, src, src.nbytes, s))
pool = new_pool()
q = ok(d.cuMemAllocFromPoolAsync(src.nbytes, pool, s))
ok(d.cuMemcpyDtoDAsync(q, p, src.nbytes, s))
ok(d.cuMemsetD8Async(q, 0xAB, 5, s))
back = np.zeros_like(src)
ok(d.cuMemcpyDtoHAsync(back, q, src.nbytes, s))
ok(d.cuStreamSynchronize(s))
unified = np.zeros(16, np.uint8)
ok(d.cuMemcpy(unified.ctypes.data, int(p), 16))  # the shim knows the address as device memory
base, size = ok(d.cuMemGetAddressRange(int(q) + 100))
ok(d.cuMemFreeAsync(p, s))
ok(d.cuMemFreeAsync(q, s))
ok(d.cuStreamSynchronize(s))
ok(d.cuMemPoolDestroy(pool))
free, total = ok(d.cuMemGetInfo())
done(same=bool((back[5:] == src[5:]).all()), memset=bool((back[:5] == 0xAB).all()),
     unified=bool((unified == src[:16]).all()), range=[int(base) == int(q), int(size)], free=free, total=total,
     gone=name(d.cuMemcpyDtoH(back, q, 16)), q=int(q))
"""


def test_async_allocation_copies_and_free_round_trip_the_bytes(worker):
    r = worker.run(ROUND_TRIP)
    res = r.result
    assert res["same"] and res["memset"] and res["unified"]
    assert res["range"] == [True, 3 * MiB + 5]
    assert res["free"] == res["total"] == 64 * MiB  # everything freed, the pools gave their reserves back
    assert res["gone"] == "CUDA_ERROR_INVALID_VALUE"  # a freed allocation is no memory of the vGPU's
    # the one line the program reads: that refusal (everything that worked printed nothing)
    assert r.stderr.splitlines() == [f"gpulab: cuMemcpyDtoH refused: device address {res['q']:#x} is not in "
                                     "this vGPU's allocations"]


# A program driven step by step: each line from the test runs one step and answers with the pools'
# figures and what cuMemGetInfo says is free, so that the test reads the control API in between.
STEPPED = POOLS + """
dev, ctx = setup()
s = ok(d.cuStreamCreate(0))
default = ok(d.cuDeviceGetDefaultMemPool(dev))
kept = new_pool(threshold=8 << 20)
ptrs = {}
steps = {
    "default-alloc": lambda: ptrs.__setitem__("a", ok(d.cuMemAllocAsync(4 << 20, s))),
    "default-free": lambda: ok(d.cuMemFreeAsync(ptrs.pop("a"), s)),
    "sync": lambda: ok(d.cuStreamSynchronize(s)),
    "kept-alloc": lambda: ptrs.__setitem__("k", ok(d.cuMemAllocFromPoolAsync(6 << 20, kept, s))),
    "kept-free": lambda: ok(d.cuMemFreeAsync(ptrs.pop("k"), s)),
    "kept-again": lambda: ptrs.__setitem__("k", ok(d.cuMemAllocFromPoolAsync(5 << 20, kept, s))),
    "trim": lambda: ok(d.cuMemPoolTrimTo(kept, 0)),
    "destroy": lambda: ok(d.cuMemPoolDestroy(kept)),
    "late-free": lambda: ok(d.cuMemFree(ptrs.pop("k"))),
}
destroyed = False
print("ready", flush=True)
for line in sys.stdin:
    steps[line.strip()]()
    destroyed |= line.strip() == "destroy"
    figures = {"free": free_now(), "default_reserved": attr(default, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)}
    if not destroyed:
        figures["kept_reserved"] = attr(kept, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
        figures["kept_used"] = attr(kept, A.CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    print(json.dumps(figures), flush=True)
"""


def test_pool_reserves_count_in_the_vgpus_used_memory_until_released(make_worker):
    w = make_worker(extra=("--vram-quota", "32M"))
    p = w.start(STEPPED)
    try:
        assert p.stdout.readline().strip() == "ready"

        def step(name):
            p.stdin.write(name + "\n")
            p.stdin.flush()
            figures = json.loads(p.stdout.readline())
            (vgpu,) = w.vgpus()
            assert figures["free"] == 32 * MiB - vgpu["used"]  # cuMemGetInfo and the control API agree
            return vgpu["used"], figures

        # the default pool: an allocation's bytes are charged; a free leaves them reserved in the pool,
        # still charged, until a synchronizing call lets the pool (release threshold 0) give them back
        assert step("default-alloc") == (4 * MiB, {"free": 28 * MiB, "default_reserved": 4 * MiB,
                                                   "kept_reserved": 0, "kept_used": 0})
        assert step("default-free")[0] == 4 * MiB
        used, figures = step("sync")
        assert used == 0 and figures["default_reserved"] == 0
        # a created pool with a release threshold of 8 MiB keeps 6 MiB over a synchronize: still charged
        assert step("kept-alloc")[0] == 6 * MiB
        step("kept-free")
        used, figures = step("sync")
        assert used == 6 * MiB and (figures["kept_reserved"], figures["kept_used"]) == (6 * MiB, 0)
        # its reserve serves the next allocation: nothing more is charged
        used, figures = step("kept-again")
        assert used == 6 * MiB and figures["kept_used"] == 5 * MiB
        # trimming gives back what no allocation uses (5 MiB stays in use)
        used, figures = step("trim")
        assert used == 5 * MiB and figures["kept_reserved"] == 5 * MiB
        # destroyed with an allocation still out: that one keeps its bytes until freed, then they go too
        assert step("destroy")[0] == 5 * MiB
        assert step("late-free")[0] == 0
        p.stdin.close()
        assert p.wait(30) == 0
        assert p.stderr.read() == ""
    finally:
        p.kill()
        p.wait()


def test_past_the_quota_out_of_memory_with_the_reason(make_worker):
    w = make_worker(extra=("--vram-quota", "16M"))
    r = w.run(POOLS + """
dev, ctx = setup()
s = ok(d.cuStreamCreate(0))
first = ok(d.cuMemAllocAsync(10 << 20, s))
over_async = name(d.cuMemAllocAsync(10 << 20, s))
pool = new_pool(threshold=1 << 30)
over_pool = name(d.cuMemAllocFromPoolAsync(7 << 20, pool, s))
fits = ok(d.cuMemAllocFromPoolAsync(6 << 20, pool, s))
ok(d.cuMemFreeAsync(fits, s)); ok(d.cuStreamSynchronize(s))
over_plain = name(d.cuMemAlloc(1 << 20))      # the pool keeps its 6 MiB reserved: the vGPU has none left
again = ok(d.cuMemAllocFromPoolAsync(6 << 20, pool, s))  # its own reserve serves it
ok(d.cuMemFreeAsync(again, s))
ok(d.cuMemPoolTrimTo(pool, 0))
plain = ok(d.cuMemAlloc(6 << 20))             # given back: cuMemAlloc has the room again
done(over_async=over_async, over_pool=over_pool, over_plain=over_plain)
""")
    assert r.result == {"over_async": "CUDA_ERROR_OUT_OF_MEMORY", "over_pool": "CUDA_ERROR_OUT_OF_MEMORY",
                        "over_plain": "CUDA_ERROR_OUT_OF_MEMORY"}
    lines = r.stderr.splitlines()
    assert "gpulab: cuMemAllocAsync(10.0 MiB) refused: this vGPU's quota is 16.0 MiB, 6.0 MiB free" in lines
    assert "gpulab: cuMemAllocFromPoolAsync(7.0 MiB) refused: this vGPU's quota is 16.0 MiB, 6.0 MiB free" in lines
    assert "gpulab: cuMemAlloc(1.0 MiB) refused: this vGPU's quota is 16.0 MiB, 0 bytes free" in lines


def test_the_quota_is_the_vgpus_across_its_processes(make_worker):
    """A pool's reserve in one process leaves that much less for the vGPU's other processes."""
    w = make_worker(extra=("--vram-quota", "8M"))
    holder = w.start(POOLS + """
setup()
pool = new_pool(threshold=1 << 30)
p = ok(d.cuMemAllocFromPoolAsync(6 << 20, pool, 0))
ok(d.cuMemFreeAsync(p, 0)); ok(d.cuCtxSynchronize())
print("held", flush=True)
sys.stdin.readline()
""")
    try:
        assert holder.stdout.readline().strip() == "held"
        r = w.run(POOLS + """
setup()
done(over=name(d.cuMemAllocAsync(3 << 20, 0)), fits=name(d.cuMemAllocAsync(2 << 20, 0)))
""")
        assert r.result == {"over": "CUDA_ERROR_OUT_OF_MEMORY", "fits": "CUDA_SUCCESS"}
        assert "this vGPU's quota is 8.0 MiB (6.0 MiB of it held by its other processes), 2.0 MiB free" in r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_pool_handles_and_attributes_answer_with_the_drivers_codes(worker):
    r = worker.run(POOLS + """
dev, ctx = setup()
s = ok(d.cuStreamCreate(0))
default = ok(d.cuDeviceGetDefaultMemPool(dev))
same = int(ok(d.cuDeviceGetDefaultMemPool(dev))) == int(default) == int(ok(d.cuDeviceGetMemPool(dev)))
pool = new_pool()
ok(d.cuDeviceSetMemPool(dev, pool))
current = int(ok(d.cuDeviceGetMemPool(dev))) == int(pool)
p = ok(d.cuMemAllocAsync(1 << 20, s))  # from the device's current pool, now the created one
in_pool = attr(pool, A.CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
ok(d.cuMemFreeAsync(p, s))
high = attr(pool, A.CU_MEMPOOL_ATTR_USED_MEM_HIGH)
ok(d.cuMemPoolSetAttribute(pool, A.CU_MEMPOOL_ATTR_USED_MEM_HIGH, d.cuuint64_t(0)))
reset = attr(pool, A.CU_MEMPOOL_ATTR_USED_MEM_HIGH)
codes = {
    "set_high_nonzero": name(d.cuMemPoolSetAttribute(pool, A.CU_MEMPOOL_ATTR_USED_MEM_HIGH, d.cuuint64_t(5))),
    "set_reserved": name(d.cuMemPoolSetAttribute(pool, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, d.cuuint64_t(0))),
    "location": attr(pool, A.CU_MEMPOOL_ATTR_LOCATION_ID),
    "reuse": attr(pool, A.CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES),
    "destroy_default": name(d.cuMemPoolDestroy(default)),
}
ok(d.cuMemPoolDestroy(pool))
back_to_default = int(ok(d.cuDeviceGetMemPool(dev))) == int(default)
never = d.CUmemoryPool(0x7777777)
codes.update(
    destroyed_attr=name(d.cuMemPoolGetAttribute(pool, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)),
    destroyed_alloc=name(d.cuMemAllocFromPoolAsync(1 << 20, pool, s)),
    destroyed_twice=name(d.cuMemPoolDestroy(pool)),
    never_trim=name(d.cuMemPoolTrimTo(never, 0)),
    null_alloc=name(d.cuMemAllocFromPoolAsync(1 << 20, d.CUmemoryPool(0), s)),
    stream_as_pool=name(d.cuMemPoolTrimTo(d.CUmemoryPool(int(s)), 0)),
    zero_bytes=name(d.cuMemAllocAsync(0, s)),
    bad_free=name(d.cuMemFreeAsync(0x1234, s)),
    after_bad_free=name(d.cuStreamSynchronize(s)),  # the pipelined free's error, returned here
)
props = d.CUmemPoolProps()
props.allocType = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
props.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
props.location.id = 3
codes["other_device"] = name(d.cuMemPoolCreate(props))
props.location.id = 0
props.handleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
codes["exportable"] = name(d.cuMemPoolCreate(props))
props.handleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
props.maxSize = 2 << 20
small = ok(d.cuMemPoolCreate(props))
codes["past_max_size"] = name(d.cuMemAllocFromPoolAsync(3 << 20, small, s))
codes["max_size"] = attr(small, A.CU_MEMPOOL_ATTR_MAX_POOL_SIZE)
done(same=same, current=current, in_pool=in_pool, high=high, reset=reset, back_to_default=back_to_default,
     **codes)
""")
    res = r.result
    assert res["same"] and res["current"] and res["back_to_default"]
    assert (res["in_pool"], res["high"], res["reset"]) == (1 * MiB, 1 * MiB, 0)
    assert (res["location"], res["reuse"]) == (0, 1)
    invalid = ["set_high_nonzero", "set_reserved", "destroy_default", "destroyed_attr", "destroyed_alloc",
               "destroyed_twice", "never_trim", "null_alloc", "stream_as_pool", "zero_bytes", "other_device",
               "after_bad_free"]
    assert {k: res[k] for k in invalid} == {k: "CUDA_ERROR_INVALID_VALUE" for k in invalid}
    assert res["bad_free"] == "CUDA_SUCCESS"  # pipelined: its error latches until the next synchronizing call
    assert res["exportable"] == "CUDA_ERROR_NOT_SUPPORTED"
    assert (res["past_max_size"], res["max_size"]) == ("CUDA_ERROR_OUT_OF_MEMORY", 2 * MiB)
    assert "gpulab: cuMemAllocFromPoolAsync refused: the pool's maxSize is 2.0 MiB, 0 bytes of it reserved, " \
           "3.0 MiB more wanted" in r.stderr
    assert "gpulab: cuMemFreeAsync(0x1234) refused: the address is not in this vGPU's allocations" in r.stderr
    assert "gpulab: cuMemPoolCreate refused: a gpulab vGPU offers pools of device memory that stay in this " \
           "process: a pool exportable to other processes (handle types 0x1) is not one" in r.stderr


def test_pools_through_the_cuda_backend(make_worker):
    """The cuda backend's pool calls, run without a GPU: client -> shim -> worker (cuda backend) -> shim ->
    worker (emulated).  The middle vGPU's quota is charged the driver's reserve as the driver reports it."""
    upstream = make_worker(extra=("--vram-quota", "1G"))
    env = shim_env(upstream.unix, upstream.token)
    env["GPULAB_CHAIN_TO_WORKER"] = "1"
    middle = make_worker(token="middle-token", backend="cuda", extra=("--vram-quota", "32M"), env=env)
    r = middle.run(POOLS + """
dev, ctx = setup()
s = ok(d.cuStreamCreate(0))
src = np.arange(1 << 18, dtype=np.uint32)
p = ok(d.cuMemAllocAsync(src.nbytes, s))
ok(d.cuMemcpyHtoDAsync(p, src, src.nbytes, s))
back = np.zeros_like(src)
ok(d.cuMemcpyDtoHAsync(back, p, src.nbytes, s)); ok(d.cuStreamSynchronize(s))
pool = new_pool(threshold=1 << 30)
q = ok(d.cuMemAllocFromPoolAsync(8 << 20, pool, s))
ok(d.cuMemFreeAsync(q, s)); ok(d.cuStreamSynchronize(s))
kept = 32 * 2**20 - free_now()
reserved = attr(pool, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
over = name(d.cuMemAllocAsync(30 << 20, s))
ok(d.cuMemPoolTrimTo(pool, 0))
ok(d.cuMemFreeAsync(p, s)); ok(d.cuStreamSynchronize(s))
ok(d.cuMemPoolDestroy(pool))
done(same=bool((back == src).all()), kept=kept, reserved=reserved, over=over, free=free_now(),
     bad=name(d.cuMemPoolTrimTo(pool, 0)))
""")
    res = r.result
    assert res["same"]
    # what the upstream pool reserved (8 MiB of the pool, 1 MiB in the default pool) is what the vGPU holds
    assert res["reserved"] == 8 * MiB and res["kept"] == 9 * MiB
    assert res["over"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert "gpulab: cuMemAllocAsync(30.0 MiB) refused: this vGPU's quota is 32.0 MiB, 23.0 MiB free" in r.stderr
    assert res["free"] == 32 * MiB and res["bad"] == "CUDA_ERROR_INVALID_VALUE"


def test_pools_are_served_but_not_advertised(worker):
    """Libraries that choose (cuda.core) keep allocating with cuMemAlloc, whose memory the VRAM tiers move."""
    r = worker.run(PRELUDE + """
dev, ctx = setup()
done(value=ok(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, dev)))
""")
    assert r.result == {"value": 0}
