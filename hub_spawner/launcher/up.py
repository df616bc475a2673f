"""`gpulab up`: the embedded default, one command from nothing to a GPU lab.

JupyterHub (SQLite, configurable-http-proxy) with the GPU pool and a local worker as
managed services, demo users and example profiles.  The worker uses the real GPU when
one is visible, else the emulated device, which the form and the dashboard label.

Stopping is JupyterHub's own clean-up (it stops the services with SIGINT, which they take
quietly, then the proxy); whatever is still running after `stop_timeout` is killed.  This
process is a child subreaper, so it still finds processes whose parent died first.
"""
from __future__ import annotations

import ctypes
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from traitlets import Enum, Float, Int, List, Unicode, default
from traitlets.config import Application

from gpu_worker.client.env import default_state_dir, gpu_visible
from hub_spawner.launcher.accounts import ensure_unix_users, shared_account_reason

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

# Offered only where the worker has a GPU (the native libcuda.so.1 needs the node's real driver): on the
# emulated device its programs would be forwarded, where PyTorch, CuPy and JAX do not run.
LOCAL_PROFILE = {"display_name": "PyTorch vGPU (this node)", "slug": "local",
                 "description": "A quarter of this node's GPU, in your server's own process: PyTorch, CuPy and JAX "
                                "run.",
                 "gpu": {"vram": "4G", "compute": 25, "mode": "local"}}

CONFIG_TEMPLATE = '''# Written by `gpulab up`; regenerated at every start. Put your changes in --config files.
import json, os, sys
settings = json.loads({settings!r})
state = settings["state"]

c.JupyterHub.bind_url = settings["hub_url"]
c.JupyterHub.hub_bind_url = settings["hub_internal_url"]
c.ConfigurableHTTPProxy.api_url = settings["proxy_api_url"]
c.ConfigurableHTTPProxy.auth_token = settings["proxy_auth_token"]  # `gpulab up` asks the proxy when it is ready
# JupyterHub's periodic service check raises AttributeError when it fires while shutdown has
# already removed a service's server; the hub restarts a managed service that exits anyway.
c.JupyterHub.service_check_interval = 0
c.JupyterHub.db_url = f"sqlite:///{{state}}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{{state}}/jupyterhub_cookie_secret"
c.ConfigurableHTTPProxy.pid_file = f"{{state}}/proxy.pid"
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = settings["user_password"]
c.SharedPasswordAuthenticator.admin_password = settings["admin_password"]
c.Authenticator.admin_users = {{"admin"}}
c.Authenticator.allowed_users = set(settings["users"])
c.JupyterHub.load_groups = {{settings["gpu_group"]: {{"users": settings["gpu_group_members"]}}}}

if settings["unix_user_prefix"] is not None:  # one Unix user per lab user (see launcher/accounts.py)
    c.JupyterHub.spawner_class = "hub_spawner.launcher.accounts.GPULabUserSpawner"
    c.GPULabUserSpawner.unix_user_prefix = settings["unix_user_prefix"]
else:  # one shared account, the banner says why
    c.JupyterHub.spawner_class = "hub_spawner.spawner.GPUSimpleLocalProcessSpawner"
    c.SimpleLocalProcessSpawner.home_dir_template = f"{{state}}/homes/{{{{username}}}}"
    if os.geteuid() == 0:  # containers and CI run as root; jupyter-server refuses that unless told
        c.Spawner.args = ["--allow-root"]
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.GPUSpawner.pool_url = settings["pool_url"]
c.GPUSpawner.pool_token = settings["pool_api_token"]
c.GPUSpawner.gpu_profiles = settings["profiles"]

c.JupyterHub.services = [
    {{"name": "gpulab-pool", "url": settings["pool_bind"], "display": True, "oauth_no_confirm": True,
      "command": [sys.executable, "-m", "hub_spawner.pool", f"--GPUPool.db_url=sqlite:///{{state}}/pool.sqlite",
                  f"--GPUPool.heartbeat_timeout={{settings['heartbeat_timeout']}}",
                  f"--GPUPool.worker_bind_url={{settings['pool_worker_url']}}"],
      "environment": {{"GPULAB_POOL_API_TOKEN": settings["pool_api_token"],
                       "GPULAB_POOL_WORKER_TOKEN": settings["pool_worker_token"]}}}},
    {{"name": "gpulab-worker",
      "command": [sys.executable, "-m", "gpu_worker.daemon", "--backend", settings["backend"],
                  "--tcp", settings["worker_bind"], "--pool-url", settings["pool_worker_url"], "--name", "local",
                  f"--GPUWorker.pool_credential_file={{state}}/worker-local.credential",
                  *(["--unix-socket", settings["worker_unix_socket"]] if settings["worker_unix_socket"] else []),
                  *sum((["--emulated-kernels", k] for k in settings["emulated_kernels"]), [])],
      "environment": {{"GPULAB_POOL_TOKEN": settings["pool_worker_token"], "GPULAB_STATE_DIR": str(state)}}}},
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
        path.chmod(0o600)  # one written by hand, or by an earlier version, may be open to others
        return json.loads(path.read_text())
    values = {"pool_api_token": secrets.token_urlsafe(32), "pool_worker_token": secrets.token_urlsafe(32),
              "admin_password": secrets.token_urlsafe(32)}
    path.touch(mode=0o600)
    path.write_text(json.dumps(values))
    return values


def http_ok(url: str, token: str = "") -> bytes | None:
    """The body of a 200 answer, or None: the probes must stay silent while nothing listens yet."""
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.read() if r.status == 200 else None
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def become_subreaper() -> None:
    """Orphans (the proxy or a service whose hub died first) become our children, not init's."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass  # not Linux: the hub's own clean-up is all there is


class GPULabUp(Application):
    name = "gpulab-up"
    description = f"""Start a GPU lab: JupyterHub with the gpulab pool and a local worker.

    JupyterHub (SQLite, configurable-http-proxy) runs with the GPU pool service and one
    worker on this machine: on its GPU if one is visible, else on the emulated device
    (a test double, labelled so in the spawn form and on the dashboard).

    Users: {", ".join(DEMO_USERS)}, password '{USER_PASSWORD}'. {" and ".join(GPU_GROUP_MEMBERS)} are in
    '{GPU_GROUP}', the only group that sees the "Full GPU" profile.

    Admin: 'admin'. Its password is made once per state directory and kept as
    "admin_password" in <state dir>/secrets.json.

    Hub: http://<ip>:<port>/hub/ -- GPU pool dashboard (admins):
    http://<ip>:<port>/services/gpulab-pool/

    State (hub and pool databases, secrets, user homes): --state-dir, by default
    $GPULAB_STATE_DIR, else $XDG_STATE_HOME/gpulab, else ~/.local/state/gpulab.

    Accounts: run as root, each user's server runs as its own Unix user (--unix-user-prefix plus
    the user's name, e.g. gpulab-alice, made at the first start, home under /home), so no user's code
    can read another's files or GPU token, nor the lab's secrets. Otherwise (not root, or this
    Python is not usable by other users) all servers share this process's account, for trying
    only: the banner says so and why.

    Ctrl-C (SIGINT) or SIGTERM stops the hub, its proxy, the pool, the worker and users' servers.
    """
    examples = """
gpulab up                                      # http://127.0.0.1:8000/hub/, state in ~/.local/state/gpulab
gpulab up --ip 0.0.0.0 --port 8080 --state-dir /srv/gpulab
gpulab up --backend emulated --config my_jupyterhub_config.py
"""

    ip = Unicode("127.0.0.1", help="Address the hub listens on (0.0.0.0: every interface).").tag(config=True)
    port = Int(8000, help="Port of the hub (the proxy's public port).").tag(config=True)
    state_dir = Unicode(default_state_dir(), help="Directory of the hub and pool databases, secrets.json (the "
                        "admin password and the pool's tokens) and user homes (a new one is made private to its "
                        "owner). Default: $GPULAB_STATE_DIR, else $XDG_STATE_HOME/gpulab, else "
                        "~/.local/state/gpulab.").tag(config=True)
    backend = Enum(["auto", "cuda", "emulated"], "auto", help="The worker's backend: 'cuda' (the GPU), 'emulated' "
                   "(a test double, no GPU needed) or 'auto' (cuda when a GPU is visible).").tag(config=True)
    pool_port = Int(0, help="Port of the GPU pool service on 127.0.0.1 (0: a free one).").tag(config=True)
    worker_port = Int(0, help="Port of the worker on 127.0.0.1 (0: a free one).").tag(config=True)
    emulated_kernels = List(Unicode(), help="More modules (dotted names or .py paths) registering host kernels "
                            "for the emulated worker; the demo kernels are always loaded.").tag(config=True)
    heartbeat_timeout = Float(30.0, help="Seconds without a heartbeat before the pool marks a worker lost."
                              ).tag(config=True)
    api_token = Unicode(help="Create a hub API token with admin rights over users and servers, for automation "
                             "(default: $GPULAB_HUB_API_TOKEN; empty: none).").tag(config=True)
    user_accounts = Enum(["auto", "separate", "shared"], "auto", help="Whose account users' servers run "
                         "under: 'separate' (one Unix user each; needs root and a Python, gpulab and shim "
                         "that other users can read and run; refuses to start otherwise), 'shared' (all "
                         "as this process's user: for trying only) or 'auto' (separate when it can be had, "
                         "else shared, and the banner says why).").tag(config=True)
    unix_user_prefix = Unicode("gpulab-", help="Prefix of the Unix user made for each lab user when servers "
                               "run as separate users (alice runs as gpulab-alice); '' for the plain names. "
                               "An existing Unix user of that name is used as it is.").tag(config=True)
    config_files = List(Unicode(), help="Extra JupyterHub config files, loaded after gpulab's own "
                                        "(c.JupyterHub.*, c.GPUSpawner.*, ...).").tag(config=True)
    ready_timeout = Float(120.0, help="Seconds to wait for the hub to come up before giving up.").tag(config=True)
    stop_timeout = Float(3.5, help="Seconds JupyterHub gets to stop its services, proxy and servers before "
                                   "whatever is left is killed.").tag(config=True)

    aliases = {"ip": "GPULabUp.ip", "port": "GPULabUp.port", "state-dir": "GPULabUp.state_dir",
               "backend": "GPULabUp.backend", "pool-port": "GPULabUp.pool_port",
               "worker-port": "GPULabUp.worker_port", "emulated-kernels": "GPULabUp.emulated_kernels",
               "heartbeat-timeout": "GPULabUp.heartbeat_timeout", "api-token": "GPULabUp.api_token",
               "user-accounts": "GPULabUp.user_accounts", "unix-user-prefix": "GPULabUp.unix_user_prefix",
               "config": "GPULabUp.config_files"}
    flags = {"show-config": Application.flags["show-config"]}

    @default("api_token")
    def _api_token(self):
        return os.environ.get("GPULAB_HUB_API_TOKEN", "")

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def write_config(self) -> tuple[Path, dict]:
        """The hub's config file for this start, and the settings written into it."""
        state = Path(self.state_dir).expanduser().resolve()
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        state.chmod(0o700)  # it holds the lab's secrets; servers of separate users never need to enter it
        (state / "homes").mkdir(exist_ok=True)
        sec = load_secrets(state)
        for db in ("jupyterhub.sqlite", "pool.sqlite"):  # SQLite gives its journals the database's mode
            (state / db).touch(mode=0o600)
            (state / db).chmod(0o600)
        self.shared_reason = self.choose_accounts()
        pool_port = self.pool_port or free_port("127.0.0.1")
        pool_prefix = "/services/gpulab-pool/"
        worker_port = self.worker_port or free_port("127.0.0.1")
        unix_socket = self.worker_unix_socket(state, worker_port)
        settings = {
            "state": str(state), "hub_url": self.url,
            "hub_internal_url": f"http://127.0.0.1:{free_port('127.0.0.1')}",
            "proxy_api_url": f"http://127.0.0.1:{free_port('127.0.0.1')}",
            "proxy_auth_token": secrets.token_urlsafe(32),
            "users": DEMO_USERS + ["admin"], "gpu_group": GPU_GROUP, "gpu_group_members": GPU_GROUP_MEMBERS,
            "user_password": USER_PASSWORD, "admin_password": sec["admin_password"],
            "pool_bind": f"http://127.0.0.1:{pool_port}", "pool_url": f"http://127.0.0.1:{pool_port}{pool_prefix}",
            # the worker API: its own listener, which the proxy does not route (pool/worker_api.py)
            "pool_worker_url": f"http://127.0.0.1:{free_port('127.0.0.1')}/",
            "pool_api_token": sec["pool_api_token"], "pool_worker_token": sec["pool_worker_token"],
            "worker_bind": f"127.0.0.1:{worker_port}", "backend": self.backend,
            "emulated_kernels": ["gpu_worker.backends.demo_kernels", *self.emulated_kernels],
            "worker_unix_socket": unix_socket, "heartbeat_timeout": self.heartbeat_timeout,
            "profiles": EXAMPLE_PROFILES[:1] + [LOCAL_PROFILE] * bool(unix_socket) + EXAMPLE_PROFILES[1:],
            "api_token": self.api_token,
            "unix_user_prefix": None if self.shared_reason else self.unix_user_prefix,
            "extra_configs": [str(Path(c).resolve()) for c in self.config_files],
        }
        path = state / "jupyterhub_config.py"
        path.touch(mode=0o600)
        path.chmod(0o600)  # it holds the secrets too
        path.write_text(CONFIG_TEMPLATE.format(settings=json.dumps(settings)))
        return path, settings

    def worker_unix_socket(self, state: Path, port: int) -> str:
        """Where the worker listens for the native mode of local vGPUs (LOCAL_PROFILE), or "" for none: only on
        a GPU. As root, in /run/gpulab, which every user's server may enter; else in the state directory,
        which the servers (run as this user) may enter too. Named by the worker's TCP port: a second lab on
        the machine has its own."""
        if not (self.backend == "cuda" or (self.backend == "auto" and gpu_visible())):
            return ""
        if os.geteuid() == 0:
            run = Path("/run/gpulab")
            run.mkdir(mode=0o755, parents=True, exist_ok=True)
            return str(run / f"worker-{port}.sock")
        return str(state / f"worker-{port}.sock")

    def choose_accounts(self) -> str:
        """Make the lab users' Unix users when servers can run as them; else why they cannot ("": they can)."""
        reason = shared_account_reason(self.user_accounts, os.geteuid(), sys.executable)
        if not reason:
            reason = ensure_unix_users(DEMO_USERS + ["admin"], self.unix_user_prefix)
        if reason and self.user_accounts == "separate":
            print(f"gpulab up: --user-accounts=separate, but {reason}", file=sys.stderr)
            self.exit(1)
        return reason

    def wait_ready(self, settings: dict) -> str:
        """Until the proxy routes the hub and the pool, and the worker has joined the pool: the lab
        is then usable. Returns what is still missing ("" when ready).

        Probing the public URL earlier makes the proxy log a 404 and an ECONNREFUSED stack
        trace (it asks the not-yet-listening hub for an error page), so ask the hub directly,
        then the proxy's API, then the pool, each only once the one before answers."""
        deadline = time.monotonic() + self.ready_timeout
        missing = "JupyterHub"
        while time.monotonic() < deadline and not self.stopping and self.hub.poll() is None:
            if missing == "JupyterHub" and http_ok(settings["hub_internal_url"] + "/hub/health") is not None:
                missing = "the proxy's routes"
            if missing == "the proxy's routes":
                body = http_ok(settings["proxy_api_url"] + "/api/routes", settings["proxy_auth_token"])
                if {"/", "/services/gpulab-pool"} <= set(json.loads(body) if body else {}):
                    missing = "the worker"
            if missing == "the worker":
                body = http_ok(settings["pool_url"] + "api/gpus", settings["pool_api_token"])
                if any(g.get("worker_status") == "up" for g in (json.loads(body) if body else [])):
                    return ""
            time.sleep(0.2)
        return missing

    def banner(self, state: Path) -> str:
        return (f"\ngpulab is up: {self.url}/hub/\n"
                f"  users: {', '.join(DEMO_USERS)} (password {USER_PASSWORD}); "
                f"{' and '.join(GPU_GROUP_MEMBERS)} are in {GPU_GROUP}\n"
                f"  admin: admin (password: \"admin_password\" in {state / 'secrets.json'})\n"
                f"  GPU pool dashboard: {self.url}/services/gpulab-pool/\n"
                f"  state: {state}\n"
                f"{self.accounts_text()}"
                f"  stop: Ctrl-C\n")

    def accounts_text(self) -> str:
        if not self.shared_reason:
            names = ", ".join(self.unix_user_prefix + u for u in DEMO_USERS + ["admin"])
            return f"  accounts: each user's server runs as its own Unix user ({names})\n"
        try:
            me = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            me = f"uid {os.geteuid()}"
        why = textwrap.fill(f"Why: {self.shared_reason}", 94, initial_indent="  !! ", subsequent_indent="  !!      ")
        return ("  " + "!" * 94 + "\n"
                f"  !! SHARED ACCOUNT, FOR TRYING ONLY: every user's server runs as {me}, the hub's own user,\n"
                "  !! so any user's code can read the others' files and GPU tokens and this lab's secrets.\n"
                f"{why}\n" + "  " + "!" * 94 + "\n")

    def on_signal(self, signum, _frame):
        if self.stopping:  # a second Ctrl-C: no more waiting
            self.kill_all(signal.SIGKILL)
        self.stopping = True

    def kill_all(self, sig) -> None:
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def shut_down(self) -> None:
        """JupyterHub's clean-up first; then SIGTERM, then SIGKILL, whatever is left."""
        if self.hub.poll() is None:
            self.hub.send_signal(signal.SIGTERM)
            try:
                self.hub.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                print(f"gpulab up: JupyterHub did not stop in {self.stop_timeout:g} s; killing it", file=sys.stderr)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                self._reap()
                if not descendants(os.getpid()):
                    return
                time.sleep(0.05)
            self.kill_all(sig)
        self._reap()

    def _reap(self) -> None:
        """Collect exited children, the hub and adopted orphans alike."""
        self.hub.poll()
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return

    def port_taken(self) -> str:
        """Why the hub's address cannot be had, or "": the proxy only logs a failed bind and runs on,
        so a lab started anyway would answer at its API while its URL served someone else."""
        try:
            with socket.socket(socket.AF_INET6 if ":" in self.ip else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((self.ip, self.port))
        except OSError as exc:
            return f"cannot listen on {self.ip}:{self.port} ({exc.strerror}); choose another with --port"
        return ""

    def start(self):
        self.stopping = False
        taken = self.port_taken()
        if taken:
            print(f"gpulab up: {taken}", file=sys.stderr)
            self.exit(1)
        become_subreaper()
        config, settings = self.write_config()
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)
        # Its own session: a terminal's Ctrl-C reaches only us, and we stop the hub in order.
        self.hub = subprocess.Popen([sys.executable, "-m", "hub_spawner.launcher.hub", "-f", str(config)],
                                    cwd=config.parent, start_new_session=True)
        code = 0
        missing = self.wait_ready(settings)
        if not missing:
            print(self.banner(config.parent), flush=True)
            while not self.stopping and self.hub.poll() is None:
                time.sleep(0.2)
        if self.stopping:
            print("gpulab up: stopping", flush=True)
        elif self.hub.poll() is None:
            print(f"gpulab up: {missing} did not come up in {self.ready_timeout:g} s; see the log above",
                  file=sys.stderr)
            code = 1
        else:
            print("gpulab up: JupyterHub exited; see its log above", file=sys.stderr)
            code = 1
        self.shut_down()
        self.exit(code)


def main(argv=None) -> int:
    app = GPULabUp.instance()
    app.initialize(argv)
    app.start()
    return 0
