"""The "Python 3 (vGPU)" kernel against a real emulated worker: installed into a prefix of its own,
started by jupyter_client's KernelManager by name from an environment with no shim on
LD_LIBRARY_PATH, it sees the vGPU (its quota as the device's memory), keeps its bytes across
`%vgpu offload warm`, and its `%vgpu` magics answer in words.  Without a vGPU the provisioner refuses
to start the kernel and says why.  One kernel is started (each start costs seconds)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from gpu_worker.client import shim_dir
from server_extension import kernelspec
from server_extension.provisioner import NoVGPU
from workertools import Worker

QUOTA = 1 << 30
TOKEN = "kernel-session-tok"


def server_env(worker: Worker | None, **extra) -> dict:
    """What a Jupyter server's environment holds: no shim on LD_LIBRARY_PATH, and the vGPU's credentials
    when there is one (as the hub's spawner sets them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_") and k != "LD_LIBRARY_PATH"}
    if worker is not None:
        env.update(GPULAB_WORKER=worker.unix, GPULAB_TOKEN=worker.token, GPULAB_CONTROL_URL=worker.control)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("kernel-worker"), token=TOKEN, extra=["--vram-quota", "1G"])
    yield w
    w.stop()


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """A kernelspec manager that sees only the kernelspecs installed into a fresh prefix."""
    prefix = tmp_path_factory.mktemp("prefix")
    kernelspec.install(prefix=str(prefix))
    return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")]), prefix


@pytest.fixture(scope="module")
def kernel(worker, specs):
    km = KernelManager(kernel_name=kernelspec.KERNEL_NAME, kernel_spec_manager=specs[0])
    km.start_kernel(env=server_env(worker))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run(kc, code: str, timeout=90) -> tuple[str, dict | None]:
    """Run a cell: (its printed and displayed text, the reply's content if the cell failed, else None)."""
    out = []

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            out.append(content["data"].get("text/plain", ""))

    reply = kc.execute_interactive(code, output_hook=hook, timeout=timeout)["content"]
    return "".join(out), (reply if reply["status"] == "error" else None)


def ok(kc, code: str) -> str:
    text, error = run(kc, code)
    assert error is None, f"{error['ename']}: {error['evalue']}\n" + "\n".join(error["traceback"])
    return text


CUDA_CELL = """
import json, os
import numpy as np
from cuda.bindings import driver as d

def ok(res):
    assert res[0] == d.CUresult.CUDA_SUCCESS, res[0].name
    return res[1] if len(res) == 2 else res[1:]

ok(d.cuInit(0))
dev = ok(d.cuDeviceGet(0))
ctx = ok(d.cuDevicePrimaryCtxRetain(dev))
ok(d.cuCtxSetCurrent(ctx))
total_mem = ok(d.cuDeviceTotalMem(dev))
free, total = ok(d.cuMemGetInfo())
data = np.random.default_rng(7).integers(0, 256, 64 << 20, dtype=np.uint8)
ptr = ok(d.cuMemAlloc(data.nbytes))
ok(d.cuMemcpyHtoD(ptr, data, data.nbytes))
back = np.zeros_like(data)
ok(d.cuMemcpyDtoH(back, ptr, data.nbytes))
print(json.dumps({"ld": os.environ["LD_LIBRARY_PATH"], "total_mem": total_mem, "total": total,
                  "same": bool((back == data).all()), "pid": os.getpid()}))
"""


def test_a_vgpu_kernel_sees_its_vgpu_and_the_magics_answer(worker, kernel):
    km, kc = kernel
    facts = json.loads(ok(kc, CUDA_CELL).strip().splitlines()[-1])
    assert facts["ld"].split(":")[0] == str(shim_dir())  # the provisioner put the shim first
    assert facts["total_mem"] == QUOTA and facts["total"] == QUOTA  # the device is the vGPU's quota
    assert facts["same"]

    status = ok(kc, "%vgpu")  # loaded at start by the kernelspec (--ext gpulab)
    assert re.search(r"VRAM:\s+[\d.]+ MiB / 1\.0 GiB \(allocations 64\.0 MiB", status), status
    assert "gpulab emulated vGPU (test double, no GPU)" in status  # the GPU by model, labelled emulated
    assert f"{facts['pid']} (this kernel)" in status
    assert re.search(r"tiers:\s+hot: 64\.0 MiB hot, 0 bytes warm, 0 bytes cold", status), status

    moved = ok(kc, "%vgpu offload warm")
    assert "is warm: 0 bytes hot, 64.0 MiB warm, 0 bytes cold" in moved, moved
    (v,) = worker.vgpus()
    assert v["tier"] == "warm" and v["tiers"]["warm"] == 64 << 20 and v["tiers"]["hot"] == 0
    assert "True" in ok(kc, "back[:] = 0\nok(d.cuMemcpyDtoH(back, ptr, data.nbytes))\nprint(bool((back == data).all()))")
    (v,) = worker.vgpus()
    assert v["tier"] == "hot"  # the touching call brought it back

    ok(kc, "%vgpu offload cold")
    assert "is hot" in ok(kc, "%vgpu restore")
    assert worker.vgpus()[0]["tiers"] == {"hot": 64 << 20, "warm": 0, "cold": 0}

    trace = ok(kc, "%vgpu trace 3").splitlines()
    assert trace[0].split() == ["TIME", "PID", "FUNCTION", "DURATION", "BYTES", "RESULT"]
    assert len(trace) == 4 and trace[-1].split()[2] == "cuMemcpyDtoH", trace
    long = ok(kc, "%vgpu trace 200")
    assert re.search(r"cuMemAlloc\S*\s+\d+ us\s+64\.0 MiB\s+CUDA_SUCCESS", long), long


def test_magic_errors_are_one_sentence(kernel):
    _, kc = kernel
    cases = {
        "%vgpu offload hot": "usage: %vgpu offload [warm|cold]",
        "%vgpu frobnicate": "no %vgpu subcommand 'frobnicate'",
        "%vgpu trace many": "usage: %vgpu trace [N]",
        "import os; _t = os.environ.pop('GPULAB_TOKEN')\ntry:\n    %vgpu\nfinally:\n    os.environ['GPULAB_TOKEN'] = _t":
            "this kernel has no vGPU: GPULAB_TOKEN is not in its environment",
        "import os; _e = {k: os.environ.pop(k) for k in ('GPULAB_TOKEN', 'GPULAB_WORKER')}\ntry:\n    %vgpu\n"
        "finally:\n    os.environ.update(_e)":
            "this kernel has no vGPU: GPULAB_WORKER and GPULAB_TOKEN are not in its environment",
        "import os; _u = os.environ['GPULAB_CONTROL_URL']; os.environ['GPULAB_CONTROL_URL'] = 'http://127.0.0.1:9'"
        "\ntry:\n    %vgpu\nfinally:\n    os.environ['GPULAB_CONTROL_URL'] = _u":
            "cannot reach the worker's control API at http://127.0.0.1:9",
    }
    for code, sentence in cases.items():
        text, error = run(kc, code)
        assert error is not None and error["ename"] == "UsageError", (code, error)
        assert error["evalue"].startswith(sentence), (code, error["evalue"])
        assert text == f"UsageError: {error['evalue']}\n"  # the sentence alone, no traceback
    assert "VRAM:" in ok(kc, "%vgpu")  # the environment is back as it was


def pre_start(specs, env: dict, name: str = kernelspec.KERNEL_NAME):
    """What the provisioner hands the kernel's launch (no process is started)."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=specs[0])

    async def go():
        try:
            return await km._async_pre_start_kernel(env=env)
        finally:
            km.cleanup_resources()

    return asyncio.run(go())


def test_without_a_vgpu_the_kernel_is_refused_with_the_cause(worker, specs):
    with pytest.raises(NoVGPU, match=r"^the \"Python 3 \(vGPU\)\" kernel needs a vGPU, but this Jupyter server has "
                                     r"none: GPULAB_WORKER and GPULAB_TOKEN are not set in its environment"):
        pre_start(specs, server_env(None))
    with pytest.raises(NoVGPU, match="GPULAB_TOKEN is not set"):
        pre_start(specs, server_env(None, GPULAB_WORKER=worker.unix))
    with pytest.raises(NoVGPU, match=f"the vGPU's worker at {worker.control} does not accept this server's "
                                     f"session token"):
        pre_start(specs, server_env(worker, GPULAB_TOKEN="not-a-session"))
    with pytest.raises(NoVGPU, match="the kernel would have no GPU: cannot reach the worker's control API at "
                                     "http://127.0.0.1:9"):
        pre_start(specs, server_env(worker, GPULAB_CONTROL_URL="http://127.0.0.1:9"))


def test_credentials_from_the_kernelspec_config_and_the_shim_once(worker, specs):
    prefix = specs[1]
    kernelspec.install("vgpu-configured", prefix=str(prefix),
                       config={"worker": worker.unix, "token": worker.token, "control_url": worker.control})
    base = server_env(None, LD_LIBRARY_PATH=f"/opt/lib:{shim_dir()}")
    cmd, kw = pre_start(specs, base, "vgpu-configured")
    env = kw["env"]
    assert env["LD_LIBRARY_PATH"] == f"{shim_dir()}:/opt/lib"  # first, and only once (the kernelspec has it too)
    assert pre_start(specs, server_env(worker))[1]["env"]["LD_LIBRARY_PATH"] == str(shim_dir())  # nothing else
    assert (env["GPULAB_WORKER"], env["GPULAB_TOKEN"], env["GPULAB_CONTROL_URL"]) == \
        (worker.unix, worker.token, worker.control)
    assert cmd[-1] == "--ext=gpulab"  # the magics load at start


def test_a_natively_placed_server_s_kernels_get_the_native_library_not_the_forwarding_shim(worker, specs):
    """The spawner of a local (native) vGPU puts the native library first and sets GPULAB_MODE=native; the
    kernelspec's stanza names the forwarding shim, which must not come before it (nor at all)."""
    from gpu_worker.client import native_dir

    base = server_env(worker, GPULAB_MODE="native", GPULAB_REAL_LIBCUDA="/usr/lib64/libcuda.so.1",
                      LD_LIBRARY_PATH=f"{native_dir()}:/opt/lib")
    env = pre_start(specs, base)[1]["env"]
    assert env["LD_LIBRARY_PATH"] == f"{native_dir()}:/opt/lib"
    assert env["GPULAB_REAL_LIBCUDA"] == "/usr/lib64/libcuda.so.1" and env["GPULAB_TOKEN"] == worker.token
    # a forwarded server's kernel: the forwarding shim, never the native library
    env = pre_start(specs, server_env(worker, LD_LIBRARY_PATH=f"{native_dir()}:/opt/lib"))[1]["env"]
    assert env["LD_LIBRARY_PATH"] == f"{shim_dir()}:/opt/lib"


def test_a_front_end_that_skips_provisioners_still_gets_the_shim_first(specs):
    """VS Code's and PyCharm's local kernels: the kernelspec's argv and env, no provisioner."""
    prefix = specs[1]
    spec_dir = prefix / "share" / "jupyter" / "kernels" / kernelspec.KERNEL_NAME
    plain = json.loads((spec_dir / "kernel.json").read_text())
    del plain["metadata"]["kernel_provisioner"]
    (spec_dir.parent / "vgpu-plain").mkdir()
    (spec_dir.parent / "vgpu-plain" / "kernel.json").write_text(json.dumps(plain))
    cmd, kw = pre_start(specs, server_env(None, LD_LIBRARY_PATH="/opt/lib"), "vgpu-plain")
    assert kw["env"]["LD_LIBRARY_PATH"] == f"{shim_dir()}:/opt/lib" and cmd[-1] == "--ext=gpulab"


def test_kernelspec_install_and_remove_from_the_command_line(tmp_path):
    gpulab = [sys.executable, "-m", "gpulab.cli", "kernelspec"]
    p = subprocess.run([*gpulab, "install", "--prefix", str(tmp_path), "--name", "gpu-k", "--display-name", "GPU k"],
                       capture_output=True, text=True, timeout=60)
    spec = tmp_path / "share" / "jupyter" / "kernels" / "gpu-k"
    assert p.returncode == 0 and f"installed kernelspec gpu-k (GPU k) in {spec}" in p.stdout, p.stderr
    k = json.loads((spec / "kernel.json").read_text())
    assert k["display_name"] == "GPU k" and k["metadata"]["kernel_provisioner"]["provisioner_name"] == "gpulab-vgpu"
    assert k["argv"][0] == sys.executable
    p = subprocess.run([*gpulab, "remove", "--prefix", str(tmp_path), "--name", "gpu-k"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and not spec.exists()
    p = subprocess.run([*gpulab, "remove", "--prefix", str(tmp_path), "--name", "gpu-k"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip() == f"gpulab kernelspec remove: no kernelspec named gpu-k in {spec.parent}"
