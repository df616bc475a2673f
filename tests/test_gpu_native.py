"""Native mode on a REAL GPU: unmodified PyTorch, CuPy and JAX programs in child processes with the native
libcuda.so.1 (`gpu_worker.shim.native_dir()` first on LD_LIBRARY_PATH, GPULAB_WORKER the worker's Unix socket,
GPULAB_TOKEN the vGPU), the real driver below it, accounted on a real `--backend cuda` worker.

tests/test_native_mode.py shows the same without a GPU (an emulated worker and a driver double); here every
child is checked to have the native library mapped, so a pass cannot come from another libcuda. Skipped
without a GPU; run `pytest -m gpu tests/test_gpu_native.py` on a GPU machine.

The quota of the vGPUs that two processes share is 8 GiB, not 2: the worker charges each process's CUDA context
up front (512 MiB until NVML has measured one, docs/vgpu.md), so two contexts and 1.5 GiB would fill 2 GiB
before the second process could allocate anything.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from workertools import PRELUDE, ROOT, Worker, load_script

from gpu_worker.shim import build as shim_build

pytestmark = pytest.mark.gpu

bench = load_script("gpulab_bench_native", "benchmarks/native.py")

MiB, GiB = 1 << 20, 1 << 30
QUOTA = 2 * GiB
TOKENS = {"small": {"vram": "2G", "gpus": [0]},
          "oom-native": {"vram": "2G", "gpus": [0]},
          "oom-expandable": {"vram": "2G", "gpus": [0]},
          "oom-async": {"vram": "2G", "gpus": [0]},
          "roomy": {"vram": "8G", "gpus": [0]},
          "frozen": {"vram": "8G", "gpus": [0]},
          "shared": {"vram": "8G", "gpus": [0]},
          "graph": {"vram": "2G", "gpus": [0]},
          "graph-over": {"vram": "2G", "gpus": [0]},
          "host-vmm": {"vram": "2G", "gpus": [0]},
          "host-pool": {"vram": "2G", "gpus": [0]},
          "arrays": {"vram": "2G", "gpus": [0]},
          "pool-shared": {"vram": "2G", "gpus": [0]},
          "quarter-strict": {"vram": "2G", "gpus": [0], "compute": 25, "burst": False},
          "quarter-burst": {"vram": "2G", "gpus": [0], "compute": 25, "burst": True},
          "idle-low": {"vram": "8G", "gpus": [0], "qos": "low"},
          "busy": {"vram": "10G", "gpus": [0]},
          "idle-low-graph": {"vram": "8G", "gpus": [0], "qos": "low"},
          "busy-graph": {"vram": "10G", "gpus": [0]}}
# what the native shim says when it refuses an allocation (gpu_worker/shim/native/attach.c, gl_oom_say)
REFUSED = re.compile(r"refused: [\d.]+ MiB asked, [\d.]+ MiB left of this vGPU's ([\d.]+) MiB quota")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A cuda worker with a vGPU per test on GPU 0 (module-wide: one worker start for all)."""
    if not shim_build.native_supported():
        pytest.skip("native mode is built for x86-64 only")
    from gpu_worker.shim import native_dir

    lib = native_dir() / "libcuda.so.1"
    if not lib.exists():
        pytest.fail(f"the native build of the shim is missing ({lib}): run `python gpu_worker/shim/build.py`")
    tmp = tmp_path_factory.mktemp("native-gpu")
    (tmp / "tokens.json").write_text(json.dumps(TOKENS))
    w = Worker(tmp, token=None, backend="cuda", extra=("--tokens-file", str(tmp / "tokens.json")))
    w.tmp = tmp
    yield w
    w.stop()


def vgpu_of(w: Worker, token: str) -> dict:
    return bench.vgpu_of(w.vgpus(), token)


def run_native(w: Worker, token: str, code: str, env_extra=None, timeout=150):
    """A child program in native mode; it prints one JSON document last. Returns (result, stderr). A variable
    of ``env_extra`` set to None is left out of the child's environment."""
    env = bench.child_env({**bench.native_env(w.unix, token), **(env_extra or {})})
    env = {k: v for k, v in env.items() if v is not None}
    p = subprocess.run([sys.executable, "-c", bench.NATIVE_MAPPED + textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise AssertionError(f"the child failed ({p.returncode}):\n{p.stdout}\n{p.stderr}\n"
                             f"worker log:\n{w.log_text()[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result.get("native") is True, f"the native libcuda.so.1 was not mapped in the child: {result}"
    return result, p.stderr


def child(w: Worker, token: str, name: str) -> "bench.Child":
    """A native-mode child driven by code strings (benchmarks/native.py's Child), PyTorch imported."""
    c = bench.Child(bench.native_env(w.unix, token), w.tmp / f"{name}.log")
    assert c.must(bench.NATIVE_MAPPED + "import torch\nout = None") is None
    return c


def need(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed in this environment")


# ---------------------------------------------------------------------------------------------- compute share


def test_a_native_vgpu_gets_its_share_and_bursts_on_an_idle_gpu(node):
    """PyTorch matrix products for 3 s on a 25% vGPU: paced to about 25% of the GPU's time without burst, and
    lent nearly all of it with burst (nothing else runs on the GPU)."""
    need("torch")
    shares = {}
    for token in ("quarter-strict", "quarter-burst"):  # each vGPU's first and only process (its kernel time is all)
        got, _ = run_native(node, token, """
            import json, time, torch
            a = torch.randn(8192, 8192, device="cuda")  # a product takes milliseconds: launches cost little beside
            torch.cuda.synchronize()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                for _ in range(4):
                    b = a @ a
                torch.cuda.synchronize()
            wall = time.monotonic() - t0
            (a @ a).sum().item()  # one more launch reads the last kernels' times back
            print(json.dumps({"native": native_mapped(), "wall": wall}))
        """)
        shares[token] = vgpu_of(node, token)["kernel_time"] / got["wall"]
    assert shares["quarter-strict"] == pytest.approx(0.25, abs=0.08), shares
    assert shares["quarter-burst"] > 0.7, shares


# ---------------------------------------------------------------------------------------------- what it sees


def test_torch_sees_the_vgpu_s_quota_as_its_memory(node):
    need("torch")
    got, _ = run_native(node, "small", """
        import json, torch
        x = torch.ones(64 << 20, dtype=torch.uint8, device="cuda")
        free, total = torch.cuda.mem_get_info()
        print(json.dumps({"native": native_mapped(), "free": free, "total": total, "count": torch.cuda.device_count(),
                          "sum": int(x.sum().item())}))
    """)
    assert got["count"] == 1
    assert got["total"] == QUOTA
    assert 0 < got["free"] <= QUOTA - (64 << 20)
    assert got["sum"] == 64 << 20


def test_nvidia_smi_reports_the_quota(node):
    from gpu_worker.shim import native_dir

    if not (native_dir() / "libnvidia-ml.so.1").exists():
        pytest.fail(f"the NVML stand-in is missing ({native_dir() / 'libnvidia-ml.so.1'}): run "
                    "`python gpu_worker/shim/build.py`")
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not installed here")
    p = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                       env=bench.native_env(node.unix, "small"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line.strip() for line in p.stdout.splitlines() if line.strip()]
    assert lines == [str(QUOTA // MiB)], p.stdout + p.stderr


# Prints the pids of NVML's per-process utilization samples of GPU 0 (NVML_ERROR_NOT_FOUND: none), over ctypes.
SAMPLED_PIDS = """
import ctypes, json
class Sample(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("ts", ctypes.c_ulonglong), ("sm", ctypes.c_uint), ("mem", ctypes.c_uint),
                ("enc", ctypes.c_uint), ("dec", ctypes.c_uint)]
nvml = ctypes.CDLL("libnvidia-ml.so.1")
assert nvml.nvmlInit_v2() == 0
h = ctypes.c_void_p()
assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h)) == 0
buf, n = (Sample * 256)(), ctypes.c_uint(256)
rc = nvml.nvmlDeviceGetProcessUtilization(h, buf, ctypes.byref(n), ctypes.c_ulonglong(0))
assert rc in (0, 6), rc
print(json.dumps(sorted({s.pid for s in buf[:n.value]}) if rc == 0 else []))
"""


def test_nvidia_smi_lists_only_the_vgpu_s_processes(node):
    """A torch process of the vGPU and one outside gpulab both hold GPU memory and compute; nvidia-smi in the
    session lists the first only, and NVML's per-process utilization samples there are its only (the NVML
    stand-in filters the node's lists by the vGPU's ledger)."""
    need("torch")
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not installed here")
    ours = child(node, "small", "smi-ours")
    outsider = bench.Child(bench.plain_env(), node.tmp / "smi-outsider.log")
    try:
        assert ours.must("x = torch.ones(64 << 20, device='cuda'); torch.cuda.synchronize(); import os; "
                         "out = os.getpid()") == ours.proc.pid
        assert outsider.must("import os, torch; x = torch.ones(64 << 20, device='cuda'); torch.cuda.synchronize(); "
                             "out = os.getpid()") == outsider.proc.pid
        query = ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"]
        everyone = subprocess.run(query, env=bench.plain_env(), capture_output=True, text=True, timeout=60)
        session = subprocess.run(query, env=bench.native_env(node.unix, "small"), capture_output=True, text=True,
                                 timeout=60)
        assert everyone.returncode == 0 and session.returncode == 0, everyone.stderr + session.stderr
        everyone_pids = {int(x) for x in everyone.stdout.split()}
        assert {ours.proc.pid, outsider.proc.pid} <= everyone_pids, everyone.stdout  # the node's NVML sees both
        assert [int(x) for x in session.stdout.split()] == [ours.proc.pid], session.stdout
        # both compute for a few seconds: the node's NVML samples both, the session's only its own
        busy = ("import threading; a = torch.randn(4096, 4096, device='cuda'); "
                "threading.Thread(target=lambda: [torch.mm(a, a).sum().item() for _ in range(3000)], "
                "daemon=True).start(); out = None")
        assert ours.must(busy) is None and outsider.must(busy) is None
        time.sleep(3)
        sampled = {name: subprocess.run([sys.executable, "-c", SAMPLED_PIDS], env=env, capture_output=True,
                                        text=True, timeout=60)
                   for name, env in (("everyone", bench.plain_env()),
                                     ("session", bench.native_env(node.unix, "small")))}
        assert all(p.returncode == 0 for p in sampled.values()), {k: p.stderr for k, p in sampled.items()}
        everyone, session = (set(json.loads(sampled[k].stdout)) for k in ("everyone", "session"))
        assert {ours.proc.pid, outsider.proc.pid} <= everyone, everyone
        assert session == {ours.proc.pid}, session
    finally:
        ours.close()
        outsider.close()


# GPU 0's utilization rates (nvmlUtilization_t) by NVML over ctypes: [gpu, memory].
UTILIZATION = """
import ctypes, json
class Rates(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]
nvml = ctypes.CDLL("libnvidia-ml.so.1")
assert nvml.nvmlInit_v2() == 0
h, rates = ctypes.c_void_p(), Rates()
assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h)) == 0
assert nvml.nvmlDeviceGetUtilizationRates(h, ctypes.byref(rates)) == 0
print(json.dumps([rates.gpu, rates.memory]))
"""


def test_an_idle_vgpu_s_session_sees_its_gpu_idle_while_others_keep_the_card_busy(node):
    """A program outside gpulab keeps GPU 0 busy with matrix products; NVML outside shows the card busy, NVML and
    nvidia-smi in the session of an idle vGPU on that GPU show 0 (the stand-in's utilization is how busy the
    vGPU's own kernels kept the GPU, from the worker's look at its kernel time)."""
    need("torch")
    outsider = bench.Child(bench.plain_env(), node.tmp / "util-outsider.log")
    try:
        assert outsider.must("import threading, torch; a = torch.randn(8192, 8192, device='cuda'); "
                             "threading.Thread(target=lambda: [torch.mm(a, a).sum().item() for _ in range(2000)], "
                             "daemon=True).start(); out = None") is None
        time.sleep(3)
        seen = {name: subprocess.run([sys.executable, "-c", UTILIZATION], env=env, capture_output=True, text=True,
                                     timeout=60)
                for name, env in (("everyone", bench.plain_env()), ("session", bench.native_env(node.unix, "small")))}
        assert all(p.returncode == 0 for p in seen.values()), {k: p.stderr for k, p in seen.items()}
        everyone, session = (json.loads(seen[k].stdout) for k in ("everyone", "session"))
        assert everyone[0] > 50, everyone  # the node's NVML: the card busy with the outsider's products
        assert session[0] == 0, session
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 env=bench.native_env(node.unix, "small"), capture_output=True, text=True, timeout=60)
            assert smi.returncode == 0 and smi.stdout.split() == ["0"], smi.stdout + smi.stderr
    finally:
        outsider.close()


# ---------------------------------------------------------------------------------------------- the quota


@pytest.mark.parametrize("token,alloc_conf", [("oom-native", None), ("oom-expandable", "expandable_segments:True"),
                                              ("oom-async", "backend:cudaMallocAsync")],
                         ids=["caching-allocator", "expandable-segments", "cudaMallocAsync"])
def test_allocating_past_the_quota_is_torch_s_out_of_memory_error_with_our_reason(node, token, alloc_conf):
    need("torch")
    got, stderr = run_native(node, token, """
        import json, torch
        oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        small = torch.ones(256 << 20, dtype=torch.uint8, device="cuda")
        try:
            big = torch.ones(3 << 30, dtype=torch.uint8, device="cuda")
            what = "allocated"
        except oom as exc:
            what = "OutOfMemoryError"
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
        after = torch.ones(16 << 20, dtype=torch.uint8, device="cuda")  # the process goes on
        print(json.dumps({"native": native_mapped(), "what": what, "backend": torch.cuda.get_allocator_backend(),
                          "sums": [int(small.sum().item()), int(after.sum().item())]}))
    """, env_extra={"PYTORCH_CUDA_ALLOC_CONF": alloc_conf})
    assert got["what"] == "OutOfMemoryError", got
    assert got["sums"] == [256 << 20, 16 << 20]
    if alloc_conf == "backend:cudaMallocAsync":
        assert got["backend"] == "cudaMallocAsync"
    said = REFUSED.search(stderr)
    assert said, f"no refusal from the shim on stderr:\n{stderr}"
    assert float(said.group(1)) == QUOTA / MiB


def test_two_processes_share_one_vgpu_s_quota(node):
    need("torch")
    a, b = child(node, "shared", "shared-a"), child(node, "shared", "shared-b")
    try:
        assert a.must("held = torch.ones(5 << 30, dtype=torch.uint8, device='cuda'); torch.cuda.synchronize()") is None
        assert b.must("torch.ones(1, device='cuda').sum().item()") is None  # B's context exists
        v = vgpu_of(node, "shared")
        assert sorted(p["mode"] for p in v["processes"]) == ["native", "native"]
        assert v["used"] >= 5 << 30
        tried = b("x = torch.ones(4 << 30, dtype=torch.uint8, device='cuda')")
        assert isinstance(tried, dict) and tried.get("error", "").startswith("OutOfMemoryError"), tried
        assert a.must("del held; torch.cuda.empty_cache(); torch.cuda.synchronize()") is None
        assert b.must("x = torch.ones(4 << 30, dtype=torch.uint8, device='cuda'); out = int(x[-1].item())") == 1
        assert vgpu_of(node, "shared")["used"] >= 4 << 30
    finally:
        said_b = b.close()
        a.close()
    said = REFUSED.search(said_b)
    assert said and float(said.group(1)) == 8 * GiB / MiB, said_b


# ---------------------------------------------------------------------------------------------- frameworks compute


def test_a_small_mlp_trains(node):
    need("torch")
    got, _ = run_native(node, "roomy", """
        import json, torch
        torch.manual_seed(0)
        x = torch.randn(4096, 64, device="cuda")
        y = x @ torch.randn(64, 1, device="cuda") / 8  # a linear teacher, unit variance
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 1)).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(json.dumps({"native": native_mapped(), "losses": losses}))
    """)
    losses = got["losses"]
    assert len(losses) == 200 and all(loss == loss for loss in losses)  # no NaN
    assert losses[-1] < losses[0] / 2, (losses[0], losses[-1])
    assert sum(losses[-10:]) < sum(losses[:10]) / 2


def test_cupy_computes(node):
    need("cupy")
    got, _ = run_native(node, "roomy", """
        import json
        import cupy as cp
        import numpy as np
        rng = np.random.default_rng(3)
        a = rng.standard_normal((512, 512), dtype=np.float32)
        b = rng.standard_normal((512, 512), dtype=np.float32)
        c = cp.asnumpy(cp.asarray(a) @ cp.asarray(b))
        free, total = cp.cuda.runtime.memGetInfo()
        print(json.dumps({"native": native_mapped(), "match": bool(np.allclose(c, a @ b, rtol=1e-3, atol=1e-2)),
                          "total": total}))
    """)
    assert got["match"]
    assert got["total"] == 8 * GiB


def test_jax_computes(node):
    need("jax")
    got, _ = run_native(node, "roomy", """
        import json
        import jax
        import jax.numpy as jnp
        x = jnp.arange(1000, dtype=jnp.float32)
        total = float(jnp.sum(x * 2).block_until_ready())
        print(json.dumps({"native": native_mapped(), "platform": jax.devices()[0].platform,
                          "devices": len(jax.devices()), "sum": total}))
    """, env_extra={"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cuda"})
    assert got["platform"] == "gpu" and got["devices"] == 1
    assert got["sum"] == 999000.0


# ------------------------------------------------------------------------- what is charged, driver API (cuda-python)
# Each program reads its vGPU's free memory through the shim's cuMemGetInfo: the quota less what is charged.


def driver_program(body: str, helpers: str = "") -> str:
    """A driver API program (cuda-python, tests/workertools.py's PRELUDE, then ``helpers``) from an indented
    ``body``."""
    return PRELUDE + helpers + textwrap.dedent(body)


def test_a_stream_ordered_allocation_captured_into_a_graph_is_charged_once_when_a_launch_reserves_it(node):
    """At capture the allocation is a node of the graph (no memory yet): not charged; the graph launch reserves
    it and the device's graph memory is charged; freed and trimmed, it is given back."""
    got, _ = run_native(node, "graph", driver_program("""
        dev, ctx = setup()
        def free():
            return ok(d.cuMemGetInfo())[0]
        s = ok(d.cuStreamCreate(0))
        f0 = free()
        ok(d.cuStreamBeginCapture(s, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
        p = ok(d.cuMemAllocAsync(256 << 20, s))
        g = ok(d.cuStreamEndCapture(s))
        captured = free()
        ge = ok(d.cuGraphInstantiate(g, 0))
        ok(d.cuGraphLaunch(ge, s))
        ok(d.cuStreamSynchronize(s))
        launched = free()
        ok(d.cuMemFreeAsync(p, s))
        ok(d.cuStreamSynchronize(s))
        ok(d.cuGraphExecDestroy(ge))
        ok(d.cuGraphDestroy(g))
        ok(d.cuDeviceGraphMemTrim(dev))
        done(native=native_mapped(), f0=f0, captured=captured, launched=launched, trimmed=free())
    """))
    assert abs(got["f0"] - got["captured"]) < 32 * MiB, got  # before: 256 MiB at capture, again at the launch
    assert 256 * MiB <= got["f0"] - got["launched"] < 1 * GiB, got
    assert abs(got["f0"] - got["trimmed"]) < 32 * MiB, got


def test_a_graph_whose_memory_would_pass_the_quota_is_refused_at_its_launch(node):
    """A graph that allocates (and frees) 256 MiB runs and its reserve is charged; one that allocates 3 GiB on the
    2 GiB vGPU is refused at its launch, before the driver reserves anything (before: launched, and the vGPU
    went past its quota)."""
    got, stderr = run_native(node, "graph-over", driver_program(helpers=PLACED, body="""
        dev, ctx = setup()
        s = ok(d.cuStreamCreate(0))
        def graph(n):
            ok(d.cuStreamBeginCapture(s, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
            p = ok(d.cuMemAllocAsync(n, s))
            ok(d.cuMemsetD8Async(p, 1, n, s))
            ok(d.cuMemFreeAsync(p, s))
            return ok(d.cuGraphInstantiate(ok(d.cuStreamEndCapture(s)), 0))
        small, big = graph(256 << 20), graph(3 << 30)
        f0 = free()
        ok(d.cuGraphLaunch(small, s))
        ok(d.cuStreamSynchronize(s))
        after_small = free()
        refused = name(d.cuGraphLaunch(big, s))
        ok(d.cuStreamSynchronize(s))
        done(native=native_mapped(), f0=f0, after_small=after_small, refused=refused, after_big=free())
    """))
    assert 256 * MiB <= got["f0"] - got["after_small"] < 1 * GiB, got
    assert got["refused"] == "CUDA_ERROR_OUT_OF_MEMORY", got
    assert got["after_big"] == got["after_small"], got
    assert re.search(r"cuGraphLaunch refused: [\d.]+ MiB asked, [\d.]+ MiB left of this vGPU's 2048.0 MiB quota",
                     stderr), stderr


# for the programs: the vGPU's free memory as the shim reports it; a location set on allocation or pool properties
PLACED = """
def free():
    return ok(d.cuMemGetInfo())[0]
L = d.CUmemLocationType
def placed(props, where, ident):
    props.location.type = where
    props.location.id = ident
    return props
"""


def test_host_located_vmm_memory_is_not_charged_to_the_gpu_quota(node):
    got, _ = run_native(node, "host-vmm", driver_program(helpers=PLACED, body="""
        dev, ctx = setup()
        def prop(where, ident):
            p = d.CUmemAllocationProp()
            p.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
            return placed(p, where, ident)
        host, device = prop(L.CU_MEM_LOCATION_TYPE_HOST, 0), prop(L.CU_MEM_LOCATION_TYPE_DEVICE, int(dev))
        least = d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        gran = ok(d.cuMemGetAllocationGranularity(device, least))
        n = -(-(256 << 20) // gran) * gran
        f0 = free()
        r, h = d.cuMemCreate(n, host, 0)
        on_host = free()
        hd = ok(d.cuMemCreate(n, device, 0))
        on_device = free()
        if r == d.CUresult.CUDA_SUCCESS:
            ok(d.cuMemRelease(h))
        ok(d.cuMemRelease(hd))
        done(native=native_mapped(), host=r.name, n=n, f0=f0, on_host=on_host, on_device=on_device, end=free())
    """))
    assert got["on_device"] == got["on_host"] - got["n"], got
    assert got["end"] == got["f0"], got
    if got["host"] != "CUDA_SUCCESS":
        pytest.skip(f"this driver refuses host-located cuMemCreate ({got['host']}); the device half passed")
    assert got["on_host"] == got["f0"], got  # before: charged n


def test_a_pool_in_host_memory_is_not_charged_and_one_on_the_device_is(node):
    """The shim learns a pool's place from cuMemPoolCreate's properties: a host-located pool's allocations are host
    memory, outside the quota; a device pool's reserve is charged."""
    got, _ = run_native(node, "host-pool", driver_program(helpers=PLACED, body="""
        dev, ctx = setup()
        def pool(where, ident):
            props = d.CUmemPoolProps()
            props.allocType = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
            return d.cuMemPoolCreate(placed(props, where, ident))
        s = ok(d.cuStreamCreate(0))
        f0 = free()
        r, host = pool(L.CU_MEM_LOCATION_TYPE_HOST, 0)
        if r == d.CUresult.CUDA_SUCCESS:
            a = ok(d.cuMemAllocFromPoolAsync(256 << 20, host, s))
            ok(d.cuStreamSynchronize(s))
        on_host = free()
        device = ok(pool(L.CU_MEM_LOCATION_TYPE_DEVICE, int(dev)))
        b = ok(d.cuMemAllocFromPoolAsync(256 << 20, device, s))
        ok(d.cuStreamSynchronize(s))
        on_device = free()
        ok(d.cuMemFreeAsync(b, s))
        if r == d.CUresult.CUDA_SUCCESS:
            ok(d.cuMemFreeAsync(a, s))
        ok(d.cuStreamSynchronize(s))
        ok(d.cuMemPoolDestroy(device))
        if r == d.CUresult.CUDA_SUCCESS:
            ok(d.cuMemPoolDestroy(host))
        done(native=native_mapped(), host=r.name, f0=f0, on_host=on_host, on_device=on_device, end=free())
    """))
    assert 256 * MiB <= got["on_host"] - got["on_device"] < 512 * MiB, got
    assert got["end"] == got["f0"], got
    if got["host"] != "CUDA_SUCCESS":
        pytest.skip(f"this driver refuses host-located pools ({got['host']}); the device half passed")
    assert got["on_host"] == got["f0"], got  # before: charged on the current GPU


@pytest.mark.parametrize("fmt,width,height,expect", [
    ("CU_AD_FORMAT_BC1_UNORM", 4096, 4096, 8 * MiB),  # 8 bytes per 4x4 block (before: 64 MiB, 4 bytes a pixel)
    ("CU_AD_FORMAT_UNORM_INT16X4", 1024, 1024, 8 * MiB),  # 8 bytes a pixel (before: 16)
    ("CU_AD_FORMAT_FLOAT", 1024, 1024, 16 * MiB),  # 4 channels of 4 bytes
])
def test_an_array_is_charged_its_format_s_size(node, fmt, width, height, expect):
    got, _ = run_native(node, "arrays", driver_program(f"""
        dev, ctx = setup()
        def free():
            return ok(d.cuMemGetInfo())[0]
        desc = d.CUDA_ARRAY_DESCRIPTOR()
        desc.Width, desc.Height, desc.NumChannels = {width}, {height}, 4
        desc.Format = d.CUarray_format.{fmt}
        f0 = free()
        r, a = d.cuArrayCreate(desc)
        made = free()
        if r == d.CUresult.CUDA_SUCCESS:
            ok(d.cuArrayDestroy(a))
        done(native=native_mapped(), r=r.name, f0=f0, made=made, end=free())
    """))
    if got["r"] != "CUDA_SUCCESS":
        pytest.skip(f"this GPU refuses a {fmt} array of 4 channels ({got['r']})")
    assert got["f0"] - got["made"] == expect, got  # the estimate: the driver tells only deferred-mapping arrays' size
    assert got["end"] == got["f0"], got


# ---------------------------------------------------------------------------------------------- the warm tier


def test_a_torch_process_is_frozen_and_thawed_with_its_tensors_intact(node):
    need("torch")
    driver = bench.driver_version()
    if driver is None or driver < bench.CHECKPOINT_DRIVER:
        pytest.skip(f"the driver's checkpoint API needs driver 570 (cuDriverGetVersion >= {bench.CHECKPOINT_DRIVER}); "
                    f"this driver reports {driver}")
    p = child(node, "frozen", "frozen")
    try:
        digest = ("import hashlib; out = hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest() + "
                  "hashlib.sha256(y.cpu().numpy().tobytes()).hexdigest()")
        assert p.must("torch.manual_seed(1); x = torch.randn(64 << 20, device='cuda'); "
                      "y = (x * 3 + 1).to(torch.float16); torch.cuda.synchronize()") is None
        before = p.must(digest)
        v = vgpu_of(node, "frozen")
        assert v["moves"]["offloads"] == 0 and v["moves"]["restores"] == 0
        status, body = node.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "warm"}, timeout=60)
        assert status == 200 and body["done"], (status, body, node.log_text()[-3000:])
        (me,) = vgpu_of(node, "frozen")["processes"]
        assert me["mode"] == "native"
        assert me["tiers"]["hot"] == 0 and me["tiers"]["warm"] >= 384 << 20, me
        assert p.must(digest, timeout=120) == before  # its next CUDA call thawed it
        v = vgpu_of(node, "frozen")
        (me,) = v["processes"]
        assert me["tiers"]["warm"] == 0 and me["tiers"]["hot"] >= 384 << 20, me
        assert v["moves"]["offloads"] == 1 and v["moves"]["restores"] == 1 and v["moves"]["failures"] == 0, v["moves"]
        assert p.must("out = float((y.float() - (x * 3 + 1)).abs().max().item())") < 0.01
    finally:
        p.close()
    assert "frozen" in node.log_text() and "thawed" in node.log_text()


@contextlib.contextmanager
def nearly_full_gpu_beside_an_idle_vgpu(node, idle_token: str):
    """A program outside gpulab holds all of GPU 0 but 12 GiB, and an idle native vGPU (low QoS) of ``idle_token``
    holds 6 GiB of sevens in ``x``: yields that vGPU's process; then the idle one's next call must find its bytes
    intact (thawed), and both programs end."""
    need("torch")
    driver = bench.driver_version()
    if driver is None or driver < bench.CHECKPOINT_DRIVER:
        pytest.skip(f"the driver's checkpoint API needs driver 570; this driver reports {driver}")
    outsider = bench.Child(bench.plain_env(), node.tmp / f"{idle_token}-outsider.log")
    idle = None
    try:
        free = outsider.must("import torch\nfree, _ = torch.cuda.mem_get_info()\n"
                             "hog = torch.empty(free - (12 << 30), dtype=torch.uint8, device='cuda')\n"
                             "torch.cuda.synchronize()\nout = free")
        assert free > 16 * GiB, free
        idle = child(node, idle_token, idle_token)
        assert idle.must("x = torch.full((6 << 30,), 7, dtype=torch.uint8, device='cuda'); torch.cuda.synchronize()",
                         timeout=120) is None
        yield idle
    finally:
        for c in (idle, outsider):
            if c is not None:
                c.close()


def frozen_for(node, idle_token: str, busy_token: str):
    """The idle vGPU's one process was frozen to host memory by an eviction for the busy vGPU."""
    (me,) = vgpu_of(node, idle_token)["processes"]
    assert me["tiers"]["hot"] == 0 and me["tiers"]["warm"] >= 6 * GiB, (me, node.log_text()[-3000:])
    assert f"eviction on GPU 0 for vGPU {vgpu_of(node, busy_token)['id']}" in node.log_text()


def test_an_allocation_on_a_full_gpu_freezes_an_idle_native_vgpu(node):
    """The GPU is nearly full; an idle native vGPU holds 6 GiB. Another's 8 GiB allocation finds no room in the
    driver, its shim asks the worker for room, the idle one is frozen to host memory and the allocation is made.
    Once the busy one has ended, the idle one's next call thaws it with its tensor intact."""
    with nearly_full_gpu_beside_an_idle_vgpu(node, "idle-low") as idle:
        busy = child(node, "busy", "busy")
        try:
            assert busy.must("y = torch.ones((8 << 30,), dtype=torch.uint8, device='cuda'); torch.cuda.synchronize(); "
                             "out = int(y.sum().item())", timeout=120) == 8 * GiB
            frozen_for(node, "idle-low", "busy")
        finally:
            busy.close()
        assert idle.must("out = int(x.sum().item())", timeout=120) == 7 * (6 * GiB)  # thawed with its bytes


def test_a_graph_launch_on_a_full_gpu_freezes_an_idle_native_vgpu(node):
    """As for an allocation: the GPU is nearly full, an idle native vGPU holds 6 GiB, and another's graph that
    allocates 8 GiB finds no room at its launch; the shim asks the worker for room, the idle one is frozen and the
    graph runs. The idle one's next call thaws it with its tensor intact."""
    with nearly_full_gpu_beside_an_idle_vgpu(node, "idle-low-graph") as idle:
        got, _ = run_native(node, "busy-graph", driver_program("""
            dev, ctx = setup()
            s = ok(d.cuStreamCreate(0))
            ok(d.cuStreamBeginCapture(s, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
            p = ok(d.cuMemAllocAsync(8 << 30, s))
            ok(d.cuMemsetD8Async(p, 1, 8 << 30, s))
            ok(d.cuMemFreeAsync(p, s))
            g = ok(d.cuGraphInstantiate(ok(d.cuStreamEndCapture(s)), 0))
            launched = name(d.cuGraphLaunch(g, s))
            ok(d.cuStreamSynchronize(s))
            done(native=native_mapped(), launched=launched)
        """), timeout=240)
        assert got["launched"] == "CUDA_SUCCESS", (got, node.log_text()[-3000:])
        frozen_for(node, "idle-low-graph", "busy-graph")
        assert idle.must("out = int(x.sum().item())", timeout=120) == 7 * (6 * GiB)  # thawed with its bytes


def test_a_process_that_exports_its_pool_is_not_frozen_and_the_offload_says_why(node):
    """A pool exported as a file descriptor may be mapped by another process: the checkpoint would not move
    that, so the shim marks the process and the worker refuses to freeze it, saying why."""
    driver = bench.driver_version()
    if driver is None or driver < bench.CHECKPOINT_DRIVER:
        pytest.skip(f"the driver's checkpoint API needs driver 570; this driver reports {driver}")
    p = bench.Child(bench.native_env(node.unix, "pool-shared"), node.tmp / "pool-shared.log")
    try:
        assert p.must(PRELUDE + bench.NATIVE_MAPPED + """
dev, ctx = setup()
props = d.CUmemPoolProps()
props.allocType = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
props.handleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
props.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
props.location.id = int(dev)
pool = ok(d.cuMemPoolCreate(props))
s = ok(d.cuStreamCreate(0))
ptr = ok(d.cuMemAllocFromPoolAsync(64 << 20, pool, s))
ok(d.cuStreamSynchronize(s))
fd = ok(d.cuMemPoolExportToShareableHandle(pool, props.handleTypes, 0))
out = native_mapped()
""") is True
        v = vgpu_of(node, "pool-shared")
        status, body = node.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "warm"}, timeout=60)
        assert status == 409, body
        assert "it shares device memory with another process (IPC)" in body["message"], body
        (me,) = vgpu_of(node, "pool-shared")["processes"]
        assert me["tiers"]["warm"] == 0 and me["tiers"]["hot"] >= 64 << 20, me
    finally:
        p.close()
