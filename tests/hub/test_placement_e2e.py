"""Placement -> device mapping end to end (pool -> spawner -> kernel) on an emulated 4-GPU worker.

A real pool, a real `gpulab worker --emulated-gpus 4` registered with it, GPUSpawner.start() against
that pool (LocalProcessSpawner starts the "server", here a kernel-like client program, with the
environment the spawner built: GPULAB_WORKER, GPULAB_TOKEN and the shim on LD_LIBRARY_PATH), and
the client lists its devices through cuda-python.  It must see exactly the GPUs the pool placed its
allocation on, in the allocation's order, with its quota as their memory."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from types import SimpleNamespace

import pytest

from gpu_worker.daemon.gpus import describe_gpus
from hub_spawner.spawner import GPUSimpleLocalProcessSpawner
from hubtools import HUB_TOKEN, WORKER_TOKEN, G
from workertools import SEE_DEVICES, Worker

NAME = "four"
MEMORY = 4 * G
PROFILES = [{"display_name": "One vGPU", "slug": "one", "gpu": {"vram": "1G", "compute": 25}},
            {"display_name": "Two vGPUs", "slug": "two", "gpu": {"vram": "512M", "compute": 25, "count": 2}}]

# The kernel: what it sees of the driver (workertools.SEE_DEVICES), from nothing but the
# environment its spawner gave it, on a second line.
KERNEL = SEE_DEVICES + """
import os
setup()
free, total = ok(d.cuMemGetInfo())
done(free=free, total=total, env={k: os.environ.get(k) for k in ("GPULAB_WORKER", "GPULAB_TOKEN", "GPULAB_ALLOCATION")})
"""


@pytest.fixture
def four(pool, tmp_path):
    """The pool's fixture pool with a 4-GPU emulated worker registered; its GPUs' uuids by index."""
    env = dict(os.environ, GPULAB_POOL_TOKEN=WORKER_TOKEN)
    w = Worker(tmp_path, token=None, tcp=True, env=env,
               extra=("--pool-url", pool.worker_url, "--name", NAME, "--emulated-gpus", "4",
                      "--emulated-memory", "4G", "--heartbeat-interval", "1"))
    try:
        gpus = [g["uuid"] for g in describe_gpus("emulated", NAME, MEMORY, 4)]
        until = time.monotonic() + 20
        while sorted(g["uuid"] for g in pool.call("GET", "api/gpus")[1] if g["worker"] == NAME) != sorted(gpus):
            assert time.monotonic() < until, "the worker did not register its 4 GPUs"
            time.sleep(0.1)
        yield w, gpus
    finally:
        w.stop()


def take(pool, vram=MEMORY) -> dict:
    """Someone else's allocation (a whole GPU by default): placement's ground truth is the pool."""
    status, alloc = pool.call("POST", "api/allocations", {"user": "other", "vram": vram, "compute": 100})
    assert status == 201, alloc
    return alloc


def granted(w, alloc: dict) -> dict:
    """The worker's vGPU of the pool's allocation (it also lists the others' vGPUs granted to it)."""
    (vgpu,) = [v for v in w.vgpus() if v["id"] == str(alloc["id"])]
    return vgpu


def spawn(pool, tmp_path, profile: str):
    """GPUSpawner.start() for user ann with `profile`; its "server" is KERNEL, whose answer is returned
    with the spawner (stop it to release the vGPU)."""
    user = SimpleNamespace(name="ann", url="/user/ann/", groups=[])
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    (tmp_path / "kernel.py").write_text(KERNEL)
    out = tmp_path / f"kernel-{profile}.json"
    s = GPUSimpleLocalProcessSpawner(user=user, hub=hub, gpu_profiles=PROFILES, pool_url=pool.url,
                                     pool_token=HUB_TOKEN, cmd=[sys.executable, str(tmp_path / "kernel.py")],
                                     home_dir=str(tmp_path / "home"))
    s.user_options = {"profile": profile}
    with open(out, "w") as f, open(tmp_path / f"kernel-{profile}.err", "w") as err:
        s.popen_kwargs = {"stdout": f, "stderr": err}
        asyncio.run(s.start())
        assert s.proc.wait(60) == 0, (tmp_path / f"kernel-{profile}.err").read_text()
    devices, rest = (json.loads(line) for line in out.read_text().strip().splitlines()[-2:])
    return s, {**devices, **rest}


def test_a_vgpu_placed_on_gpu_3_sees_one_device_that_is_gpu_3(pool, four, tmp_path):
    w, gpus = four
    taken = [take(pool)["gpus"] for _ in range(3)]  # whole GPUs: only one is left for ann
    assert sorted(g for t in taken for g in t) == sorted(gpus[:3]), taken  # compact-first takes them in order
    s, seen = spawn(pool, tmp_path, "one")
    try:
        alloc = pool.call("GET", f"api/allocations/{s.gpu_allocation['id']}")[1]
        assert alloc["gpus"] == [gpus[3]] and alloc["user"] == "ann" and alloc["vram"] == G
        assert seen["env"] == {"GPULAB_WORKER": alloc["address"], "GPULAB_TOKEN": s.gpu_allocation["token"],
                               "GPULAB_ALLOCATION": str(alloc["id"])}
        assert seen["count"] == 1 and seen["beyond"] == "CUDA_ERROR_INVALID_DEVICE"
        (device,) = seen["devices"]  # GPU 3, as device 0, its quota as memory
        assert (device["uuid"], device["memory"]) == (gpus[3], G) and "emulated" in device["name"]
        assert seen["total"] == G and 0 < seen["free"] <= G
        vgpu = granted(w, alloc)  # the worker's ledger agrees with the pool
        assert vgpu["gpus"] == [gpus[3]] and vgpu["quota"] == G and vgpu["sessions_opened"] == 1
    finally:
        asyncio.run(s.stop(now=True))
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["status"] == "released"


def test_a_count_2_vgpu_sees_its_two_gpus_in_the_allocations_order(pool, four, tmp_path):
    w, gpus = four
    blockers = [take(pool) for _ in range(4)]
    assert sorted(b["gpus"][0] for b in blockers) == sorted(gpus)
    # free GPUs 1 and 3 only: device 0 must not simply be the worker's first GPU
    for b in blockers:
        if b["gpus"][0] in (gpus[1], gpus[3]):
            assert pool.call("DELETE", f"api/allocations/{b['id']}")[0] == 204
    s, seen = spawn(pool, tmp_path, "two")
    try:
        alloc = pool.call("GET", f"api/allocations/{s.gpu_allocation['id']}")[1]
        assert sorted(alloc["gpus"]) == sorted([gpus[1], gpus[3]]) and alloc["count"] == 2
        assert seen["count"] == 2 and seen["beyond"] == "CUDA_ERROR_INVALID_DEVICE"
        assert [(x["uuid"], x["memory"]) for x in seen["devices"]] == [(u, 512 << 20) for u in alloc["gpus"]]
        vgpu = granted(w, alloc)
        assert vgpu["gpus"] == alloc["gpus"] and vgpu["quota"] == 2 * (512 << 20)  # vram x count (docs/vgpu.md)
    finally:
        asyncio.run(s.stop(now=True))
