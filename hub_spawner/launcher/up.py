"""`gpulab up`: the embedded default, one command from nothing to a GPU lab.

JupyterHub (SQLite, configurable-http-proxy) with the GPU pool and a local worker as
managed services, demo users and example profiles.  The worker uses the real GPU when
one is visible, else the emulated device, which the form and the dashboard label.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEMO_USERS = ["alice", "bob", "carol"]
GPU_GROUP = "gpu-users"
GPU_GROUP_MEMBERS = ["alice", "admin"]
USER_PASSWORD = "gpulab-demo"

EXAMPLE_PROFILES = [
    {"display_name": "Small vGPU", "slug": "small", "default": True,
     "description": "A slice of a GPU for exercises: pick its memory below.",
     "gpu": {"vram": "2G", "compute": 25, "mode": "any"},
     "profile_options": {"vram": {"display_name": "GPU memory", "choices": {
         "1g": {"display_name": "1 GiB", "gpu": {"vram": "1G"}},
         "2g": {"display_name": "2 GiB", "default": True, "gpu": {"vram": "2G"}},
         "4g": {"display_name": "4 GiB", "gpu": {"vram": "4G"}}}}}},
    {"display_name": "Half GPU (remote)", "slug": "half", "description": "Half a pooled GPU, served remotely.",
     "gpu": {"vram": "8G", "compute": 50, "mode": "remote"}},
    {"display_name": "Full GPU", "slug": "full", "description": "A whole GPU, for the gpu-users group.",
     "gpu": {"vram": "16G", "compute": 100, "mode": "any"}, "groups": [GPU_GROUP]},
    {"display_name": "CPU only", "slug": "cpu", "description": "No GPU."},
]

CONFIG_TEMPLATE = '''# Written by `gpulab up`; regenerated at every start. Put your changes in --config files.
import json, os, sys
settings = json.loads({settings!r})
state = settings["state"]

c.JupyterHub.bind_url = settings["hub_url"]
c.JupyterHub.hub_bind_url = settings["hub_internal_url"]
c.ConfigurableHTTPProxy.api_url = settings["proxy_api_url"]
c.JupyterHub.db_url = f"sqlite:///{{state}}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{{state}}/jupyterhub_cookie_secret"
c.ConfigurableHTTPProxy.pid_file = f"{{state}}/proxy.pid"
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = settings["user_password"]
c.SharedPasswordAuthenticator.admin_password = settings["admin_password"]
c.Authenticator.admin_users = {{"admin"}}
c.Authenticator.allowed_users = set(settings["users"])
c.JupyterHub.load_groups = {{settings["gpu_group"]: {{"users": settings["gpu_group_members"]}}}}

c.JupyterHub.spawner_class = "hub_spawner.spawner.GPUSimpleLocalProcessSpawner"
c.SimpleLocalProcessSpawner.home_dir_template = f"{{state}}/homes/{{{{username}}}}"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
if os.geteuid() == 0:  # containers and CI run as root; jupyter-server refuses that unless told
    c.Spawner.args = ["--allow-root"]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.GPUSpawner.pool_url = settings["pool_url"]
c.GPUSpawner.pool_token = settings["pool_api_token"]
c.GPUSpawner.gpu_profiles = settings["profiles"]

c.JupyterHub.services = [
    {{"name": "gpulab-pool", "url": settings["pool_bind"], "display": True, "oauth_no_confirm": True,
      "command": [sys.executable, "-m", "hub_spawner.pool", f"--GPUPool.db_url=sqlite:///{{state}}/pool.sqlite",
                  f"--GPUPool.heartbeat_timeout={{settings['heartbeat_timeout']}}"],
      "environment": {{"GPULAB_POOL_API_TOKEN": settings["pool_api_token"],
                       "GPULAB_POOL_WORKER_TOKEN": settings["pool_worker_token"]}}}},
    {{"name": "gpulab-worker",
      "command": [sys.executable, "-m", "gpu_worker.daemon", "--backend", settings["backend"],
                  "--tcp", settings["worker_bind"], "--pool-url", settings["pool_url"], "--name", "local",
                  *sum((["--emulated-kernels", k] for k in settings["emulated_kernels"]), [])],
      "environment": {{"GPULAB_POOL_TOKEN": settings["pool_worker_token"]}}}},
]
if settings["api_token"]:
    c.JupyterHub.services.append({{"name": "gpulab-automation", "api_token": settings["api_token"]}})
    c.JupyterHub.load_roles = [{{"name": "gpulab-automation", "services": ["gpulab-automation"],
                                "scopes": ["admin:users", "admin:servers", "access:servers", "read:services"]}}]
for extra in settings["extra_configs"]:
    load_subconfig(extra)
'''


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def load_secrets(state: Path) -> dict:
    """Secrets made once per state directory (readable by the owner only)."""
    path = state / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {"pool_api_token": secrets.token_urlsafe(32), "pool_worker_token": secrets.token_urlsafe(32),
              "admin_password": secrets.token_urlsafe(32)}
    path.touch(mode=0o600)
    path.write_text(json.dumps(values))
    return values


def write_config(args) -> Path:
    state = Path(args.state_dir).resolve()
    (state / "homes").mkdir(parents=True, exist_ok=True)
    sec = load_secrets(state)
    pool_port = args.pool_port or free_port(args.ip)
    pool_prefix = "/services/gpulab-pool/"
    settings = {
        "state": str(state), "hub_url": f"http://{args.ip}:{args.port}",
        "hub_internal_url": f"http://127.0.0.1:{free_port('127.0.0.1')}",
        "proxy_api_url": f"http://127.0.0.1:{free_port('127.0.0.1')}",
        "users": DEMO_USERS + ["admin"], "gpu_group": GPU_GROUP, "gpu_group_members": GPU_GROUP_MEMBERS,
        "user_password": USER_PASSWORD, "admin_password": sec["admin_password"],
        "pool_bind": f"http://127.0.0.1:{pool_port}", "pool_url": f"http://127.0.0.1:{pool_port}{pool_prefix}",
        "pool_api_token": sec["pool_api_token"], "pool_worker_token": sec["pool_worker_token"],
        "worker_bind": f"127.0.0.1:{args.worker_port or free_port('127.0.0.1')}", "backend": args.backend,
        "emulated_kernels": ["gpu_worker.backends.demo_kernels", *(args.emulated_kernels or [])],
        "heartbeat_timeout": args.heartbeat_timeout, "profiles": EXAMPLE_PROFILES,
        "api_token": args.api_token or os.environ.get("GPULAB_HUB_API_TOKEN", ""),
        "extra_configs": [str(Path(c).resolve()) for c in (args.config or [])],
    }
    path = state / "jupyterhub_config.py"
    path.write_text(CONFIG_TEMPLATE.format(settings=json.dumps(settings)))
    return path


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/hub/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="gpulab up", description=__doc__.splitlines()[0])
    ap.add_argument("--ip", default="127.0.0.1", help="address the hub listens on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="hub port (default 8000)")
    ap.add_argument("--state-dir", default=os.path.expanduser("~/.gpulab"),
                    help="where the hub and pool databases, secrets and user homes live (default ~/.gpulab)")
    ap.add_argument("--backend", choices=["auto", "cuda", "emulated"], default="auto",
                    help="worker backend: the GPU if present (auto), or the emulated test double")
    ap.add_argument("--pool-port", type=int, default=0, help="pool service port (default: a free one)")
    ap.add_argument("--worker-port", type=int, default=0, help="worker port (default: a free one)")
    ap.add_argument("--emulated-kernels", action="append", help="extra host-kernel modules for the emulated worker")
    ap.add_argument("--heartbeat-timeout", type=float, default=30.0, help="seconds before a silent worker is lost")
    ap.add_argument("--api-token", help="create a hub API token with admin rights over users and servers "
                                        "(for automation; default $GPULAB_HUB_API_TOKEN)")
    ap.add_argument("--config", action="append", help="extra JupyterHub config file(s) loaded last")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = write_config(args)
    url = f"http://{args.ip}:{args.port}"
    hub = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=config.parent,
                           start_new_session=True)
    stop = lambda *_: os.killpg(hub.pid, signal.SIGTERM)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    try:
        if not wait_ready(url, hub, 120):
            print("gpulab up: JupyterHub did not start; see the log above", file=sys.stderr)
            stop()
            return 1
        sec = load_secrets(config.parent)
        print(f"\ngpulab is up: {url}/hub/\n"
              f"  users: {', '.join(DEMO_USERS)} (password {USER_PASSWORD}); {', '.join(GPU_GROUP_MEMBERS)} "
              f"are in {GPU_GROUP}\n  admin: admin (password {sec['admin_password']})\n"
              f"  GPU pool dashboard: {url}/services/gpulab-pool/\n  state: {config.parent}\n", flush=True)
        return hub.wait()
    except KeyboardInterrupt:
        stop()
        return hub.wait()
