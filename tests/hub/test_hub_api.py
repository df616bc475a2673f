"""JupyterHub REST API path: spawn with user_options naming a profile, release on stop."""
from __future__ import annotations

from kernel_client import run_in_kernel

from hubtools import API_TOKEN

CUDA_PROBE = """
import os
from cuda.bindings import driver as d
d.cuInit(0)
err, ctx = d.cuDevicePrimaryCtxRetain(0)
d.cuCtxSetCurrent(ctx)
err, free, total = d.cuMemGetInfo()
print(err.name, total, d.cuDeviceGetName(64, 0)[1].split(b"\\0")[0].decode(), os.environ["GPULAB_ALLOCATION"])
"""


def test_spawn_with_profile_gives_the_kernel_its_vgpu(hub):
    status, _ = hub.api("POST", "users/alice/server", {"profile": "small", "vram": "4g"})
    assert status in (201, 202)
    hub.wait_ready("alice")
    [alloc] = hub.allocations("alice")
    assert alloc["vram"] == 4 << 30 and alloc["compute"] == 25 and alloc["profile"] == "small"
    out = run_in_kernel(hub.url, "alice", API_TOKEN, CUDA_PROBE)
    result, total, name, alloc_id = out.split()[:3] + [out.split()[-1]]
    assert result == "CUDA_SUCCESS" and int(total) == 4 << 30, out
    assert "emulated" in out and int(alloc_id) == alloc["id"]
    status, _ = hub.api("DELETE", "users/alice/server")
    assert status in (202, 204)
    hub.wait_stopped("alice")
    assert hub.allocations("alice") == []
    _, released = hub.pool("GET", f"api/allocations/{alloc['id']}")
    assert released["status"] == "released" and released["ended"] is not None


def test_invalid_profile_and_option_are_refused(hub):
    status, body = hub.api("POST", "users/bob/server", {"profile": "no-such-profile"})
    assert status == 400 and "Unknown profile" in body["message"]
    status, body = hub.api("POST", "users/bob/server", {"profile": "small", "vram": "64g"})
    assert status == 400 and "Invalid choice" in body["message"]
    # bob is not in gpu-users: the full-GPU profile does not exist for him
    status, body = hub.api("POST", "users/bob/server", {"profile": "full"})
    assert status == 400 and "Unknown profile 'full'" in body["message"]
    assert hub.allocations("bob") == []


def test_cpu_profile_gets_no_gpu(hub):
    status, _ = hub.api("POST", "users/carol/server", {"profile": "cpu"})
    assert status in (201, 202)
    hub.wait_ready("carol")
    assert hub.allocations("carol") == []
    out = run_in_kernel(hub.url, "carol", API_TOKEN, "import os; print(os.environ.get('GPULAB_WORKER', 'none'))")
    assert out.strip() == "none"
    hub.api("DELETE", "users/carol/server")
    hub.wait_stopped("carol")


def test_full_pool_refuses_with_503(hub):
    # the emulated GPU has 16 GiB: alice (gpu-users) takes all of it, then bob cannot get 2 GiB
    status, _ = hub.api("POST", "users/alice/server", {"profile": "full"})
    assert status in (201, 202)
    hub.wait_ready("alice")
    status, body = hub.api("POST", "users/bob/server", {"profile": "small", "vram": "2g"})
    assert status == 503, body
    assert body["message"] == ("No GPU has 2 GiB of free memory right now (the most free is 0 GiB). "
                               "Pick a smaller memory option or try again later.")
    hub.api("DELETE", "users/alice/server")
    hub.wait_stopped("alice")
    assert hub.allocations("alice") == []
