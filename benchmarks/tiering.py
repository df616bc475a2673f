#!/usr/bin/env python
"""VRAM tiering: how fast memory moves between tiers, against plain copies measured in the same run.

    python benchmarks/tiering.py [--quick] [--backend emulated|cuda]

* Data path (in this process, the executor's own code: gpu_worker.daemon.tiers.TierStore on a backend).
  A few allocations of random bytes, then, in turns, each pair of samples back to back (the plain copy out
  just before the offload, the plain copy in just after the restore, since both need the memory on the GPU):
  - warm offload (GPU -> host buffer, then the GPU memory released) ÷ a plain copy of the same bytes from
    the same allocations into host buffers of the same kind (page-locked on a GPU);
  - warm restore (new GPU memory mapped at the same addresses, bytes copied back) ÷ a plain copy from
    those host buffers into the allocations (on a GPU: the pinned host-to-device bandwidth);
  - cold offload (GPU -> files with a CRC-32 per chunk) ÷ a sequential write of files of the same sizes
    into the same directory;
  - cold restore (files -> GPU, CRC checked) ÷ a sequential read of files of the same sizes; both sides'
    files are written back and dropped from the page cache first, so both read the disk, as a cold
    tier does after an idle spell.
  Each ratio is throughput over baseline throughput (the median of the per-pair ratios), the targets
  are >= 0.8 for warm and >= 0.7 for cold. Every restore is checked byte for byte (outside the timing).
* First touch (a real worker, a raw client session): one vGPU holding SIZE bytes is moved warm over the
  control API, then a 4-byte read from it is timed: the whole restore as the program sees it. p95 over
  the samples; target < 1 s for a 4 GiB vGPU on a GPU.
* Density (a real worker, the emulated device: the same policy and data path with host memory for the
  GPU): vGPUs whose quotas add up to 4x the GPU's memory, each holding 90% of its quota, under a
  lab-like trace (a few vGPUs active at a time, the rest idle long enough to move warm or cold): the
  p95 delay of a first touch after an idle spell. Target: p95 < 1 s at 4x.

The exit status is 0 whether or not the targets are met (a benchmark, not a test) and non-zero on
errors.  On a GPU, the density case would need 4x the card in host RAM and disk: it runs only on the
emulated device here, and says so.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from benchworker import BenchWorker  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TARGETS = {"warm offload": 0.8, "warm restore": 0.8, "cold offload": 0.7, "cold restore": 0.7}


@dataclass
class Plan:
    """How much each part moves; --quick trades precision for time."""

    allocs: int         # allocations in the data-path case
    alloc_bytes: int    # bytes of each
    reps: int           # sample pairs per ratio
    touch_bytes: int    # the first-touch vGPU's memory
    touches: int        # first-touch samples
    density_gpu: int    # the emulated GPU of the density case
    density_vgpus: int  # its vGPUs (quotas sum to 4x the GPU)
    trace_s: float      # seconds of the lab-like trace


FULL = Plan(allocs=4, alloc_bytes=256 * MiB, reps=7, touch_bytes=4 * GiB, touches=20,
            density_gpu=1 * GiB, density_vgpus=40, trace_s=60.0)
QUICK = Plan(allocs=4, alloc_bytes=32 * MiB, reps=3, touch_bytes=128 * MiB, touches=5,
             density_gpu=256 * MiB, density_vgpus=20, trace_s=8.0)


# ---------------------------------------------------------------- the data path, in this process


def make_backend(kind: str, memory: int):
    """A backend with a current context on device 0, as an executor has."""
    if kind == "emulated":
        from gpu_worker.backends.emulated import EmulatedBackend

        backend = EmulatedBackend(total_memory=memory)
    else:
        from gpu_worker.backends.cuda import CudaBackend

        backend = CudaBackend(visible=[])
    backend.cuInit(0)
    (ctx,) = backend.cuDevicePrimaryCtxRetain(0)
    backend.set_current(ctx)
    return backend


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_files(paths: list[str], bufs: list[memoryview]) -> None:
    for path, buf in zip(paths, bufs):
        with open(path, "wb", buffering=0) as f:
            pos = 0
            while pos < len(buf):
                pos += f.write(buf[pos:pos + 8 * MiB])


def read_files(paths: list[str], bufs: list[memoryview]) -> None:
    for path, buf in zip(paths, bufs):
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < len(buf):
                got = f.readinto(buf[pos:pos + 8 * MiB])
                if not got:
                    raise SystemExit(f"{path} is shorter than it was written")
                pos += got


def from_disk(paths) -> None:
    """Write the files back and drop them from the page cache, so that the next read comes from the disk, as
    a cold tier's read does after an idle spell (not timed; done to both sides alike)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def data_path(kind: str, plan: Plan, tmp: Path) -> dict[str, list[float]]:
    """{case: [tier throughput / baseline throughput per sample pair]}, every restore checked."""
    from gpu_worker.daemon.ledger import Ledger, Slot
    from gpu_worker.daemon.tierboard import TierBoard
    from gpu_worker.daemon.tiers import COLD, WARM, TierStore

    total = plan.allocs * plan.alloc_bytes
    backend = make_backend(kind, total * 2)
    ledger = Ledger(1, None)
    slot = Slot(ledger, ledger.claim())
    board = TierBoard([0], 4 * total)
    spool = tmp / "spool"
    store = TierStore(backend, slot, board, board.claim(os.getpid()), [0], str(spool), None)
    rng = np.random.default_rng(9)
    ptrs, expect = [], []
    for _ in range(plan.allocs):
        ptr = store.allocate(plan.alloc_bytes, backend.physical_size(plan.alloc_bytes))
        data = rng.bytes(plan.alloc_bytes)
        staging = backend.host_buffer(plan.alloc_bytes)
        staging[:] = data
        backend.copy_in(ptr, plan.alloc_bytes, staging)
        backend.host_free(staging)
        ptrs.append(ptr)
        expect.append(data)
    host = [backend.host_buffer(plan.alloc_bytes) for _ in ptrs]
    files = [str(tmp / f"plain-{i}.bin") for i in range(len(ptrs))]

    def check(what: str) -> None:
        buf = host[0]
        for ptr, data in zip(ptrs, expect):
            backend.copy_out(ptr, plan.alloc_bytes, buf)
            if bytes(buf) != data:
                raise SystemExit(f"{what}: the bytes at {ptr:#x} did not come back")

    def copy_out():
        backend.synchronize_all()
        for ptr, buf in zip(ptrs, host):
            backend.copy_out(ptr, plan.alloc_bytes, buf)

    def copy_in():
        for ptr, buf in zip(ptrs, host):
            backend.copy_in(ptr, plan.alloc_bytes, buf)

    ratios: dict[str, list[float]] = {k: [] for k in TARGETS}
    # the run's first warm offload takes new host memory (a process's first offload does); later ones reuse
    # the buffers the previous restore emptied (kept POOL_KEEP seconds): reported apart
    ratios["first warm offload"] = []
    for rep in range(plan.reps + 1):
        for tier, name in ((WARM, "warm"), (COLD, "cold")):
            # the baselines need the memory on the GPU: the plain copy out runs just before the offload, the
            # plain copy in just after the restore, so each pair is measured back to back
            if tier == WARM:
                t_base_out = timed(copy_out)
            else:
                for path in files:  # new files, as the tier writes (truncating old ones costs more)
                    if os.path.exists(path):
                        os.unlink(path)
                os.sync()  # each side's writes start with no other dirty pages to wait behind
                t_base_out = timed(lambda: write_files(files, host))
                os.sync()
            t_out = timed(lambda: store.offload(tier))
            if tier == COLD:
                from_disk([*files, *(str(p) for p in spool.rglob("*.cold"))])
            t_in = timed(store.restore)
            store.free_spent()
            if tier == WARM:
                t_base_in = timed(copy_in)
                check(f"warm restore, sample {rep + 1}")  # the plain copy wrote back the same bytes
            else:
                check(f"cold restore, sample {rep + 1}")
                t_base_in = timed(lambda: read_files(files, host))
            if rep == 0 and tier == WARM:
                ratios["first warm offload"].append(t_base_out / t_out)
            elif rep > 0:
                ratios[f"{name} offload"].append(t_base_out / t_out)
            if rep > 0:
                ratios[f"{name} restore"].append(t_base_in / t_in)
    for path in files:
        os.unlink(path)
    for buf in host:
        backend.host_free(buf)
    store.close()
    return ratios


# ---------------------------------------------------------------- a real worker


class Worker(BenchWorker):
    """A `gpulab worker` with vGPUs from a config file and its spool in the run's directory."""

    def __init__(self, tmp: Path, name: str, backend: str, lines: list[str]):
        config = tmp / f"{name}.py"
        config.write_text("\n".join(lines) + "\n")
        super().__init__(tmp, name, ["--backend", backend, "--config", str(config),
                                     f"--GPUWorker.spool_dir={tmp / (name + '-spool')}"])


def vgpu_id(token: str) -> str:
    from gpu_worker.client.tokens import token_hash

    return "t-" + token_hash(token)[:8]  # a configured token's vGPU id


def must(res, what: str):
    if res[0]:
        raise SystemExit(f"{what} failed: CUresult {res[0]} {res[2]}")
    return res[1]


def first_touch(kind: str, plan: Plan, tmp: Path) -> list[float]:
    """Seconds of a 4-byte read that brings a whole warm vGPU back, per sample."""
    from rawclient import RawSession

    chunk = min(plan.touch_bytes, 512 * MiB)
    memory = plan.touch_bytes * 2
    w = Worker(tmp, "touch", kind, [f"c.GPUWorker.tokens = {{'touch': {{'vram': {plan.touch_bytes}}}}}",
                                    f"c.GPUWorker.emulated_memory = {memory}",
                                    "c.GPUWorker.warm_after = {'low': 0, 'medium': 0, 'high': 0}",
                                    "c.GPUWorker.cold_after = {'low': 0, 'medium': 0, 'high': 0}"])
    try:
        s = RawSession(w.sock, "touch", timeout=120)
        must(s.open_device(0), "opening the device")
        ptrs, left = [], plan.touch_bytes
        while left >= chunk:  # the quota charges the GPU's granularity: stay within it
            res = s.alloc(chunk)
            if res[0]:
                break
            ptrs.append(res[1][0])
            must(s.memset(ptrs[-1], len(ptrs) & 0xFF, chunk), "filling")
            left -= chunk
        if not ptrs:
            raise SystemExit("the first-touch vGPU could not allocate")
        samples = []
        for _ in range(plan.touches):
            w.api(f"/api/vgpus/{vgpu_id('touch')}/offload", {"to": "warm"})
            t0 = time.perf_counter()
            (data,) = must(s.dtoh(ptrs[-1], 4), "the first touch")
            samples.append(time.perf_counter() - t0)
            if data != bytes([len(ptrs) & 0xFF]) * 4:
                raise SystemExit("the first touch read back the wrong bytes")
        s.close()
        return samples
    finally:
        w.stop()


def density(plan: Plan, tmp: Path) -> dict:
    """The lab-like trace on vGPUs whose quotas sum to 4x the (emulated) GPU: first-touch delays."""
    from rawclient import RawSession

    n = plan.density_vgpus
    quota = 4 * plan.density_gpu // n
    held = quota * 9 // 10 // 256 * 256
    tokens = {f"lab{i}": {"vram": quota, "qos": "low"} for i in range(n)}  # one course: one profile
    w = Worker(tmp, "lab", "emulated", [f"c.GPUWorker.tokens = {tokens!r}",
                                        f"c.GPUWorker.emulated_memory = {plan.density_gpu}",
                                        "c.GPUWorker.warm_after = {'low': 1, 'medium': 2, 'high': 0}",
                                        "c.GPUWorker.cold_after = {'low': 4, 'medium': 8, 'high': 0}",
                                        f"c.GPUWorker.warm_budget = {plan.density_gpu}"])
    rng = random.Random(4)
    delays, ooms, reasons = [], 0, {}
    try:
        sessions = []
        for i in range(n):
            s = RawSession(w.sock, f"lab{i}", timeout=120)
            must(s.open_device(0), "opening the device")
            res = s.alloc(held)
            if res[0]:  # the GPU is full of busy vGPUs: counted, and the vGPU stays without memory
                ooms += 1
                reasons[res[2][:160]] = reasons.get(res[2][:160], 0) + 1
                sessions.append((s, None))
                continue
            must(s.memset(res[1][0], i & 0xFF, held), "filling")
            sessions.append((s, res[1][0]))
        last = [time.monotonic()] * n
        end = time.monotonic() + plan.trace_s
        while time.monotonic() < end:
            i = rng.randrange(n)  # a student comes back to the notebook
            s, ptr = sessions[i]
            if ptr is None:
                continue
            idle = time.monotonic() - last[i]
            t0 = time.perf_counter()
            res = s.dtoh(ptr + rng.randrange(held // 4) * 4, 4)
            took = time.perf_counter() - t0
            if res[0]:
                ooms += 1
                reasons[res[2][:160]] = reasons.get(res[2][:160], 0) + 1
                continue
            if res[1][0] != bytes([i & 0xFF]) * 4:
                raise SystemExit(f"vGPU lab{i} read back the wrong bytes")
            if idle > 1.0:
                delays.append(took)
            for _ in range(rng.randrange(1, 4)):  # then works a little
                must(s.memset(ptr, i & 0xFF, min(held, 4 * MiB)), "working")
            last[i] = time.monotonic()
            time.sleep(rng.random() * 0.05)
        moves = [v["moves"] for v in w.api("/api/vgpus")["vgpus"]]
        for s, _ptr in sessions:
            s.close()
        return {"ratio": n * quota / plan.density_gpu, "delays": delays, "ooms": ooms,
                "offloads": sum(m["offloads"] for m in moves), "restores": sum(m["restores"] for m in moves), "reasons": reasons}
    finally:
        w.stop()


# ---------------------------------------------------------------- report


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))] if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer samples (~30 s)")
    ap.add_argument("--backend", choices=["emulated", "cuda"], default="emulated",
                    help="the device of the data-path and first-touch cases (density always runs emulated)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.backend == "cuda":  # the first-touch target is for a 4 GiB vGPU: a GPU has room for it
        plan = Plan(**{**plan.__dict__, "touch_bytes": 4 * GiB, "alloc_bytes": max(plan.alloc_bytes, 256 * MiB)})
    with tempfile.TemporaryDirectory(prefix="gpulab-tiering-") as tmp:
        tmp = Path(tmp)
        ratios = data_path(args.backend, plan, tmp)
        mib = plan.allocs * plan.alloc_bytes // MiB
        print(f"data path ({args.backend}, {plan.allocs} allocations, {mib} MiB, {plan.reps} sample pairs)")
        print(f"{'case':<18}  {'ratio':>6}  {'min':>6}  {'max':>6}  {'target':<12}  verdict")
        print("-" * 62)
        for case, xs in ratios.items():
            med = statistics.median(xs)
            target = TARGETS.get(case)
            print(f"{case:<18}  {med:6.2f}  {min(xs):6.2f}  {max(xs):6.2f}  "
                  f"{('ratio >= %.1f' % target) if target else '-':<12}  "
                  f"{('PASS' if med >= target else 'MISS') if target else '-'}")
        print()
        touches = first_touch(args.backend, plan, tmp)
        size = f"{plan.touch_bytes / GiB:g} GiB" if plan.touch_bytes >= GiB else f"{plan.touch_bytes // MiB} MiB"
        print(f"first touch of a warm {size} vGPU ({args.backend}, {len(touches)} samples): "
              f"median {statistics.median(touches):.3f} s, p95 {p95(touches):.3f} s "
              f"(target < 1 s for 4 GiB on a GPU)")
        d = density(plan, tmp)
        print(f"density (emulated, {plan.density_vgpus} vGPUs on {plan.density_gpu // MiB} MiB, quotas "
              f"{d['ratio']:.1f}x the GPU, {plan.trace_s:g} s trace): {len(d['delays'])} first touches after "
              f"an idle spell, p95 {p95(d['delays']):.3f} s, median "
              f"{statistics.median(d['delays']) if d['delays'] else float('nan'):.3f} s; {d['offloads']} offloads, "
              f"{d['restores']} restores, {d['ooms']} out-of-memory answers "
              f"({'PASS' if d['delays'] and p95(d['delays']) < 1.0 else 'MISS'}: p95 < 1 s at 4x)")
        for why, count in sorted(d["reasons"].items(), key=lambda kv: -kv[1])[:3]:
            print(f"  {count} x {why}")
        # (a worker's spool subdirectory keeps its lock file, which names the worker: not a cold-tier file)
        left = [str(f) for d in tmp.glob("*-spool") for f in d.rglob("*") if f.is_file() and f.name != ".lock"]
        left += [str(f) for f in (tmp / "spool").rglob("*") if f.is_file()]
        if left:
            raise SystemExit(f"cold-tier files left behind: {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
