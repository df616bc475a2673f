"""A vGPU ended on its worker reaches the pool: an admin of the worker, or the session itself, revokes it
through the worker's control API, and within a couple of heartbeats the pool's allocation is revoked
with the same sentence (the spawner and the user read why) and its GPU's memory is free to place again.
A real pool and a real worker daemon; the heartbeat's "ended" checked at the pool's edge."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gpu_worker.client import token_hash
from hubtools import G, WORKER_TOKEN, Pool, _call

INTERVAL = 1.0  # the worker's heartbeat interval here
WITHIN = 2 * INTERVAL + 2.0  # a couple of heartbeats, plus the start of a request on two shared cores
ADMIN = "worker-admin-token-for-tests"


@pytest.fixture
def lab(tmp_path):
    """A pool and a worker (one emulated 16 GiB GPU, its control API on) registered with it."""
    pool = Pool(str(tmp_path / "pool.sqlite"))
    state = tmp_path / "state"
    env = dict(os.environ, GPULAB_POOL_TOKEN=WORKER_TOKEN, GPULAB_WORKER_ADMIN_TOKEN=ADMIN,
               GPULAB_STATE_DIR=str(state), XDG_RUNTIME_DIR=str(tmp_path))
    worker = subprocess.Popen(
        [sys.executable, "-m", "gpu_worker.daemon", "--backend", "emulated", "--tcp", "127.0.0.1:0",
         "--pool-url", pool.worker_url, "--name", "w-rev", "--heartbeat-interval", str(INTERVAL),
         "--control", "127.0.0.1:0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        lines = [worker.stdout.readline(), worker.stdout.readline()]
        control = lines[1].split("control API at ")[1].strip()
        deadline = time.time() + 20
        while not pool.call("GET", "api/gpus")[1]:
            assert time.time() < deadline, "the worker did not register"
            time.sleep(0.1)
        yield pool, control
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        pool.stop()


def granted(control: str, alloc: dict, token: str) -> None:
    """Until the worker holds the allocation's grant (it came with a heartbeat's reply)."""
    deadline = time.time() + WITHIN
    while _call("GET", f"{control}/api/vgpus/{alloc['id']}", None, token)[0] != 200:
        assert time.time() < deadline, "the worker never received the grant"
        time.sleep(0.05)


def ended(pool: Pool, alloc: dict) -> dict:
    """The allocation once the pool no longer counts it active."""
    deadline = time.time() + WITHIN
    while (a := pool.call("GET", f"api/allocations/{alloc['id']}")[1])["status"] == "active":
        assert time.time() < deadline, "the worker's revocation did not reach the pool"
        time.sleep(0.05)
    return a


@pytest.mark.parametrize("by", ["admin", "session"])
def test_a_vgpu_revoked_on_its_worker_ends_in_the_pool_and_frees_its_gpu(lab, by):
    pool, control = lab
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "16G"})
    assert status == 201, alloc
    assert pool.call("GET", "api/gpus")[1][0]["used_vram"] == 16 * G
    assert pool.call("POST", "api/allocations", {"user": "bob", "vram": "1G"})[0] == 503  # the GPU is full
    token = ADMIN if by == "admin" else alloc["token"]
    granted(control, alloc, token)

    status, vgpu = _call("POST", f"{control}/api/vgpus/{alloc['id']}/revoke", {"reason": "GPU maintenance"}, token)
    assert status == 200 and vgpu["state"] == "revoked", vgpu
    who = "an admin of its worker" if by == "admin" else "its own session"
    assert vgpu["reason"] == f"{who} revoked this vGPU: GPU maintenance"

    a = ended(pool, alloc)
    assert (a["status"], a["message"]) == ("revoked", vgpu["reason"])
    assert a["ended"]
    assert pool.call("GET", "api/gpus")[1][0]["used_vram"] == 0
    status, again = pool.call("POST", "api/allocations", {"user": "bob", "vram": "16G"})
    assert status == 201, again  # its memory is placed again
    # later heartbeats keep reporting it ended: nothing changes, the new allocation stays active
    time.sleep(2 * INTERVAL)
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["message"] == vgpu["reason"]
    assert pool.call("GET", f"api/allocations/{again['id']}")[1]["status"] == "active"


def beat(pool, body, worker="w1"):
    return pool.worker_call("POST", f"api/workers/{worker}/heartbeat", body, worker=worker)


def test_ended_ends_only_the_workers_own_active_allocations(pool):
    pool.register("w1", node="n1")
    pool.register("w2", node="n2")
    spec = {"user": "ann", "vram": "4G", "compute": 10, "mode": "local"}
    allocs = []
    for node in ("n1", "n1", "n2"):
        status, alloc = pool.call("POST", "api/allocations", {**spec, "node": node})
        assert status == 201, alloc
        allocs.append(alloc)
    mine, released, other = allocs
    assert pool.call("DELETE", f"api/allocations/{released['id']}")[0] == 204
    why = "an admin of its worker revoked this vGPU: maintenance"
    status, reply = beat(pool, {"ended": {token_hash(a["token"]): why for a in allocs} | {"f" * 64: why}})
    assert status == 200, reply
    states = {a["id"]: pool.call("GET", f"api/allocations/{a['id']}")[1] for a in allocs}
    assert (states[mine["id"]]["status"], states[mine["id"]]["message"]) == ("revoked", why)
    assert states[released["id"]]["status"] == "released"  # already ended: left as it was
    assert states[other["id"]]["status"] == "active"  # another worker's: ignored
    assert reply["grants"] == [] and reply["revoked"][token_hash(mine["token"])] == why
    # idempotent: the same report again changes nothing
    ended_at = states[mine["id"]]["ended"]
    assert beat(pool, {"ended": {token_hash(mine["token"]): "another sentence"}})[0] == 200
    assert pool.call("GET", f"api/allocations/{mine['id']}")[1]["ended"] == ended_at


@pytest.mark.parametrize("ended, says", [
    ([], "ended must be a JSON object"),
    ({"h": 5}, "(why the vGPU ended) must be a non-empty string of at most 1024 characters"),
    ({"h": ""}, "(why the vGPU ended) must be a non-empty string"),
    ({"h": "x" * 1025}, "at most 1024 characters"),
    ({"": "why"}, "an ended vGPU's token hash must be a non-empty string"),
    ({f"h{i}": "why" for i in range(4097)}, "ended may have at most 4096 entries, not 4097"),
])
def test_a_bad_ended_is_refused_with_a_sentence(pool, ended, says):
    pool.register("w1")
    status, body = beat(pool, {"ended": ended})
    assert status == 400 and says in body["message"], body
