"""VRAM in use as the pool sees it: a real pool, a real worker daemon and a client through the shim.

The dashboard is only worth reading if its number is the worker's: every allocation and free
within one heartbeat, still true after an executor dies without cleaning up, and 0 under a
restarted daemon once the old one's executors ended with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gpu_worker.client import shim_env
from hubtools import WORKER_TOKEN, Pool, free_port
from workertools import PRELUDE, alive, children_of

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
        self.runtime_dir = runtime_dir
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
    """CLIENT driven line by line; `stderr=subprocess.PIPE` keeps the shim's reasons for the test."""

    def __init__(self, address: str, token: str, stderr=None):
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT], env=shim_env(address, token),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
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


def test_executors_end_with_their_daemon_and_a_new_daemon_reports_none_of_their_use(setup):
    """Executors die with their daemon (they ask for PR_SET_PDEATHSIG), so a worker the pool marks
    lost holds no GPU memory the pool could place again.  The program's next call fails with a
    reason, and the pool's figure goes to 0 under the new daemon (its vGPUs' ledgers start empty).  (Before: executors outlived a killed daemon and went on serving.)"""
    pool, alloc, start_daemon, _, daemons = setup
    client = Client(daemons[-1].address, alloc["token"], stderr=subprocess.PIPE)
    try:
        client("alloc", "a", 3 * MiB)
        client("alloc", "b", 4 * MiB)
        wait_used(pool, alloc["id"], 7 * MiB, INTERVAL + SLACK)
        old = daemons[-1]
        executors = children_of(old.proc.pid)
        assert len(executors) == 1
        os.kill(old.proc.pid, signal.SIGKILL)  # the daemon only
        old.proc.wait()
        deadline = time.monotonic() + 1.5
        while alive(executors[0]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(executors[0]), "the executor outlived its daemon"
        client.proc.stdin.write("sync\n")
        client.proc.stdin.flush()
        assert client.proc.stdout.readline() == ""  # the program stopped at the failed call
        assert client.proc.wait(10) != 0
        stderr = client.proc.stderr.read()
        assert "connection to the worker lost" in stderr and "CUDA_ERROR_DEVICE_UNAVAILABLE" in stderr, stderr
    finally:
        client.close()
    assert used_vram(pool, alloc["id"]) == 7 * MiB  # no daemon, no heartbeat: the pool's last word
    start_daemon()
    wait_used(pool, alloc["id"], 0, 20)  # start-up, registration, then its first heartbeat


def test_an_executor_killed_mid_session_stops_counting(setup):
    pool, alloc, _, connect, daemons = setup
    first, second = connect(alloc["token"]), connect(alloc["token"])  # two processes, one vGPU
    first("alloc", "a", 3 * MiB)
    second("alloc", "a", 2 * MiB)
    wait_used(pool, alloc["id"], 5 * MiB, INTERVAL + SLACK)
    executors = sorted(children_of(daemons[-1].proc.pid))
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
    for bad in ({"vgpus": []}, {"vgpus": {"x": {"used": "lots"}}}, {"vgpus": {"x": {"used": -1}}}):
        assert beat(pool, daemons[-1], bad) == 400
    assert used_vram(pool, alloc["id"]) == 3 * MiB


@pytest.mark.parametrize("end, reason", [
    (("DELETE", ""), "this vGPU was released: its Jupyter server stopped"),
    (("POST", "/revoke"), "an admin revoked this vGPU: GPU maintenance"),
])
def test_a_release_or_revocation_ends_the_live_sessions_within_one_heartbeat(setup, end, reason):
    """Grants, not look-ups: the spawner releases the vGPU (its server stopped or was culled) or an
    admin revokes it, and the program's next call fails with the pool's reason within one heartbeat."""
    pool, alloc, _, _, daemons = setup
    client = Client(daemons[-1].address, alloc["token"], stderr=subprocess.PIPE)
    try:
        client("alloc", "a", 3 * MiB)
        method, suffix = end
        status, _ = pool.call(method, f"api/allocations/{alloc['id']}{suffix}", {"message": "GPU maintenance"})
        assert status in (200, 204)
        time.sleep(INTERVAL + SLACK)
        client.proc.stdin.write("alloc b 1024\n")
        client.proc.stdin.flush()
        assert client.proc.stdout.readline() == ""  # the program stopped at the refused call
        stderr = client.proc.stderr.read()
        assert reason in stderr, stderr
    finally:
        client.close()


def test_a_pool_outage_does_not_stop_new_kernels(setup):
    """The worker holds its grants: with the pool down, a running lab opens new kernels on its vGPU,
    also after the worker itself restarted (the grants it saved)."""
    pool, alloc, start_daemon, connect, daemons = setup
    connect(alloc["token"])("alloc", "a", 1 * MiB)
    wait_used(pool, alloc["id"], 1 * MiB, INTERVAL + SLACK)  # a heartbeat (and its grants) went both ways
    pool.stop()
    connect(alloc["token"])("alloc", "b", 2 * MiB)
    daemons[-1].kill_group()
    start_daemon()
    connect(alloc["token"])("alloc", "c", 2 * MiB)
