#!/usr/bin/env python
"""What the vGPU panel's polling costs the worker, and how often a tier action's progress updates.

    python benchmarks/panel_polling.py [--quick] [--vgpus N] [--window S]

* Polling cost.  One emulated worker holds N vGPUs (default 50), each with a live client process
  holding memory through a session of its own.  The worker's CPU (the daemon and its executor
  processes: utime + stime from /proc) is measured over a window with nobody polling, then over an
  equal window in which N pollers each do exactly what one Jupyter server's extension does per
  refresh with a panel open (server_extension.vgpu_state.fetch: the vGPUs and the GPUs; and the
  panel's recent calls, the newest 20 trace records), at the extension's default refresh interval
  (c.VGPUExtension.refresh), each with its own session token, started at staggered times.  Like the
  server, a poller asks for the GPUs only every 30 s and for the recent calls only when the vGPU's
  counters moved, so an idle session's panel costs one request per refresh.  Printed:
  CPU % of one core for both windows, their difference (what polling costs) and ratio; the target is
  a difference below 1% of one core.  The pollers' own CPU per Jupyter server is printed too.
* Action progress.  A program holding memory is in a long call (a kernel that sleeps on the emulated
  device), so the worker acts on an offload only when it ends; the extension's Actions
  (server_extension/actions.py) follows it as in the server.  Printed: the updates of its "updated"
  field per second while it ran and the longest gap; the target is at least one a second.

The exit status is 0 whether or not the targets are met (a benchmark, not a test) and non-zero on errors.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from benchworker import BenchWorker  # noqa: E402

from gpu_worker.client import shim_env, token_hash  # noqa: E402
from server_extension.actions import Actions  # noqa: E402
from server_extension.config import VGPUExtension  # noqa: E402
from server_extension.vgpu_state import WorkerView  # noqa: E402
from server_extension.worker_client import WorkerClient  # noqa: E402

MiB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
TRACE = 20  # recent calls a panel shows (GET vgpus/<id>/trace's default)
KERNELS = str(ROOT / "tests" / "emulated_kernels.py")

# A client process holding argv[3] bytes on its vGPU (a raw session: no CUDA library needed), until stdin closes.
RAW_HOLDER = """
import sys
sys.path.insert(0, {tests!r})
from rawclient import RawSession
s = RawSession(sys.argv[1], sys.argv[2], timeout=60)
assert s.hello[0] == 0, s.hello
assert s.open_device(0)[0] == 0
res = s.alloc(int(sys.argv[3]))
assert res[0] == 0, res
assert s.memset(res[1][0], 7, int(sys.argv[3]))[0] == 0
print("ready", flush=True)
sys.stdin.read()
""".format(tests=str(ROOT / "tests"))


def action_holder() -> str:
    """A cuda-python program through the shim: holds argv[1] bytes; a line on stdin starts a sleep of
    argv[2] ms on the device, followed by a query that waits for it (and touches no memory)."""
    from workertools import SLEEP_PRELUDE

    return SLEEP_PRELUDE + """
setup()
n = int(sys.argv[1])
ptr = ok(d.cuMemAlloc(n))
ok(d.cuMemsetD8(ptr, 7, n))
print("ready", flush=True)
sys.stdin.readline()
launch_sleep(int(sys.argv[2]))
ok(d.cuMemGetInfo())
print("slept", flush=True)
sys.stdin.readline()
"""


def group_ticks(pgid: int) -> int:
    """CPU ticks (user + system) of every live process in process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total


def cpu_percent(pgid: int, seconds: float, during=None) -> float:
    """% of one core the group used over ``seconds`` (while ``during``, a coroutine factory, runs)."""
    t0, w0 = group_ticks(pgid), time.monotonic()
    if during is None:
        time.sleep(seconds)
    else:
        asyncio.run(during(seconds))
    took = time.monotonic() - w0
    return (group_ticks(pgid) - t0) / TICK / took * 100


class CountingClient(WorkerClient):
    """A WorkerClient that counts the requests it makes."""

    requests = 0

    async def call(self, *args, **kwargs):
        CountingClient.requests += 1
        return await super().call(*args, **kwargs)


async def poll(worker: BenchWorker, tokens: list[str], refresh: float, seconds: float) -> dict:
    """Each token's poller: every ``refresh`` s, one extension refresh and the panel's recent calls, through
    the extension's WorkerView (what a server with a panel open asks the worker)."""
    views = [WorkerView(CountingClient(worker.control, t, timeout=10)) for t in tokens]
    ids = [f"t-{token_hash(t)[:8]}" for t in tokens]
    rounds, errors = [0], []
    CountingClient.requests = 0

    async def one(i: int):
        await asyncio.sleep(refresh * i / len(views))  # servers start at different times
        end = time.monotonic() + seconds - refresh * i / len(views)
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                vgpus, _gpus = await views[i].refresh()
                assert [v["id"] for v in vgpus] == [ids[i]], vgpus
                await views[i].trace(ids[i], TRACE)
                rounds[0] += 1
            except Exception as exc:  # counted and shown: a benchmark of a failing worker is no benchmark
                errors.append(repr(exc))
            await asyncio.sleep(max(0.0, refresh - (time.monotonic() - t0)))

    c0 = time.process_time()
    await asyncio.gather(*(one(i) for i in range(len(views))))
    return {"rounds": rounds[0], "requests": CountingClient.requests, "errors": errors, "cpu": time.process_time() - c0}


async def follow_action(worker: BenchWorker, token: str, vgpu_id: str, holder: subprocess.Popen) -> dict:
    """An offload to warm during the holder's long call, followed by the extension's Actions."""
    actions = Actions(WorkerClient(worker.control, token, timeout=10))
    holder.stdin.write("go\n")
    holder.stdin.flush()
    await asyncio.sleep(0.3)  # the sleep is on the device
    action = actions.start(vgpu_id, "offload", "warm")
    seen = [action.updated]
    while action.state == "running":
        await asyncio.sleep(0.05)
        if action.updated != seen[-1]:
            seen.append(action.updated)
    gaps = [b - a for a, b in zip(seen, seen[1:])] or [action.elapsed]
    return {"state": action.state, "message": action.message, "elapsed": action.elapsed, "updates": len(seen) - 1,
            "max_gap": max(gaps), "warm": action.tiers.get("warm", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--quick", action="store_true", help="5 vGPUs, 4 s windows, a 1.5 s action (a smoke run)")
    ap.add_argument("--vgpus", type=int, default=None, help="vGPUs and pollers (default 50; 5 with --quick)")
    ap.add_argument("--window", type=float, default=None, help="seconds of each window (default 60; 4 with --quick)")
    ap.add_argument("--refresh", type=float, default=None, help="seconds between two refreshes (default: the "
                                                                 "extension's, c.VGPUExtension.refresh)")
    args = ap.parse_args()
    n = args.vgpus or (5 if args.quick else 50)
    window = args.window or (4.0 if args.quick else 60.0)
    held = 4 * MiB
    sleep_ms = 1500 if args.quick else 4000
    refresh = args.refresh or VGPUExtension().refresh  # the extension's default interval

    with tempfile.TemporaryDirectory(prefix="gpulab-panel-") as tmp:
        tokens = [f"lab{i}" for i in range(n)]
        table = {t: {"vram": "64M"} for t in tokens + ["act"]}
        config = Path(tmp) / "panel.py"  # a worker configuration file with a session token per vGPU
        config.write_text(f"c.GPUWorker.tokens = {table!r}\n")
        worker = BenchWorker(Path(tmp), "panel", ["--backend", "emulated", "--emulated-kernels", KERNELS,
                                                  "--config", str(config)])
        holders = []
        try:
            for t in tokens:
                holders.append(subprocess.Popen([sys.executable, "-c", RAW_HOLDER, worker.sock, t, str(held)],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT))
            env = shim_env(worker.unix, "act")
            act = subprocess.Popen([sys.executable, "-c", action_holder(), str(32 * MiB), str(sleep_ms)], env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            holders.append(act)
            for h in holders:
                if h.stdout.readline().strip() != "ready":
                    raise SystemExit("a client process could not hold its memory on the worker")
            vgpus = worker.api("/api/vgpus")["vgpus"]
            live = sum(1 for v in vgpus if v["processes"] and v["used"] >= held)
            print(f"worker: emulated, {len(vgpus)} vGPUs, {live} with a live client process holding "
                  f"{held // MiB} MiB or more; refresh interval {refresh:g} s"
                  f"{' (c.VGPUExtension.refresh default)' if not args.refresh else ''}")
            time.sleep(2.0)  # start-up settles
            pgid = worker.proc.pid
            quiet = cpu_percent(pgid, window)
            result = {}

            async def polling(seconds):
                result.update(await poll(worker, tokens, refresh, seconds))

            busy = cpu_percent(pgid, window, polling)
            cost = busy - quiet
            expected = n * window / refresh
            print(f"worker CPU, {window:g} s without polling: {quiet:.3f} % of one core")
            print(f"worker CPU, {window:g} s with {n} panels polling: {busy:.3f} % of one core "
                  f"({result['rounds']} refreshes, {expected:.0f} expected, {result['requests']} requests to the worker; "
                  f"{len(result['errors'])} errors)")
            ratio = busy / quiet if quiet > 0 else float("inf")
            print(f"polling cost: {cost:+.3f} % of one core (ratio {ratio:.2f}x); target < 1 %: "
                  f"{'MET' if cost < 1.0 else 'MISSED'}")
            print(f"pollers' own CPU (the Jupyter servers' side): {result['cpu'] / window / n * 100:.3f} % of one core "
                  f"per server")
            if result["errors"]:
                print("first poller error:", result["errors"][0])
                return 1

            figures = asyncio.run(follow_action(worker, "act", f"t-{token_hash('act')[:8]}", act))
            rate = figures["updates"] / figures["elapsed"] if figures["elapsed"] else 0.0
            print(f"action progress: offload to warm during a {sleep_ms / 1000:g} s call, {figures['state']} in "
                  f"{figures['elapsed']:.2f} s; {figures['updates']} updates ({rate:.1f} per second), longest gap "
                  f"{figures['max_gap']:.2f} s; target >= 1 per second: "
                  f"{'MET' if figures['max_gap'] <= 1.0 and figures['updates'] else 'MISSED'}")
            print(f"action outcome: {figures['message']}")
            return 0 if figures["state"] == "done" else 1
        finally:
            for h in holders:
                h.kill()
                h.wait()
                h.stdout.close()
                h.stdin.close()
            worker.stop()


if __name__ == "__main__":
    sys.exit(main())
