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
CLIENT = PRELUDE + f"""
import time
setup()
mod = ok(d.cuModuleLoadData({BUSY_PTX!r}.encode() + b"\\0"))
fn = ok(d.cuModuleGetFunction(mod, b"busy"))
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
n = 0
while time.monotonic() - t0 < float(sys.argv[1]):
    ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0))
    ok(d.cuCtxSynchronize())
    n += 1
done(launches=n, wall=time.monotonic() - t0)
"""


def share_worker(make_worker, tmp_path, tokens: dict):
    (tmp_path / "busy_kernels.py").write_text(KERNELS)
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    return make_worker(token=None, extra=("--emulated-kernels", str(tmp_path / "busy_kernels.py"),
                                          "--tokens-file", str(tmp_path / "tokens.json")))


def run_together(w, tokens: list[str], seconds: float = RUN) -> dict[str, dict]:
    """Start one client per token, let them all go at once; {token: its vGPU's figures and the client's}."""
    clients = {t: subprocess.Popen([sys.executable, "-c", CLIENT, str(seconds)], env=w.env(token=t),
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
