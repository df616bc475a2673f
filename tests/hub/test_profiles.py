"""Profile resolution rules of GPUSpawner (the hub-level paths are in test_hub_api/test_browser)."""
import asyncio
from types import SimpleNamespace

import pytest
from jupyterhub.spawner import SpawnException

from hub_spawner.spawner import GPUSimpleLocalProcessSpawner

PROFILES = [
    {"display_name": "Small", "slug": "small", "gpu": {"vram": "2G", "compute": 25},
     "profile_options": {"vram": {"display_name": "GPU memory", "choices": {
         "2g": {"display_name": "2 GiB", "default": True, "gpu": {"vram": "2G"}},
         "6g": {"display_name": "6 GiB", "gpu": {"vram": "6G"}}}}}},
    {"display_name": "Staff GPU", "slug": "staff", "default": True, "gpu": {"vram": "40G"}, "groups": ["staff"]},
    {"display_name": "CPU", "slug": "cpu"},
]


def spawner(groups=(), profiles=PROFILES):
    user = SimpleNamespace(name="ann", groups=[SimpleNamespace(name=g) for g in groups])
    return GPUSimpleLocalProcessSpawner(user=user, gpu_profiles=profiles)


def visible(s):
    return [p["slug"] for p in asyncio.run(s.visible_profiles())]


def test_groups_filter_profiles():
    assert visible(spawner()) == ["small", "cpu"]
    assert visible(spawner(groups=["staff"])) == ["small", "staff", "cpu"]


def test_callable_profiles_sync_and_async():
    def per_user(s):
        return PROFILES[:1] if s.user.name == "ann" else PROFILES

    async def per_user_async(s):
        return PROFILES[2:]

    assert visible(spawner(profiles=per_user)) == ["small"]
    assert visible(spawner(profiles=per_user_async)) == ["cpu"]


def test_resolve_defaults_options_and_errors():
    s = spawner()
    profiles = asyncio.run(s.visible_profiles())
    profile, gpu = s.resolve(profiles, {})
    assert profile["slug"] == "small" and gpu == {"vram": 2 << 30, "compute": 25}  # first when none is default
    assert s.resolve(profiles, {"profile": "small", "vram": "6g"})[1]["vram"] == 6 << 30
    assert s.resolve(profiles, {"profile": "cpu"})[1] is None
    for bad, msg in [({"profile": "staff"}, "Unknown profile"), ({"profile": "small", "vram": "99g"}, "Invalid choice")]:
        with pytest.raises(SpawnException, match=msg) as err:
            s.resolve(profiles, bad)
        assert err.value.status_code == 400
    with pytest.raises(SpawnException, match="Unknown GPU setting"):
        s.resolve([{"display_name": "X", "gpu": {"vram": "1G", "colour": "red"}}], {})


def test_form_fields_map_to_user_options():
    s = spawner()
    opts = s.options_from_form({"profile": ["small"], "profile-option-small--vram": ["6g"],
                                "profile-option-cpu--vram": ["2g"]})
    assert opts == {"profile": "small", "vram": "6g"}


def test_unreachable_pool_is_a_clear_503():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    s = spawner()
    s.pool_url = f"http://127.0.0.1:{port}/"
    with pytest.raises(SpawnException, match="unreachable") as err:
        asyncio.run(s.allocate_gpu(PROFILES[0], {"vram": 2 << 30}))
    assert err.value.status_code == 503
    form = asyncio.run(s.render_options_form())
    assert "Full: the GPU pool is unreachable" in form


def test_form_tells_the_user_their_vgpu_was_lost(tmp_path):
    from hubtools import HUB_TOKEN, Pool

    pool = Pool(str(tmp_path / "pool.sqlite"), timeout=0.5)
    try:
        pool.register()
        assert pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G"})[0] == 201
        import time

        deadline = time.time() + 10
        while pool.call("GET", "api/gpus")[1][0]["worker_status"] != "lost":
            assert time.time() < deadline
            time.sleep(0.1)
        s = spawner()
        s.pool_url, s.pool_token = pool.url, HUB_TOKEN
        form = asyncio.run(s.render_options_form())
        assert "Your vGPU was lost: GPU worker w1 stopped responding" in form
        assert "no GPU worker is available" in form  # and nothing can be placed now
    finally:
        pool.stop()
