#!/usr/bin/env python
"""Compute shares on the emulated backend: how closely they hold, and what pacing costs, in one run.

    python benchmarks/compute_share.py [--quick]

The emulated device is a test double whose kernels may declare a simulated duration: it holds its
GPU for that long (one kernel at a time per GPU, over every process, like a real GPU) and counts it
as the vGPU's kernel time, so the pacing arithmetic is exercised exactly as on a GPU, without one.

* Share accuracy. One worker, pacing on. Two vGPUs at 25% and 75% of the GPU, each with a client
  launching a 10 ms kernel and synchronizing, over and over, both at once; then a lone 25% vGPU that
  may not burst, alone on the GPU. A vGPU's measured share is its kernel time (the worker's control
  API, before and after) over the wall time of the run, in percent of the GPU; for the busy pair also
  its part of the kernel time of both. Target: within 5 points of the share.
* Pacing overhead. An uncontended vGPU at 100% runs loops of tiny kernels (no duration) and
  synchronizes; the same loop on a second worker started with pacing off (`--GPUWorker.pacing=False`)
  is the baseline, measured in the same run, samples taken back to back with the side that goes first
  rotating (load on a small shared machine swings within seconds; remote_driver.interleaved). The
  figure is the median of the per-sample ratios paced/unpaced; target >= 0.97 (within 3%). A third
  side, a 50% vGPU allowed to burst, alone (its bucket and its GPU's board are consulted, and never
  make it wait), is reported too.

The exit status is 0 whether or not the targets are met (a benchmark, not a test) and non-zero on
errors.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from benchworker import BenchWorker  # noqa: E402
from remote_driver import interleaved  # noqa: E402  (the same sampling)

KERNEL_S = 0.010  # the busy kernel's simulated duration
POINTS = 5.0      # share accuracy target, in points of the GPU
OVERHEAD = 0.97   # pacing overhead target: paced launch rate / unpaced, at least
PTX = r"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry busy()
{
    ret;
}
.visible .entry tiny()
{
    ret;
}
"""
KERNELS = f'''
from gpu_worker.backends.emulated_kernels import register


@register("busy", duration={KERNEL_S})
def busy(launch):
    """{KERNEL_S * 1000:.0f} ms of the emulated GPU's time."""


@register("tiny")
def tiny(launch):
    """No device time: the launch path alone."""
'''
# vGPUs of the paced worker (a tokens file) and of the unpaced one
PACED = {"quarter": {"compute": 25}, "three-quarters": {"compute": 75},
         "lone-quarter": {"compute": 25, "burst": False},
         "whole": {"compute": 100}, "half-burst": {"compute": 50, "burst": True}}
UNPACED = {"whole": {"compute": 100}}


@dataclass
class Plan:
    """How long each part takes; --quick trades precision for time."""

    busy_s: float  # seconds each share-accuracy case runs
    reps: int      # (paced, unpaced, half) samples of the launch rate
    launches: int  # tiny launches per sample


FULL = Plan(busy_s=10.0, reps=15, launches=50_000)
QUICK = Plan(busy_s=2.5, reps=7, launches=10_000)


# ---------------------------------------------------------------- client (a child process through the shim)


def client_main() -> None:
    """Reads requests on stdin, one a line, and answers each with one JSON line:
    `busy SECONDS`: launch the busy kernel and synchronize until SECONDS have passed;
    `tiny N`: N tiny launches then a synchronize, answered with launches per second."""
    from cuda.bindings import driver as d

    def ok(res):
        if res[0] != d.CUresult.CUDA_SUCCESS:
            raise SystemExit(f"CUDA call failed: {res[0].name}")
        return res[1] if len(res) == 2 else None

    ok(d.cuInit(0))
    ok(d.cuCtxSetCurrent(ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0))))))
    mod = ok(d.cuModuleLoadData(PTX.encode() + b"\0"))
    fns = {name: ok(d.cuModuleGetFunction(mod, name.encode())) for name in ("busy", "tiny")}
    launch, sync = d.cuLaunchKernel, d.cuCtxSynchronize
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        what, amount = line.split()
        fn = fns[what]
        t0 = time.perf_counter()
        if what == "busy":
            n = 0
            while time.perf_counter() - t0 < float(amount):
                ok(launch(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0))
                ok(sync())
                n += 1
            print(json.dumps({"launches": n, "wall": time.perf_counter() - t0}), flush=True)
        else:
            n = int(amount)
            for _ in range(n):
                res = launch(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0)
            ok(res)
            ok(sync())
            print(json.dumps({"rate": n / (time.perf_counter() - t0)}), flush=True)


class Client:
    """A client_main child connected to one worker with one token."""

    def __init__(self, worker: "Worker", token: str):
        from gpu_worker.client import shim_env

        self.worker, self.token = worker, token
        self.proc = subprocess.Popen([sys.executable, __file__, "--client"], env=shim_env(worker.unix, token),
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=worker.log, text=True)
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            raise SystemExit(f"a client of {worker.name} ({token}) did not start; see {worker.log.name}")

    def ask(self, request: str) -> None:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a client of {self.worker.name} ({self.token}) ended; see {self.worker.log.name}")
        return json.loads(line)

    def tiny_rate(self, n: int):
        def sample() -> float:
            self.ask(f"tiny {n}")
            return self.answer()["rate"]

        return sample

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


# ---------------------------------------------------------------- workers


class Worker(BenchWorker):
    """An emulated `gpulab worker` with a tokens file, its control API and the busy/tiny kernels."""

    def __init__(self, tmp: Path, name: str, tokens: dict, pacing: bool):
        (tmp / f"{name}-tokens.json").write_text(json.dumps(tokens))
        super().__init__(tmp, name, ["--backend", "emulated", "--emulated-kernels", str(tmp / "bench_kernels.py"),
                                     "--tokens-file", str(tmp / f"{name}-tokens.json"),
                                     f"--GPUWorker.pacing={pacing}"])

    def kernel_times(self) -> dict[str, float]:
        """{token hash: cumulative kernel seconds} of its vGPUs, from the control API."""
        return {v["token_hash"]: v["kernel_time"] for v in self.api("/api/vgpus")["vgpus"]}


# ---------------------------------------------------------------- the figures


def run_busy(worker: Worker, clients: dict[str, Client], seconds: float) -> dict[str, dict]:
    """Every client runs the busy loop for `seconds`, all at once: {token: {"share": % of the GPU over
    its wall time, "kernel": s, "wall": s}}."""
    from gpu_worker.client.tokens import token_hash

    before = worker.kernel_times()
    for c in clients.values():
        c.ask(f"busy {seconds}")
    out = {t: c.answer() for t, c in clients.items()}
    after = worker.kernel_times()
    for t, o in out.items():
        h = token_hash(t)
        o["kernel"] = after.get(h, 0.0) - before.get(h, 0.0)
        o["share"] = 100.0 * o["kernel"] / o["wall"]
    return out


def share_rows(pair: dict, lone: dict) -> list[tuple]:
    """(case, vGPU, target %, measured % of the GPU, % of the kernel time, off by points, verdict)."""
    rows = []
    total = sum(o["kernel"] for o in pair.values()) or 1.0
    for t, o in pair.items():
        target = PACED[t]["compute"]
        part = 100.0 * o["kernel"] / total
        off = part - target  # under contention the promise is a part of the GPU's kernel time
        rows.append(("busy pair, both at once", t, f"{target}%", f"{o['share']:.1f}%", f"{part:.1f}%",
                     f"{off:+.1f}", "PASS" if abs(off) <= POINTS else "MISS"))
    for t, o in lone.items():
        target = PACED[t]["compute"]
        off = o["share"] - target  # alone without burst: a part of the GPU's wall time
        rows.append(("alone, no burst", t, f"{target}%", f"{o['share']:.1f}%", "-", f"{off:+.1f}",
                     "PASS" if abs(off) <= POINTS else "MISS"))
    return rows


def overhead_rows(samples: list[list[float]]) -> list[tuple]:
    """Rows against the unpaced side (index 1): (vGPU, launches/s, unpaced launches/s, ratio, target, verdict)."""
    base = statistics.median(s[1] for s in samples)
    rows = []
    for i, name, target in ((0, "100%, pacing on", OVERHEAD), (2, "50% may burst, alone", None)):
        ratio = statistics.median(s[i] / s[1] for s in samples)
        rows.append((name, f"{statistics.median(s[i] for s in samples):,.0f} /s", f"{base:,.0f} /s",
                     f"{ratio:.3f}", f"ratio >= {target}" if target else "(reported)",
                     "-" if target is None else "PASS" if ratio >= target else "MISS"))
    return rows


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def measure(tmp: Path, plan: Plan) -> tuple[list[tuple], list[tuple]]:
    (tmp / "bench_kernels.py").write_text(KERNELS)
    with contextlib.ExitStack() as stack:
        paced = Worker(tmp, "paced", PACED, pacing=True)
        stack.callback(paced.stop)
        unpaced = Worker(tmp, "unpaced", UNPACED, pacing=False)
        stack.callback(unpaced.stop)

        def client(worker: Worker, token: str) -> Client:
            c = Client(worker, token)
            stack.callback(c.close)
            return c

        pair = run_busy(paced, {t: client(paced, t) for t in ("quarter", "three-quarters")}, plan.busy_s)
        lone = run_busy(paced, {"lone-quarter": client(paced, "lone-quarter")}, plan.busy_s)
        sides = [client(paced, "whole"), client(unpaced, "whole"), client(paced, "half-burst")]
        samples = interleaved([c.tiny_rate(plan.launches) for c in sides], plan.reps)
    return share_rows(pair, lone), overhead_rows(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs and fewer samples (~20 s)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # internal: the measuring child
    args = ap.parse_args(argv)
    if args.client:
        client_main()
        return 0
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="gpulab-bench-share-") as tmp:
        shares, overhead = measure(Path(tmp), plan)
    print(f"compute shares on the emulated backend: {KERNEL_S * 1000:.0f} ms kernels, {plan.busy_s:g} s per case; "
          f"target within {POINTS:g} points")
    print_table(("case", "vGPU", "share", "of the GPU", "of the kernel time", "points off", "result"), shares)
    print()
    print(f"pacing overhead: {plan.reps} x {plan.launches:,} tiny launches + cuCtxSynchronize per side, uncontended; "
          f"ratio = median per-sample ratio against the worker with pacing off")
    print_table(("vGPU", "launches", "pacing off", "ratio", "target", "result"), overhead)
    return 0


if __name__ == "__main__":
    sys.exit(main())
