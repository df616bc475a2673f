"""Compute shares that hold, on the emulated device (a test double whose kernels take a simulated
duration and run one at a time per GPU, like a real one): pacing, fairness, bursting.

Each client launches a 10 ms kernel and synchronizes, over and over, for RUN seconds; a vGPU's
share is its kernel time (from the worker's control API) over the wall time of the run."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from workertools import PRELUDE, ROOT

RUN = 3.0
KERNEL_S = 0.01
BUSY_PTX = r"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry busy()
{
    ret;
}
"""
KERNELS = f'''
from gpu_worker.backends.emulated_kernels import kernel


@kernel("busy", duration={KERNEL_S})
def busy(launch):
    """Nothing on the host; {KERNEL_S * 1000:.0f} ms of the emulated GPU's time."""
'''
# Once `fn` is loaded: say so, wait for the go, then launch and synchronize for argv[1] seconds.
LOOP = """print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
n = 0
while time.monotonic() - t0 < float(sys.argv[1]):
    ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0))
    ok(d.cuCtxSynchronize())
    n += 1
done(launches=n, wall=time.monotonic() - t0)
"""
CLIENT = PRELUDE + f"""
import time
setup()
mod = ok(d.cuModuleLoadData({BUSY_PTX!r}.encode() + b"\\0"))
fn = ok(d.cuModuleGetFunction(mod, b"busy"))
""" + LOOP


# The same work as a graph: five kernels captured once, the graph launched over and over.
GRAPH_CLIENT = CLIENT.replace("""print("ready", flush=True)""", """stream = ok(d.cuStreamCreate(0))
ok(d.cuStreamBeginCapture(stream, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
for _ in range(5):
    ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, stream, 0, 0))
gexec = ok(d.cuGraphInstantiate(ok(d.cuStreamEndCapture(stream)), 0))
print("ready", flush=True)""").replace("""    ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0))
    ok(d.cuCtxSynchronize())""", """    ok(d.cuGraphLaunch(gexec, stream))
    ok(d.cuStreamSynchronize(stream))""")


def share_worker(make_worker, tmp_path, tokens: dict):
    (tmp_path / "busy_kernels.py").write_text(KERNELS)
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    return make_worker(token=None, extra=("--emulated-kernels", str(tmp_path / "busy_kernels.py"),
                                          "--tokens-file", str(tmp_path / "tokens.json")))


def run_together(w, tokens: list[str], seconds: float = RUN, client: str = CLIENT) -> dict[str, dict]:
    """Start one client per token, let them all go at once; {token: its vGPU's figures and the client's}."""
    clients = {t: subprocess.Popen([sys.executable, "-c", client, str(seconds)], env=w.env(token=t),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
               for t in tokens}
    try:
        for c in clients.values():
            assert c.stdout.readline().strip() == "ready"
        before = {v["id"]: v["kernel_time"] for v in w.vgpus()}
        for c in clients.values():
            c.stdin.write("go\n")
            c.stdin.flush()
        out = {t: json.loads(c.stdout.readline()) for t, c in clients.items()}
        vgpus = {v["id"]: v for v in w.vgpus()}
    finally:
        for c in clients.values():
            c.kill()
            c.wait()
    from gpu_worker.client.tokens import token_hash

    result = {}
    for t in tokens:
        v = vgpus[f"t-{token_hash(t)[:8]}"]
        kernel = v["kernel_time"] - before.get(v["id"], 0.0)
        result[t] = {**out[t], "kernel": kernel, "share": kernel / out[t]["wall"], "vgpu": v}
    return result


def test_two_busy_vgpus_get_their_shares_of_kernel_time(make_worker, tmp_path):
    w = share_worker(make_worker, tmp_path, {"quarter": {"compute": 25}, "three": {"compute": 75}})
    res = run_together(w, ["quarter", "three"])
    total = res["quarter"]["kernel"] + res["three"]["kernel"]
    assert res["quarter"]["kernel"] / total == pytest.approx(0.25, abs=0.05), res
    assert res["three"]["kernel"] / total == pytest.approx(0.75, abs=0.05), res
    assert res["quarter"]["share"] == pytest.approx(0.25, abs=0.05), res
    assert res["quarter"]["vgpu"]["throttled_time"] > 0 and res["quarter"]["vgpu"]["share"] == 25


def test_a_lone_vgpu_without_burst_gets_its_share_and_with_burst_nearly_the_whole_gpu(make_worker, tmp_path):
    w = share_worker(make_worker, tmp_path, {"strict": {"compute": 25, "burst": False},
                                             "bursty": {"compute": 25, "burst": True}})
    strict = run_together(w, ["strict"])["strict"]
    assert strict["share"] == pytest.approx(0.25, abs=0.05), strict
    bursty = run_together(w, ["bursty"])["bursty"]
    assert bursty["share"] > 0.85, bursty


def test_an_idle_vgpu_costs_nothing(make_worker, tmp_path):
    """A vGPU with a process attached but no launches neither slows another nor takes its spare share."""
    w = share_worker(make_worker, tmp_path, {"idle": {"compute": 50}, "busy": {"compute": 50, "burst": True}})
    idle = subprocess.Popen([sys.executable, "-c", PRELUDE + "setup()\nprint('up', flush=True)\nsys.stdin.readline()"],
                            env=w.env(token="idle"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert idle.stdout.readline().strip() == "up"
        busy = run_together(w, ["busy"])["busy"]
        assert busy["share"] > 0.85, busy
    finally:
        idle.kill()
        idle.wait()


def test_an_uncontended_whole_gpu_vgpu_is_not_paced(make_worker, tmp_path):
    w = share_worker(make_worker, tmp_path, {"whole": {"compute": 100, "burst": False}})
    res = run_together(w, ["whole"], seconds=1.5)["whole"]
    assert res["share"] > 0.85 and res["vgpu"]["throttled_time"] == 0, res


def test_graph_launches_are_paced_as_a_whole(make_worker, tmp_path):
    w = share_worker(make_worker, tmp_path, {"graphs": {"compute": 25, "burst": False}})
    res = run_together(w, ["graphs"], client=GRAPH_CLIENT)["graphs"]
    assert res["share"] == pytest.approx(0.25, abs=0.05), res
    assert res["vgpu"]["throttled_time"] > 0


def test_idle_share_is_lent_to_bursting_vgpus_highest_qos_first():
    from gpu_worker.daemon.pacing import QOS_RANK, GPUBoard

    board = GPUBoard()
    medium = board.take(0.25, QOS_RANK["medium"], True)
    high = board.take(0.25, QOS_RANK["high"], True)
    low = board.take(0.25, QOS_RANK["low"], False)
    now = 1000.0
    board.wanted(medium, now)
    assert board.lent(medium, now) == pytest.approx(0.75)  # alone: everything the others do not want
    board.wanted(high, now)
    assert board.lent(medium, now) == pytest.approx(0.5)  # the high-QoS vGPU has what it wants
    board.waiting(high, True)
    assert board.lent(medium, now) == 0.0  # a high-QoS vGPU that waits for more borrows first
    assert board.lent(high, now) == pytest.approx(0.5)
    board.wanted(low, now)  # busy without burst: its share is its own, not spare
    assert board.lent(high, now) == pytest.approx(0.25)
    assert board.lent(high, now + 1.0) == pytest.approx(0.75)  # a second later nobody else wants any
    board.give_back(high)
    assert board.lent(medium, now) == pytest.approx(0.5)


# On a real GPU: a 10 ms kernel spinning on the nanosecond globaltimer, compiled for the device with
# NVRTC (a cubin: the driver may be older than NVRTC's PTX), launched through the shim to a cuda worker.
GPU_CLIENT = PRELUDE + r'''
import time
from cuda.bindings import nvrtc
SRC = b"""
extern "C" __global__ void busy() {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < 10000000ull);
}
"""
dev, ctx = setup()
A = d.CUdevice_attribute
major = ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
minor = ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
err, prog = nvrtc.nvrtcCreateProgram(SRC, b"busy.cu", 0, [], [])
assert nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=sm_{major}{minor}".encode()])[0] == 0
_, size = nvrtc.nvrtcGetCUBINSize(prog)
cubin = b" " * size
nvrtc.nvrtcGetCUBIN(prog, cubin)
fn = ok(d.cuModuleGetFunction(ok(d.cuModuleLoadData(cubin)), b"busy"))
''' + LOOP


@pytest.mark.gpu
def test_shares_hold_on_a_real_gpu_measured_by_events(make_worker, tmp_path):
    (tmp_path / "tokens.json").write_text(json.dumps({"quarter": {"compute": 25, "burst": False},
                                                      "three": {"compute": 75, "burst": False},
                                                      "alone": {"compute": 25, "burst": False}}))
    w = make_worker(token=None, backend="cuda", extra=("--tokens-file", str(tmp_path / "tokens.json")))
    res = run_together(w, ["quarter", "three"], seconds=5.0, client=GPU_CLIENT)
    total = res["quarter"]["kernel"] + res["three"]["kernel"]
    assert res["quarter"]["kernel"] / total == pytest.approx(0.25, abs=0.05), res
    assert res["three"]["kernel"] / total == pytest.approx(0.75, abs=0.05), res
    alone = run_together(w, ["alone"], seconds=5.0, client=GPU_CLIENT)["alone"]
    assert alone["share"] == pytest.approx(0.25, abs=0.05), alone
