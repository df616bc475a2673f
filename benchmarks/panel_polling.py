#!/usr/bin/env python
"""What the vGPU panel's polling costs the worker, and how often a tier action's progress updates.

    python benchmarks/panel_polling.py [--quick] [--vgpus N] [--window S] [--refresh S]

* Polling cost.  One emulated worker holds N vGPUs (default 50), each with a live client process
  holding memory through a session of its own.  The worker's CPU (the daemon and its executor
  processes: utime + stime from /proc) is measured over equal windows (default 60 s):
  1. idle sessions, nobody polling (the baseline);
  2. idle sessions, N panels polling: N pollers each do what one Jupyter server's extension does
     when its panel polls at the default interval (c.VGPUExtension.refresh, 5 s; 2 s with --quick),
     with its own session token, started at staggered times, through the extension's own WorkerView:
     the vGPU at the server's pace (every refresh, or every background_refresh once two answers in a row showed no
     activity and, here, no kernel is busy), with the recent calls (the newest 20) in the same
     request, and the GPUs every 60 s;
  3. idle sessions, N servers with no panel open (history samples every background_refresh);
  4. every session running a cell (one call a second that touches its memory), nobody polling;
  5. the same, N panels polling: every answer shows activity, so the refresh pace throughout.
  Pollers start 3 refresh intervals before their window (servers run long before and after it).
  Printed: CPU % of one core per window and the polling cost (2 - 1, 5 - 4) with its ratio; the
  target is a cost below 1% of one core.  The pollers' own CPU per server is printed too.
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

# A client process holding argv[3] bytes on its vGPU (a raw session: no CUDA library needed), until stdin closes;
# told "work", it makes one call a second that touches its memory (a running cell), told "rest", none.
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
import threading, time
mode = ["rest"]
def read():
    for line in sys.stdin:
        mode[0] = line.strip()
    mode[0] = "end"
threading.Thread(target=read, daemon=True).start()
while mode[0] != "end":
    if mode[0] == "work":  # a running cell: one call a second that touches the memory
        assert s.memset(res[1][0], 7, 4096)[0] == 0
    time.sleep(1.0)
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
    """CPU ticks (user + system) of every live process in process group ``pgid``; those of its leader (the
    worker's daemon, which serves the control API) go to LEADER too."""
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
            if int(entry) == pgid:
                LEADER["ticks"] = int(fields[11]) + int(fields[12])
    return total


LEADER = {"ticks": 0, "percent": 0.0}  # the daemon alone: the executors' share moves with the machine's load


def cpu_percent(pgid: int, seconds: float, during=None) -> float:
    """% of one core the group used over ``seconds``; with ``during`` (a coroutine function of the seconds and
    a ``start`` to call when the measured window begins, after its warm-up), while that runs."""
    mark = {}

    def start():
        mark.update(t0=group_ticks(pgid), l0=LEADER["ticks"], w0=time.monotonic())

    if during is None:
        start()
        time.sleep(seconds)
    else:
        asyncio.run(during(seconds, start))
    took = time.monotonic() - mark["w0"]
    total = group_ticks(pgid)
    LEADER["percent"] = (LEADER["ticks"] - mark["l0"]) / TICK / took * 100
    return (total - mark["t0"]) / TICK / took * 100


def print_polled(what: str, percent: float, result: dict) -> None:
    """One polled window's line: the worker's CPU and what the pollers asked of it."""
    print(f"{what}: {percent:.3f} % of one core ({result['rounds']} refreshes, {result['requests']} requests to the "
          f"worker; {len(result['errors'])} errors)")


COUNTS = {"requests": 0, "rounds": 0}  # over all pollers, since the start


class CountingClient(WorkerClient):
    """A WorkerClient that counts the requests it makes."""

    async def call(self, *args, **kwargs):
        COUNTS["requests"] += 1
        return await super().call(*args, **kwargs)


async def poll(worker: BenchWorker, tokens: list[str], refresh: float, background: float, seconds: float,
               panel: bool = True) -> dict:
    """Each token's poller: every ``refresh`` s what one server's extension does when its panel polls (``panel``:
    the vGPU, and its recent calls) or its history timer fires, through the extension's WorkerView."""
    views = [WorkerView(CountingClient(worker.control, t, timeout=10)) for t in tokens]
    ids = [f"t-{token_hash(t)[:8]}" for t in tokens]
    errors = []

    async def one(i: int):
        await asyncio.sleep(refresh * i / len(views))  # servers start at different times
        end = time.monotonic() + seconds - refresh * i / len(views)
        asked = -1e9
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                # as VGPUState.snapshot: the last answer serves while it is fresh for the vGPU's pace (no kernel
                # here, so nothing on the server is busy: a quiet vGPU is asked every background_refresh)
                if t0 - asked >= views[i].interval(refresh, background, busy=False) - 0.1:
                    asked = t0
                    vgpus, _gpus = await views[i].refresh(TRACE if panel else 0)
                    assert [v["id"] for v in vgpus] == [ids[i]], vgpus
                if panel:
                    await views[i].trace(ids[i], TRACE)
                COUNTS["rounds"] += 1
            except Exception as exc:  # counted and shown: a benchmark of a failing worker is no benchmark
                errors.append(repr(exc))
            await asyncio.sleep(max(0.0, refresh - (time.monotonic() - t0)))

    await asyncio.gather(*(one(i) for i in range(len(views))))
    return {"errors": errors}


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
    ap.add_argument("--quick", action="store_true", help="5 vGPUs, 4 s windows, refresh 2 s, a 1.5 s action (a smoke "
                                                         "run)")
    ap.add_argument("--vgpus", type=int, default=None, help="vGPUs and pollers (default 50; 5 with --quick)")
    ap.add_argument("--window", type=float, default=None, help="seconds of each window (default 60; 4 with --quick)")
    ap.add_argument("--refresh", type=float, default=None, help="seconds between two refreshes (default: the "
                                                                 "extension's, c.VGPUExtension.refresh; 2 with "
                                                                 "--quick, whose windows are 4 s)")
    args = ap.parse_args()
    n = args.vgpus or (5 if args.quick else 50)
    window = args.window or (4.0 if args.quick else 60.0)
    held = 4 * MiB
    sleep_ms = 1500 if args.quick else 4000
    # the extension's default interval; a smoke run's 4 s windows need a shorter one to see several refreshes
    refresh = args.refresh or (2.0 if args.quick else VGPUExtension().refresh)

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
                  f"{' (c.VGPUExtension.refresh default)' if not (args.refresh or args.quick) else ''}")
            time.sleep(2.0)  # start-up settles
            pgid = worker.proc.pid
            background = VGPUExtension().background_refresh
            result = {}

            warmup = 3 * refresh  # servers run long before and after a window: their first answers are not in it

            def polled(interval, panel):
                async def run(seconds, start):
                    task = asyncio.ensure_future(poll(worker, tokens, interval, background, warmup + seconds, panel))
                    await asyncio.sleep(warmup)
                    before = dict(COUNTS)
                    c0 = time.process_time()
                    start()
                    res = await task
                    result.clear()
                    result.update(res, cpu=time.process_time() - c0,
                                  **{k: COUNTS[k] - before[k] for k in COUNTS})
                return run

            def tell(word):
                for h in holders[:-1]:
                    h.stdin.write(word + "\n")
                    h.stdin.flush()

            quiet = cpu_percent(pgid, window)
            daemon = {"quiet": LEADER["percent"]}
            print(f"worker CPU, {window:g} s, idle sessions, nobody polling: {quiet:.3f} % of one core")
            idle_panels = cpu_percent(pgid, window, polled(refresh, True))
            daemon["idle_panels"] = LEADER["percent"]
            idle_result = dict(result)
            print_polled(f"worker CPU, {window:g} s, idle sessions, {n} panels polling", idle_panels, idle_result)
            no_panel = cpu_percent(pgid, window, polled(background, False))
            print(f"worker CPU, {window:g} s, idle sessions, {n} servers with no panel open: {no_panel:.3f} % of one "
                  f"core ({result['requests']} requests)")
            tell("work")
            time.sleep(2.0)
            working = cpu_percent(pgid, window)
            daemon["working"] = LEADER["percent"]
            print(f"worker CPU, {window:g} s, every session running a cell (a call a second), nobody polling: "
                  f"{working:.3f} % of one core")
            busy_panels = cpu_percent(pgid, window, polled(refresh, True))
            daemon["busy_panels"] = LEADER["percent"]
            busy_result = dict(result)
            print_polled(f"worker CPU, {window:g} s, every session running a cell, {n} panels polling", busy_panels,
                         busy_result)
            tell("rest")
            expected = n * window / refresh
            for what, cost, base, res in (("idle sessions", idle_panels - quiet, quiet, idle_result),
                                          ("sessions running cells", busy_panels - working, working, busy_result)):
                ratio = (cost + base) / base if base > 0 else float("inf")
                print(f"polling cost, {what}: {cost:+.3f} % of one core (ratio {ratio:.2f}x; {res['rounds']} of "
                      f"{expected:.0f} refreshes); target < 1 %: {'MET' if cost < 1.0 else 'MISSED'}")
            print(f"no panel open: {no_panel - quiet:+.3f} % of one core")
            print(f"the daemon alone (it serves the control API; the rest is the executors): idle sessions "
                  f"{daemon['quiet']:.3f} % unpolled, {daemon['idle_panels']:.3f} % polled "
                  f"({daemon['idle_panels'] - daemon['quiet']:+.3f} %); sessions running cells {daemon['working']:.3f} % "
                  f"unpolled, {daemon['busy_panels']:.3f} % polled ({daemon['busy_panels'] - daemon['working']:+.3f} %)")
            print(f"pollers' own CPU (the Jupyter servers' side), panels on running sessions: "
                  f"{busy_result['cpu'] / window / n * 100:.3f} % of one core per server")
            errors = idle_result["errors"] + busy_result["errors"] + result["errors"]
            if errors:
                print("first poller error:", errors[0])
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
