"""Kernel time in the backends: what pacing charges to a vGPU.

Emulated (CI): kernels registered with a simulated duration (tests/emulated_kernels.py) count it as
kernel time and hold their GPU's device lock while they "run", so the kernels of processes sharing a
GPU run one at a time.  On a real GPU (`-m gpu`): events around each launch measure a spin kernel of
known duration.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cuda.bindings import driver as drv

import emulated_kernels  # noqa: F401  (registers spin_ms and spin_20ms)
from gpu_worker.api.errors import CudaError
from gpu_worker.backends.emulated import EmulatedBackend

ROOT = Path(__file__).resolve().parent.parent
OK = drv.CUresult.CUDA_SUCCESS
GPU = {"uuid": "GPU-00000000-0000-4000-8000-00000000a100", "index": 0, "memory": 1 << 30, "capability": "9.0"}

# the entries of tests/emulated_kernels.py's spin kernels (the bodies are the host implementations')
SPIN_PTX = r"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry spin_ms(.param .u32 spin_ms_param_0)
{
    ret;
}
.visible .entry spin_20ms()
{
    ret;
}
"""


def spin_backend(device_lock: int | None = None) -> tuple[EmulatedBackend, object, object]:
    """An emulated vGPU on GPU, its context current, and its spin_ms and spin_20ms functions."""
    b = EmulatedBackend(gpus=[GPU], device_locks=None if device_lock is None else {GPU["uuid"]: device_lock})
    (ctx,) = b.cuDevicePrimaryCtxRetain(0)
    b.set_current(ctx)
    (mod,) = b.cuModuleLoadData(SPIN_PTX.encode())
    return b, b.cuModuleGetFunction(mod, "spin_ms")[0], b.cuModuleGetFunction(mod, "spin_20ms")[0]


def launch(b: EmulatedBackend, fn, *u32: int) -> None:
    b.launch(fn, (1, 1, 1), (1, 1, 1), 0, None, memoryview(struct.pack(f"<{len(u32)}I", *u32)), b"", 0)


def test_a_kernel_of_fixed_duration_counts_it_per_launch():
    b, _spin_ms, spin_20ms = spin_backend()
    assert b.kernel_time() == 0.0
    t0 = time.perf_counter()
    for n in range(1, 4):
        launch(b, spin_20ms)
        assert b.kernel_time() == pytest.approx(0.020 * n)
    assert time.perf_counter() - t0 >= 0.058  # it ran on the device for that long


def test_a_duration_from_the_kernels_parameter_and_none_without_one():
    b, spin_ms, _ = spin_backend()
    launch(b, spin_ms, 7)
    launch(b, spin_ms, 0)
    assert b.kernel_time() == pytest.approx(0.007)
    (mod,) = b.cuModuleLoadData(b".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry gpulab_noop()\n{\nret;\n}\n")
    launch(b, b.cuModuleGetFunction(mod, "gpulab_noop")[0])  # registered without a duration
    assert b.kernel_time() == pytest.approx(0.007)


def _busy_process(lock_fd: int, start, results) -> None:
    b, _, spin_20ms = spin_backend(lock_fd)
    start.wait()
    for _ in range(10):
        launch(b, spin_20ms)
    results.put(b.kernel_time())


def run_two_processes(fds: tuple[int, int]) -> tuple[float, list[float]]:
    """Wall time of two processes each running 10 kernels of 20 ms, with these device-lock fds."""
    mp = multiprocessing.get_context("fork")  # the memfds are inherited, as the daemon's executors inherit them
    start, results = mp.Barrier(3), mp.Queue()
    procs = [mp.Process(target=_busy_process, args=(fd, start, results)) for fd in fds]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    times = [results.get(timeout=30) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    return wall, times


def test_processes_on_one_gpu_run_their_kernels_one_at_a_time():
    one = os.memfd_create("gpulab-test-device-lock")
    try:
        wall, times = run_two_processes((one, one))
    finally:
        os.close(one)
    assert times == [pytest.approx(0.2), pytest.approx(0.2)]
    assert wall >= 0.39  # 20 kernels of 20 ms, serialised


def test_processes_on_different_gpus_overlap():
    a, b = os.memfd_create("gpulab-test-lock-a"), os.memfd_create("gpulab-test-lock-b")
    try:
        wall, times = run_two_processes((a, b))
    finally:
        os.close(a)
        os.close(b)
    assert times == [pytest.approx(0.2), pytest.approx(0.2)]
    assert wall < 0.33  # about 0.2 s: side by side


# ------------------------------------------------------- the cuda backend's timer, on a fake driver
class FakeDriver:
    """The event calls of the driver, on a GPU that finishes what the test says, in order."""

    def __init__(self, monkeypatch):
        from gpu_worker.backends import cuda

        self.ctx = drv.CUcontext(0x1000)
        self.created, self.recorded, self.synced = [], {}, []
        self.done = 0  # events recorded up to this sequence number are complete
        self.seq = 0
        for name in ("cuCtxGetCurrent", "cuEventCreate", "cuEventRecord", "cuEventQuery", "cuEventElapsedTime",
                     "cuEventSynchronize", "cuEventDestroy"):
            monkeypatch.setattr(cuda.drv, name, getattr(self, name))

    def cuCtxGetCurrent(self):
        return OK, self.ctx

    def cuEventCreate(self, flags):
        assert flags == drv.CUevent_flags.CU_EVENT_DEFAULT  # timing enabled
        self.created.append(object())
        return OK, self.created[-1]

    def cuEventRecord(self, event, stream):
        self.seq += 1
        self.recorded[id(event)] = self.seq
        return (OK,)

    def cuEventQuery(self, event):
        return (OK,) if self.recorded[id(event)] <= self.done else (drv.CUresult.CUDA_ERROR_NOT_READY,)

    def cuEventElapsedTime(self, start, end):
        return OK, 10.0 * (self.recorded[id(end)] - self.recorded[id(start)])  # 10 ms per step

    def cuEventSynchronize(self, event):
        self.synced.append(event)
        self.done = max(self.done, self.recorded[id(event)])
        return (OK,)

    def cuEventDestroy(self, event):
        return (OK,)


def timed_launch(timer, launched=True):
    pair = timer.start("stream")
    timer.stop(pair, "stream", launched)


@pytest.fixture
def fake(monkeypatch):
    return FakeDriver(monkeypatch)


def test_the_timer_counts_completed_launches_oldest_first_without_waiting(fake):
    from gpu_worker.backends.cuda import _KernelTimer

    t = _KernelTimer()
    for _ in range(3):
        timed_launch(t)  # events 1-2, 3-4, 5-6: 10 ms each
    assert t.poll() == 0.0 and len(t.pending) == 3 and not fake.synced
    fake.done = 4
    assert t.poll() == pytest.approx(0.020) and len(t.pending) == 1
    timed_launch(t)  # reuses a completed pair: no new events
    assert len(fake.created) == 6
    fake.done = 8
    assert t.poll() == pytest.approx(0.040) and not t.pending


def test_a_launch_the_driver_refused_is_not_timed(fake):
    from gpu_worker.backends.cuda import _KernelTimer

    t = _KernelTimer()
    timed_launch(t, launched=False)
    assert not t.pending and len(t.free[0x1000]) == 1


def test_the_pairs_in_flight_are_bounded(fake, monkeypatch):
    from gpu_worker.backends.cuda import _KernelTimer

    monkeypatch.setattr(_KernelTimer, "MAX_PENDING", 4)
    t = _KernelTimer()
    for _ in range(10):
        timed_launch(t)
        assert len(t.pending) <= 4
    assert len(fake.synced) == 6 and len(fake.created) <= 2 * 5  # waited for the oldest, reused its events
    fake.done = fake.seq
    assert t.poll() == pytest.approx(0.100)


def test_a_destroyed_contexts_events_are_forgotten(fake):
    from gpu_worker.backends.cuda import _KernelTimer

    t = _KernelTimer()
    timed_launch(t)
    t.forget(0x1000)
    assert not t.pending and not t.free and t.poll() == 0.0


def test_a_launch_is_timed_only_when_it_runs_now(fake, monkeypatch):
    from gpu_worker.backends.cuda import CudaBackend, _KernelTimer

    b = CudaBackend.__new__(CudaBackend)  # no cuInit: only the timing around a launch
    b.timer = _KernelTimer()
    capture = {"stream": 0}
    monkeypatch.setattr(drv, "cuStreamIsCapturing", lambda stream: (OK, capture[stream]))
    b._timed("stream", lambda: (OK,))
    capture["stream"] = 1  # captured into a graph: it runs when the graph is launched
    b._timed("stream", lambda: (OK,))
    assert len(b.timer.pending) == 1
    with pytest.raises(CudaError):
        capture["stream"] = 0
        b._timed("stream", lambda: (drv.CUresult.CUDA_ERROR_INVALID_VALUE,))  # the driver's error, untimed
    assert len(b.timer.pending) == 1


# ------------------------------------------------------------------------------- on a real GPU
# spin_ms spins on the GPU's nanosecond globaltimer (not clock64, whose rate follows the SM clock):
# a kernel of known duration whatever the clocks do.
GPU_SPIN = r'''
import json, struct, sys, time
from cuda.bindings import driver as d, nvrtc
from gpu_worker.backends.cuda import CudaBackend

SRC = rb"""
extern "C" __global__ void spin_ms(unsigned int ms) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ms * 1000000ull);
}
"""
b = CudaBackend()
(ctx,) = b.cuDevicePrimaryCtxRetain(0)
b.set_current(ctx)
A = d.CUdevice_attribute
(major,) = b.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0)
(minor,) = b.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0)
err, prog = nvrtc.nvrtcCreateProgram(SRC, b"spin.cu", 0, [], [])
assert nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=sm_{major}{minor}".encode()])[0] == 0
_, size = nvrtc.nvrtcGetCUBINSize(prog)
cubin = b" " * size
nvrtc.nvrtcGetCUBIN(prog, cubin)
(mod,) = b.cuModuleLoadData(cubin)
(fn,) = b.cuModuleGetFunction(mod, "spin_ms")

def launch(ms, stream=None):
    b.launch(fn, (1, 1, 1), (1, 1, 1), 0, stream, memoryview(struct.pack("<I", ms)), b"", 0)

launch(1)  # loads the kernel: not part of the figures
b.cuCtxSynchronize()
before = b.kernel_time()
t0 = time.perf_counter()
for _ in range(10):
    launch(20)
launched = time.perf_counter() - t0
t0 = time.perf_counter()
early = b.kernel_time() - before  # kernels still running: counted later, and the call does not wait
polled = time.perf_counter() - t0
b.cuCtxSynchronize()
total = b.kernel_time() - before
(stream,) = b.cuStreamCreate(0)
for _ in range(3 * b.timer.MAX_PENDING):  # more tiny launches than pairs in flight: the pool stays bounded
    launch(0, stream)
most = len(b.timer.pending)
b.cuCtxSynchronize()
tiny = b.kernel_time() - before - total
b.close()
print(json.dumps({"total": total, "early": early, "launched": launched, "polled": polled, "most": most,
                  "bound": b.timer.MAX_PENDING, "tiny": tiny}))
'''


@pytest.mark.gpu
def test_cuda_kernel_time_measures_a_spin_kernel_by_events():
    out = subprocess.run([sys.executable, "-c", GPU_SPIN], capture_output=True, text=True, timeout=300, check=True,
                         cwd=ROOT).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["total"] == pytest.approx(0.200, rel=0.10), r  # 10 kernels of 20 ms
    assert r["launched"] < 0.1 and r["polled"] < 0.01, r  # neither launching nor polling waits for the GPU
    assert r["early"] < 0.15, r
    assert r["most"] <= r["bound"] and 0 < r["tiny"] < 0.5, r
