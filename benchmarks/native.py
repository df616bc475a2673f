#!/usr/bin/env python
"""Native mode on a real GPU, each figure against a baseline measured in the same run.

    python benchmarks/native.py [--quick]

Native mode (docs/vgpu.md, issue 12): a process on the GPU's own node runs with the native
libcuda.so.1 (`gpu_worker.shim.native_dir()` first on LD_LIBRARY_PATH, GPULAB_WORKER naming the node's
worker's Unix socket, GPULAB_TOKEN its vGPU), which loads the real driver in-process and intercepts only
allocations, memory queries, device enumeration and launches. A real `--backend cuda` worker holds the
vGPUs' ledgers (`--tokens-file`).

* Training step: a small PyTorch model (4 linear layers 1024 wide with ReLU between, Adam, batch 256)
  in two child processes started alike, one natively under the shim, one in the plain environment (the
  real libcuda, no shim). The parent asks them in turn, alternating which goes first, for one sample
  each: 50 warm-up steps, then 300 timed steps (synchronized before and after). The figure is the
  median of each side and the median of the per-pair ratios native/plain; target <= 1.02.
* Freeze and thaw: a native process holds 4 GiB, then 16 GiB, of tensors (1 GiB each); the worker's
  control API moves its vGPU warm (POST /api/vgpus/<id>/offload {"to": "warm"}: the driver's checkpoint
  API locks the process and copies its device memory to host memory), then the process's next CUDA
  call (torch.cuda.synchronize) thaws it. Freeze: the worker's own timing of the checkpoint (the vGPU's
  "moves", offload_seconds); thaw: that first call as the program sees it. Both in seconds per GiB held,
  against pinned host<->device copies of 1 GiB (torch, page-locked host tensor, copy_ and a
  synchronize) measured in the plain child in the same run. The tensors are checked after the last
  thaw. Needs a driver with the checkpoint API (>= 570, CUDA 12.8); with an older one this part says so
  and is left out. Printed beside it, a reference from elsewhere (not measured here): cuda-checkpoint
  issue #29, ~15 s per 8xH100 toggle.

Without a visible NVIDIA GPU it refuses at once (exit 2); likewise without PyTorch or without the
native build of the shim. The exit status is 0 whether or not the target is met (a benchmark, not a
test) and non-zero on errors.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GiB = 1 << 30
TARGET = 1.02  # training step time, native / plain
CHECKPOINT_DRIVER = 12080  # cuDriverGetVersion of driver 570 (CUDA 12.8): the checkpoint API's first
REFERENCE = "cuda-checkpoint issue #29: ~15 s per 8xH100 toggle"
TOKENS = {"train": {"vram": "8G", "gpus": [0]}, "holder": {"vram": "18G", "gpus": [0]}}
CHILD_START_S = 180  # importing torch and creating a context; a GPU machine that takes longer is reported
STEP_S = 300  # one answer of a child: a training sample, a thaw, allocating 16 GiB
NO_GPU = ("no NVIDIA GPU visible ({}): benchmarks/native.py measures native mode on a real GPU, so nothing "
          "was run. Run it on a GPU machine (docs/validation.md says how).")


@dataclass
class Plan:
    """How much each part measures; --quick trades precision for time."""

    pairs: int    # (native, plain) training samples
    warmup: int   # training steps before each timed sample
    steps: int    # training steps timed per sample
    copies: int   # pinned copies timed per direction
    toggles: int  # freeze/thaw samples per size


FULL = Plan(pairs=11, warmup=50, steps=300, copies=7, toggles=3)
QUICK = Plan(pairs=5, warmup=50, steps=300, copies=5, toggles=1)
SIZES_GIB = (4, 16)


# ---------------------------------------------------------------- environments and children


def native_env(worker_unix: str, token: str, base=None) -> dict:
    """``base`` (default: this process's environment) for a process in native mode: the native directory first
    on LD_LIBRARY_PATH (neither it nor the forwarding shim's elsewhere), the worker's Unix socket and the
    token; GPULAB_REAL_LIBCUDA is kept when set, the settings of other modes and GPULAB_QUIET go."""
    from gpu_worker.shim import native_dir

    env = plain_env(base)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(native_dir()), env.get("LD_LIBRARY_PATH")) if p)
    env.update({"GPULAB_WORKER": worker_unix, "GPULAB_TOKEN": token})
    return env


def plain_env(base=None) -> dict:
    """``base`` with neither the forwarding shim nor the native one on LD_LIBRARY_PATH and no gpulab client
    settings: the real libcuda, as a program without gpulab has it."""
    from gpu_worker.daemon.native import real_driver_env

    env = real_driver_env(base)
    for k in ("GPULAB_WORKER", "GPULAB_TOKEN", "GPULAB_QUIET", "GPULAB_CHAIN_TO_WORKER", "GPULAB_DRIVER_WORKER",
              "GPULAB_DRIVER_TOKEN"):
        env.pop(k, None)
    return env


# A child that runs code sent by its parent, one JSON-encoded string a line, in one namespace; after each it
# answers one line "@@ <JSON>": the value the code left in `out`, or {"error": "<exception class>: ..."}. Lines
# without the prefix (a library's chatter on stdout) are not answers.
CHILD_LOOP = r"""
import json, sys
ns = {"__name__": "__child__"}
print("@@ " + json.dumps({"up": True}), flush=True)
for line in sys.stdin:
    try:
        exec(json.loads(line), ns)
        out = ns.pop("out", None)
    except BaseException as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print("@@ " + json.dumps(out), flush=True)
"""

# Code for a child: whether the native libcuda.so.1 is mapped into it (native mode really happened).
NATIVE_MAPPED = r"""
def native_mapped():
    import os
    lib = os.path.join(os.environ["GPULAB_NATIVE_DIR"], "libcuda.so.1")
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(lib) for line in f)
"""


def child_env(env: dict) -> dict:
    """``env`` for a child that runs NATIVE_MAPPED's check."""
    from gpu_worker.shim import native_dir

    return {**env, "GPULAB_NATIVE_DIR": os.path.realpath(native_dir()), "PYTHONUNBUFFERED": "1"}


class Child:
    """A Python child process driven by code strings (CHILD_LOOP); its stderr goes to ``log``."""

    def __init__(self, env: dict, log: Path, timeout: float = CHILD_START_S):
        self.log_path = log
        self.log = open(log, "w")
        env = child_env(env)
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD_LOOP], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        first = self._answer(timeout)
        if first != {"up": True}:
            raise RuntimeError(f"the child did not start: {first!r}")

    def _answer(self, timeout: float):
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.kill()
                    raise RuntimeError(f"the child gave no answer within {timeout:g} s; its stderr:\n{self.stderr()}")
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait(10)
                    raise RuntimeError(f"the child ended (exit {self.proc.returncode}); its stderr:\n{self.stderr()}")
                if line.startswith("@@ "):
                    return json.loads(line[3:])

    def __call__(self, code: str, timeout: float = STEP_S):
        """Run ``code`` in the child: what it left in ``out`` (or {"error": ...})."""
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def must(self, code: str, timeout: float = STEP_S):
        """As calling it, raising on an error."""
        out = self(code, timeout)
        if isinstance(out, dict) and "error" in out:
            raise RuntimeError(f"the child failed: {out['error']}\nits stderr:\n{self.stderr()}")
        return out

    def stderr(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> str:
        """End the child (its stdin closed, killed if it lingers): its stderr."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.proc.stdout.close()
        self.log.close()
        return self.log_path.read_text(errors="replace")


def driver_version(env: dict | None = None) -> int | None:
    """cuDriverGetVersion of the real driver (e.g. 12080 for driver 570), asked in a plain child; None where it
    cannot be loaded."""
    code = ("import ctypes\nv = ctypes.c_int(0)\nr = ctypes.CDLL('libcuda.so.1').cuDriverGetVersion(ctypes.byref(v))\n"
            "print(v.value if r == 0 else -1)")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=plain_env(env), capture_output=True, text=True, timeout=60)
        v = int(p.stdout.strip() or -1)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return v if v > 0 else None


def vgpu_of(vgpus: list[dict], token: str) -> dict:
    from gpu_worker.client.tokens import token_hash

    return next(v for v in vgpus if v["token_hash"] == token_hash(token))


# ---------------------------------------------------------------- the parts


TRAIN_SETUP = NATIVE_MAPPED + r"""
import time
import torch
torch.manual_seed(0)
dev = torch.device("cuda")
layers = []
for i in range(4):
    layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers[:-1]).to(dev)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
x = torch.randn(256, 1024, device=dev)
y = torch.randn(256, 1024, device=dev)

def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()

def sample(warmup, steps):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps

out = {"native": native_mapped(), "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
"""

PINNED_SETUP = r"""
n = 1 << 30
host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
host.fill_(7)

def copy(h2d):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if h2d:
        gpu.copy_(host, non_blocking=True)
    else:
        host.copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0

copy(True); copy(False)
out = None
"""

HOLDER_SETUP = NATIVE_MAPPED + r"""
import time
import torch
torch.empty(1, device="cuda")  # importing torch loads no driver: this cuInit attaches the process to its vGPU
torch.cuda.synchronize()
held = []

def hold(gib):
    while len(held) < gib:
        t = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        t.fill_(len(held) % 251 + 1)
        held.append(t)
    torch.cuda.synchronize()

def first_call():
    t0 = time.perf_counter()
    torch.cuda.synchronize()
    return time.perf_counter() - t0

def intact():
    return all(bool((t == i % 251 + 1).all()) for i, t in enumerate(held))

out = {"native": native_mapped()}
"""


def training(native: Child, plain: Child, plan: Plan) -> tuple[list[float], list[float]]:
    """Seconds per step, (native samples, plain samples), taken in pairs with alternating order."""
    ns, ps = [], []
    for i in range(plan.pairs):
        order = [(native, ns), (plain, ps)] if i % 2 == 0 else [(plain, ps), (native, ns)]
        for child, samples in order:
            samples.append(child.must(f"out = sample({plan.warmup}, {plan.steps})"))
    return ns, ps


def pinned(plain: Child, plan: Plan) -> dict:
    """Seconds per GiB of pinned copies, median of each direction, alternating."""
    plain.must(PINNED_SETUP)
    h2d, d2h = [], []
    for _ in range(plan.copies):
        h2d.append(plain.must("out = copy(True)"))
        d2h.append(plain.must("out = copy(False)"))
    return {"h2d": statistics.median(h2d), "d2h": statistics.median(d2h)}


def wait_moves(w, token: str, before: dict, key: str, timeout: float = 300.0) -> dict:
    """The vGPU's "moves" once ``key`` counts one more than in ``before``, or a failure more (the control API
    answers 202 when its processes take longer than 30 s)."""
    deadline = time.monotonic() + timeout
    while True:
        moves = vgpu_of(w.api("/api/vgpus")["vgpus"], token)["moves"]
        if moves[key] > before[key] or moves["failures"] > before["failures"]:
            return moves
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker counted no more {key} within {timeout:g} s: {moves}")
        time.sleep(0.1)


def offload(w, vid: str) -> dict:
    """POST /api/vgpus/<vid>/offload {"to": "warm"}: the answer, an error's included."""
    import urllib.error

    try:
        return w.api(f"/api/vgpus/{vid}/offload", {"to": "warm"})
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read() or b"{}")}


def freeze_thaw(w, holder: Child, plan: Plan) -> dict:
    """{size GiB: {"freeze": [s/GiB], "thaw": [s/GiB], "freeze_wall": [s], "checkpointed": bytes}}."""
    vid = vgpu_of(w.api("/api/vgpus")["vgpus"], "holder")["id"]
    out = {}
    for gib in SIZES_GIB:
        holder.must(f"hold({gib})", timeout=STEP_S)
        fig = out[gib] = {"freeze": [], "thaw": [], "freeze_wall": [], "checkpointed": 0}
        for _ in range(plan.toggles):
            holder.must("torch.cuda.synchronize()")
            before = vgpu_of(w.api("/api/vgpus")["vgpus"], "holder")["moves"]
            t0 = time.perf_counter()
            answer = offload(w, vid)
            wall = time.perf_counter() - t0
            moves = wait_moves(w, "holder", before, "offloads")
            if moves["failures"] != before["failures"] or moves["offloads"] == before["offloads"]:
                raise RuntimeError(f"the freeze failed: {answer.get('message') or moves}; see the worker's log")
            frozen = [p for p in vgpu_of(w.api("/api/vgpus")["vgpus"], "holder")["processes"] if p["tiers"]["warm"]]
            if not frozen:
                raise RuntimeError(f"the offload left nothing warm: {answer}")
            thaw = holder.must("out = first_call()")
            moves = wait_moves(w, "holder", before, "restores")
            if moves["restores"] == before["restores"]:
                raise RuntimeError(f"the thaw was not counted as a restore: {moves}; see the worker's log")
            fig["freeze"].append((moves["offload_seconds"] - before["offload_seconds"]) / gib)
            fig["freeze_wall"].append(wall)
            fig["thaw"].append(thaw / gib)
            fig["checkpointed"] = moves["bytes_offloaded"] - before["bytes_offloaded"]
        if not holder.must("out = intact()"):
            raise RuntimeError(f"the tensors of the {gib} GiB process did not come back intact after the thaw")
    return out


# ---------------------------------------------------------------- report


def print_table(rows: list[tuple]) -> None:
    header = ("metric", "measured", "baseline", "ratio", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * wd for wd in widths))


def training_row(ns: list[float], ps: list[float]) -> tuple:
    ratio = statistics.median(n / p for n, p in zip(ns, ps))
    return ("training step, 4x1024 MLP, batch 256, native / plain", f"{statistics.median(ns) * 1e3:.3f} ms",
            f"{statistics.median(ps) * 1e3:.3f} ms", f"{ratio:.3f}", f"<= {TARGET}",
            "MET" if ratio <= TARGET else "MISSED")


def toggle_rows(figs: dict, copies: dict) -> list[tuple]:
    rows = []
    for gib, fig in figs.items():
        for what, key, base, side in (("freeze", "freeze", copies["d2h"], "pinned DtoH"),
                                      ("thaw", "thaw", copies["h2d"], "pinned HtoD")):
            med = statistics.median(fig[key])
            rows.append((f"{what} of {gib} GiB held ({'checkpoint, worker-timed' if key == 'freeze' else 'first CUDA call'})",
                         f"{med:.3f} s/GiB", f"{base:.3f} s/GiB ({side})", f"{med / base:.1f}", "-", "-"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer training pairs and one freeze/thaw per size")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL

    from validate_gpu import no_gpu_reason

    why = no_gpu_reason()
    if why:
        print(NO_GPU.format(why), file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("benchmarks/native.py measures PyTorch programs: torch is not installed in this environment, so "
              "nothing was run.", file=sys.stderr)
        return 2
    from gpu_worker.shim import native_dir

    try:
        lib = native_dir() / "libcuda.so.1"
    except FileNotFoundError as exc:
        lib, why = None, str(exc)
    if lib is None or not lib.exists():
        print(f"the native build of the shim is missing ({lib or why}): build it with `python gpu_worker/shim/build.py`",
              file=sys.stderr)
        return 2
    driver = driver_version()

    from benchworker import BenchWorker
    from remote_driver import logs_on_failure

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpulab-native-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        stack.enter_context(logs_on_failure(tmp))  # entered first: shows the logs once every process has stopped
        (tmp / "tokens.json").write_text(json.dumps(TOKENS))
        w = BenchWorker(tmp, "native", ["--backend", "cuda", "--tokens-file", str(tmp / "tokens.json")])
        stack.callback(w.stop)
        native = Child(native_env(w.unix, "train"), tmp / "native-child.log")
        stack.callback(native.close)
        plain = Child(plain_env(), tmp / "plain-child.log")
        stack.callback(plain.close)
        facts = native.must(TRAIN_SETUP)
        plain_facts = plain.must(TRAIN_SETUP)
        if not facts["native"] or plain_facts["native"]:
            raise RuntimeError(f"the native child must map {lib} and the plain one must not: native "
                               f"{facts['native']}, plain {plain_facts['native']}")
        processes = vgpu_of(w.api("/api/vgpus")["vgpus"], "train")["processes"]
        if [p["mode"] for p in processes] != ["native"]:
            raise RuntimeError(f"the worker does not list the native child as its vGPU's one native process: {processes}")
        ns, ps = training(native, plain, plan)
        rows = [training_row(ns, ps)]
        copies = pinned(plain, plan)
        toggled = None
        if driver is not None and driver >= CHECKPOINT_DRIVER:
            holder = Child(native_env(w.unix, "holder"), tmp / "holder-child.log")
            stack.callback(holder.close)
            if not holder.must(HOLDER_SETUP)["native"]:
                raise RuntimeError(f"the holder child does not map {lib}")
            toggled = freeze_thaw(w, holder, plan)
            rows += toggle_rows(toggled, copies)
    run = "quick" if args.quick else "full"
    print(f"gpulab native mode on {facts['device']}, CUDA driver {driver or '?'} (cuDriverGetVersion), torch "
          f"{facts['torch']} ({run} run, {time.perf_counter() - t0:.0f} s)")
    print(f"training: {plan.pairs} alternating pairs of {plan.steps} steps after {plan.warmup} warm-up, native child "
          f"(shim {lib}) and plain child (real libcuda, no shim); ratio = median per-pair ratio native/plain")
    if toggled is None:
        print(f"freeze/thaw not measured: the driver's checkpoint API needs cuDriverGetVersion >= {CHECKPOINT_DRIVER} "
              f"(driver 570), this driver reports {driver or 'nothing'}")
    else:
        held = ", ".join(f"{gib} GiB held: {fig['checkpointed'] / GiB:.2f} GiB checkpointed, offload call "
                         f"{statistics.median(fig['freeze_wall']):.2f} s" for gib, fig in toggled.items())
        print(f"freeze/thaw: {plan.toggles} per size ({held}); baseline: pinned 1 GiB copies in the plain child, "
              f"median of {plan.copies}; ratio = s/GiB over the baseline's s/GiB")
        print(f"reference (not measured here): {REFERENCE}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
