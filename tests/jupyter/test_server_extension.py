"""The server extension against a real worker (emulated backend), real kernels and real client programs.

A Jupyter server (pytest-jupyter, base URL /a%40b/) runs with the spawner's environment: the worker's
control URL, the session token and the shim first on LD_LIBRARY_PATH, so its kernels reach the vGPU.
Programs hold memory through the shim; the tests read the extension's REST API (docs/jupyter.md)."""
from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from traitlets import TraitError
from traitlets.config import Config
from workertools import SLEEP_PRELUDE, LineProgram


MiB = 1 << 20

# Holds argv[1] bytes of random data on the vGPU; on stdin: "sleep MS" (a long kernel on the worker, then
# a query that waits for it: a synchronize would touch the memory, which brings it back) and
# "check" (reads the bytes back and says whether they are intact).
HOLDER = SLEEP_PRELUDE + """
import os
setup()
n = int(sys.argv[1])
data = np.frombuffer(os.urandom(n), np.uint8)
ptr = ok(d.cuMemAlloc(n))
ok(d.cuMemcpyHtoD(ptr, data.ctypes.data, n))
done(ready=True, pid=os.getpid())
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "sleep":
        launch_sleep(int(cmd[1]))
        ok(d.cuMemGetInfo())  # a query: it sends the launch and waits for it, and touches no memory
        done(slept=True)
    elif cmd[0] == "check":
        back = np.empty(n, np.uint8)
        r = name(d.cuMemcpyDtoH(back.ctypes.data, ptr, n))
        done(r=r, same=bool((back == data).all()))
"""

# Run in a kernel: 8 MiB allocated through the shim and kept in the kernel's namespace.
KERNEL_ALLOC = """
from cuda.bindings import driver as d
assert d.cuInit(0)[0] == d.CUresult.CUDA_SUCCESS
_dev = d.cuDeviceGet(0)[1]
_ctx = d.cuDevicePrimaryCtxRetain(_dev)[1]
d.cuCtxSetCurrent(_ctx)
err, gpu_buffer = d.cuMemAlloc(8 << 20)
assert err == d.CUresult.CUDA_SUCCESS, err
print("allocated")
"""


@pytest.fixture
def vgpu_worker(request, make_worker, monkeypatch):
    """The spawner's environment for the server: a worker's control URL, a session token, the shim
    (None, with indirect parametrization: a server without a vGPU)."""
    if getattr(request, "param", "worker") is None:
        for name in ("GPULAB_CONTROL_URL", "GPULAB_TOKEN", "GPULAB_WORKER"):
            monkeypatch.delenv(name, raising=False)
        return None
    w = make_worker(extra=("--vram-quota", "256M"))
    for name, value in w.env().items():
        if name in ("LD_LIBRARY_PATH", "GPULAB_WORKER", "GPULAB_TOKEN"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("GPULAB_CONTROL_URL", w.control)
    return w


@pytest.fixture
def jp_server_config(vgpu_worker):
    return Config({"ServerApp": {"jpserver_extensions": {"server_extension": True}},
                   "VGPUExtension": {"refresh": 0.5, "background_refresh": 2.0,
                                     "idle_interval": 0.3}})


@pytest.fixture
def holders(vgpu_worker):
    progs = []

    def start(nbytes: int) -> LineProgram:
        p = LineProgram(vgpu_worker, HOLDER, args=[nbytes])
        assert p.first["ready"], p.first
        progs.append(p)
        return p

    yield start
    for p in progs:
        p.close()


async def get(jp_fetch, *path, **params) -> tuple[int, dict]:
    r = await jp_fetch("gpulab", "api", *path, params=params, raise_error=False)
    return r.code, json.loads(r.body)


async def post(jp_fetch, *path, body=None) -> tuple[int, dict]:
    r = await jp_fetch("gpulab", "api", *path, method="POST", body=json.dumps(body or {}), raise_error=False)
    return r.code, json.loads(r.body)


async def until(probe, what: str, timeout: float = 30.0, every: float = 0.2):
    """Await ``probe()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"{what} did not happen within {timeout} s; last look: {last!r}")


async def the_vgpu(jp_fetch) -> dict:
    status, body = await get(jp_fetch, "vgpus")
    assert status == 200, body
    (v,) = body["vgpus"]
    return v


async def run_action(jp_fetch, vgpu_id, kind, to=None) -> tuple[dict, list[dict]]:
    """Start a tier action and follow it as the panel does (every 0.2 s here): its end and every look."""
    status, body = await post(jp_fetch, "vgpus", vgpu_id, kind, body={"to": to} if to else None)
    assert status == 202 and body["action"]["state"] == "running", body
    looks = [body["action"]]

    async def ended():
        status, action = await get(jp_fetch, "actions", looks[0]["id"])
        assert status == 200, action
        looks.append(action)
        return action if action["state"] != "running" else None

    return await until(ended, f"the {kind} ending", timeout=60), looks


async def test_the_vgpu_as_the_worker_sees_it_with_quota_usage_and_gpu(jp_fetch, vgpu_worker, holders):
    p = holders(16 * MiB)
    status, body = await get(jp_fetch, "vgpus")
    assert status == 200 and body["configured"] is True and body["message"] is None, body
    assert body["emulated"] is True and body["refresh"] == 0.5
    (gpu,) = body["gpus"]
    assert gpu["model"] == "gpulab emulated vGPU (test double, no GPU)" and gpu["facts"]["emulated"] is True
    (v,) = body["vgpus"]
    (worker_view,) = vgpu_worker.vgpus()
    assert v["id"] == worker_view["id"] and v["quota"] == 256 * MiB
    assert "token_hash" in worker_view and "token_hash" not in v  # the worker's business, not the browser's
    assert v["used"] >= 16 * MiB and v["tiers"]["hot"] >= 16 * MiB and v["tier"] == "hot"
    assert v["worker"] == vgpu_worker.control.split("//")[1]
    (proc,) = v["other_processes"]  # a program, not a kernel's
    assert proc["client_pid"] == p.first["pid"] and proc["used"] >= 16 * MiB
    assert v["kernels"] == [] and v["action"] is None
    # the history has a sample per refresh, taken while nobody polls too
    await asyncio.sleep(2.5)
    status, hist = await get(jp_fetch, "vgpus", v["id"], "history")
    assert status == 200 and hist["interval"] == 0.5 and len(hist["samples"]) >= 2, hist
    last = hist["samples"][-1]
    assert set(last) == {"t", "hot", "warm", "cold", "used", "overhead", "quota", "share", "share_measured"}
    assert last["hot"] >= 16 * MiB and last["quota"] == 256 * MiB
    assert [s["t"] for s in hist["samples"]] == sorted(s["t"] for s in hist["samples"])


async def test_many_tabs_cost_the_worker_one_request_per_interval(jp_fetch, jp_serverapp):
    state = jp_serverapp.web_app.settings["gpulab_vgpu_state"]
    await the_vgpu(jp_fetch)
    state.stale()  # as when the interval passed: the next look asks the worker
    before = state.fetches
    answers = await asyncio.gather(*(get(jp_fetch, "vgpus") for _ in range(10)))
    assert all(status == 200 for status, _ in answers)
    assert state.fetches - before == 1, state.fetches - before
    assert len({body["time"] for _, body in answers}) == 1  # the same answer for every tab


async def test_a_quiet_vgpu_is_asked_less_until_a_cell_runs(jp_fetch, jp_serverapp, holders):
    state = jp_serverapp.web_app.settings["gpulab_vgpu_state"]
    holders(MiB)

    async def quiet():
        await get(jp_fetch, "vgpus")
        return state.view.quiet()

    await until(quiet, "two answers in a row without activity")

    async def fetches_while_polling(seconds: float) -> int:
        before, end = state.fetches, time.monotonic() + seconds
        while time.monotonic() < end:
            assert (await get(jp_fetch, "vgpus"))[0] == 200
            await asyncio.sleep(0.1)
        return state.fetches - before

    assert await fetches_while_polling(1.8) <= 1  # background_refresh 2 s, not refresh 0.5 s
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))
    client = jp_serverapp.kernel_manager.get_kernel(json.loads(r.body)["id"]).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        cell = asyncio.ensure_future(client.execute_interactive("import time; time.sleep(3)", timeout=30))
        await asyncio.sleep(0.3)
        assert await fetches_while_polling(1.8) >= 3  # a cell runs: the refresh pace
        await cell
    finally:
        client.stop_channels()


async def test_recent_calls_are_the_newest_records_oldest_first(jp_fetch, holders):
    holders(MiB)
    v = await the_vgpu(jp_fetch)

    async def three():
        status, body = await get(jp_fetch, "vgpus", v["id"], "trace", limit="3")
        assert status == 200, body
        return body if len(body["records"]) == 3 else None

    body = await until(three, "three calls in the trace")  # the executor publishes its calls in batches
    seqs = [r["seq"] for r in body["records"]]
    assert seqs == sorted(seqs)
    status, everything = await get(jp_fetch, "vgpus", v["id"], "trace", limit="200")
    assert [r["seq"] for r in everything["records"]][-3:] == seqs  # the newest three
    assert "cuMemAlloc" in {r["function"] for r in everything["records"]}
    for bad in ("0", "201", "x"):
        status, body = await get(jp_fetch, "vgpus", v["id"], "trace", limit=bad)
        assert status == 400 and "limit" in body["message"], body


async def test_a_kernel_using_the_vgpu_is_shown_with_its_notebook(jp_fetch, jp_serverapp, jp_root_dir):
    (jp_root_dir / "work").mkdir()
    r = await jp_fetch("api", "sessions", method="POST", body=json.dumps(
        {"path": "work/gpu.ipynb", "name": "gpu.ipynb", "type": "notebook", "kernel": {"name": "python3"}}))
    session = json.loads(r.body)
    kid = session["kernel"]["id"]
    client = jp_serverapp.kernel_manager.get_kernel(kid).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        said = []
        reply = await client.execute_interactive(KERNEL_ALLOC, timeout=60, output_hook=said.append)
        assert reply["content"]["status"] == "ok", (reply["content"], said)

        async def mapped():
            v = await the_vgpu(jp_fetch)
            rows = [k for k in v["kernels"] if k["kernel_id"] == kid and k["used"] >= 8 * MiB]
            return (v, rows[0]) if rows else None

        v, row = await until(mapped, "the kernel's 8 MiB shown under the kernel")
        kernel_pid = jp_serverapp.kernel_manager.get_kernel(kid).provisioner.pid
        assert row["pids"] == [kernel_pid] and row["notebook"] == "work/gpu.ipynb" and row["name"] == "python3"
        assert row["execution_state"] in ("idle", "busy") and isinstance(row["calls"], int) and row["overhead"] >= 0
        assert v["other_processes"] == []
    finally:
        client.stop_channels()


async def test_offload_and_restore_with_progress_and_the_bytes_intact(jp_fetch, vgpu_worker, holders):
    p = holders(32 * MiB)
    v = await the_vgpu(jp_fetch)
    # the program is in a 3 s call: the worker acts on the offload when it ends, so the action runs a while
    p.tell("sleep 3000")
    time.sleep(0.3)
    action, looks = await run_action(jp_fetch, v["id"], "offload", "warm")
    assert p.said() == {"slept": True}
    assert action["state"] == "done" and action["status"] == 200, (action["message"], action["status"])
    assert action["kind"] == "offload" and action["to"] == "warm" and action["elapsed"] >= 2.0, action
    assert action["tiers"]["warm"] >= 32 * MiB and action["tiers"]["hot"] == 0, action
    assert "now in the worker's host RAM" in action["message"], action
    running = [a for a in looks if a["state"] == "running"]
    updates = [a["updated"] for a in running]
    assert len(running) >= 8, looks  # seconds of looks every 0.2 s
    assert max(b - a for a, b in zip(updates, updates[1:])) <= 1.0, updates  # progress at least once a second
    assert updates[-1] > updates[0]
    (worker_view,) = vgpu_worker.vgpus()
    assert worker_view["tier"] == "warm" and worker_view["tiers"]["warm"] >= 32 * MiB, (worker_view["tiers"], worker_view["processes"])
    v = await the_vgpu(jp_fetch)
    assert v["action"]["id"] == action["id"] and v["tier"] == "warm"  # the cache was dropped at the end

    action, _ = await run_action(jp_fetch, v["id"], "restore")
    assert action["state"] == "done" and action["to"] == "hot" and action["tiers"]["hot"] >= 32 * MiB, action
    (worker_view,) = vgpu_worker.vgpus()
    assert worker_view["tiers"] == {"hot": worker_view["tiers"]["hot"], "warm": 0, "cold": 0}, worker_view
    assert p("check") == {"r": "CUDA_SUCCESS", "same": True}


async def test_a_second_action_while_one_runs_is_409_and_bad_requests_are_refused(jp_fetch, holders):
    p = holders(4 * MiB)
    v = await the_vgpu(jp_fetch)
    p.tell("sleep 2000")
    time.sleep(0.3)
    status, first = await post(jp_fetch, "vgpus", v["id"], "offload", body={"to": "cold"})
    assert status == 202, first
    status, body = await post(jp_fetch, "vgpus", v["id"], "restore")
    assert status == 409 and body["action"]["id"] == first["action"]["id"], body
    assert "already busy" in body["message"] and "offload to cold" in body["message"], body
    for bad in ({"to": "hot"}, {"to": None}, {}):
        status, body = await post(jp_fetch, "vgpus", v["id"], "offload", body=bad)
        assert status == 400 and '"to"' in body["message"], body
    r = await jp_fetch("gpulab", "api", "vgpus", v["id"], "offload", method="POST", body="not json",
                       raise_error=False)
    assert r.code == 400 and json.loads(r.body)["message"].endswith(", not 'not json'"), r.body
    for path in (("vgpus", "nope", "history"), ("vgpus", "nope", "trace"), ("actions", "nope")):
        status, body = await get(jp_fetch, *path)
        assert status == 404 and "nope" in body["message"], (path, body)
    status, body = await post(jp_fetch, "vgpus", "nope", "restore")
    assert status == 404 and "no vGPU nope" in body["message"], body
    assert p.said() == {"slept": True}

    async def ended():
        return (await get(jp_fetch, "actions", first["action"]["id"]))[1]["state"] != "running"

    await until(ended, "the offload ending")


async def test_a_worker_that_is_down_is_a_502_with_the_reason(jp_fetch, vgpu_worker):
    await the_vgpu(jp_fetch)
    vgpu_worker.stop()
    await asyncio.sleep(2.1)  # past the background interval (the vGPU was quiet): the next request asks the worker
    status, body = await get(jp_fetch, "vgpus")
    where = vgpu_worker.control.split("//")[1]
    assert status == 502 and body["message"].startswith(f"cannot reach the vGPU's worker at {where}: "), body
    status, body = await get(jp_fetch, "vgpus", "t-x", "history")
    assert status == 502 and "cannot reach" in body["message"], body


@pytest.mark.parametrize("vgpu_worker", [None], indirect=True)
async def test_without_a_vgpu_the_extension_says_so_and_starts_nothing(jp_fetch, jp_serverapp):
    status, body = await get(jp_fetch, "vgpus")
    assert status == 200 and body["configured"] is False and body["vgpus"] == [], body
    assert body["message"].startswith("This Jupyter server has no vGPU: it was started without the worker's control URL")
    assert jp_serverapp.web_app.settings["gpulab_vgpu_state"] is None  # no timers, no client
    status, body = await post(jp_fetch, "vgpus", "x", "restore")
    assert status == 404 and "has no vGPU" in body["message"]


@pytest.mark.parametrize("vgpu_worker", [None], indirect=True)
def test_a_bad_setting_fails_at_start_with_its_name(jp_configurable_serverapp):
    config = Config({"ServerApp": {"jpserver_extensions": {"server_extension": True},
                                   "reraise_server_extension_failures": True},
                     "VGPUExtension": {"control_url": "http://127.0.0.1:1", "token": "t", "refresh": 0}})
    with pytest.raises((TraitError, SystemExit)) as failed:
        jp_configurable_serverapp(config=config)
    cause = failed.value if isinstance(failed.value, TraitError) else failed.value.__context__
    assert isinstance(cause, TraitError), failed.value  # the server gives up at start, on this error
    assert str(cause).startswith("c.VGPUExtension.refresh must be a number of seconds of at least 0.1"), cause


async def test_a_cell_that_starts_brings_the_vgpu_s_memory_back(jp_fetch, jp_serverapp, vgpu_worker, holders):
    """wake_on_busy: the vGPU's memory went warm while all was idle; when a cell starts, the extension asks the
    worker to restore it, before (and without) any program touching it, while the cell still runs; once per
    busy period."""
    p = holders(16 * MiB)
    v = await the_vgpu(jp_fetch)
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))
    client = jp_serverapp.kernel_manager.get_kernel(json.loads(r.body)["id"]).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        status, body = vgpu_worker.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "warm"})
        assert status == 200 and vgpu_worker.vgpus()[0]["tier"] == "warm", body
        state = jp_serverapp.web_app.settings["gpulab_vgpu_state"]
        await asyncio.sleep(1.0)
        assert state.idle.wakes == 0 and vgpu_worker.vgpus()[0]["tier"] == "warm"  # idle kernels wake nothing
        # a long cell, so that a loaded machine's slowness cannot end it before the wake-up is seen
        cell = asyncio.ensure_future(client.execute_interactive("import time; time.sleep(10)", timeout=40))

        async def hot():
            return vgpu_worker.vgpus()[0]["tier"] == "hot"

        await until(hot, "the restore asked when the cell started", timeout=8.0)
        assert not cell.done()  # the cell still runs: the extension, not the cell's end, brought it back
        assert state.idle.wakes == 1
        assert (await cell)["content"]["status"] == "ok"
        assert state.idle.wakes == 1  # once per busy period
        assert vgpu_worker.vgpus()[0]["moves"]["restores"] == 1
    finally:
        client.stop_channels()
    assert p("check") == {"r": "CUDA_SUCCESS", "same": True}


async def test_the_idle_hint_reaches_the_worker_when_all_kernels_are_idle(jp_fetch, jp_serverapp, vgpu_worker):
    assert vgpu_worker.vgpus()[0]["idle_seconds"] is None  # no process, no hint yet
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))
    kid = json.loads(r.body)["id"]
    client = jp_serverapp.kernel_manager.get_kernel(kid).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        reply = await client.execute_interactive("import time; time.sleep(1.5)", timeout=30)
        assert reply["content"]["status"] == "ok"
        ended = time.time()
        state = jp_serverapp.web_app.settings["gpulab_vgpu_state"]

        async def told():  # the idle period after the cell (one came before it too, after the kernel started)
            return state.idle.told is not None and state.idle.told > ended - 1.0

        await until(told, "a hint after the cell")
        v = vgpu_worker.vgpus()[0]
        # the worker's clock counts from what the server told it: the kernels' last activity, the cell's end
        assert v["idle_seconds"] is not None, v
        assert abs((time.time() - v["idle_seconds"]) - state.idle.told) < 0.5, (v["idle_seconds"], state.idle.told)
        assert state.idle.told <= ended + 0.5, (state.idle.told, ended)
        hints = state.idle.hints
        await asyncio.sleep(1.5)
        assert state.idle.hints == hints  # once per idle period
        await client.execute_interactive("1 + 1", timeout=30)  # a new period

        async def again():
            return state.idle.hints > hints

        await until(again, "a hint for the next idle period")
    finally:
        client.stop_channels()


def sample_url(pattern: str) -> str:
    """A path a route's regex matches: each group filled with its first alternative, or 'x'."""
    def fill(m):
        body = m.group(2)
        return body.split("|")[0] if re.fullmatch(r"[\w|]+", body) else "x"

    return re.sub(r"\((\?P<\w+>)?([^()]*)\)", fill, pattern.rstrip("$"))


def extension_routes(web_app) -> list[tuple[str, type]]:
    """(regex, handler class) of every route whose handler comes from server_extension, from the app's routers."""
    found = []

    def walk(router):
        for rule in getattr(router, "rules", []):
            target = rule.target
            if isinstance(target, type) and target.__module__.startswith("server_extension"):
                found.append((rule.matcher.regex.pattern, target))
            elif hasattr(target, "rules"):
                walk(target)

    walk(web_app.default_router)
    return found


async def test_every_route_refuses_an_unauthenticated_request(jp_serverapp, jp_web_app, http_server_client,
                                                                 jp_base_url):
    patterns = extension_routes(jp_web_app)
    assert len(patterns) == 5, patterns
    for pattern, handler in patterns:
        path = sample_url(pattern)
        assert re.fullmatch(pattern, path) and path.startswith(jp_base_url + "gpulab/api/"), (pattern, path)
        for method in ("GET", "POST"):
            # A matching XSRF cookie and header: jupyter_server checks XSRF before authentication, so a POST
            # without them would be refused (403) even by a handler that forgot @authenticated.
            r = await http_server_client.fetch(path, method=method, body=b"{}" if method == "POST" else None,
                                               headers={"Cookie": "_xsrf=x", "X-XSRFToken": "x"},
                                               raise_error=False, follow_redirects=False)
            serves = method.lower() in vars(handler)  # tornado answers 405 to a method before any handler code
            assert r.code in ((403, 302) if serves else (403, 302, 405)), (method, path, r.code)
            if r.code == 302:
                assert "/login" in r.headers["Location"], r.headers
            assert b"xsrf" not in r.body.lower(), (method, path, r.body)  # refused by authentication, not XSRF
            assert b"vgpus" not in r.body and b"quota" not in r.body



def test_a_kernels_child_process_counts_for_the_kernel():
    """A program a kernel started (`!python train.py` runs it under a shell) is found up its parent chain."""
    import os
    import subprocess
    import sys

    from server_extension.kernels import map_processes, owner

    shell = subprocess.Popen(["sh", "-c", f"{sys.executable} -c 'import time; time.sleep(30)' & wait"],
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (grandchildren := [p for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == shell.pid]):
            assert time.monotonic() < deadline, "the shell's child did not start"
            time.sleep(0.05)
        program = int(grandchildren[0])
        assert owner(program, {shell.pid: "k1"}) == "k1"  # two levels up: the shell
        assert owner(program, {os.getpid(): "k2"}) == "k2"  # three: this process started the shell
        assert owner(program, {1 << 22: "k3"}) is None  # no kernel among its ancestors
        kernels = [{"kernel_id": "k1", "name": "python3", "pid": shell.pid, "notebook": "a.ipynb",
                    "execution_state": "idle", "last_activity": None},
                   {"kernel_id": "k9", "name": "python3", "pid": None, "notebook": None,
                    "execution_state": "idle", "last_activity": None}]
        rows, others = map_processes([{"pid": 11, "client_pid": program, "used": 5, "overhead": 2, "calls": 3},
                                      {"pid": 12, "client_pid": 1 << 22, "used": 7, "overhead": 0, "calls": 1}], kernels)
        assert rows[0] == {"kernel_id": "k1", "name": "python3", "notebook": "a.ipynb", "execution_state": "idle",
                           "pids": [program], "used": 5, "overhead": 2, "calls": 3}
        assert rows[1]["kernel_id"] == "k9" and rows[1]["pids"] == [] and rows[1]["used"] == 0
        assert [p["pid"] for p in others] == [12]
    finally:
        os.killpg(shell.pid, 9)
        shell.wait()


def _parent(pid: int) -> int | None:
    from server_extension.kernels import parent_of

    return parent_of(pid)


async def test_a_panel_showing_recent_calls_gets_them_with_each_refresh(jp_fetch, jp_serverapp, holders):
    """Once a panel asked for the recent calls, every refresh brings them in its one request to the worker."""
    state = jp_serverapp.web_app.settings["gpulab_vgpu_state"]
    v = await the_vgpu(jp_fetch)
    assert (await get(jp_fetch, "vgpus", v["id"], "trace", limit="5"))[0] == 200
    separate = []
    fetch_trace = state.client.trace

    async def counted(*args):
        separate.append(args)
        return await fetch_trace(*args)

    state.client.trace = counted
    holders(MiB)  # new calls on the vGPU

    async def alloc_seen():
        status, body = await get(jp_fetch, "vgpus", v["id"], "trace", limit="5")
        assert status == 200, body
        return "cuMemAlloc" in {r["function"] for r in body["records"]}

    await until(alloc_seen, "the new program's allocation among the recent calls")
    assert separate == []  # no request of their own: they came with the vGPU
    assert "trace" not in (await the_vgpu(jp_fetch))  # and the vGPU's JSON keeps its shape


async def test_the_wake_up_comes_once_per_busy_period_and_never_over_a_panel_action():
    """wake_on_busy asks for one restore per busy period; in a busy period where the panel's tier action runs
    (an offload by hand), none: the person's offload is not undone."""
    from types import SimpleNamespace

    from server_extension.idle import IdleHint

    kernel = SimpleNamespace(execution_state="busy", last_activity=None, kernel_name="python3")
    moved = []

    class Kernels:
        def list_kernel_ids(self):
            return ["k"]

        def get_kernel(self, kid):
            return kernel

    class State:
        config = SimpleNamespace(idle_interval=5.0, idle_hint=False, wake_on_busy=True)
        actions = SimpleNamespace(by_id={"a": SimpleNamespace(state="running")})

        def __init__(self):
            self.client = SimpleNamespace(move=self.move)

        async def move(self, vgpu_id, action):
            moved.append((vgpu_id, action))
            return 200, {}

        def stale(self):
            pass

        async def snapshot(self):
            return {"vgpus": [{"id": "v1", "state": "active", "tier": "warm"}]}

    state = State()
    hint = IdleHint(state, Kernels())
    await hint.check()
    state.actions.by_id = {}  # the action ended, the cell still runs
    await hint.check()
    assert moved == []
    for execution_state in ("idle", "busy", "busy", "busy"):  # a new busy period: one restore
        kernel.execution_state = execution_state
        await hint.check()
    assert moved == [("v1", "restore")] and hint.wakes == 1
    for execution_state in ("idle", "busy"):
        kernel.execution_state = execution_state
        await hint.check()
    assert moved == [("v1", "restore")] * 2
    # a kernel starting is no cell: it neither wakes the vGPU nor keeps a busy period open (a server that
    # missed the kernel's first "idle" sees "starting" until the first cell)
    for execution_state in ("starting", "starting", "busy"):
        kernel.execution_state = execution_state
        await hint.check()
    assert moved == [("v1", "restore")] * 3


async def test_the_idle_hint_warns_once_per_outage(caplog):
    """A worker that stays down is logged once, not every idle_interval; once it answers, the next outage
    is logged again."""
    import logging
    from types import SimpleNamespace

    from server_extension.idle import IdleHint
    from server_extension.worker_client import WorkerError

    class Kernels:
        def list_kernel_ids(self):
            return ["k"]

        def get_kernel(self, kid):
            return SimpleNamespace(execution_state="idle", last_activity=None, kernel_name="python3")

    down = [True]
    told = []

    class State:
        config = SimpleNamespace(idle_interval=5.0, idle_hint=True, wake_on_busy=True)
        client = SimpleNamespace(idle=lambda vid, since: _done(told.append(vid)))

        async def snapshot(self):
            if down[0]:
                raise WorkerError(502, "cannot reach the worker")
            return {"vgpus": [{"id": "v1", "state": "active"}]}

    async def _done(_):
        return None

    hint = IdleHint(State(), Kernels())
    hint.idle_since = lambda kernels: 1000.0 + len(told)  # a new idle period each time it was told
    caplog.set_level(logging.DEBUG, "gpulab.server_extension")
    for _ in range(3):
        await hint.check()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot reach the worker" in warnings[0].getMessage(), caplog.records
    down[0] = False
    await hint.check()
    assert told == ["v1"]
    down[0] = True
    await hint.check()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
