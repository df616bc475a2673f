"""One ledger per vGPU on a REAL GPU (backend cuda): the memory the driver spends on each process's
CUDA context is measured with NVML and charged to the vGPU's quota, and two kernels (client
processes) of one token together never pass that quota.

Skipped without a GPU; run `pytest -m gpu tests/test_gpu_ledger.py` on a GPU machine.  The context
overhead estimate is set to 1 MiB here, far below any real context, so that a reported overhead
above it is NVML's measurement and not the estimate charged up front (docs/vgpu.md)."""
from __future__ import annotations

import time

import pytest

from workertools import PRELUDE, LineProgram

pytestmark = pytest.mark.gpu

MiB = 1 << 20
QUOTA = 2 << 30
ESTIMATE = 1 * MiB
CHUNK = 16 * MiB
GRANULARITY = 2 * MiB  # NVML counts a process's device memory in pages of this size

# A kernel driven line by line: "up" once its context exists; `alloc N` allocates N bytes; `info`
# says cuMemGetInfo; `fill` takes CHUNK allocations until the vGPU refuses, each filled with its own
# byte; `check` reads every byte back.  Each command answers one JSON line.
KERNEL = PRELUDE + f"""
mark = int(sys.argv[1])
setup()
held = []
print(json.dumps({{"up": True}}), flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "alloc":
        held.append(ok(d.cuMemAlloc(int(args[0]))))
        ok(d.cuMemsetD8(held[-1], mark, int(args[0])))
        done(held=len(held))
    elif cmd == "info":
        free, total = ok(d.cuMemGetInfo())
        done(free=free, total=total)
    elif cmd == "fill":
        before = len(held)
        while True:
            err, p = d.cuMemAlloc({CHUNK})
            if err != d.CUresult.CUDA_SUCCESS:
                break
            ok(d.cuMemsetD8(p, mark, {CHUNK}))
            held.append(p)
        done(took=len(held) - before, held=len(held), refused=err.name)
    elif cmd == "check":
        back = np.empty({CHUNK}, np.uint8)
        intact = True
        for p in held:
            ok(d.cuMemcpyDtoH(back, p, {CHUNK}))
            intact &= bool((back == mark).all())
        done(intact=intact)
    sys.stdout.flush()
"""


class Kernel(LineProgram):
    def __init__(self, w, mark: int):
        super().__init__(w, KERNEL, [mark])
        assert self.first == {"up": True}


@pytest.fixture
def cuda_worker(make_worker):
    return make_worker(backend="cuda", extra=("--vram-quota", "2G",
                                              "--GPUWorker.context_overhead_estimate=1M"))


def measured(w, processes: int, within: float = 10.0) -> dict:
    """The one vGPU once NVML has measured the context of each of its `processes` (the registry
    measures, at most once a second, when it is asked; a measurement replaces the estimate)."""
    deadline = time.monotonic() + within
    while True:
        (vgpu,) = w.vgpus()
        procs = vgpu["processes"]
        if len(procs) == processes and all(p["overhead"] > ESTIMATE for p in procs):
            return vgpu
        assert time.monotonic() < deadline, f"no context overhead measured within {within} s: {vgpu}"
        time.sleep(0.25)


def test_context_overhead_is_measured_and_charged(cuda_worker):
    w = cuda_worker
    first = Kernel(w, 1)  # a context, no allocation
    second = None
    try:
        vgpu = measured(w, 1)
        (proc,) = vgpu["processes"]
        overhead = proc["overhead"]
        assert proc["used"] == 0 and vgpu["overhead"] == overhead and vgpu["quota"] == QUOTA
        # a second process is charged the largest context measured so far, up front
        second = Kernel(w, 2)
        assert second(f"alloc {64 * MiB}") == {"held": 1}
        info = second("info")
        assert info["total"] == QUOTA
        assert abs(info["free"] - (QUOTA - 2 * overhead - 64 * MiB)) <= GRANULARITY, (info, overhead)
        # once its own context is measured, what it is told is exactly the ledger's figure
        vgpu = measured(w, 2)
        time.sleep(1.1)
        (vgpu,) = w.vgpus()
        charged = sum(p["used"] + p["overhead"] for p in vgpu["processes"])
        assert vgpu["used"] == 64 * MiB and all(abs(p["overhead"] - overhead) <= GRANULARITY
                                                 for p in vgpu["processes"]), vgpu
        assert second("info")["free"] == QUOTA - charged
    finally:
        for k in (first, second):
            if k:
                k.close()


def test_two_kernels_sharing_a_quota_cannot_pass_it_together(cuda_worker):
    w = cuda_worker
    kernels = []
    try:
        kernels = [Kernel(w, 10), Kernel(w, 11)]
        measured(w, 2)
        time.sleep(1.1)
        (vgpu,) = w.vgpus()  # each context measured on its own by now
        overhead = {p["client_pid"]: p["overhead"] for p in vgpu["processes"]}
        for k in kernels:  # both at once
            k.tell("fill")
        filled = [k.said() for k in kernels]
        assert [f["refused"] for f in filled] == ["CUDA_ERROR_OUT_OF_MEMORY"] * 2, filled
        used = sum(f["held"] for f in filled) * CHUNK
        (vgpu,) = w.vgpus()
        assert vgpu["used"] == used
        assert sorted(p["used"] for p in vgpu["processes"]) == sorted(f["held"] * CHUNK for f in filled)
        charged = used + sum(overhead.values())
        assert QUOTA - CHUNK < charged <= QUOTA, (used, overhead)  # together the quota, never more

        # the first leaves: its memory and its context's return to the vGPU; the other's bytes are intact
        first, second = kernels
        assert first("check") == {"intact": True}
        first.close()
        deadline = time.monotonic() + 5
        while len(w.vgpus()[0]["processes"]) != 1:
            assert time.monotonic() < deadline, "the first kernel's process was not reaped"
            time.sleep(0.1)
        more = second("fill")
        assert more["refused"] == "CUDA_ERROR_OUT_OF_MEMORY" and more["took"] >= filled[0]["held"], (more, filled)
        (vgpu,) = w.vgpus()
        (proc,) = vgpu["processes"]
        assert proc["used"] == more["held"] * CHUNK
        assert QUOTA - CHUNK < proc["used"] + proc["overhead"] <= QUOTA, proc
        assert second("check") == {"intact": True}
    finally:
        for k in kernels:
            k.close()
