"""VRAM in use as the pool sees it: a real pool, a real worker daemon and a client through the shim.

The dashboard is only worth reading if its number is the worker's: every allocation and free
within one heartbeat, and still true after the daemon restarts under executors that outlived it,
or after an executor dies without cleaning up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gpu_worker.client import shim_env
from hubtools import WORKER_TOKEN, Pool, free_port
from workertools import PRELUDE

MiB = 1 << 20
INTERVAL = 1.0  # heartbeat interval of the workers here; a figure must reach the pool within one of them
SLACK = 1.5     # start-up of the request, the pool's write, two shared cores

# A client driven line by line from the test: each command answers "ok" once the call returned.
CLIENT = PRELUDE + """
setup()
held = {}
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "alloc":
        held[args[0]] = ok(d.cuMemAlloc(int(args[1])))
    elif cmd == "free":
        ok(d.cuMemFree(held.pop(args[0])))
    elif cmd == "sync":
        ok(d.cuCtxSynchronize())
    print("ok", flush=True)
"""


class Daemon:
    """`gpulab worker` registered with the pool under a fixed name and port, so it can be started again."""

    def __init__(self, pool: Pool, name: str, port: int, runtime_dir: str):
        env = dict(os.environ, GPULAB_POOL_TOKEN=WORKER_TOKEN, XDG_RUNTIME_DIR=runtime_dir)
        self.credential_file = os.path.join(runtime_dir, f"{name}.credential")  # kept across its restarts
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker.daemon", "--backend", "emulated", "--tcp", f"127.0.0.1:{port}",
             "--pool-url", pool.worker_url, "--name", name, "--heartbeat-interval", str(INTERVAL),
             f"--GPUWorker.pool_credential_file={self.credential_file}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.address = self.proc.stdout.readline().split("listening on ")[1].split()[0]

    def kill_group(self):
        """The daemon and every executor it forked (they share its process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Client:
    def __init__(self, address: str, token: str):
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT], env=shim_env(address, token),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, *cmd):
        self.proc.stdin.write(" ".join(map(str, cmd)) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok", f"client failed at {cmd}"

    def close(self):
        self.proc.kill()
        self.proc.wait()


def beat(pool, daemon: Daemon, body: dict) -> int:
    """A heartbeat as the worker would send it, with its own credential; the status."""
    with open(daemon.credential_file) as f:
        return pool.worker_call("POST", "api/workers/w-usage/heartbeat", body, f.read().strip())[0]


def used_vram(pool, alloc_id) -> int:
    return pool.call("GET", f"api/allocations/{alloc_id}")[1]["used_vram"]


def wait_used(pool, alloc_id, expected: int, within: float) -> float:
    """Seconds until the pool shows ``expected`` bytes in use; fails after ``within``."""
    start = time.monotonic()
    seen = None
    while time.monotonic() - start < within:
        seen = used_vram(pool, alloc_id)
        if seen == expected:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"the pool shows {seen} bytes in use, not {expected}, after {within:.1f} s")


def executors_of(pid: int) -> list[int]:
    """Child processes of the daemon: its executors."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


@pytest.fixture
def setup(tmp_path):
    """A pool, a daemon registered as worker ``w-usage`` and one vGPU allocated on it."""
    pool = Pool(str(tmp_path / "pool.sqlite"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    port = free_port()
    daemons, clients = [], []

    def start_daemon():
        daemon = Daemon(pool, "w-usage", port, str(runtime))
        daemons.append(daemon)
        return daemon

    def connect(token):
        client = Client(daemons[-1].address, token)
        clients.append(client)
        return client

    start_daemon()
    deadline = time.time() + 20
    while not [g for g in pool.call("GET", "api/gpus")[1] if g["worker"] == "w-usage"]:
        assert time.time() < deadline, "the worker did not register"
        time.sleep(0.1)
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G"})
    assert status == 201
    yield pool, alloc, start_daemon, connect, daemons
    for c in clients:
        c.close()
    for d in daemons:
        d.kill_group()
    pool.stop()


def test_allocations_and_frees_reach_the_pool_within_one_heartbeat(setup):
    pool, alloc, _, connect, _ = setup
    client = connect(alloc["token"])
    client("alloc", "a", 3 * MiB)
    time.sleep(0.1)
    client("alloc", "b", 5 * MiB)
    wait_used(pool, alloc["id"], 8 * MiB, INTERVAL + SLACK)
    # cuMemFree is pipelined (no reply awaited) and no synchronizing call follows: the shim sends a
    # free at once, so the worker, and through its heartbeat the pool, see it all the same
    client("free", "a")
    wait_used(pool, alloc["id"], 5 * MiB, INTERVAL + SLACK)
    client("free", "b")
    wait_used(pool, alloc["id"], 0, INTERVAL + SLACK)


def test_a_restarted_daemon_reports_the_sessions_that_outlived_the_old_one(setup):
    pool, alloc, start_daemon, connect, daemons = setup
    client = connect(alloc["token"])
    client("alloc", "a", 3 * MiB)
    client("alloc", "b", 4 * MiB)
    wait_used(pool, alloc["id"], 7 * MiB, INTERVAL + SLACK)
    old = daemons[-1]
    executors = executors_of(old.proc.pid)
    assert len(executors) == 1
    os.kill(old.proc.pid, signal.SIGKILL)  # the daemon only: its executor keeps serving the client
    old.proc.wait()
    client("free", "a")
    client("sync")
    # while no daemon runs, the pool hears nothing; make its figure wrong on purpose so that only
    # a heartbeat of the new daemon can put it right
    assert beat(pool, old, {"sessions": {}}) == 200
    assert used_vram(pool, alloc["id"]) == 0
    start_daemon()
    wait_used(pool, alloc["id"], 4 * MiB, 20)  # start-up, registration, then its first heartbeat
    client("alloc", "c", 2 * MiB)  # the surviving executor's changes keep reaching the new daemon
    wait_used(pool, alloc["id"], 6 * MiB, INTERVAL + SLACK)
    os.kill(executors[0], signal.SIGKILL)  # an executor that dies without cleaning up stops counting
    wait_used(pool, alloc["id"], 0, INTERVAL + SLACK)


def test_an_executor_killed_mid_session_stops_counting(setup):
    pool, alloc, _, connect, daemons = setup
    first, second = connect(alloc["token"]), connect(alloc["token"])  # two processes, one vGPU
    first("alloc", "a", 3 * MiB)
    second("alloc", "a", 2 * MiB)
    wait_used(pool, alloc["id"], 5 * MiB, INTERVAL + SLACK)
    executors = sorted(executors_of(daemons[-1].proc.pid))
    assert len(executors) == 2
    os.kill(executors[0], signal.SIGKILL)  # the first client's executor (forked first)
    wait_used(pool, alloc["id"], 2 * MiB, INTERVAL + SLACK)


def test_heartbeats_without_session_figures_leave_them_alone(setup):
    pool, alloc, _, connect, daemons = setup
    connect(alloc["token"])("alloc", "a", 3 * MiB)
    wait_used(pool, alloc["id"], 3 * MiB, INTERVAL + SLACK)
    daemons[-1].kill_group()
    assert beat(pool, daemons[-1], {}) == 200
    assert used_vram(pool, alloc["id"]) == 3 * MiB
    for bad in ({"sessions": []}, {"sessions": {"x": "lots"}}, {"sessions": {"x": -1}}):
        assert beat(pool, daemons[-1], bad) == 400
    assert used_vram(pool, alloc["id"]) == 3 * MiB
