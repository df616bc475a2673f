#!/usr/bin/env python
"""Hub spawn-to-ready time with a vGPU, against the same hub with a plain spawner.

    python benchmarks/spawn.py [--rounds N] [--quick]

Two `gpulab up` hubs (emulated backend) run side by side, each in its own temporary state
directory and on its own port. They differ in one line: the baseline hub gets an extra --config
file setting `c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"`, so
both start the same single-user command with the same arguments and home directory layout, and
the only difference is the GPUSpawner mix-in: profile validation, the vGPU allocation from the
pool and the environment it injects. Both hubs run their own pool and emulated worker, so the
background load is the same whichever hub is spawning.

Spawn-to-ready is the wall time from POST /hub/api/users/<u>/server {"profile": "small"} until
the hub says the server is ready: the POST itself when it answers 201 (the hub waits up to its
slow_spawn_timeout before answering), else the "ready" event of the hub's progress event stream,
which comes once the proxy route exists. Neither needs polling, which would load the hub.

Why both hubs at once rather than one after the other: load on a small shared machine swings
within seconds, and only spawns taken close together see the same conditions. The hubs never
spawn at the same time; each round spawns on one hub, then on the other, first one then the other
in alternating order, and each server is stopped (DELETE, then waited for) before the next spawn.
An idle hub costs little CPU and both sides have the other hub idling beside them alike. One
unmeasured warm-up spawn per hub pays for first-use costs (home directory, caches) up front.

JupyterHub's own readiness check polls the new server with randomly jittered exponential backoff
(0.2 s doubling, up to 5 s), so single spawns vary by a second or so on either side; the medians
over rounds and their ratio are the figures to read, the per-round figures show the spread.

After each measured spawn (outside the timing) the pool is asked for the user's active vGPU
allocations: one on the vGPU hub, none on the baseline, or the run fails. The exit status is 0
whether or not the target is met (a benchmark, not a test) and non-zero on errors; every process
the hubs started is killed on the way out, errors included.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER = "alice"
SPAWN_OPTIONS = {"profile": "small"}
TARGET_RATIO = 1.2
PLAIN_SPAWNER_CONFIG = 'c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"\n'
SETTLE_S = 0.5  # pause after each stop, so its tail (process exit, DB writes) misses the next spawn


def free_port() -> int:
    """A port for one hub; both hubs need their own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, token: str, body=None, timeout: float = 60):
    """(status, parsed JSON body or None) of one call, HTTP errors included: callers judge the status."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


# ------------------------------------------------------------ processes


def process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, start time) of every process, read from /proc (no psutil needed)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def descendants(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (pgid, start time) of `root` and everything below it. The hub, the proxy, the pool,
    the worker and each server run in sessions of their own, so killing one group misses the rest."""
    table = process_table()
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found[pid] = table[pid][1:]
            todo += [p for p, (ppid, _, _) in table.items() if ppid == pid]
    return found


def kill_leftovers(snapshot: dict[int, tuple[int, int]]) -> None:
    """SIGKILL the process group of every snapshot process still alive. The start time proves a pid
    still names the process we started, not a newcomer that reused it."""
    table = process_table()
    for pid, (pgid, start) in snapshot.items():
        if pid in table and table[pid][2] == start:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


# ------------------------------------------------------------------ hub


class Hub:
    """One `gpulab up` in its own state directory, driven through the hub's REST API."""

    def __init__(self, name: str, work: Path, extra_config: str | None = None):
        self.name = name
        self.state = work / name
        self.state.mkdir()
        self.url = f"http://127.0.0.1:{free_port()}"
        self.token = secrets.token_hex(24)
        self.log_path = work / f"{name}.log"
        cmd = [sys.executable, "-m", "gpulab.cli", "up", "--state-dir", str(self.state),
               "--port", self.url.rsplit(":", 1)[1], "--backend", "emulated", "--api-token", self.token]
        if extra_config:
            config = work / f"{name}_config.py"
            config.write_text(extra_config)
            cmd += ["--config", str(config)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        self.pool_token = ""

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the hub's output, for error messages: the temporary directory goes away."""
        return self.log_path.read_text(errors="replace")[-chars:]

    def fail(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.name} hub: {what}\n--- {self.name} hub log (tail) ---\n{self.log_tail()}")

    def wait_up(self, timeout: float = 180) -> None:
        """Until `gpulab up` says so and the worker has registered with the pool: a spawn before
        that would fail on the vGPU hub, and the baseline waits alike to start in the same state."""
        deadline = time.monotonic() + timeout
        while "gpulab is up" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise self.fail("did not come up")
            time.sleep(0.2)
        self.pool_token = json.loads((self.state / "secrets.json").read_text())["pool_api_token"]
        while time.monotonic() < deadline:
            status, gpus = self.pool("GET", "api/gpus")
            if status == 200 and gpus and gpus[0]["worker_status"] == "up":
                return
            time.sleep(0.2)
        raise self.fail("the worker did not register with the pool")

    def api(self, method: str, path: str, body=None, timeout: float = 60):
        return http(method, f"{self.url}/hub/api/{path}", self.token, body, timeout)

    def pool(self, method: str, path: str):
        return http(method, f"{self.url}/services/gpulab-pool/{path}", self.pool_token)

    def spawn_to_ready(self, user: str) -> float:
        """Seconds from the spawn request until the hub reports the server ready."""
        t0 = time.perf_counter()
        status, body = self.api("POST", f"users/{user}/server", SPAWN_OPTIONS, timeout=180)
        if status == 202:
            self.wait_ready_event(user)
        elif status != 201:
            raise self.fail(f"spawn refused: {status} {body}")
        return time.perf_counter() - t0

    def wait_ready_event(self, user: str, timeout: float = 180) -> None:
        """Read the progress event stream until its last event: ready, or failed."""
        req = urllib.request.Request(f"{self.url}/hub/api/users/{user}/server/progress",
                                     headers={"Authorization": f"token {self.token}"})
        deadline = time.monotonic() + timeout
        with urllib.request.urlopen(req, timeout=30) as stream:  # the hub sends keep-alives every 8 s
            while time.monotonic() < deadline:
                line = stream.readline()
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("ready"):
                    return
                if event.get("failed"):
                    raise self.fail(f"spawn failed: {event.get('message')}")
        raise self.fail("the progress stream ended before the server was ready")

    def stop_server(self, user: str, timeout: float = 60) -> None:
        """Stop the server and wait until the hub has forgotten it, so rounds do not overlap."""
        status, body = self.api("DELETE", f"users/{user}/server")
        if status not in (202, 204):
            raise self.fail(f"stop refused: {status} {body}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, model = self.api("GET", f"users/{user}")
            if not model["servers"]:
                return
            time.sleep(0.05)
        raise self.fail(f"{user}'s server did not stop")

    def active_allocations(self, user: str) -> int:
        """How many vGPUs the pool has given `user`: proves which spawner actually ran."""
        status, rows = self.pool("GET", f"api/allocations?user={user}&status=active")
        if status != 200:
            raise self.fail(f"pool allocation query failed: {status} {rows}")
        return len(rows)

    def shutdown(self) -> None:
        """SIGTERM `gpulab up` (it stops JupyterHub, which stops its servers, services and proxy),
        then SIGKILL whatever of that tree is left: a failed run must not leave hubs behind."""
        snapshot = descendants(self.proc.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        kill_leftovers(snapshot)
        self.proc.wait()


# ------------------------------------------------------------ measuring


def start_hubs(stack: contextlib.ExitStack, work: Path) -> tuple[Hub, Hub]:
    """Both hubs, started together to halve the wait; each shut down by `stack` even if the other fails."""
    gpu = Hub("vgpu", work)
    stack.callback(gpu.shutdown)
    plain = Hub("plain", work, PLAIN_SPAWNER_CONFIG)
    stack.callback(plain.shutdown)
    gpu.wait_up()
    plain.wait_up()
    return gpu, plain


def measure_once(hub: Hub, expected_allocations: int) -> float:
    """One spawn-to-ready, checked to have taken the intended path, then the server stopped."""
    seconds = hub.spawn_to_ready(USER)
    got = hub.active_allocations(USER)
    if got != expected_allocations:
        raise hub.fail(f"expected {expected_allocations} active vGPU allocation(s) for {USER}, found {got}")
    hub.stop_server(USER)
    time.sleep(SETTLE_S)
    return seconds


def run_rounds(gpu: Hub, plain: Hub, rounds: int) -> list[tuple[float, float]]:
    """(vGPU, plain) seconds per round, the hub that goes first alternating so drifts in load
    hit both sides alike; one unmeasured warm-up spawn on each hub first."""
    measure_once(gpu, 1)
    measure_once(plain, 0)
    results = []
    for i in range(rounds):
        if i % 2 == 0:
            g = measure_once(gpu, 1)
            p = measure_once(plain, 0)
        else:
            p = measure_once(plain, 0)
            g = measure_once(gpu, 1)
        print(f"  round {i + 1}/{rounds}: vGPU {g:.3f} s, plain {p:.3f} s, ratio {g / p:.2f}", flush=True)
        results.append((g, p))
    return results


# --------------------------------------------------------------- report


def print_table(header: tuple, rows: list[tuple]) -> None:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for n, row in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def report(results: list[tuple[float, float]], elapsed: float, quick: bool) -> None:
    """Per-round figures, then the verdict on the ratio of the medians."""
    print(f"\nper round (s), hub spawn-to-ready, profile {SPAWN_OPTIONS['profile']!r}:")
    print_table(("round", "first", "vGPU", "plain", "ratio"),
                [(i + 1, "vGPU" if i % 2 == 0 else "plain", f"{g:.3f}", f"{p:.3f}", f"{g / p:.2f}")
                 for i, (g, p) in enumerate(results)])
    gpu_median = statistics.median(g for g, _ in results)
    plain_median = statistics.median(p for _, p in results)
    ratio = gpu_median / plain_median
    print(f"\ngpulab hub spawn-to-ready, GPUSimpleLocalProcessSpawner vs SimpleLocalProcessSpawner "
          f"({'quick' if quick else 'full'} run, {len(results)} rounds, {elapsed:.0f} s); medians, ratio of medians")
    print_table(("metric", "measured", "baseline", "ratio", "target", "result"),
                [("spawn-to-ready (profile small)", f"{gpu_median:.3f} s", f"{plain_median:.3f} s",
                  f"{ratio:.2f}", f"<= {TARGET_RATIO}", "PASS" if ratio <= TARGET_RATIO else "MISS")])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, help="measured rounds, one spawn on each hub per round (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 rounds unless --rounds says otherwise")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, kill) and SIGHUP (a closed terminal) must unwind through the ExitStack
    # so the hubs go too; SIGINT does already (KeyboardInterrupt)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpulab-spawn-bench-") as tmp, contextlib.ExitStack() as stack:
        print("starting the vGPU and plain hubs...", flush=True)
        gpu, plain = start_hubs(stack, Path(tmp))
        print(f"hubs up after {time.perf_counter() - t0:.0f} s; warm-up spawn on each, then {args.rounds} rounds",
              flush=True)
        results = run_rounds(gpu, plain, args.rounds)
    report(results, time.perf_counter() - t0, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
