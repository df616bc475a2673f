"""Profile resolution rules of GPUSpawner, its spawn errors and its form and the pool dashboard as
rendered from their templates (the hub-level paths are in test_hub_api/test_browser)."""
import asyncio
import re
from types import SimpleNamespace

import pytest
from jupyterhub.spawner import SpawnException
from jupyterhub.utils import format_exception

from hub_spawner.spawner import GPUSimpleLocalProcessSpawner
from hub_spawner.spawner.mixin import PoolError

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
    assert err.value.status_code == 503 and "Connection refused" not in format_exception(err.value)[0]
    form = asyncio.run(s.render_options_form())
    assert "Unavailable: the GPU pool is unreachable right now" in form
    assert 'class="alert alert-danger gpulab-pool-error"' in form
    assert re.search(r'value="cpu"\s+checked', form)  # the one profile that needs no pool


def test_form_tells_the_user_their_vgpu_was_lost(tmp_path):
    from hubtools import HUB_TOKEN, Pool

    pool = Pool(str(tmp_path / "pool.sqlite"), timeout=0.5)
    try:
        pool.register()
        assert pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G"})[0] == 201
        pool.wait_lost()
        s = spawner()
        s.pool_url, s.pool_token = pool.url, HUB_TOKEN
        form = asyncio.run(s.render_options_form())
        assert "Your vGPU was lost: GPU worker w1 stopped responding" in form
        assert "Unavailable: GPU worker w1 stopped responding at" in form  # and nothing can be placed now
        with pytest.raises(SpawnException) as err:
            asyncio.run(s.allocate_gpu(PROFILES[0], {"vram": 1 << 30}))
        assert err.value.reason == "gpu-lost" and format_exception(err.value)[0].startswith(
            "GPU worker w1 stopped responding at ")
    finally:
        pool.stop()


# --------------------------------------------------------------- spawn errors and the form template
MEMORY_SHORT = {"fits": False, "slots": 0, "constraint": "memory", "need": 2 << 30, "free": 1 << 30,
                "reason": "no GPU has 2 GiB of free memory right now (the most free is 1 GiB)",
                "message": "No GPU has 2 GiB of free memory right now (the most free is 1 GiB). "
                           "Pick a smaller memory option or try again later."}


def canned_pool(s, avail):
    """Answers the form's pool calls with ``avail(spec)`` for each availability request."""
    async def pool_call(method, path, body=None):
        if path == "api/availability":
            return [avail(spec) for spec in body["requests"]]
        return [] if path.startswith("api/allocations") else [{"emulated": True}]
    s.pool_call = pool_call


def test_spawn_errors_are_the_pools_sentence():
    s = spawner()

    async def full(method, path, body=None):
        raise PoolError(503, MEMORY_SHORT["message"], {"status": 503, **MEMORY_SHORT})
    s.pool_call = full
    with pytest.raises(SpawnException) as err:
        asyncio.run(s.allocate_gpu(PROFILES[0], {"vram": 2 << 30}))
    e = err.value
    assert (e.status_code, e.reason) == (503, "gpu-memory")
    # what JupyterHub puts on the spawn form, the spawn-pending page and in API errors
    assert format_exception(e) == (MEMORY_SHORT["message"], None)
    assert format_exception(e, only_jupyterhub=True)[0] == MEMORY_SHORT["message"]
    assert "(reason=gpu-memory)" in str(e)  # the log keeps the reason label
    with pytest.raises(SpawnException) as err:  # an invalid profile is a sentence too
        s.resolve(PROFILES, {"profile": "nope"})
    assert format_exception(err.value)[0].startswith("Unknown profile 'nope'")


def test_form_never_preselects_a_full_profile():
    # nothing with a GPU fits: not Staff GPU (the default), not Small with 2 or 6 GiB; CPU is the first that fits
    s = spawner(groups=["staff"])
    canned_pool(s, lambda spec: MEMORY_SHORT)
    form = asyncio.run(s.render_options_form())
    checked = re.findall(r'name="profile"[^>]*value="([^"]+)"\s+checked', form)
    assert checked == ["cpu"], form
    assert form.count('gpulab-full">Full: no GPU has 2 GiB of free memory right now (the most free is 1 GiB)') == 2
    assert 'data-slug="staff"' in form and 'data-fits="0" data-why="Staff GPU: no GPU has' in form
    assert "2 GiB (full)" in form and "6 GiB (full)" in form
    assert "EMULATED" in form and "start.disabled" in form


def test_form_preselects_the_default_profile_when_it_fits():
    s = spawner(groups=["staff"])
    canned_pool(s, lambda spec: {"fits": True, "slots": 3, "reason": ""} if spec["vram"] < 4 << 30 else MEMORY_SHORT)
    form = asyncio.run(s.render_options_form())
    assert re.findall(r'name="profile"[^>]*value="([^"]+)"\s+checked', form) == ["small"]  # staff does not fit
    assert "3 available now" in form and "6 GiB (full)" in form and "2 GiB (full)" not in form
    canned_pool(s, lambda spec: {"fits": True, "slots": 1, "reason": ""})
    form = asyncio.run(s.render_options_form())
    assert re.findall(r'name="profile"[^>]*value="([^"]+)"\s+checked', form) == ["staff"]


def test_a_profile_whose_default_choice_is_full_offers_the_choice_that_fits():
    # Small's default 2 GiB is full, but 1 GiB fits: Small is not "Full", 1 GiB is selected, and
    # Small (the first that fits now) is preselected rather than CPU
    profiles = [{**PROFILES[0], "profile_options": {"vram": {"display_name": "GPU memory", "choices": {
        "1g": {"display_name": "1 GiB", "gpu": {"vram": "1G"}},
        "2g": {"display_name": "2 GiB", "default": True, "gpu": {"vram": "2G"}}}}}}, PROFILES[2]]
    s = spawner(profiles=profiles)
    canned_pool(s, lambda spec: {"fits": True, "slots": 2, "reason": ""} if spec["vram"] <= 1 << 30 else MEMORY_SHORT)
    form = asyncio.run(s.render_options_form())
    assert re.findall(r'name="profile"[^>]*value="([^"]+)"\s+checked', form) == ["small"]
    assert "2 available now with GPU memory 1 GiB" in form and "Full:" not in form
    assert re.search(r'<option value="1g" selected data-fits="1"', form), form
    assert re.search(r'<option value="2g" data-fits="0"', form) and "2 GiB (full)" in form


def test_form_escapes_profile_text():
    s = spawner(profiles=[{"display_name": "<b>x</b>", "slug": "x", "description": "a & b"}])
    canned_pool(s, lambda spec: MEMORY_SHORT)
    form = asyncio.run(s.render_options_form())
    assert "&lt;b&gt;x&lt;/b&gt;" in form and "a &amp; b" in form and "<b>x</b>" not in form


def test_dashboard_template_uses_the_hubs_page():
    from hub_spawner.pool.dashboard import dashboard_rows, environment, page_namespace

    gpus = [{"worker": "local", "model": "gpulab emulated vGPU (test double, no GPU)", "capability": "9.0",
             "memory": 16 << 30, "used_vram": 0, "used_compute": 0, "sessions": 0, "emulated": True,
             "worker_status": "up"},
            {"worker": "w2", "model": "Fake H100", "capability": "9.0", "memory": 80 << 30, "used_vram": 0,
             "used_compute": 0, "sessions": 0, "emulated": True, "worker_status": "up"}]
    ns = page_namespace({"name": "admin", "admin": True}, "/hub/", "/services/gpulab-pool/")
    html = environment().get_template("dashboard.html").render(**ns, **dashboard_rows(gpus, [], [], []))
    assert 'id="jupyterhub-logo"' in html and 'href="/hub/home"' in html and 'href="/hub/admin"' in html
    assert 'href="/hub/static/css/style.min.css"' in html and 'href="/hub/logout"' in html
    rows = re.findall(r"<tr><td>(?:local|w2)</td>.*?</tr>", html, re.S)
    assert len(rows) == 2 and all(r.lower().count("emulated") == 1 for r in rows), rows
    assert "No GPU workers" not in html
    assert "No workers yet." in html and "No sessions: no server holds a vGPU right now." in html
    assert "No GPU time used yet." in html
    empty = environment().get_template("dashboard.html").render(**ns, **dashboard_rows([], [], [], []))
    assert "No GPU workers have registered yet" in empty


# --------------------------------------------------------------- limits checked where they enter
BAD_PROFILES = [
    ({"display_name": "Infinite", "slug": "inf", "gpu": {"vram": "inf"}}, "gpu.vram: 'inf' is not a size"),
    ({"display_name": "Negative", "slug": "neg", "gpu": {"vram": "-1G"}}, "gpu.vram: '-1G' is not a size above zero"),
    ({"display_name": "Count", "slug": "cnt", "gpu": {"vram": "1G", "count": "abc"}},
     "gpu.count: 'abc' is not a GPU count"),
    ({"display_name": "Share", "slug": "share", "gpu": {"vram": "1G", "compute": 250}},
     "gpu.compute: 250 is not a compute share"),
    ({"display_name": "Choice", "slug": "choice", "gpu": {"vram": "1G"}, "profile_options": {"vram": {
        "choices": {"a": {"gpu": {"vram": "1G"}}, "b": {"gpu": {"vram": "8X"}}}}}}, "gpu.vram: '8X' is not a size"),
    ({"display_name": "Colour", "slug": "colour", "gpu": {"vram": "1G", "colour": "red"}},
     "gpu: unknown GPU setting(s) ['colour']"),
    ({"display_name": "Listy", "slug": "listy", "gpu": ["1G"]}, "gpu: a list is not a mapping of GPU settings"),
    (["not", "a", "profile"], "a profile must be a dict, not a list"),
]


@pytest.mark.parametrize("bad, why", BAD_PROFILES)
def test_a_bad_admin_profile_is_left_out_and_the_form_renders_for_everyone(caplog, bad, why):
    # a callable: a static list of non-dicts is already refused by the trait when the config loads
    s = spawner(profiles=lambda spawner: [PROFILES[0], bad, PROFILES[2]])
    canned_pool(s, lambda spec: {"fits": True, "slots": 1, "reason": ""})
    with caplog.at_level("ERROR"):
        assert visible(s) == ["small", "cpu"]
    lines = [r.getMessage() for r in caplog.records if "gpu_profiles" in r.getMessage()]
    name = repr(bad["slug"]) if isinstance(bad, dict) else "#2"
    assert len(lines) == 1 and lines[0].startswith(f"c.GPUSpawner.gpu_profiles: left out profile {name}: "), lines
    assert why in lines[0]
    form = asyncio.run(s.render_options_form())
    assert 'value="small"' in form and 'value="cpu"' in form
    profile, gpu = s.resolve(asyncio.run(s.visible_profiles()), {"profile": "small", "vram": "6g"})
    assert gpu == {"vram": 6 << 30, "compute": 25}


def test_a_choice_may_supply_what_the_profile_leaves_out():
    p = {"display_name": "Pick", "slug": "pick", "gpu": {"compute": 10}, "profile_options": {"vram": {"choices": {
        "1g": {"default": True, "gpu": {"vram": "1G"}}, "2g": {"gpu": {"vram": "2G"}}}}}}
    s = spawner(profiles=[p])
    assert visible(s) == ["pick"]
    assert s.resolve([p], {})[1] == {"compute": 10, "vram": 1 << 30}


@pytest.mark.parametrize("options, kind", [({"profile": ["small"]}, "a list"), ({"profile": {"a": 1}}, "an object"),
                                           ({"profile": "small", "vram": ["6g"]}, "a list"),
                                           ({"profile": "small", "vram": 6}, "a number")])
def test_option_values_that_are_not_strings_are_a_400_sentence(options, kind):
    s = spawner()
    with pytest.raises(SpawnException) as err:
        asyncio.run(s.apply_user_options(s, options))
    assert err.value.status_code == 400
    name = "vram" if "vram" in options else "profile"
    assert format_exception(err.value)[0] == (f"The option {name!r} must be a string (a profile's slug or a "
                                              f"choice's key), not {kind}.")


def test_the_form_asks_each_distinct_request_once_within_the_pools_cap():
    choices = {f"c{i}": {"display_name": f"{i} MiB", "gpu": {"vram": f"{i + 1}M"}} for i in range(250)}
    profiles = [{"display_name": f"P{n}", "slug": f"p{n}", "gpu": {"vram": "1M"},
                 "profile_options": {"vram": {"choices": choices}}} for n in range(3)]
    s = spawner(profiles=profiles)
    calls = []

    async def pool_call(method, path, body=None):
        if path == "api/availability":
            assert len(body["requests"]) <= 100
            calls.append(len(body["requests"]))
            return [{"fits": True, "slots": 1, "reason": ""} for _ in body["requests"]]
        return [] if path.startswith("api/allocations") else [{"emulated": True}]
    s.pool_call = pool_call
    form = asyncio.run(s.render_options_form())
    assert sum(calls) == 250 and len(calls) == 3  # 3 profiles x 251 asks, 250 distinct requests
    assert 'value="p2"' in form and "Unavailable" not in form


def test_the_lost_allocations_query_names_only_this_user(tmp_path):
    """A user named like a query string must not see someone else's lost vGPU."""
    from hubtools import HUB_TOKEN, Pool

    pool = Pool(str(tmp_path / "pool.sqlite"), timeout=0.5)
    try:
        pool.register()
        assert pool.call("POST", "api/allocations", {"user": "alice", "vram": "1G"})[0] == 201
        pool.wait_lost()
        s = spawner()
        s.user.name = "bob&user=alice"
        s.pool_url, s.pool_token = pool.url, HUB_TOKEN
        assert "Your vGPU was lost" not in asyncio.run(s.render_options_form())
        s.user.name = "alice"
        assert "Your vGPU was lost" in asyncio.run(s.render_options_form())
    finally:
        pool.stop()
