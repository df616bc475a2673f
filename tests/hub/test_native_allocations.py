"""Native mode, the pool's and the spawner's part: a worker registers its Unix socket; the pool answers a
local vGPU on that worker with ``native`` and ``local_address``, a remote one without; the spawner gives a
native vGPU's server the socket, the native libcuda.so.1 first on LD_LIBRARY_PATH and the real driver's
paths; the form says what each mode runs.  A real pool (SQLite and PostgreSQL) and a real emulated worker;
at the end a spawned server's program runs through the native library over build.py's driver double."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from types import SimpleNamespace

import pytest

from gpu_worker.client import native_dir, shim_dir
from gpu_worker.shim import build as shim_build
from hub_spawner.spawner import GPUSimpleLocalProcessSpawner
from hub_spawner.spawner.mixin import MODE_TEXT
from hubtools import HUB_TOKEN, WORKER_TOKEN, Pool, registration
from workertools import PRELUDE, SEE_DEVICES, Worker

NODE = socket.gethostname()  # the worker's node, and the spawner's: a local vGPU lands on this host
PROFILES = [{"display_name": "Local", "slug": "local", "gpu": {"vram": "1G", "compute": 25, "mode": "local"}},
            {"display_name": "Remote", "slug": "remote", "gpu": {"vram": "1G", "compute": 25, "mode": "remote"}},
            {"display_name": "Anywhere", "slug": "any", "gpu": {"vram": "1G", "compute": 25}},
            {"display_name": "CPU", "slug": "cpu"}]
# the "server": what its spawner gave it, as JSON
SERVER = ("import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
          "if k.startswith(('GPULAB_', 'LD_LIBRARY_PATH'))}))")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_pool(request, tmp_path):
    db = str(tmp_path / "pool.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    p = Pool(db)
    yield p
    p.stop()


@pytest.fixture
def worker(any_pool, tmp_path):
    """A real emulated worker on TCP and a Unix socket, registered with the pool."""
    env = dict(os.environ, GPULAB_POOL_TOKEN=WORKER_TOKEN)
    w = Worker(tmp_path, token=None, tcp=True, env=env,
               extra=("--pool-url", any_pool.worker_url, "--name", "w-native", "--heartbeat-interval", "1"))
    try:
        until = time.monotonic() + 20
        while not [g for g in any_pool.call("GET", "api/gpus")[1] if g["worker"] == "w-native"]:
            assert time.monotonic() < until, "the worker did not register"
            time.sleep(0.1)
        yield w
    finally:
        w.stop()


def allocate(pool, **spec) -> dict:
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G", "compute": 25, **spec})
    assert status == 201, alloc
    return alloc


def test_a_local_vgpu_on_a_worker_with_a_unix_socket_is_native(any_pool, worker):
    local = allocate(any_pool, mode="local", node=NODE)
    assert local["native"] is True and local["local_address"] == worker.unix  # unix:///<its socket>
    assert local["backend"] == "emulated" and local["emulated"] is True  # the answer says it is the test double
    assert local["address"] == worker.tcp  # forwarding still has its address
    # the address reaches the worker, which admits the vGPU's token there: its one GPU, its quota
    seen = worker.run(SEE_DEVICES, address=local["local_address"], token=local["token"]).result
    assert [(d["uuid"], d["memory"]) for d in seen["devices"]] == [(local["gpus"][0], 1 << 30)]
    # every later answer about it says the same
    assert any_pool.call("GET", f"api/allocations/{local['id']}")[1]["local_address"] == worker.unix
    for mode in ("remote", "any"):  # forwarded, even when it lands on the server's node
        other = allocate(any_pool, mode=mode, node=NODE)
        assert other["native"] is False and other["local_address"] == "" and other["address"] == worker.tcp


def test_a_local_vgpu_on_a_worker_without_a_unix_socket_is_forwarded(any_pool):
    any_pool.register(node=NODE)  # a TCP address only
    alloc = allocate(any_pool, mode="local", node=NODE)
    assert alloc["native"] is False and alloc["local_address"] == "" and alloc["address"].startswith("tcp://")


@pytest.mark.parametrize("path", ["run/gpulab.sock", "/" + "x" * 107, "/run/a\nb.sock", 7])
def test_a_unix_socket_the_shim_cannot_dial_is_a_400(pool, path):
    body = {**registration(), "unix_socket": path}
    status, answer = pool.worker_call("POST", "api/workers", body, WORKER_TOKEN)
    assert status == 400 and "unix_socket must be an absolute path of at most 107 bytes" in answer["message"]


def spawner(**traits) -> GPUSimpleLocalProcessSpawner:
    """A spawner of ann's server, without a hub."""
    user = SimpleNamespace(name="ann", url="/user/ann/", groups=[])
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    return GPUSimpleLocalProcessSpawner(user=user, hub=hub, gpu_profiles=PROFILES, **traits)


def spawn(pool, tmp_path, profile: str, **traits):
    """GPUSpawner.start() for ann with ``profile`` against the real pool; its server prints its environment."""
    out = tmp_path / f"server-{profile}.json"
    s = spawner(pool_url=pool.url, pool_token=HUB_TOKEN, cmd=[sys.executable, "-c", SERVER],
                home_dir=str(tmp_path / "home"), **traits)
    s.user_options = {"profile": profile}
    with open(out, "w") as f:
        s.popen_kwargs = {"stdout": f}
        asyncio.run(s.start())
        assert s.proc.wait(60) == 0
    return s, json.loads(out.read_text())


def test_the_server_of_a_native_vgpu_gets_the_socket_and_the_native_library(any_pool, worker, tmp_path):
    s, env = spawn(any_pool, tmp_path, "local", real_libcuda="/usr/lib/x86_64-linux-gnu/libcuda.so.580",
                   real_nvml="/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580")
    try:
        assert env["GPULAB_WORKER"] == worker.unix and env["GPULAB_MODE"] == "native"
        assert env["LD_LIBRARY_PATH"].split(":")[0] == str(native_dir()) == str(shim_dir() / "native")
        assert str(shim_dir()) not in env["LD_LIBRARY_PATH"].split(":")  # the forwarding libcuda would answer
        assert env["GPULAB_REAL_LIBCUDA"] == "/usr/lib/x86_64-linux-gnu/libcuda.so.580"
        assert env["GPULAB_REAL_NVML"] == "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.580"
        assert env["GPULAB_TOKEN"] == s.gpu_allocation["token"] and env["GPULAB_VRAM"] == str(1 << 30)
    finally:
        asyncio.run(s.stop(now=True))


def test_the_server_of_a_remote_vgpu_is_forwarded_as_before(any_pool, worker, tmp_path):
    s, env = spawn(any_pool, tmp_path, "remote", real_libcuda="/usr/lib/libcuda.so.1")
    try:
        assert env["GPULAB_WORKER"] == worker.tcp and env["LD_LIBRARY_PATH"].split(":")[0] == str(shim_dir())
        assert not {"GPULAB_MODE", "GPULAB_REAL_LIBCUDA", "GPULAB_REAL_NVML"} & set(env)
    finally:
        asyncio.run(s.stop(now=True))


def test_get_env_of_native_and_forwarded_allocations():
    s = spawner(shim_path="/opt/fwd", native_shim_path="/opt/native")
    base = {"id": 3, "token": "t", "vram": 1 << 30, "compute": 25, "address": "tcp://10.0.0.1:7000",
            "control_url": "http://10.0.0.1:7001"}
    s.gpu_allocation = {**base, "mode": "local", "native": True, "local_address": "unix:///run/gpulab/w.sock"}
    env = s.get_env()
    assert (env["GPULAB_WORKER"], env["GPULAB_MODE"]) == ("unix:///run/gpulab/w.sock", "native")
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/opt/native" and "/opt/fwd" not in env["LD_LIBRARY_PATH"]
    assert env["GPULAB_CONTROL_URL"] == "http://10.0.0.1:7001"
    assert "GPULAB_REAL_LIBCUDA" not in env and "GPULAB_REAL_NVML" not in env  # unset traits: not set
    # an allocation of an older pool (no "native"), or a local one that is not native: forwarded
    for alloc in (base, {**base, "mode": "local", "native": False, "local_address": ""}):
        s.gpu_allocation = alloc
        env = s.get_env()
        assert env["GPULAB_WORKER"] == "tcp://10.0.0.1:7000" and env["LD_LIBRARY_PATH"].split(":")[0] == "/opt/fwd"
        assert "GPULAB_MODE" not in env


def test_the_form_says_what_each_mode_runs():
    s = spawner()

    async def pool_call(method, path, body=None):
        if path == "api/availability":
            return [{"fits": True, "slots": 2, "reason": ""} for _ in body["requests"]]
        return []
    s.pool_call = pool_call
    form = asyncio.run(s.render_options_form())
    boxes = {b.split('"', 1)[0]: b for b in form.split('data-slug="')[1:]}
    assert "PyTorch, CuPy, JAX, and any CUDA program: local vGPU on this node" in boxes["local"]
    assert "CUDA programs through cuda-python, cuda.core, numba-cuda (not PyTorch/CuPy/JAX): remote vGPU" \
        in boxes["remote"]
    assert MODE_TEXT["any"] in boxes["any"] and "not PyTorch" in MODE_TEXT["any"]
    assert "gpulab-mode" not in boxes["cpu"]


# ------------------------------------------------------------------ end to end, through the native library
# A spawned server's program runs with nothing but the environment its spawner built: the native
# libcuda.so.1 first on LD_LIBRARY_PATH, the worker's Unix socket, the vGPU's token and, as the node's
# "real driver", the driver double of gpu_worker/shim/build.py (the forwarding shim on a node-wide token of
# the same worker), given as GPULAB_REAL_LIBCUDA through c.GPUSpawner.real_libcuda.
NATIVE_SERVER = PRELUDE + """
import os, uuid
setup()
dev = ok(d.cuDeviceGet(0))
free, total = ok(d.cuMemGetInfo())
ptr = ok(d.cuMemAlloc(256 << 20))
done(count=ok(d.cuDeviceGetCount()), uuid="GPU-" + str(uuid.UUID(bytes=bytes(ok(d.cuDeviceGetUuid(dev)).bytes))),
     total=total, free=free, device_total=ok(d.cuDeviceTotalMem(dev)), too_much=name(d.cuMemAlloc(900 << 20)),
     libcuda=sorted({line.split()[-1] for line in open("/proc/self/maps") if "libcuda" in line}))
"""


@pytest.mark.skipif(not shim_build.native_supported(), reason="native mode is built for x86-64 only")
def test_a_spawned_native_server_sees_its_vgpu_through_the_native_library(pool, tmp_path):
    if not (native_dir() / "libcuda.so.1").exists():
        pytest.skip("the native libcuda.so.1 is not built")
    double = shim_build.build_driver_double(tmp_path / "driver-double")
    (tmp_path / "tokens.json").write_text(json.dumps({"node": {"gpus": [0]}}))  # the double's own session
    env = dict(os.environ, GPULAB_POOL_TOKEN=WORKER_TOKEN)
    w = Worker(tmp_path, token=None, tcp=True, env=env,
               extra=("--pool-url", pool.worker_url, "--name", "w-e2e", "--heartbeat-interval", "1",
                      "--emulated-memory", "4G", "--tokens-file", str(tmp_path / "tokens.json")))
    try:
        until = time.monotonic() + 20
        while not pool.call("GET", "api/gpus")[1]:
            assert time.monotonic() < until, "the worker did not register"
            time.sleep(0.1)
        (tmp_path / "server.py").write_text(NATIVE_SERVER)
        out = tmp_path / "server.json"
        s = spawner(pool_url=pool.url, pool_token=HUB_TOKEN, cmd=[sys.executable, str(tmp_path / "server.py")],
                    home_dir=str(tmp_path / "home"), real_libcuda=str(double),
                    environment={"GPULAB_DRIVER_WORKER": w.unix, "GPULAB_DRIVER_TOKEN": "node"})
        s.user_options = {"profile": "local"}
        with open(out, "w") as f, open(tmp_path / "server.err", "w") as err:
            s.popen_kwargs = {"stdout": f, "stderr": err}
            asyncio.run(s.start())
            try:
                assert s.proc.wait(60) == 0, (tmp_path / "server.err").read_text()
                seen = json.loads(out.read_text().strip().splitlines()[-1])
                alloc = s.gpu_allocation
                assert alloc["native"] and alloc["local_address"] == w.unix
                # the native library, and below it the "real driver" it loaded, not the forwarding shim
                assert seen["libcuda"] == sorted([str(native_dir() / "libcuda.so.1"), str(double)])
                # the vGPU, not the 4 GiB card: one device, its quota as memory, no more than the quota
                assert (seen["count"], seen["uuid"]) == (1, alloc["gpus"][0])
                assert seen["total"] == seen["device_total"] == 1 << 30 and seen["free"] <= 1 << 30
                assert seen["too_much"] == "CUDA_ERROR_OUT_OF_MEMORY"
            finally:
                asyncio.run(s.stop(now=True))
    finally:
        w.stop()
