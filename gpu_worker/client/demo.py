"""`gpulab demo` (what `make demo` runs): start a worker, run a short CUDA program through the shim.

The program is ordinary cuda-python: it does not know it runs on a remote vGPU.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap

PROGRAM = textwrap.dedent(r'''
    import time
    import numpy as np
    from cuda.bindings import driver as d
    from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch

    def ok(res):
        if res[0] != d.CUresult.CUDA_SUCCESS:
            raise SystemExit(f"CUDA error: {res[0].name}")
        return res[1] if len(res) == 2 else res[1:]

    dev = Device()
    dev.set_current()
    free, total = ok(d.cuMemGetInfo())
    print(f"device      : {dev.name} (compute capability {dev.compute_capability.major}.{dev.compute_capability.minor})")
    print(f"driver      : {ok(d.cuDriverGetVersion())} (reported by the worker)")
    print(f"vGPU memory : {free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB (the session quota, not the card)")

    n = 4 << 20
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    y = np.random.default_rng(1).random(n, dtype=np.float32)
    dx, dy, dz = (ok(d.cuMemAlloc(n * 4)) for _ in range(3))
    t = time.perf_counter()
    ok(d.cuMemcpyHtoD(dx, x, n * 4)); ok(d.cuMemcpyHtoD(dy, y, n * 4))
    print(f"copy in     : 2 x {n * 4 / 2**20:.0f} MiB in {(time.perf_counter() - t) * 1e3:.1f} ms")

    src = 'extern "C" __global__ void saxpy(float a, const float *x, const float *y, float *out, int n)' \
          '{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) out[i] = a * x[i] + y[i]; }'
    kernel = Program(src, code_type="c++", options=ProgramOptions(arch=f"sm_{dev.arch}")).compile(
        "cubin" if "emulated" not in dev.name else "ptx").get_kernel("saxpy")
    print("compile     : saxpy with NVRTC on this machine (no GPU needed here)")
    stream = dev.create_stream()
    launch(stream, LaunchConfig(grid=(n + 255) // 256, block=256), kernel, np.float32(2.0), int(dx), int(dy), int(dz),
           np.int32(n))
    stream.sync()
    z = np.empty_like(x)
    ok(d.cuMemcpyDtoH(z, dz, n * 4))
    good = np.allclose(z, 2.0 * x + y)
    print(f"launch      : saxpy over {n} elements; result {'matches' if good else 'DOES NOT match'} numpy")
    over = d.cuMemAlloc(total + 1)[0]
    print(f"quota check : allocating more than the quota returns {over.name}")
    raise SystemExit(0 if good else 1)
''')


def main(backend: str = "auto") -> int:
    from .env import shim_env

    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="gpulab-demo-") as tmp:
        sock = os.path.join(tmp, "worker.sock")
        worker = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker.daemon", "--backend", backend, "--unix-socket", sock,
             "--token", token, "--vram-quota", "2G", "--emulated-kernels", "gpu_worker.backends.demo_kernels"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = worker.stdout.readline().strip()
            if not line:
                print("gpulab demo: the worker did not start", file=sys.stderr)
                return 1
            print(line)
            print(f"running a cuda-python program with the gpulab shim as libcuda.so.1 (token {token[:6]}...)\n")
            return subprocess.run([sys.executable, "-c", PROGRAM], env=shim_env(f"unix://{sock}", token)).returncode
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(10)
