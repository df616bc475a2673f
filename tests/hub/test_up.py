"""`gpulab up` starts without stack traces, says how to use the lab, and stops within 5 s of
SIGINT or SIGTERM, taking the hub, the proxy, the pool and the worker with it, quietly."""
from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from hubtools import ROOT, Hub, alive, remove_unix_users, tree
from hub_spawner.launcher.accounts import closed_to_others, shared_account_reason
from hub_spawner.launcher.up import default_state_dir

STOP_WITHIN = 5.0
# What a clean start and stop must not print: Python tracebacks (JupyterHub's service check during
# shutdown, a worker's KeyboardInterrupt), and the proxy's complaints about a probe that came too early.
NOISE = re.compile(r"Traceback|ECONNREFUSED|404 GET /hub/health|KeyboardInterrupt|AttributeError")


def start_and_stop(state, sig, **kw) -> tuple[Hub, dict[int, str], float]:
    """A real `gpulab up` (emulated worker registered), then `sig`: its parts and the seconds to exit."""
    hub = Hub(state, **kw)
    try:
        parts = tree(hub.proc.pid)
        t = time.monotonic()
        hub.proc.send_signal(sig)
        try:
            hub.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        return hub, parts, time.monotonic() - t
    finally:
        hub.stop()  # kills what is left if the test fails


def kinds(parts: dict[int, str]) -> set[str]:
    named = {"hub": "hub_spawner.launcher.hub", "proxy": "configurable-http-proxy",
             "pool": "-m hub_spawner.pool", "worker": "-m gpu_worker.daemon"}
    return {kind for kind, marker in named.items() if any(marker in c for c in parts.values())}


def test_sigint_stops_everything_quickly_and_quietly(tmp_path):
    """Also: its secrets are its own, and the banner says whose account users' servers run under.
    Accounts are left to `gpulab up` (auto); any Unix user it makes has a prefix of this test's."""
    prefix = f"gpulab-t{os.getpid()}-"
    try:
        hub, parts, took = start_and_stop(tmp_path / "state", signal.SIGINT, accounts="auto",
                                          extra=["--unix-user-prefix", prefix])
    finally:
        remove_unix_users(prefix)
    log = hub.log_text()
    assert kinds(parts) == {"hub", "proxy", "pool", "worker"}, parts
    assert hub.proc.returncode == 0, log[-3000:]
    assert took < STOP_WITHIN, f"`gpulab up` took {took:.1f} s to stop:\n{log[-3000:]}"
    assert not alive(parts), f"left running: {[parts[p] for p in alive(parts)]}"
    noise = [line for line in log.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise)

    banner = log[log.index("gpulab is up"):]
    for fact in ("alice", "bob", "carol", "gpulab-demo", "admin", f"{tmp_path / 'state' / 'secrets.json'}",
                 f"{hub.url}/services/gpulab-pool/", f"state: {tmp_path / 'state'}"):
        assert fact in banner, f"the banner does not name {fact}:\n{banner[:800]}"
    assert hub.admin_password not in log  # the banner says where the password is, not what

    state = tmp_path / "state"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [state, *state.iterdir()] if p.is_file() or p == state}
    assert modes[state.name] == 0o700
    for name in ("secrets.json", "jupyterhub.sqlite", "pool.sqlite", "jupyterhub_cookie_secret",
                 "jupyterhub_config.py"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    assert not [n for n, m in modes.items() if m & 0o077], modes  # journals and the rest too

    why = shared_account_reason("auto", os.geteuid(), sys.executable)
    if why:  # here: not root, or this Python is under a private directory (pyenv in a mode-700 /root)
        assert "SHARED ACCOUNT, FOR TRYING ONLY" in banner, banner
        assert " ".join(why.split()) in " ".join(banner.replace("!!", "").split()), banner
        if closed_to_others(sys.executable):
            assert f"{closed_to_others(sys.executable)} is closed to other users" in why
    else:
        assert f"each user's server runs as its own Unix user ({prefix}alice" in banner, banner


def test_sigterm_stops_everything_quickly_even_started_in_the_background(tmp_path):
    """Started with SIGINT ignored, as `gpulab up &` in a script is: JupyterHub stops its services
    with SIGINT, so they must take that signal themselves or it waits 30 s for each."""
    hub, parts, took = start_and_stop(tmp_path / "state", signal.SIGTERM, sigint_ignored=True)
    assert hub.proc.returncode == 0
    assert took < STOP_WITHIN, f"`gpulab up` took {took:.1f} s to stop:\n{hub.log_text()[-3000:]}"
    assert not alive(parts), f"left running: {[parts[p] for p in alive(parts)]}"
    assert not [line for line in hub.log_text().splitlines() if NOISE.search(line)]


@pytest.mark.parametrize("env, expected", [
    ({"GPULAB_STATE_DIR": "/srv/lab", "XDG_STATE_HOME": "/x"}, "/srv/lab"),
    ({"XDG_STATE_HOME": "/x"}, "/x/gpulab"),
    ({"HOME": "/home/u"}, "/home/u/.local/state/gpulab"),
])
def test_the_state_directory_default(monkeypatch, env, expected):
    for name in ("GPULAB_STATE_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_state_dir() == expected


def test_a_taken_port_fails_at_once(tmp_path):
    """The proxy only logs a failed bind and runs on: `gpulab up` must not report a lab whose URL
    is someone else's."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "gpulab.cli", "up", "--port", str(port), "--state-dir",
                            str(tmp_path / "state")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1 and f"127.0.0.1:{port}" in p.stderr and "--port" in p.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("backend", ["cuda", "emulated"])
def test_on_a_gpu_the_lab_offers_a_native_pytorch_profile_and_the_worker_a_unix_socket(tmp_path, monkeypatch,
                                                                                          backend):
    """Only with the GPU backend: the native libcuda.so.1 needs the node's real driver. The config `gpulab up`
    writes, loaded as JupyterHub loads it, gives the worker a Unix socket that every user's server can enter
    (/run/gpulab as root) and the form a local profile; with the emulated device, neither."""
    from traitlets.config import Config

    from hub_spawner.launcher.up import GPULabUp

    monkeypatch.setattr(GPULabUp, "choose_accounts", lambda self: "one account for all in this test")
    app = GPULabUp(backend=backend, state_dir=str(tmp_path / "state"), worker_port=45123)
    path, _settings = app.write_config()
    c = Config()
    exec(compile(path.read_text(), str(path), "exec"), {"c": c, "load_subconfig": None})
    worker = next(s for s in c.JupyterHub.services if s["name"] == "gpulab-worker")["command"]
    slugs = [p["slug"] for p in c.GPUSpawner.gpu_profiles]
    if backend == "emulated":
        assert "--unix-socket" not in worker and slugs == ["small", "half", "full", "cpu"]
        return
    sock = worker[worker.index("--unix-socket") + 1]
    where = "/run/gpulab" if os.geteuid() == 0 else str(tmp_path / "state")
    assert sock == f"{where}/worker-45123.sock"
    if os.geteuid() == 0:
        assert stat.S_IMODE(os.stat(where).st_mode) & 0o005 == 0o005  # every user's server may enter
    assert slugs == ["small", "local", "half", "full", "cpu"]
    local = c.GPUSpawner.gpu_profiles[1]
    assert local["gpu"]["mode"] == "local"
