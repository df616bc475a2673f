"""Native mode without a GPU: the native shim (gpu_worker/shim/lib/native) over a double of the node's driver.

The "real driver" below the native shim is build.py's driver double: the forwarding shim reading
GPULAB_DRIVER_WORKER/GPULAB_DRIVER_TOKEN, holding a session of its own on the same emulated worker with a
token for the whole node (both GPUs, no quota). Above it, the native shim attaches to the vGPU of
GPULAB_TOKEN (one GPU, a quota). What the native shim hooks must show the vGPU; everything else must be
the double's own answer; the ledger must be shared with forwarded sessions of the same vGPU.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time

import pytest

from workertools import PRELUDE, ROOT, SLEEP_PRELUDE, Worker, metric_samples

from gpu_worker.client.units import format_size
from gpu_worker.daemon.gpus import describe_gpus
from gpu_worker.shim import build as shim_build
from gpu_worker.shim import native_dir

QUOTA = 64 << 20
TOKENS = {"vgpu": {"vram": "64M", "gpus": [1], "compute": 25}, "node": {"gpus": [0, 1]},
          "neighbour": {"vram": "64M", "gpus": [1], "compute": 50},
          "strict": {"vram": "64M", "gpus": [1], "compute": 25, "burst": False},
          "whole": {"vram": "64M", "gpus": [1]}, "pair": {"vram": "64M", "gpus": [0, 1]}}
TIME_EVERY = 4  # the node's native_time_every: a whole-GPU vGPU's native processes time one launch in 4

pytestmark = pytest.mark.skipif(not shim_build.native_supported(), reason="native mode is built for x86-64 only")


@pytest.fixture(scope="module")
def driver_double(tmp_path_factory):
    return shim_build.build_driver_double(tmp_path_factory.mktemp("driver-double"))


@pytest.fixture
def node(tmp_path, driver_double):
    (tmp_path / "tokens.json").write_text(json.dumps(TOKENS))
    w = Worker(tmp_path, token=None, extra=("--emulated-gpus", "2", "--emulated-memory", "4G", "--name", "node",
                                            "--tokens-file", str(tmp_path / "tokens.json"),
                                            f"--GPUWorker.native_time_every={TIME_EVERY}"))
    w.double = driver_double
    yield w
    w.stop()


def native_env(w: Worker, token="vgpu", driver_token="node") -> dict:
    """A native program's environment: the vGPU of ``token``; below it the driver double, whose own session is the
    vGPU of ``driver_token`` (what the emulated checkpoint moves)."""
    env = dict(os.environ)
    env.update({"LD_LIBRARY_PATH": str(native_dir()), "GPULAB_WORKER": w.unix, "GPULAB_TOKEN": token,
                "GPULAB_REAL_LIBCUDA": str(w.double), "GPULAB_DRIVER_WORKER": w.unix,
                "GPULAB_DRIVER_TOKEN": driver_token})
    return env


# For the programs: the descriptor of a memfd this process holds (the ledger, the GPU's board), by its name.
FIND_MEMFD = """
def memfd(name):
    import os
    return next(int(f) for f in os.listdir("/proc/self/fd") if os.path.lexists(f"/proc/self/fd/{f}")
                and os.readlink(f"/proc/self/fd/{f}").startswith("/memfd:" + name))
"""


def run_native(w: Worker, code: str, token="vgpu", check=True, env_extra=None, prelude=PRELUDE):
    p = subprocess.run([sys.executable, "-c", prelude + FIND_MEMFD + textwrap.dedent(code)],
                       env={**native_env(w, token), **(env_extra or {})},
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"client failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    p.result = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else None
    return p


class Native:
    """A native-mode program driven a line at a time: each line is Python run in it, answered by one JSON line."""

    def __init__(self, w: Worker, token="vgpu", forwarded=False, driver_token="node"):
        driver = PRELUDE + FIND_MEMFD + textwrap.dedent("""
            import ctypes, sys
            state = {}
            print(json.dumps({"pid": __import__("os").getpid()}), flush=True)
            for line in sys.stdin:
                try:
                    out = eval(compile(line, "<line>", "eval"), globals(), state) if not line.startswith("!") else \\
                        exec(line[1:], globals(), state)
                except SystemExit as exc:
                    out = {"exit": str(exc)}
                print(json.dumps(out), flush=True)
        """)
        env = w.env(token=token) if forwarded else native_env(w, token, driver_token)  # forwarded: the ordinary shim
        self.proc = subprocess.Popen([sys.executable, "-c", driver], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.pid = self.said()["pid"]

    def said(self, timeout=90):
        # one line answers each request, so nothing waits in the pipe's buffer when select looks
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.kill()
            raise AssertionError(f"the program did not answer within {timeout} s: {self.proc.stderr.read()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the program stopped: {self.proc.stderr.read()}")
        return json.loads(line)

    def __call__(self, line: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.said()

    def close(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(30)
        return self.proc.stderr.read()


def vgpu_of(w: Worker, token: str) -> dict:
    from gpu_worker.client.tokens import token_hash

    return next(v for v in w.vgpus() if v["token_hash"] == token_hash(token))


def test_the_vgpu_is_what_a_native_process_sees(node):
    """cuMemGetInfo, cuDeviceTotalMem and enumeration are the vGPU's; the double below shows the whole node."""
    gpus = describe_gpus("emulated", "node", 4 << 30, 2)
    r = run_native(node, """
        import ctypes, os, uuid
        ok(d.cuInit(0))
        n = ok(d.cuDeviceGetCount())
        dev = ok(d.cuDeviceGet(0))
        ctx = ok(d.cuDevicePrimaryCtxRetain(dev)); ok(d.cuCtxSetCurrent(ctx))
        free, total = ok(d.cuMemGetInfo())
        below = ctypes.CDLL(os.environ["GPULAB_REAL_LIBCUDA"])
        real_n = ctypes.c_int()
        below.cuDeviceGetCount(ctypes.byref(real_n))
        real_total = ctypes.c_size_t()
        below.cuDeviceTotalMem_v2(ctypes.byref(real_total), 0)
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        done(count=n, device=int(dev), beyond=name(d.cuDeviceGet(1)), free=free, total=total,
             visible=libc.getenv(b"CUDA_VISIBLE_DEVICES").decode(),
             total_mem=ok(d.cuDeviceTotalMem(dev)),
             uuid="GPU-" + str(uuid.UUID(bytes=bytes(ok(d.cuDeviceGetUuid(dev)).bytes))),
             real_count=real_n.value, real_total=real_total.value)
    """)
    got = r.result
    assert got["real_count"] == 2 and got["real_total"] == 4 << 30  # the double: the whole node
    assert got["count"] == 1 and got["beyond"] == "CUDA_ERROR_INVALID_DEVICE"
    assert got["uuid"] == gpus[1]["uuid"]  # the vGPU's GPU, as ordinal 0 ...
    assert got["device"] == 1  # ... which is the node's second device (the double ignores the next line)
    assert got["visible"] == gpus[1]["uuid"]  # what a real driver enumerates: only the vGPU's GPU, as ordinal 0
    assert got["total"] == QUOTA and got["total_mem"] == QUOTA and got["free"] == QUOTA


def test_quota_holds_across_native_processes_and_forwarded_sessions_of_one_vgpu(node):
    a, b = Native(node), Native(node)
    try:
        for p in (a, b):
            assert p("ok(d.cuInit(0)) or 0") == 0
            assert p("!ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))") is None
        assert a("!p = ok(d.cuMemAlloc(40 << 20))") is None
        assert b("name(d.cuMemAlloc(40 << 20))") == "CUDA_ERROR_OUT_OF_MEMORY"
        assert b("[int(x) for x in ok(d.cuMemGetInfo())]") == [QUOTA - (40 << 20), QUOTA]
        v = vgpu_of(node, "vgpu")
        assert v["used"] == 40 << 20
        assert sorted(p["mode"] for p in v["processes"]) == ["native", "native"]
        # the idle clock: the worker sees no call of a native process; its allocations stamp its slot
        touched = [p["last_touch"] for p in v["processes"] if p["used"]]
        assert len(touched) == 1 and abs(touched[0] - time.time()) < 5 and v["idle_seconds"] < 5
        # a forwarded session of the same vGPU (the ordinary shim) is held to the same ledger
        fwd = node.run(PRELUDE + "setup(); done(r=name(d.cuMemAlloc(40 << 20)))", token="vgpu").result
        assert fwd["r"] == "CUDA_ERROR_OUT_OF_MEMORY"
        assert a("name(d.cuMemFree(state['p']))") == "CUDA_SUCCESS"
        assert b("!q = ok(d.cuMemAlloc(40 << 20))") is None
        assert vgpu_of(node, "vgpu")["used"] == 40 << 20
    finally:
        said = b.close()
        a.close()
    assert "cuMemAlloc refused: 40.0 MiB asked, 24.0 MiB left of this vGPU's 64.0 MiB quota" in said
    # the processes ended: their slots are free, nothing stays charged
    deadline = time.monotonic() + 10
    while vgpu_of(node, "vgpu")["processes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vgpu_of(node, "vgpu")["used"] == 0 and vgpu_of(node, "vgpu")["processes"] == []


def test_stream_ordered_allocations_and_pools_are_charged_what_the_pools_hold(node):
    """cuMemAllocAsync and cuMemAllocFromPoolAsync are charged up front; a pool's reserve (what the driver below
    keeps after a free: CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT) stays charged until the pool gives it back
    (a trim, a synchronize past its release threshold, its destroy), and counts against the quota."""
    p = Native(node)

    def used():
        return vgpu_of(node, "vgpu")["used"]

    try:
        assert p("!ok(d.cuInit(0)); dev = ok(d.cuDeviceGet(0)); ctx = ok(d.cuDevicePrimaryCtxRetain(dev)); "
                 "ok(d.cuCtxSetCurrent(ctx)); s = ok(d.cuStreamCreate(0)); default = ok(d.cuDeviceGetMemPool(dev))") \
            is None
        assert p("!a = ok(d.cuMemAllocAsync(16 << 20, s))") is None and used() == 16 << 20
        assert p("!ok(d.cuMemFreeAsync(a, s))") is None and used() == 16 << 20  # the pool keeps it reserved
        assert p("!ok(d.cuStreamSynchronize(s)); ok(d.cuMemPoolTrimTo(default, 0))") is None and used() == 0
        # cuMemFree takes a stream-ordered allocation too: the pool's live bytes drop, its reserve is trimmed
        assert p("!e = ok(d.cuMemAllocAsync(8 << 20, s)); ok(d.cuStreamSynchronize(s)); ok(d.cuMemFree(e)); "
                 "ok(d.cuMemPoolTrimTo(default, 0))") is None and used() == 0
        # a pool of its own that keeps up to 64 MiB reserved past a synchronize
        assert p("!props = d.CUmemPoolProps(); "
                 "props.allocType = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED; "
                 "props.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE; props.location.id = int(dev); "
                 "kept = ok(d.cuMemPoolCreate(props)); ok(d.cuMemPoolSetAttribute(kept, "
                 "d.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, d.cuuint64_t(64 << 20)))") is None
        assert p("!b = ok(d.cuMemAllocFromPoolAsync(40 << 20, kept, s)); ok(d.cuMemFreeAsync(b, s)); "
                 "ok(d.cuStreamSynchronize(s))") is None
        assert used() == 40 << 20
        assert p("name(d.cuMemAlloc(30 << 20))") == "CUDA_ERROR_OUT_OF_MEMORY"
        assert p("name(d.cuMemAllocAsync(30 << 20, s))") == "CUDA_ERROR_OUT_OF_MEMORY"
        assert p("!ok(d.cuMemPoolTrimTo(kept, 0)); c = ok(d.cuMemAlloc(30 << 20))") is None and used() == 30 << 20
        assert p("!ok(d.cuMemPoolDestroy(kept)); ok(d.cuMemFree(c))") is None and used() == 0
    finally:
        said = p.close()
    assert "cuMemAlloc refused: 30.0 MiB asked, 24.0 MiB left of this vGPU's 64.0 MiB quota" in said
    assert "cuMemAllocAsync refused: 30.0 MiB asked, 24.0 MiB left of this vGPU's 64.0 MiB quota" in said


def test_a_pool_is_charged_on_the_gpu_it_is_on_not_the_current_one(node):
    """With the vGPU's first GPU current, a pool made on its second one and that GPU's default pool are charged on
    the second (the shim learns where a pool is from cuMemPoolCreate's properties and from the device whose pool it
    is); cuMemAllocAsync's pool is the current GPU's. Before, all three went to the GPU current at the allocation."""
    p = Native(node, "pair")

    def on_gpus():
        return vgpu_of(node, "pair")["processes"][0]["on_gpus"]

    try:
        assert p(OPEN + "; s = ok(d.cuStreamCreate(0)); second = ok(d.cuDeviceGet(1))") is None
        assert p("!props = d.CUmemPoolProps(); "
                 "props.allocType = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED; "
                 "props.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE; "
                 "props.location.id = int(second); made = ok(d.cuMemPoolCreate(props))") is None
        assert p("!a = ok(d.cuMemAllocFromPoolAsync(16 << 20, made, s))") is None
        assert on_gpus() == [0, 16 << 20]
        assert p("!default = ok(d.cuDeviceGetDefaultMemPool(second)); "
                 "b = ok(d.cuMemAllocFromPoolAsync(8 << 20, default, s))") is None
        assert on_gpus() == [0, 24 << 20]
        assert p("!c = ok(d.cuMemAllocAsync(4 << 20, s))") is None
        assert on_gpus() == [4 << 20, 24 << 20]
        assert vgpu_of(node, "pair")["used"] == 28 << 20
        assert p("!ok(d.cuMemFreeAsync(a, s)); ok(d.cuMemFreeAsync(b, s)); ok(d.cuMemFreeAsync(c, s)); "
                 "ok(d.cuStreamSynchronize(s)); "
                 "ok(d.cuMemPoolDestroy(made)); ok(d.cuMemPoolTrimTo(default, 0)); "
                 "ok(d.cuMemPoolTrimTo(ok(d.cuDeviceGetMemPool(ok(d.cuDeviceGet(0)))), 0))") is None
        assert on_gpus() == [0, 0] and vgpu_of(node, "pair")["used"] == 0
    finally:
        p.close()


def test_a_captured_graph_is_instantiated_and_launched_through_the_hooks(node):
    """cuGraphInstantiate and cuGraphLaunch are hooked (a graph's memory nodes are charged at its launch): a captured
    memset instantiated, launched, its executable graph destroyed, through the chain. (The driver double has no
    graph memory nodes: their charge is tested on a GPU only, tests/test_gpu_native.py.)"""
    got = run_native(node, """
        setup()
        s = ok(d.cuStreamCreate(0))
        buf = ok(d.cuMemAlloc(4096))
        ok(d.cuMemsetD32(buf, 0, 1024))
        ok(d.cuStreamBeginCapture(s, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
        ok(d.cuMemsetD32Async(buf, 7, 1024, s))
        g = ok(d.cuStreamEndCapture(s))
        before = np.zeros(1024, np.uint32)
        ok(d.cuMemcpyDtoH(before.ctypes.data, buf, 4096))
        x = ok(d.cuGraphInstantiate(g, 0))
        ok(d.cuGraphLaunch(x, s))
        ok(d.cuStreamSynchronize(s))
        out = np.zeros(1024, np.uint32)
        ok(d.cuMemcpyDtoH(out.ctypes.data, buf, 4096))
        ok(d.cuGraphExecDestroy(x))
        done(captured=int(before.max()), launched=sorted(set(out.tolist())))
    """).result
    assert got == {"captured": 0, "launched": [7]}


def test_unhooked_functions_and_the_export_table_pass_straight_through(node):
    """An un-hooked function, cuGetExportTable included, is the library below's own: cuGetProcAddress hands out
    our entry point of the same name, which is one jump to it (after a look at the frozen byte)."""
    r = run_native(node, """
        import ctypes, os
        ok(d.cuInit(0))
        below = ctypes.CDLL(os.environ["GPULAB_REAL_LIBCUDA"])
        ours = ctypes.CDLL("libcuda.so.1")
        def addr(lib, fn):
            return ctypes.cast(getattr(lib, fn), ctypes.c_void_p).value
        def proc(sym):
            err, pfn, _status = d.cuGetProcAddress(sym.encode(), 12000, 0)
            return int(pfn) if int(err) == 0 else None
        table, uuid = ctypes.c_void_p(), (ctypes.c_char * 16)()
        handed = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(proc("cuGetExportTable"))
        ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))
        dev = ctypes.c_int(-1)
        below_ctx = below.cuCtxGetDevice(ctypes.byref(dev))
        done(ctx_get_device=[proc("cuCtxGetDevice"), addr(below, "cuCtxGetDevice"), addr(ours, "cuCtxGetDevice")],
             device=[int(ok(d.cuCtxGetDevice())), dev.value, below_ctx],
             export_table=[proc("cuGetExportTable"), addr(ours, "cuGetExportTable")],
             export_table_call=[handed(ctypes.byref(table), uuid), below.cuGetExportTable(ctypes.byref(table), uuid)],
             mem_alloc=[proc("cuMemAlloc"), addr(below, "cuMemAlloc_v2"), addr(ours, "cuMemAlloc_v2")])
    """, env_extra={"GPULAB_DEBUG": "1"})
    got = r.result
    handed, below, ours = got["ctx_get_device"]
    assert handed == ours != below
    assert got["device"] == [1, 1, 0]  # called through our entry point: the library below's answer
    assert got["export_table"][0] == got["export_table"][1]
    # the double has no private tables: its own answer, and its own debug line, come through
    assert got["export_table_call"] == [801, 801]
    assert r.stderr.count("cuGetExportTable: not offered by a gpulab vGPU") == 2
    handed, below, ours = got["mem_alloc"]
    assert handed == ours != below  # hooked: the caller gets ours


def test_pacing_arithmetic_is_pacing_py_s_on_the_shared_bucket(node):
    """The native shim's bucket arithmetic (C) and the executors' (pacing.py) take turns on one vGPU's bucket."""
    r = run_native(node, """
        import ctypes, mmap, os
        from gpu_worker.daemon import ledger as L
        from gpu_worker.daemon.pacing import DEPTH, Pacer
        ok(d.cuInit(0))
        ours = ctypes.CDLL("libcuda.so.1")
        ours.gpulab_native_settle.restype = ctypes.c_double
        ours.gpulab_native_settle.argtypes = [ctypes.c_double] * 4
        fd = memfd("gpulab-vgpu-ledger")
        ledger = L.Ledger.__new__(L.Ledger)
        ledger.slots = 256
        ledger.size = os.fstat(fd).st_size
        ledger.slots = (ledger.size - L.HEADER_SIZE) // L.SLOT_SIZE
        ledger.fd, ledger.map = fd, mmap.mmap(fd, ledger.size)
        share = ledger.pacing()[0]
        mine = L.Slot(ledger, 0)
        class Backend:
            def __init__(self): self.t = 0.0
            def kernel_time(self): return self.t
        backend = Backend()
        pacer = Pacer(mine, backend, None, None)
        steps = [ours.gpulab_native_settle(100.0, share, share, DEPTH)]
        mine.set_pacing_figures(0.010, 0.0, False)
        steps.append(ours.gpulab_native_settle(100.02, share, share, DEPTH))
        backend.t = pacer.kernel_time = 0.030
        steps.append(pacer._settle(100.04, share, 0, False))
        steps.append(ours.gpulab_native_settle(100.06, share, share, DEPTH))
        done(share=share, steps=steps)
    """)
    got = r.result
    assert got["share"] == 0.25
    full = 0.25 * 0.1
    expected = [full, full - 0.010, min(full - 0.010 + 0.25 * 0.02, full) - 0.020, 0.25 * 0.02]
    assert got["steps"] == pytest.approx(expected, abs=1e-9)


def test_a_native_launch_marks_its_vgpu_busy_on_the_gpu_s_board(node):
    """Bursting lends a GPU's spare share to the vGPUs that may burst (pacing.py's GPUBoard.lent). A native
    process's launch stamps its vGPU's row as an executor's does, in the same clock, so a bursting neighbour
    is lent less while it runs (before, a native-only vGPU always looked idle)."""
    neighbour = Native(node, token="neighbour")
    try:
        assert neighbour("!ok(d.cuInit(0))") is None  # its vGPU takes its row on GPU 1's board
        r = run_native(node, """
            import mmap, os, time
            from gpu_worker.daemon import pacing
            ok(d.cuInit(0))
            ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))
            fd = memfd("gpulab-gpu-board")
            board = pacing.GPUBoard.__new__(pacing.GPUBoard)
            board.map = mmap.mmap(fd, pacing.ENTRIES * pacing.ENTRY.size)
            rows = {pacing.ENTRY.unpack_from(board.map, i * pacing.ENTRY.size)[4]: i for i in range(pacing.ENTRIES)
                    if pacing.ENTRY.unpack_from(board.map, i * pacing.ENTRY.size)[0]}
            mine, theirs = rows[0.25], rows[0.5]
            def stamp():
                return pacing.ENTRY.unpack_from(board.map, mine * pacing.ENTRY.size)[5]
            before = stamp()
            launch_sleep(1)
            ok(d.cuCtxSynchronize())
            t = stamp()
            done(before=before, stamp=t, now=time.monotonic(), lent_busy=board.lent(theirs, t),
                 lent_idle=board.lent(theirs, t + 1.0))
        """, prelude=SLEEP_PRELUDE)
    finally:
        neighbour.close()
    got = r.result
    assert got["before"] == 0.0
    assert 0 < got["now"] - got["stamp"] < 30, got  # time.monotonic's clock, stamped at the launch
    # busy: 1 - 0.5 - 0.25 spare, split between the two medium-QoS rows that may burst; idle: all of 1 - 0.5
    assert got["lent_busy"] == pytest.approx(0.125) and got["lent_idle"] == pytest.approx(0.5), got


# Launch a 10 ms kernel and synchronize, over and over, for 2 s: the kernel time the vGPU got over the wall time.
BUSY_LOOP = """
import time
ok(d.cuInit(0))
ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))
mod = ok(d.cuModuleLoadData(SLEEP_PTX.encode() + b"\\0"))
fn = ok(d.cuModuleGetFunction(mod, b"sleep_ms"))
arg = np.array([10], np.uint32)
params = np.array([arg.ctypes.data], np.uint64)
t0 = time.monotonic()
while time.monotonic() - t0 < 2.0:
    ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, params.ctypes.data, 0))
    ok(d.cuCtxSynchronize())
wall = time.monotonic() - t0
ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, params.ctypes.data, 0))  # its launch reads the last kernel's time
ok(d.cuCtxSynchronize())
done(wall=wall)
"""


def test_a_native_vgpu_that_may_burst_is_lent_its_idle_gpu_s_spare_share(node):
    """Native processes burst by pacing.py's rule, worked out from the GPU's board in the process: alone on its
    GPU, a 25% vGPU that may burst gets nearly the whole GPU; one that may not gets its 25%."""
    from workertools import SLEEP_PTX

    got = {}
    for token in ("strict", "vgpu"):
        r = run_native(node, f"SLEEP_PTX = {SLEEP_PTX!r}\n" + BUSY_LOOP, token=token, prelude=SLEEP_PRELUDE)
        v = vgpu_of(node, token)
        got[token] = {"share": v["kernel_time"] / r.result["wall"], "throttled": v["throttled_time"]}
    assert got["strict"]["share"] == pytest.approx(0.25, abs=0.08), got
    assert got["strict"]["throttled"] > 1.0, got
    assert got["vgpu"]["share"] > 0.75, got


def test_a_whole_gpu_vgpu_s_kernel_time_is_estimated_from_one_launch_in_n(node):
    """Not paced, a native process times one launch in each run of TIME_EVERY, at a random place, and counts it
    TIME_EVERY times. Kernels of 1 and 9 ms alternate (a period that divides the run): timing the same place in
    every run would count 1 or 9 ms for all (0.2 or 1.8 of the truth); the estimate is near the truth."""
    from workertools import SLEEP_PTX

    r = run_native(node, f"SLEEP_PTX = {SLEEP_PTX!r}\n" + textwrap.dedent("""
        import time
        ok(d.cuInit(0))
        ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))
        fn = ok(d.cuModuleGetFunction(ok(d.cuModuleLoadData(SLEEP_PTX.encode() + b"\\0")), b"sleep_ms"))
        args = [np.array([ms], np.uint32) for ms in (1, 9)]
        params = [np.array([a.ctypes.data], np.uint64) for a in args]
        spent, n = 0.0, 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            t = time.monotonic()
            ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, params[n % 2].ctypes.data, 0))
            ok(d.cuCtxSynchronize())
            spent += time.monotonic() - t
            n += 1
        time.sleep(0.01)
        ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, params[0].ctypes.data, 0))  # reads the last times back
        ok(d.cuCtxSynchronize())
        done(spent=spent, launches=n)
    """), token="whole")
    v = vgpu_of(node, "whole")
    ratio = v["kernel_time"] / r.result["spent"]
    assert r.result["launches"] > 150, r.result
    assert 0.6 < ratio < 1.3, (ratio, v["kernel_time"], r.result)  # about 5 sd either way; a fixed place: 1.69
    assert v["throttled_time"] == 0 and v["share"] == 100


@pytest.mark.parametrize("value", [0, -3, 1 << 21])
def test_a_bad_native_time_every_stops_the_worker_with_its_name(value):
    from traitlets import TraitError

    from gpu_worker.daemon.worker import GPUWorker

    with pytest.raises(TraitError) as bad:
        GPUWorker(native_time_every=value)
    assert "'native_time_every' trait of a GPUWorker" in str(bad.value) and str(value) in str(bad.value)


def warm_bytes(w: Worker) -> int:
    """The worker's gpulab_worker_warm_bytes, as Prometheus reads it."""
    import urllib.request

    req = urllib.request.Request(w.control + "/metrics", headers={"Authorization": f"token {w.admin}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(metric_samples(r.read().decode())[("gpulab_worker_warm_bytes", ())])


def test_freeze_and_thaw_through_the_chain_keep_the_bytes(node):
    """The control API's offload freezes the native process (on this worker: the double's vGPU goes warm, and the
    warm tier counts its bytes once); its next CUDA call thaws it, and the bytes it wrote come back."""
    p = Native(node)
    try:
        assert p("!ok(d.cuInit(0)); ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); "
                 "ok(d.cuCtxSetCurrent(ctx))") is None
        assert p("!data = np.arange(1 << 20, dtype=np.uint32); ptr = ok(d.cuMemAlloc(data.nbytes)); "
                 "ok(d.cuMemcpyHtoD(ptr, data.ctypes.data, data.nbytes))") is None
        v = vgpu_of(node, "vgpu")
        status, body = node.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "warm"})
        assert status == 200, body
        below = vgpu_of(node, "node")
        assert below["tiers"]["warm"] >= 4 << 20 and below["tiers"]["hot"] == 0  # the double's memory moved
        assert warm_bytes(node) == below["tiers"]["warm"]  # not counted a second time as the native process's
        me = vgpu_of(node, "vgpu")["processes"][0]
        assert me["mode"] == "native" and me["tiers"]["warm"] == 4 << 20 and me["tiers"]["hot"] == 0
        back = p("!out = np.zeros_like(data); ok(d.cuMemcpyDtoH(out.ctypes.data, ptr, out.nbytes))")
        assert back is None
        assert p("bool((out == data).all())") is True
        me = vgpu_of(node, "vgpu")["processes"][0]
        assert me["tiers"]["hot"] == 4 << 20 and me["tiers"]["warm"] == 0
        moves = vgpu_of(node, "vgpu")["moves"]
        assert moves["offloads"] == 1 and moves["restores"] == 1
        assert vgpu_of(node, "node")["tiers"]["warm"] == 0 and warm_bytes(node) == 0
    finally:
        p.close()
    assert "thawed" in node.log_text() and "frozen" in node.log_text()


def close_all(node: Worker, *programs) -> None:
    """Ends the programs a test started (None: not started), then the worker."""
    for prog in programs:
        if prog is not None:
            prog.close()
    node.stop()


def small_node(tmp_path, double, tokens: dict, extra=()) -> Worker:
    """A node whose GPUs hold 128 MiB each: full after a few allocations."""
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    w = Worker(tmp_path, token=None, extra=("--emulated-gpus", "2", "--emulated-memory", "128M", "--name", "node",
                                            "--tokens-file", str(tmp_path / "tokens.json"), *extra))
    w.double = double
    return w


OPEN = "!ok(d.cuInit(0)); ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))"
WRITE = ("!data = np.random.default_rng({seed}).integers(0, 255, {n}, dtype=np.uint8); ptr = ok(d.cuMemAlloc({n})); "
         "ok(d.cuMemcpyHtoD(ptr, data.ctypes.data, data.nbytes))")
READ_BACK = ("!out = np.zeros_like(data); ok(d.cuMemcpyDtoH(out.ctypes.data, ptr, out.nbytes)); "
             "same = bool((out == data).all())")


# In a Native program: mark its slot as the shim does after a managed allocation (the driver double refuses those),
# through the ledger as the process maps it (names at module level: the driver runs each line with exec).
MARK_UVM = ("!import builtins, mmap, os; from gpu_worker.daemon import ledger as L; builtins.os = os; "
            "fd = memfd('gpulab-vgpu-ledger'); "
            "m = mmap.mmap(fd, os.fstat(fd).st_size); led = L.Ledger.__new__(L.Ledger); led.map = m; "
            "led.slots = (m.size() - L.HEADER_SIZE) // L.SLOT_SIZE; builtins.led = led; "
            "mine = [i for i in range(led.slots) if (led.read_slot(i) or {}).get('client_pid') == os.getpid()][0]; "
            "m[led._slot_off(mine) + L.TIER_OFF + L.T_FROZEN + 1] = 1")


def test_a_native_process_whose_gpu_is_full_gets_room_from_idle_vgpus(tmp_path, driver_double):
    """The driver (here the double, whose vGPU has the lowest QoS, so that its own executor's asks for room move
    nobody) finds the GPU full: the native shim asks the worker for room, an idle vGPU of the same QoS moves to
    warm, the allocation is made. Where only a vGPU of higher QoS holds the GPU, the allocation fails with
    CUDA_ERROR_OUT_OF_MEMORY and the worker's reason, and its charge is given back."""
    node = small_node(tmp_path, driver_double, {
        "node": {"gpus": [0, 1], "qos": "low"}, "vgpu": {"vram": "64M", "gpus": [1]},
        "idle": {"vram": "96M", "gpus": [1]}, "boss": {"vram": "96M", "gpus": [1], "qos": "high"}})
    idle = p = boss = None
    try:
        idle = Native(node, "idle", forwarded=True)
        assert idle(OPEN) is None and idle(WRITE.format(seed=1, n=96 << 20)) is None
        p = Native(node)
        assert p(OPEN) is None
        assert p("name(d.cuMemAlloc(48 << 20))") == "CUDA_SUCCESS"  # 96 + 48 MiB > 128 MiB: room was made
        moved = vgpu_of(node, "idle")
        assert moved["tiers"]["hot"] == 0 and moved["tiers"]["warm"] == 96 << 20
        assert vgpu_of(node, "vgpu")["used"] == 48 << 20
        v = vgpu_of(node, "vgpu")
        assert f"eviction on GPU 1 for vGPU {v['id']} (process {p.pid}, 48.0 MiB): {moved['id']} -> warm" \
            in node.log_text()
        said = p.close()
        p = None
        assert "of this vGPU is full" not in said, said
        # only a vGPU of higher QoS holds the GPU now: nothing may move for this one
        boss = Native(node, "boss", forwarded=True)
        assert boss(OPEN) is None and boss(WRITE.format(seed=2, n=96 << 20)) is None
        p = Native(node)
        assert p(OPEN) is None
        assert p("name(d.cuMemAlloc(48 << 20))") == "CUDA_ERROR_OUT_OF_MEMORY"
        assert vgpu_of(node, "vgpu")["used"] == 0 and vgpu_of(node, "boss")["tiers"]["hot"] == 96 << 20
        said = p.close()
        p = None
        assert ("cuMemAlloc refused: GPU 0 of this vGPU is full: the driver has no room left (0.0 MiB held by this "
                "process), 48.0 MiB more wanted; the other vGPUs there have a higher QoS than this one (medium) and "
                "are never moved for it (CUDA_ERROR_OUT_OF_MEMORY)") in said, said
        assert boss(READ_BACK) is None and boss("same") is True
        boss.close()
        boss = None
        assert idle(READ_BACK) is None and idle("same") is True  # restored with its bytes
    finally:
        close_all(node, p, boss, idle)


def test_an_idle_native_vgpu_is_frozen_to_make_room_for_another(tmp_path, driver_double):
    """A forwarded vGPU's allocation finds the GPU full; the memory there is a native vGPU's of lower QoS (held,
    on this worker, by the double's vGPU of high QoS, which is never moved for it). The eviction counts the
    native processes' memory, freezes them, and the allocation is made; the native process's next call thaws it
    with its bytes. A native process the checkpoint cannot move (managed memory) is no candidate: the next such
    allocation is refused at once, not after waiting for a freeze that cannot happen."""
    node = small_node(tmp_path, driver_double, {
        "node": {"gpus": [0, 1], "qos": "high"}, "vgpu": {"vram": "64M", "gpus": [1], "qos": "low"},
        "hungry": {"vram": "96M", "gpus": [1]}})
    p = None
    try:
        p = Native(node)
        assert p(OPEN) is None and p(WRITE.format(seed=3, n=48 << 20)) is None
        hungry = node.run(PRELUDE + "setup(); done(r=name(d.cuMemAlloc(96 << 20)))", token="hungry")
        assert hungry.result["r"] == "CUDA_SUCCESS", hungry.stderr
        me = vgpu_of(node, "vgpu")["processes"][0]
        assert me["mode"] == "native" and me["tiers"]["warm"] == 48 << 20 and me["tiers"]["hot"] == 0
        assert "frozen" in node.log_text()
        assert p(READ_BACK) is None and p("same") is True  # thawed: the bytes came back
        assert vgpu_of(node, "vgpu")["processes"][0]["tiers"]["hot"] == 48 << 20
        assert p(MARK_UVM) is None
        hungry = node.run(PRELUDE + "setup(); done(r=name(d.cuMemAlloc(96 << 20)))", token="hungry")
        assert hungry.result["r"] == "CUDA_ERROR_OUT_OF_MEMORY"
        assert ("the other vGPUs there have a higher QoS than this one (medium) and are never moved for it; 1 vGPU(s) "
                "there hold only memory that the driver's checkpoint cannot move (managed or shared between "
                "processes)") in hungry.stderr, hungry.stderr
        assert vgpu_of(node, "vgpu")["processes"][0]["tiers"]["hot"] == 48 << 20
    finally:
        close_all(node, p)


def test_a_native_vgpu_on_two_gpus_counts_its_memory_on_the_one_that_holds_it(tmp_path, driver_double):
    """A low-QoS native vGPU on both GPUs writes 48 MiB on its second (GPU 1). Room wanted on GPU 0 never freezes
    it (another vGPU there moves instead); room wanted on GPU 1 beyond half its bytes does, and its next call
    thaws it with its bytes. (Counted evenly, as before, it was a victim on GPU 0 and too small on GPU 1.)"""
    node = small_node(tmp_path, driver_double, {
        "node": {"gpus": [0, 1], "qos": "high"}, "pair": {"vram": "64M", "gpus": [0, 1], "qos": "low"},
        "filler": {"vram": "100M", "gpus": [0]}, "hungry0": {"vram": "64M", "gpus": [0]},
        "hungry1": {"vram": "112M", "gpus": [1]}})
    p = filler = None
    try:
        p = Native(node, "pair")
        assert p(OPEN.replace("cuDeviceGet(0)", "cuDeviceGet(1)")) is None
        assert p(WRITE.format(seed=7, n=48 << 20)) is None
        filler = Native(node, "filler", forwarded=True)
        assert filler(OPEN) is None and filler(WRITE.format(seed=8, n=100 << 20)) is None
        hungry = node.run(PRELUDE + "setup(); done(r=name(d.cuMemAlloc(64 << 20)))", token="hungry0")
        assert hungry.result["r"] == "CUDA_SUCCESS", hungry.stderr
        assert vgpu_of(node, "filler")["tiers"]["warm"] == 100 << 20
        assert vgpu_of(node, "pair")["processes"][0]["tiers"]["hot"] == 48 << 20  # not frozen for GPU 0
        hungry = node.run(PRELUDE + "setup(); done(r=name(d.cuMemAlloc(112 << 20)))", token="hungry1")
        assert hungry.result["r"] == "CUDA_SUCCESS", hungry.stderr
        assert vgpu_of(node, "pair")["processes"][0]["tiers"]["warm"] == 48 << 20  # frozen for GPU 1
        assert p(READ_BACK) is None and p("same") is True
        assert filler(READ_BACK) is None and filler("same") is True
    finally:
        close_all(node, p, filler)


def test_a_checkpoint_the_warm_budget_cannot_hold_is_not_made(tmp_path, driver_double):
    """The warm budget (32 MiB) is smaller than an idle native process's 48 MiB: an offload by hand answers 507 with
    the budget's figures and leaves it running; an eviction passes it over and says why; its bytes stay hot."""
    node = small_node(tmp_path, driver_double, {
        "node": {"gpus": [0, 1], "qos": "high"}, "vgpu": {"vram": "64M", "gpus": [1], "qos": "low"},
        "hungry": {"vram": "96M", "gpus": [1]}}, extra=("--GPUWorker.warm_budget=32M",))
    p = None
    try:
        p = Native(node)
        assert p(OPEN) is None and p(WRITE.format(seed=6, n=48 << 20)) is None
        v = vgpu_of(node, "vgpu")
        status, body = node.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "cold"}, timeout=40)
        assert status == 507, body
        held = format_size((48 << 20) + v["overhead"])
        assert (f"process {p.pid}: CUDA_ERROR_OUT_OF_MEMORY, because its checkpoint would keep {held} in host "
                f"memory and the warm budget (32.0 MiB) has 32.0 MiB left") in body["message"], body
        assert vgpu_of(node, "vgpu")["tiers"] == {"hot": 48 << 20, "warm": 0, "cold": 0} and warm_bytes(node) == 0
        hungry = node.run(PRELUDE + "setup(); done(r=name(d.cuMemAlloc(96 << 20)))", token="hungry")
        assert hungry.result["r"] == "CUDA_ERROR_OUT_OF_MEMORY"
        assert ("1 native vGPU(s) there cannot be frozen: the warm budget has no room for what their checkpoint "
                "would keep in host memory") in hungry.stderr, hungry.stderr
        assert p(READ_BACK) is None and p("same") is True
        assert vgpu_of(node, "vgpu")["processes"][0]["tiers"]["hot"] == 48 << 20
    finally:
        close_all(node, p)


def test_a_freeze_the_warm_budget_refused_is_asked_again_once_the_budget_has_room(tmp_path, driver_double):
    """Two idle native vGPUs of 48 MiB and a warm budget of 64 MiB: the idle policy freezes one and the budget
    refuses the other. When the frozen one is touched (thawed) the budget has room again, and the policy freezes the
    other without waiting for a touch or cold_after (which is never here); both keep their bytes. (Each process's
    driver double has a vGPU of its own, which is what the emulated checkpoint moves.)"""
    node = small_node(tmp_path, driver_double, {
        "node-a": {"gpus": [0, 1], "qos": "high"}, "node-b": {"gpus": [0, 1], "qos": "high"},
        "one": {"vram": "64M", "gpus": [0], "qos": "low"}, "two": {"vram": "64M", "gpus": [1], "qos": "low"}},
        extra=("--GPUWorker.warm_budget=64M", "--GPUWorker.warm_after={'low': 1}",
               "--GPUWorker.cold_after={'low': 0}"))
    procs = {}

    def warm(token):
        return vgpu_of(node, token)["processes"][0]["tiers"]["warm"]

    def wait_for(what, seconds=20):
        deadline = time.monotonic() + seconds
        while not what() and time.monotonic() < deadline:
            time.sleep(0.1)
        return what()

    try:
        for token, driver, seed in (("one", "node-a", 11), ("two", "node-b", 12)):
            procs[token] = Native(node, token, driver_token=driver)
            assert procs[token](OPEN) is None
            assert procs[token](WRITE.format(seed=seed, n=48 << 20)) is None
        refusal = "not frozen: its checkpoint would keep"
        assert wait_for(lambda: refusal in node.log_text() and any(warm(t) for t in procs)), node.log_text()[-2000:]
        frozen = next(t for t in procs if warm(t))
        other = next(t for t in procs if t != frozen)
        assert warm(frozen) == 48 << 20 and warm(other) == 0
        assert procs[frozen](READ_BACK) is None and procs[frozen]("same") is True  # its call thaws it
        assert wait_for(lambda: warm(other) == 48 << 20), node.log_text()[-2000:]
        assert procs[other](READ_BACK) is None and procs[other]("same") is True
    finally:
        close_all(node, *procs.values())


def test_a_thaw_short_of_room_moves_other_vgpus_off_the_gpu(tmp_path, driver_double):
    """A frozen native process's next call finds its GPU filled meanwhile by a vGPU of its QoS: the thaw asks the
    eviction for room (the double's own asks move nobody: its vGPU has the lowest QoS), the filler moves to warm,
    the process is restored with its bytes."""
    node = small_node(tmp_path, driver_double, {
        "node": {"gpus": [0, 1], "qos": "low"}, "vgpu": {"vram": "64M", "gpus": [1]},
        "filler": {"vram": "96M", "gpus": [1]}})
    p = filler = None
    try:
        p = Native(node)
        assert p(OPEN) is None and p(WRITE.format(seed=4, n=48 << 20)) is None
        v = vgpu_of(node, "vgpu")
        status, body = node.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "warm"})
        assert status == 200, body
        filler = Native(node, "filler", forwarded=True)
        assert filler(OPEN) is None and filler(WRITE.format(seed=5, n=96 << 20)) is None  # 32 MiB left
        assert p(READ_BACK) is None and p("same") is True
        assert vgpu_of(node, "vgpu")["processes"][0]["tiers"]["hot"] == 48 << 20
        assert vgpu_of(node, "filler")["tiers"] == {"hot": 0, "warm": 96 << 20, "cold": 0}
        log = node.log_text()
        assert "waiting for 50331648 bytes of room on its GPU before restoring" in log
        assert f"eviction on GPU 1 for vGPU {v['id']}" in log and "thawed" in log
        assert filler(READ_BACK) is None and filler("same") is True
    finally:
        close_all(node, p, filler)


def test_a_malformed_request_for_room_is_answered_with_why_and_an_oversized_one_ends_the_attachment(node):
    """OP_NATIVE_ROOM from a raw native attachment: what the worker cannot read is CUDA_ERROR_OUT_OF_MEMORY with a
    sentence and the attachment goes on; a sound one is answered with the room there is; a payload past its
    bound closes the attachment and frees the slot."""
    import socket

    from gpu_worker.api.protocol import HELLO, PROTOCOL_VERSION, REP_HEADER, REQ_HEADER
    from gpu_worker.api.wire import OP_NATIVE_HELLO, OP_NATIVE_ROOM

    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(node.unix[len("unix://"):])
    tok = b"vgpu"
    sock.sendall(REQ_HEADER.pack(HELLO.size + len(tok), OP_NATIVE_HELLO, 0) + HELLO.pack(PROTOCOL_VERSION, os.getpid(),
                                                                                         len(tok)) + tok)
    head, fds, _flags, _addr = socket.recv_fds(sock, REP_HEADER.size, 4, socket.MSG_WAITALL)
    for fd in fds:
        os.close(fd)
    plen, res, _ = REP_HEADER.unpack(head)
    assert res == 0 and b"eviction_wait_ms=10000" in sock.recv(plen, socket.MSG_WAITALL)

    def ask(body: bytes) -> tuple[int, str]:
        sock.sendall(REQ_HEADER.pack(len(body), OP_NATIVE_ROOM, 0) + body)
        plen, res, _ = REP_HEADER.unpack(sock.recv(REP_HEADER.size, socket.MSG_WAITALL))
        return res, sock.recv(plen, socket.MSG_WAITALL).decode()

    for bad in (b"garbage", b'{"device": 1, "need": 1, "wait": 1}', b'{"device": 0, "need": -5, "wait": 1}'):
        res, why = ask(bad)
        assert res == 2 and why.startswith("the worker did not understand this process's request for room"), why
        assert why.endswith("expected its device's ordinal, the bytes it needs and the seconds it waits")
    res, freed = ask(b'{"device": 0, "need": 1048576, "wait": 1}')  # an empty 4 GiB GPU: the room is there
    assert res == 0 and int(freed) == 4 << 30
    assert len(vgpu_of(node, "vgpu")["processes"]) == 1
    sock.sendall(REQ_HEADER.pack(1000, OP_NATIVE_ROOM, 0) + b"x" * 1000)
    try:
        closed = sock.recv(16) == b""
    except ConnectionResetError:  # closed with the rest of the payload unread
        closed = True
    assert closed
    sock.close()
    deadline = time.monotonic() + 10
    while vgpu_of(node, "vgpu")["processes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vgpu_of(node, "vgpu")["processes"] == []
    assert "unexpected frame (opcode 7, 1000 bytes); closing" in node.log_text()


def test_a_process_the_driver_cannot_checkpoint_stays_and_the_offload_says_why(node):
    """Managed (UVM) memory: the shim marks its slot when such an allocation succeeds (the driver double refuses
    managed allocations, so the program sets the mark itself here, where the shim would); the offload is then
    refused for it with the reason, and the process and its bytes stay on the GPU."""
    p = Native(node)
    try:
        assert p("!ok(d.cuInit(0)); ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); "
                 "ok(d.cuCtxSetCurrent(ctx)); ptr = ok(d.cuMemAlloc(4 << 20))") is None
        assert p(MARK_UVM) is None
        v = vgpu_of(node, "vgpu")
        status, body = node.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "warm"})
        assert status == 409, body
        assert body["message"] == (f"the offload to warm of vGPU {v['id']} failed (process {p.pid}: "
                                   f"CUDA_ERROR_NOT_SUPPORTED, because it uses managed (UVM) memory, which the "
                                   f"driver's checkpoint does not move); the worker's log says why, and \"tiers\" "
                                   f"where its memory is now")
        me = vgpu_of(node, "vgpu")["processes"][0]
        assert me["tiers"]["hot"] == 4 << 20 and me["tiers"]["warm"] == 0
        assert vgpu_of(node, "node")["tiers"]["warm"] == 0  # nothing was checkpointed below
    finally:
        p.close()


def test_a_wrong_token_or_a_tcp_worker_is_cuinit_s_error_with_a_reason(node):
    bad = run_native(node, "done(r=name(d.cuInit(0)))", token="nope")
    assert bad.result["r"] == "CUDA_ERROR_NOT_PERMITTED"
    assert "the session token is not valid for this worker" in bad.stderr
    env = native_env(node)
    env["GPULAB_WORKER"] = "tcp://127.0.0.1:1"
    p = subprocess.run([sys.executable, "-c", PRELUDE + "done(r=name(d.cuInit(0)))"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert json.loads(p.stdout)["r"] == "CUDA_ERROR_NO_DEVICE"
    assert "needs its worker on this node" in p.stderr


def test_without_a_real_driver_every_call_says_so(node, tmp_path):
    env = native_env(node)
    env["GPULAB_REAL_LIBCUDA"] = str(tmp_path / "missing.so")
    p = subprocess.run([sys.executable, "-c", PRELUDE + "done(r=name(d.cuInit(0)))"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert json.loads(p.stdout)["r"] == "CUDA_ERROR_NO_DEVICE"
    assert f"GPULAB_REAL_LIBCUDA={tmp_path / 'missing.so'} is not a libcuda.so.1 this shim can load" in p.stderr


def test_the_real_driver_is_found_on_the_library_path_but_never_ourselves(node):
    """Without GPULAB_REAL_LIBCUDA: the native directory comes first on LD_LIBRARY_PATH and is skipped."""
    env = native_env(node)
    del env["GPULAB_REAL_LIBCUDA"]
    env["LD_LIBRARY_PATH"] = f"{native_dir()}:{node.double.parent}"
    env["GPULAB_DEBUG"] = "1"
    p = subprocess.run([sys.executable, "-c", PRELUDE + "done(r=name(d.cuInit(0)), n=ok(d.cuDeviceGetCount()))"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert json.loads(p.stdout) == {"r": "CUDA_SUCCESS", "n": 1}
    assert f"native: real libcuda.so.1 {node.double.parent}/libcuda.so.1" in p.stderr


# ------------------------------------------------------------------------------------------ the NVML stand-in
@pytest.fixture(scope="module")
def nvml_double(tmp_path_factory):
    """build the test double of the node's libnvidia-ml.so.1 (tests/data/nvml_double.c)"""
    out = tmp_path_factory.mktemp("nvml-double") / "libnvidia-ml.so.1"
    subprocess.run(["cc", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-o", str(out),
                    str(ROOT / "tests" / "data" / "nvml_double.c")], check=True)
    return out


NVML_PROBE = """
import ctypes
nvml = ctypes.CDLL("libnvidia-ml.so.1")
class Mem(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]
class MemV2(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]
def nvml_devices():
    n, h, buf = ctypes.c_uint(), ctypes.c_void_p(), ctypes.create_string_buffer(96)
    init = nvml.nvmlInit_v2()
    if init:
        return {"init": init}
    nvml.nvmlDeviceGetCount_v2(ctypes.byref(n))
    out = {"count": n.value, "beyond": nvml.nvmlDeviceGetHandleByIndex_v2(n.value, ctypes.byref(h)), "devices": []}
    for i in range(n.value):
        nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h))
        m, m2 = Mem(), MemV2(version=(2 << 24) | ctypes.sizeof(MemV2))
        nvml.nvmlDeviceGetMemoryInfo(h, ctypes.byref(m))
        nvml.nvmlDeviceGetMemoryInfo_v2(h, ctypes.byref(m2))
        nvml.nvmlDeviceGetUUID(h, buf, 96)
        uuid = buf.value.decode()
        nvml.nvmlDeviceGetName(h, buf, 96)
        out["devices"].append({"uuid": uuid, "name": buf.value.decode(), "v1": [m.total, m.used, m.free],
                               "v2": [m2.total, m2.reserved, m2.used, m2.free]})
    return out
"""


def nvml_env(double) -> dict:
    gpus = describe_gpus("emulated", "node", 4 << 30, 2)
    return {"GPULAB_REAL_NVML": str(double), "GPULAB_NVML_DOUBLE_GPUS": ",".join(g["uuid"] for g in gpus),
            "GPULAB_NVML_DOUBLE_MEMORY": str(4 << 30)}


def test_nvml_shows_the_vgpu_as_cuda_does(node, nvml_double):
    """libnvidia-ml.so.1 in the native directory: the vGPU's GPU only, its quota as total, what the vGPU's
    processes hold (native and forwarded, from the ledger) as used; names and UUIDs are the node's NVML's."""
    gpus = describe_gpus("emulated", "node", 4 << 30, 2)
    holder = Native(node)
    try:
        assert holder("!ok(d.cuInit(0)); ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); "
                      "ok(d.cuCtxSetCurrent(ctx)); p = ok(d.cuMemAlloc(16 << 20))") is None
        r = run_native(node, NVML_PROBE + textwrap.dedent(f"""
            seen = nvml_devices()
            h = ctypes.c_void_p()
            other = nvml.nvmlDeviceGetHandleByUUID(b"{gpus[0]['uuid']}", ctypes.byref(h))
            ours = nvml.nvmlDeviceGetHandleByUUID(b"{gpus[1]['uuid']}", ctypes.byref(h))
            by_bus = [nvml.nvmlDeviceGetHandleByPciBusId_v2(b"00000000:%02X:00.0" % i, ctypes.byref(h))
                      for i in (16, 17)]
            ok(d.cuInit(0)); ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))
            p = ok(d.cuMemAlloc(8 << 20))
            free, total = ok(d.cuMemGetInfo())
            after = nvml_devices()["devices"][0]
            done(seen=seen, other=other, ours=ours, by_bus=by_bus, cuda=[int(total), int(free)], after=after)
        """), env_extra=nvml_env(nvml_double))
    finally:
        holder.close()
    got = r.result
    assert got["seen"]["count"] == 1 and got["seen"]["beyond"] == 2  # NVML_ERROR_INVALID_ARGUMENT past the count
    dev = got["seen"]["devices"][0]
    assert dev["uuid"] == gpus[1]["uuid"] and dev["name"] == "gpulab NVML double"  # passed through
    assert dev["v1"] == [QUOTA, 16 << 20, QUOTA - (16 << 20)]
    assert dev["v2"] == [QUOTA, 0, 16 << 20, QUOTA - (16 << 20)]
    assert got["other"] == 6 and got["ours"] == 0  # NVML_ERROR_NOT_FOUND for the node's other GPU
    assert got["by_bus"] == [6, 0]
    # NVML and CUDA agree within the process: its own allocation counts too
    assert got["cuda"] == [QUOTA, QUOTA - (24 << 20)]
    assert got["after"]["v1"] == [QUOTA, 24 << 20, QUOTA - (24 << 20)]


def among_four(w: Worker, double, code: str):
    """Runs ``code`` in a probe of vGPU "neighbour" whose GPU, by the node's NVML (double), runs four processes:
    another process of that vGPU (32 MiB; ``ours`` in the code), one of another vGPU (16 MiB; ``theirs``), a
    stranger (pid 1, 1 GiB) and the probe itself (8 MiB). The probe's result, and the pids of ours and theirs."""
    ours, theirs = Native(w, token="neighbour"), Native(w)
    try:
        assert ours("!ok(d.cuInit(0))") is None and theirs("!ok(d.cuInit(0))") is None
        r = run_native(w, NVML_PROBE + textwrap.dedent(f"""
            import os
            ours, theirs = {ours.pid}, {theirs.pid}
            ok(d.cuInit(0))
            os.environ["GPULAB_NVML_DOUBLE_PROCESSES"] = (f"{{theirs}}:16777216,{{ours}}:33554432,1:1073741824,"
                                                          f"{{os.getpid()}}:8388608")
        """) + textwrap.dedent(code), token="neighbour", env_extra=nvml_env(double))
    finally:
        ours.close()
        theirs.close()
    return r, ours.pid, theirs.pid


def test_nvml_lists_only_the_vgpu_s_processes(node, nvml_double):
    """The node's NVML runs four processes on the GPU: another process of this vGPU, one of another vGPU, a
    stranger (pid 1) and the probe itself; the stand-in lists the two of this vGPU, by NVML's rules for the
    count, in the older lists and in the newer detail list alike."""
    r, ours, _theirs = among_four(node, nvml_double, """
            class Proc(ctypes.Structure):
                _fields_ = [("pid", ctypes.c_uint), ("used", ctypes.c_ulonglong), ("gi", ctypes.c_uint),
                            ("ci", ctypes.c_uint)]
            assert nvml.nvmlInit_v2() == 0
            h = ctypes.c_void_p()
            nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h))
            n = ctypes.c_uint(0)
            asked = nvml.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n), None)
            one, n1 = (Proc * 1)(), ctypes.c_uint(1)
            short = nvml.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n1), one)
            procs, n8 = (Proc * 8)(), ctypes.c_uint(8)
            full = nvml.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n8), procs)
            listed = [[p.pid, p.used] for p in procs[:n8.value]]
            absent = nvml.nvmlDeviceGetGraphicsRunningProcesses_v3(h, ctypes.byref(n8), procs)
            class Detail(ctypes.Structure):  # nvmlProcessDetail_v1_t
                _fields_ = [("pid", ctypes.c_uint), ("used", ctypes.c_ulonglong), ("gi", ctypes.c_uint),
                            ("ci", ctypes.c_uint), ("cc", ctypes.c_ulonglong)]
            class DetailList(ctypes.Structure):  # nvmlProcessDetailList_v1_t
                _fields_ = [("version", ctypes.c_uint), ("mode", ctypes.c_uint), ("entries", ctypes.c_uint),
                            ("procs", ctypes.POINTER(Detail))]
            details = (Detail * 8)()
            dl = DetailList(version=ctypes.sizeof(DetailList) | (1 << 24), mode=0, entries=1, procs=details)
            detail_short = [nvml.nvmlDeviceGetRunningProcessDetailList(h, ctypes.byref(dl)), dl.entries]
            dl.entries = 8
            detail_full = nvml.nvmlDeviceGetRunningProcessDetailList(h, ctypes.byref(dl))
            detailed = [[d.pid, d.used] for d in details[:dl.entries]]
            done(asked=[asked, n.value], short=[short, n1.value], full=full, listed=listed, me=os.getpid(),
                 absent=absent, detail_short=detail_short, detail_full=detail_full, detailed=detailed)
        """)
    got = r.result
    assert got["asked"] == [7, 2] and got["short"] == [7, 2]  # NVML_ERROR_INSUFFICIENT_SIZE: two are needed
    assert got["full"] == 0 and got["listed"] == [[ours, 32 << 20], [got["me"], 8 << 20]], got
    assert got["absent"] == 13  # NVML_ERROR_FUNCTION_NOT_FOUND: the node's NVML lacks it
    # the newer form of the list, nvmlDeviceGetRunningProcessDetailList, by the same rules
    assert got["detail_short"] == [7, 2] and got["detail_full"] == 0
    assert got["detailed"] == [[ours, 32 << 20], [got["me"], 8 << 20]], got


def test_nvml_samples_utilization_of_the_vgpu_s_processes_only(node, nvml_double):
    """The node's NVML has a utilization sample for each of four processes (SM % = its MiB % 100, time stamps
    1000..1003 µs): the stand-in gives this vGPU's two, in both forms, by NVML's rules for the count and for
    lastSeenTimeStamp, and NVML_ERROR_NOT_FOUND where none of this vGPU's is left."""
    r, ours, theirs = among_four(node, nvml_double, """
            class Sample(ctypes.Structure):  # nvmlProcessUtilizationSample_t
                _fields_ = [("pid", ctypes.c_uint), ("ts", ctypes.c_ulonglong), ("sm", ctypes.c_uint),
                            ("mem", ctypes.c_uint), ("enc", ctypes.c_uint), ("dec", ctypes.c_uint)]
            class Info(ctypes.Structure):  # nvmlProcessUtilizationInfo_v1_t
                _fields_ = [("ts", ctypes.c_ulonglong), ("pid", ctypes.c_uint), ("sm", ctypes.c_uint),
                            ("mem", ctypes.c_uint), ("enc", ctypes.c_uint), ("dec", ctypes.c_uint),
                            ("jpg", ctypes.c_uint), ("ofa", ctypes.c_uint)]
            class Infos(ctypes.Structure):  # nvmlProcessesUtilizationInfo_v1_t
                _fields_ = [("version", ctypes.c_uint), ("count", ctypes.c_uint), ("last", ctypes.c_ulonglong),
                            ("procs", ctypes.POINTER(Info))]
            assert nvml.nvmlInit_v2() == 0
            h = ctypes.c_void_p()
            nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h))
            def sampled(room, last):
                buf, n = (Sample * max(room, 1))(), ctypes.c_uint(room)
                rc = nvml.nvmlDeviceGetProcessUtilization(h, buf if room else None, ctypes.byref(n),
                                                          ctypes.c_ulonglong(last))
                return [rc, n.value, [[s.pid, s.ts, s.sm] for s in buf[:n.value]] if rc == 0 else []]
            def infos(room, last):
                buf = (Info * max(room, 1))()
                got = Infos(version=ctypes.sizeof(Infos) | (1 << 24), count=room, last=last, procs=buf)
                rc = nvml.nvmlDeviceGetProcessesUtilizationInfo(h, ctypes.byref(got))
                return [rc, got.count, [[e.pid, e.ts, e.sm] for e in buf[:got.count]] if rc == 0 else []]
            out = dict(probe=sampled(0, 0), short=sampled(1, 0), full=sampled(8, 0), newer=sampled(8, 1001),
                       none_newer=sampled(8, 1003), info_short=infos(1, 0), info_full=infos(8, 0),
                       info_newer=infos(8, 1001))
            os.environ["GPULAB_NVML_DOUBLE_PROCESSES"] = f"{theirs}:16777216,1:1073741824"  # only others' samples
            done(**out, only_others=sampled(8, 0), info_only_others=infos(8, 0), me=os.getpid())
        """)
    got = r.result
    mine = [[ours, 1001, 32], [got["me"], 1003, 8]]
    assert got["probe"] == [7, 2, []] and got["short"] == [7, 2, []]  # NVML_ERROR_INSUFFICIENT_SIZE: two needed
    assert got["full"] == [0, 2, mine], got
    assert got["newer"] == [0, 1, mine[1:]] and got["none_newer"][0] == 6  # NVML_ERROR_NOT_FOUND
    assert got["info_short"] == [7, 2, []] and got["info_full"] == [0, 2, mine]
    assert got["info_newer"] == [0, 1, mine[1:]]
    assert got["only_others"][0] == 6 and got["info_only_others"][0] == 6


def test_nvml_shows_how_busy_the_vgpu_kept_its_gpu_not_the_card(node, nvml_double):
    """The node's NVML says the card is 97 % busy (other users' work). A 25 % vGPU that may not burst shows 0
    before it runs anything, about 25 % while its kernels run back to back (the worker's look at its kernel time
    over the last second), and 0 again once they stop; the memory controller's 41 % stays the card's."""
    from workertools import SLEEP_PTX

    r = run_native(node, NVML_PROBE + f"SLEEP_PTX = {SLEEP_PTX!r}\n" + textwrap.dedent("""
        import threading, time
        class Rates(ctypes.Structure):  # nvmlUtilization_t
            _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]
        def rates():
            got, h = Rates(), ctypes.c_void_p()
            nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h))
            return [nvml.nvmlDeviceGetUtilizationRates(h, ctypes.byref(got)), got.gpu, got.memory]
        assert nvml.nvmlInit_v2() == 0
        ok(d.cuInit(0))
        ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0)))); ok(d.cuCtxSetCurrent(ctx))
        fn = ok(d.cuModuleGetFunction(ok(d.cuModuleLoadData(SLEEP_PTX.encode() + b"\\0")), b"sleep_ms"))
        time.sleep(1.5)  # the worker has looked at the vGPU since it opened
        before = rates()
        arg = np.array([10], np.uint32)
        params = np.array([arg.ctypes.data], np.uint64)
        stop = threading.Event()
        def busy():
            ok(d.cuCtxSetCurrent(ctx))
            while not stop.is_set():
                ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, params.ctypes.data, 0))
                ok(d.cuCtxSynchronize())
        runner = threading.Thread(target=busy)
        runner.start()
        during = []
        for _ in range(3):
            time.sleep(1.2)
            during.append(rates())
        stop.set()
        runner.join()
        time.sleep(2.5)
        done(before=before, during=during, after=rates())
    """), token="strict", env_extra=nvml_env(nvml_double))
    got = r.result
    assert got["before"] == [0, 0, 41], got
    assert all(rc == 0 and memory == 41 for rc, _gpu, memory in got["during"]), got
    busy = sorted(gpu for _rc, gpu, _memory in got["during"])
    assert 12 <= busy[1] <= 40 and busy[-1] <= 60, got  # 25 % of the GPU, looked at over about a second
    assert got["after"] == [0, 0, 41], got


def test_nvml_without_a_vgpu_says_why(node, nvml_double):
    r = run_native(node, NVML_PROBE + "done(**nvml_devices())", token="nope", env_extra=nvml_env(nvml_double))
    assert r.result == {"init": 4}  # NVML_ERROR_NO_PERMISSION
    assert "the session token is not valid for this worker" in r.stderr


def test_a_node_without_the_native_build_offers_the_pool_no_native_socket(tmp_path, monkeypatch):
    """Not x86-64 (no lib/native/libcuda.so.1): the worker keeps its Unix socket for forwarded sessions but does
    not give it to the pool as the native one, so the pool forwards its local vGPUs instead of having their
    servers load the real driver unaccounted."""
    from gpu_worker import shim
    from gpu_worker.daemon.worker import GPUWorker

    w = GPUWorker(unix_socket=str(tmp_path / "w.sock"))
    assert w._native_socket() == str(tmp_path / "w.sock")  # this machine has the native build
    monkeypatch.setattr(shim, "native_dir", lambda: tmp_path / "none")
    assert w._native_socket() == ""
    assert GPUWorker()._native_socket() == ""  # no Unix socket at all


def test_the_checkpoint_helper_finds_the_driver_where_the_processes_do(monkeypatch):
    """The driver's checkpoint must be called through the node's libcuda.so.1, found as the frozen processes
    find it (an image may reach it only through LD_LIBRARY_PATH), never through gpulab's own libraries."""
    from gpu_worker.daemon.native import real_driver_env
    from gpu_worker.shim import shim_dir

    monkeypatch.setenv("LD_LIBRARY_PATH", f"{native_dir()}:/usr/local/nvidia/lib64:{shim_dir()}/:/opt/cuda/compat")
    assert real_driver_env()["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64:/opt/cuda/compat"
    monkeypatch.setenv("LD_LIBRARY_PATH", str(native_dir()))
    assert "LD_LIBRARY_PATH" not in real_driver_env()
