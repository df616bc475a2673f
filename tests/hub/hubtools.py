"""Helpers for hub tests: a real `gpulab up` (JupyterHub + configurable-http-proxy + pool + emulated worker),
a pool on its own, and the process tree of a command (to prove that stopping it stopped everything)."""
from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import workertools
from hub_spawner.launcher.up import DEMO_USERS

ROOT = Path(__file__).resolve().parents[2]
KERNELS = str(ROOT / "tests" / "emulated_kernels.py")
API_TOKEN = "gpulab-test-automation-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    def __init__(self, state: Path, extra=(), sigint_ignored=False, accounts="shared", python=sys.executable):
        """`sigint_ignored`: start it as a script's background job (`gpulab up &`) is started, with
        SIGINT ignored, which its children inherit unless they take the signal themselves.
        `accounts`: --user-accounts; shared unless a test asks, so that no test but those that
        clean up after themselves makes Unix users. `python`: the interpreter of the whole lab."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        self.log_path = state.parent / f"{state.name}-hub.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [python, "-m", "gpulab.cli", "up", "--state-dir", str(state), "--port", str(self.port),
             "--backend", "emulated", "--api-token", API_TOKEN, "--emulated-kernels", KERNELS,
             "--user-accounts", accounts, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
        deadline = time.time() + 120
        while "gpulab is up" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("gpulab up failed:\n" + self.log_path.read_text(errors="replace")[-5000:])
            time.sleep(0.3)
        secrets = json.loads((state / "secrets.json").read_text())
        self.pool_token = secrets["pool_api_token"]
        self.admin_password = secrets["admin_password"]
        self.wait_for_worker()

    def api(self, method: str, path: str, body=None, token=API_TOKEN):
        """(status, parsed JSON or None) of a hub API call."""
        return _call(method, f"{self.url}/hub/api/{path}", body, token)

    def pool(self, method: str, path: str, body=None):
        return _call(method, f"{self.url}/services/gpulab-pool/{path}", body, self.pool_token)

    def wait_for_worker(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, gpus = self.pool("GET", "api/gpus")
            if status == 200 and gpus and gpus[0]["worker_status"] == "up":
                return gpus
            time.sleep(0.3)
        raise RuntimeError("the worker did not register with the pool")

    def wait_ready(self, user: str, timeout=120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, model = self.api("GET", f"users/{user}")
            server = model["servers"].get("")
            if server and server["ready"]:
                return server
            if not server or server["pending"] not in ("spawn", None):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{user}'s server did not become ready:\n" + self.log_text()[-4000:])

    def wait_stopped(self, user: str, timeout=60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, model = self.api("GET", f"users/{user}")
            if not model["servers"]:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{user}'s server did not stop")

    def allocations(self, user: str, status="active") -> list:
        _, rows = self.pool("GET", f"api/allocations?user={user}&status={status}")
        return rows

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM `gpulab up`, which stops the hub, proxy, services and servers; kill any left.

        They run in sessions of their own (JupyterHub starts them so), so a process group
        signal would miss them: take the process tree before asking."""
        parts = tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in alive(parts):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def remove_unix_users(prefix: str) -> None:
    """The Unix users `gpulab up` made for the lab users under a test's `prefix`, and their homes."""
    for name in DEMO_USERS + ["admin"]:
        try:
            pwd.getpwnam(prefix + name)
        except KeyError:
            continue
        subprocess.run(["userdel", "--remove", prefix + name], capture_output=True)


def tree(pid: int) -> dict[int, str]:
    """{pid: command line} of every live process below `pid` (zombies count as gone)."""
    parent, cmd = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] != b"Z":
            parent[int(entry)], cmd[int(entry)] = int(fields[1]), args
    below, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in below:
                below[child] = cmd[child]
                todo.append(child)
    return below


def alive(pids) -> list[int]:
    """Those of `pids` still running (a zombie has stopped)."""
    return [p for p in pids if workertools.alive(p)]


def _call(method, url, body, token):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


HUB_TOKEN, WORKER_TOKEN = "hub-secret-for-tests", "worker-secret-for-tests"
G = 2**30


def registration(name="w1", address=None, gpus=1, memory=16 * G, node="n1", **gpu) -> dict:
    """A worker's registration body: `gpus` test GPUs of `memory` bytes, each with the fields in `gpu`."""
    return {"name": name, "address": address or f"tcp://10.0.0.1:{7000 + gpus}", "node": node, "backend": "emulated",
            "gpus": [{"uuid": f"GPU-{name}-{i}", "index": i, "model": "test GPU", "memory": memory, **gpu}
                     for i in range(gpus)]}


RUNNING_POOLS: list = []  # Pool processes started and not stopped yet


class Pool:
    """A pool process: `url` is its service URL (the hub's API), `worker_url` its internal worker listener.

    `db` is a SQLite file's path or a whole SQLAlchemy URL (one with '://', e.g. a PostgreSQL database's);
    `extra` are more command-line settings. Its output is read as it comes (`output()`), so a pool that
    logs much never blocks on a full pipe."""

    def __init__(self, db: str, timeout: float = 30.0, extra=(), start_timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.worker_url = f"http://127.0.0.1:{free_port()}/"
        self.credentials: dict[str, str] = {}  # worker name -> the credential the pool issued at enrolment
        self.lines: list[str] = []
        env = dict(os.environ, GPULAB_POOL_API_TOKEN=HUB_TOKEN, GPULAB_POOL_WORKER_TOKEN=WORKER_TOKEN)
        env.pop("JUPYTERHUB_API_TOKEN", None)
        db_url = db if "://" in db else f"sqlite:///{db}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hub_spawner.pool", f"--GPUPool.db_url={db_url}",
             f"--GPUPool.bind_url=http://127.0.0.1:{self.port}", f"--GPUPool.worker_bind_url={self.worker_url}",
             f"--GPUPool.heartbeat_timeout={timeout}", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        RUNNING_POOLS.append(self)  # stopped after its test whatever happens (conftest.py)
        self._listening = threading.Event()
        threading.Thread(target=self._read_output, daemon=True).start()
        # before it listens it may say other things, e.g. what a migration of an older database did
        self._listening.wait(start_timeout)
        if "listening" not in self.output():
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the pool did not start listening (within {start_timeout:.0f} s):\n" + self.output())

    def _read_output(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening" in line:
                self._listening.set()
        self._listening.set()  # it ended: nothing more to wait for
        self.proc.stdout.close()

    def output(self) -> str:
        """What the pool has written so far (stdout and stderr)."""
        return "".join(self.lines)

    def call(self, method, path, body=None, token=HUB_TOKEN):
        return _call(method, self.url + path, body, token)

    def worker_call(self, method, path, body=None, token=None, worker="w1"):
        """A call on the worker listener, by default with worker `worker`'s own credential."""
        return _call(method, self.worker_url + path, body, token or self.credentials[worker])

    def register(self, name="w1", gpus=1, memory=16 * G, node="n1"):
        """Enrol `name` (or register it again with its credential), keeping its credential."""
        body = registration(name, gpus=gpus, memory=memory, node=node)
        status, answer = self.worker_call("POST", "api/workers", body, self.credentials.get(name, WORKER_TOKEN))
        assert status == 200, answer
        self.credentials.setdefault(name, answer.get("credential"))

    def wait_lost(self, timeout=10) -> None:
        """Until the pool has marked its (first) worker lost: no heartbeat came in time."""
        deadline = time.time() + timeout
        while self.call("GET", "api/gpus")[1][0]["worker_status"] != "lost":
            assert time.time() < deadline, "the worker was not marked lost"
            time.sleep(0.1)

    def stop(self, sig=signal.SIGKILL, timeout: float = 30.0):
        """Kill it (SIGKILL: nothing of it runs on), or send `sig` and wait until it has ended."""
        if self in RUNNING_POOLS:
            RUNNING_POOLS.remove(self)
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
