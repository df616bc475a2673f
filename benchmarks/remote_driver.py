#!/usr/bin/env python
"""Loopback benchmark of the gpulab remote driver, each figure against a baseline from the same run.

    python benchmarks/remote_driver.py [--backend emulated|cuda] [--transport unix|tcp|both] [--quick]
    python benchmarks/remote_driver.py --baseline REV [--transport unix|tcp|both] [--quick]

Absolute numbers from a small, shared machine say little, so every figure measured through the
shim (libcuda.so.1 -> socket -> emulated worker) is set against what plain Python sockets achieve
on the same transport in the same run, talking to a Python peer in a separate process:

* null call: cuDriverGetVersion (one round trip) vs. a 16-byte request / 16-byte reply ping-pong;
* 64 MiB cuMemcpyHtoD / cuMemcpyDtoH vs. one-way sendall() / recv_into() streams of 64 MiB;
* pipelined no-op launches per second vs. one sendall() per launch-sized frame to a draining peer.

The shim side runs in a child process whose environment is `shim_env(...)`, so the libcuda.so.1
that cuda.bindings loads is the shim (checked). That child also drives the raw baselines, one
repetition of each side after the other in alternating order: load on this kind of machine swings
within seconds, and only back-to-back pairs see the same conditions. Each figure is the median of
each side, with the median of the per-pair ratios.

Latency is measured with the client, the worker's session process and the echo peer pinned to one
CPU. Unpinned, a ping-pong on two vCPUs takes ~12 us when the scheduler keeps both ends on one core
and ~45 us across cores (wake-up IPIs through the hypervisor), and it keeps one placement or the
other for seconds at a time: shim and baseline would be measured under different placements.
One core is also where the transport costs least, so the shim's own overhead shows most. Copies
and launches run unpinned, where the two ends can overlap as they would in real use.

With `--backend cuda` the worker runs the real GPU (refused at once, exit 2, where no NVIDIA GPU is
visible). The null call keeps its ping-pong baseline and the copies their raw-stream one; copies and
launches are also set against the same program done natively: a child process with the real libcuda
(no shim on its library path) runs cuda-python in-process on the same GPU, with the same pageable
numpy host buffers and the same no-op kernel, and measures one sample whenever the shim side asks, so
the three sides still alternate back to back. The kernel is compiled by NVRTC to a cubin for the
device: a driver older than NVRTC's PTX ISA (tests/data/kernels.ptx) could not JIT PTX.

With `--baseline REV` the comparison is with an older worker instead: REV's committed files (git
archive into the temporary directory; the repository's own checkout is left alone) run a second
emulated worker beside the working tree's, each from its own sources (PYTHONPATH) and each reached
through a shim built from its own sources, since the wire protocol may differ between them. One
client per worker stays connected while the parent asks the two for a sample in turn (new, old, then
old, new, ...), so load hits both alike; each row gives both medians and the median per-pair ratio
new/old. Besides the null call, the copies and the launches (target: within 5% of the old worker),
it reports cuMemAlloc(1 MiB)+cuMemFree pairs per second, the path of the vGPU's memory accounts.

The exit status is 0 whether or not the targets are met (a benchmark, not a test) and non-zero on
errors.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "tests" / "emulated_kernels.py"
PTX_FILE = ROOT / "tests" / "data" / "kernels.ptx"
TOKEN = "bench-token"

COPY_BYTES = 64 << 20
PING_BYTES = 16
LENGTH = struct.Struct("<Q")  # prefix of each transfer to the sink / request to the source
ACK = b"k"
NOOP_SOURCE = b'extern "C" __global__ void gpulab_noop() {}'
NATIVE_START_S = 120  # cuInit, a context and an NVRTC compile; a GPU that takes longer is reported
NO_GPU = ("no NVIDIA GPU visible ({}): `--backend cuda` measures a real GPU, so nothing was run. "
          "Run it on a GPU machine, or measure the transport alone with --backend emulated.")


@dataclass
class Plan:
    """How much work each figure takes; --quick trades precision for time."""

    call_reps: int  # (shim, raw) pairs for the null call
    calls: int  # round trips timed per null-call repetition
    copy_reps: int  # (shim, raw) pairs per copy direction
    launch_reps: int  # (shim, raw) pairs for the launch rate
    launches: int  # launches (or raw frames) timed per launch-rate repetition
    alloc_reps: int  # (new, old) pairs for the allocation rate (--baseline)
    allocs: int  # cuMemAlloc+cuMemFree pairs timed per allocation-rate repetition


FULL = Plan(call_reps=31, calls=2000, copy_reps=21, launch_reps=9, launches=200_000, alloc_reps=21, allocs=2000)
QUICK = Plan(call_reps=9, calls=1000, copy_reps=7, launch_reps=5, launches=30_000, alloc_reps=9, allocs=1000)
# --chained (a smoke test of the cuda path without a GPU) goes through two workers: only enough to run every step.
CHAINED = Plan(call_reps=2, calls=100, copy_reps=2, launch_reps=2, launches=500, alloc_reps=2, allocs=100)
ALLOC_BYTES = 1 << 20


def launch_frame_bytes() -> int:
    """What the shim sends per parameterless launch: request header, launch record, params length."""
    from gpu_worker.api.protocol import LAUNCH, REQ_HEADER

    return REQ_HEADER.size + LAUNCH.size + 8


# ---------------------------------------------------------------- timing


def seconds_per_call(fn, calls: int) -> float:
    """Mean seconds per call of `fn` over `calls` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def rate(fn, amount: int) -> float:
    """`amount` (bytes, launches) per second of one call of `fn`."""
    t0 = time.perf_counter()
    fn()
    return amount / (time.perf_counter() - t0)


def paired(shim, raw, reps: int) -> list[list[float]]:
    """`reps` [shim, raw] samples taken back to back, alternating which side goes first so that
    neither side always runs on the caches / scheduler state the other leaves behind."""
    return interleaved([shim, raw], reps)


def interleaved(sides: list, reps: int) -> list[list[float]]:
    """`reps` samples of every side, one of each back to back, the side that goes first rotating
    (for two sides: alternating, as in paired()); each row lists the sides in the given order."""
    for side in sides:
        side()  # warm-up: connections, page faults, lazy initialisation
    rows = []
    for i in range(reps):
        k = i % len(sides)
        row = [0.0] * len(sides)
        for j in list(range(k, len(sides))) + list(range(k)):
            row[j] = sides[j]()
        rows.append(row)
    return rows


# ---------------------------------------------------------------- client process (through the shim)


def checker(d):
    """`ok(result)`: the value of a cuda.bindings result tuple, or exit naming the CUresult."""
    def ok(res):
        if res[0] != d.CUresult.CUDA_SUCCESS:
            raise SystemExit(f"CUDA call failed: {res[0].name}")
        return res[1] if len(res) == 2 else None

    return ok


def client_main(plan: Plan, phase: str, transport: str, peers: dict, cpus: list | None,
                backend: str = "emulated", chained: bool = False) -> None:
    """Child process entry: measure one phase, shim and baselines interleaved; print one JSON line."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    from cuda.bindings import driver as d

    ok = checker(d)
    dev = shim_context(d, ok)
    # the native peer's control channel is local whatever the transport: it carries no timed bytes
    conns = {name: connect("unix" if name == "native" else transport, address) for name, address in peers.items()}
    if phase == "latency":
        echo = conns["echo"]
        null = lambda: seconds_per_call(d.cuDriverGetVersion, plan.calls)  # noqa: E731
        ping = lambda: seconds_per_call(functools.partial(ping_once, echo), plan.calls)  # noqa: E731
        out = {"null_call_s": paired(null, ping, plan.call_reps)}
    elif backend == "emulated":
        out = copy_figures(d, ok, conns["sink"], conns["source"], plan)
        out["launch_rate"] = paired(shim_launches(d, ok, plan.launches), raw_frames(conns["sink"], plan.launches),
                                    plan.launch_reps)
    else:
        native = SampleLink(conns["native"].sendall, conns["native"].makefile("rb"), "native baseline")
        htod, dtoh, check, buf = copy_samplers(d, ok)
        out = {"htod_Bps": interleaved([htod, raw_stream_out(conns["sink"]), native.sampler("htod")], plan.copy_reps),
               "dtoh_Bps": interleaved([dtoh, raw_stream_in(conns["source"]), native.sampler("dtoh")], plan.copy_reps)}
        check()
        native.sampler("check")()
        ok(d.cuMemFree(buf))
        fn = nvrtc_noop(d, ok, dev, chained)
        out["launch_rate"] = interleaved([launch_sampler(d, ok, fn, plan.launches), native.sampler("launch")],
                                         plan.launch_reps)
        out["device"] = device_facts(d, ok, dev)
    ok(d.cuDriverGetVersion())  # the session is still healthy after all of it
    print(json.dumps(out))


def shim_context(d, ok, lib: str | None = None):
    """cuInit through the shim (checked: the one in `lib`, by default this tree's) and device 0's
    primary context made current; returns the device."""
    ok(d.cuInit(0))
    assert_libcuda(shim=True, lib=lib)
    dev = ok(d.cuDeviceGet(0))
    ok(d.cuCtxSetCurrent(ok(d.cuDevicePrimaryCtxRetain(dev))))
    return dev


def loaded_libcuda() -> set[str]:
    with open("/proc/self/maps") as f:
        return {os.path.realpath(line.split()[-1]) for line in f if "libcuda.so" in line}


def assert_libcuda(shim: bool, lib: str | None = None) -> str:
    """Refuse to report numbers unless this process's libcuda is the gpulab shim (shim=True; the one
    in the directory `lib`, by default this tree's) or, for the native baseline, a driver that is
    not the shim; returns its path."""
    from gpu_worker.client import shim_dir

    libs = loaded_libcuda()
    expected = os.path.realpath(Path(lib or shim_dir()) / "libcuda.so.1")
    if shim and libs != {expected}:
        raise SystemExit(f"libcuda loaded from {sorted(libs)}, expected only {expected}")
    if not shim and (expected in libs or len(libs) != 1):
        raise SystemExit(f"libcuda loaded from {sorted(libs)}, expected one driver library, not the shim {expected}")
    return libs.pop()


def copy_figures(d, ok, sink, source, plan: Plan) -> dict:
    """Paired samples of 64 MiB copies each way; the data is checked afterwards so a fast but
    wrong copy cannot pass."""
    htod, dtoh, check, dev = copy_samplers(d, ok)
    out = {"htod_Bps": paired(htod, raw_stream_out(sink), plan.copy_reps),
           "dtoh_Bps": paired(dtoh, raw_stream_in(source), plan.copy_reps)}
    check()
    ok(d.cuMemFree(dev))
    return out


def copy_samplers(d, ok):
    """(htod, dtoh, check, device buffer): sample functions of synchronous 64 MiB copies between
    pageable numpy arrays and one device buffer, and a check that what came back is what went in.
    The shim and the native baseline both use these. Host buffers are touched first so page faults
    are not timed."""
    import numpy as np

    host = np.full(COPY_BYTES, 7, np.uint8)
    back = np.zeros(COPY_BYTES, np.uint8)
    dev = ok(d.cuMemAlloc(COPY_BYTES))
    htod = lambda: rate(lambda: ok(d.cuMemcpyHtoD(dev, host, COPY_BYTES)), COPY_BYTES)  # noqa: E731
    dtoh = lambda: rate(lambda: ok(d.cuMemcpyDtoH(back, dev, COPY_BYTES)), COPY_BYTES)  # noqa: E731

    def check():
        if not (back == 7).all():
            raise SystemExit("cuMemcpyDtoH returned other bytes than cuMemcpyHtoD sent")

    return htod, dtoh, check, dev


def shim_launches(d, ok, n: int):
    """A sample function: launches/s of `n` pipelined gpulab_noop launches (from the repository's
    PTX, which the emulated device runs), up to the cuCtxSynchronize that waits for them all."""
    fn = ok(d.cuModuleGetFunction(ok(d.cuModuleLoadData(PTX_FILE.read_bytes())), b"gpulab_noop"))
    return launch_sampler(d, ok, fn, n)


def launch_sampler(d, ok, fn, n: int):
    """A sample function: launches/s of `n` back-to-back launches of the parameterless `fn`, up to
    the cuCtxSynchronize that waits for them all (through the shim: for the worker to have run them)."""
    launch = d.cuLaunchKernel

    def burst():
        for _ in range(n):
            res = launch(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0)
        ok(res)
        ok(d.cuCtxSynchronize())

    return lambda: rate(burst, n)


def alloc_free_sampler(d, ok, n: int):
    """A sample function: cuMemAlloc(1 MiB)+cuMemFree pairs/s of `n` pairs back to back, two round
    trips each through the shim, on the path where the worker keeps the vGPU's memory accounts."""
    alloc, free = d.cuMemAlloc, d.cuMemFree

    def pairs():
        for _ in range(n):
            ok(free(ok(alloc(ALLOC_BYTES))))

    return lambda: rate(pairs, n)


def run_client(address: str, plan: Plan, phase: str, transport: str, peers: dict, cpus=None,
               backend: str = "emulated", chained: bool = False) -> dict:
    """Run client_main in a child whose environment routes libcuda.so.1 to the worker."""
    from gpu_worker.client import shim_env

    args = [asdict(plan), phase, transport, peers, sorted(cpus) if cpus else None, backend, chained]
    cmd = [sys.executable, __file__, "--client", json.dumps(args)]
    p = subprocess.run(cmd, env=shim_env(address, TOKEN), cwd=ROOT, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"client on {address} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the cuda backend: kernel, device, native baseline


def compile_noop(major: int, minor: int, kind: str = "cubin") -> bytes:
    """gpulab_noop compiled by NVRTC (which needs no GPU) for compute capability major.minor: a cubin
    (SASS, which loads on a driver older than this NVRTC) or PTX (what the emulated device runs)."""
    from cuda.bindings import nvrtc

    def check(res, what):
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise SystemExit(f"NVRTC {what} failed: {res[0].name}")
        return res[1] if len(res) == 2 else None

    arch = f"--gpu-architecture={'sm' if kind == 'cubin' else 'compute'}_{major}{minor}"
    prog = check(nvrtc.nvrtcCreateProgram(NOOP_SOURCE, b"gpulab_noop.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        err = nvrtc.nvrtcCompileProgram(prog, 1, [arch.encode()])[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = b" " * check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise SystemExit(f"NVRTC could not compile gpulab_noop with {arch}: {err.name}\n"
                             f"{log.rstrip(b' ').rstrip(bytes(1)).decode(errors='replace')}")
        size_of, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if kind == "cubin"
                        else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        image = b" " * check(size_of(prog), size_of.__name__)
        check(get(prog, image), get.__name__)
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compute_capability(d, ok, dev) -> tuple[int, int]:
    A = d.CUdevice_attribute
    return (ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)),
            ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)))


def nvrtc_noop(d, ok, dev, chained: bool):
    """The gpulab_noop function for this device, compiled here: a cubin on a GPU; PTX in a chained
    smoke test, whose emulated device at the end of the chain loads PTX only."""
    image = compile_noop(*compute_capability(d, ok, dev), "ptx" if chained else "cubin")
    return ok(d.cuModuleGetFunction(ok(d.cuModuleLoadData(image)), b"gpulab_noop"))


def device_facts(d, ok, dev) -> dict:
    """What the report says the figures are from: the device's name and compute capability, and the
    CUDA version of the driver (through the shim: as the worker reports them)."""
    version = ok(d.cuDriverGetVersion())
    return {"name": ok(d.cuDeviceGetName(128, dev)).split(b"\0")[0].decode(errors="replace"),
            "cc": "{}.{}".format(*compute_capability(d, ok, dev)),
            "driver": f"{version // 1000}.{version % 1000 // 10}"}


class SampleLink:
    """The measuring side's end of a control channel to a process that measures in its own process
    (the native peer, or one worker's client in a --baseline run): one line names a sample, one
    JSON line answers with its value (answer_samples is the other end)."""

    def __init__(self, send: Callable[[bytes], None], reader, who: str):
        self.send, self.reader, self.who = send, reader, who

    def sampler(self, what: str):
        def sample() -> float:
            self.send(what.encode() + b"\n")
            reply = json.loads(self.reader.readline() or b'{"error": "it closed the connection"}')
            if "error" in reply:
                raise SystemExit(f"{self.who} ({what}): {reply['error']}")
            return reply["value"]

        return sample


def answer_samples(samplers: dict, requests, send: Callable[[bytes], None]) -> None:
    """Measure one sample per line of `requests` naming it; send its value (or the error) as a JSON line."""
    for line in requests:
        try:
            reply = {"value": samplers[line.decode().strip()]()}
        except (SystemExit, KeyError) as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        send(json.dumps(reply).encode() + b"\n")


def native_main(address: str, launches: int, chained: bool) -> None:
    """Child process entry: the native baseline. cuda-python on the real libcuda in this process
    (checked), the same copies and kernel as the shim side; prints its facts once ready, then
    measures one sample per request on `address` (a Unix socket), for one client after another."""
    from cuda.bindings import driver as d

    ok = checker(d)
    ok(d.cuInit(0))
    libcuda = assert_libcuda(shim=chained)
    dev = ok(d.cuDeviceGet(0))
    ok(d.cuCtxSetCurrent(ok(d.cuDevicePrimaryCtxRetain(dev))))
    htod, dtoh, check, _ = copy_samplers(d, ok)
    samplers = {"htod": htod, "dtoh": dtoh, "launch": launch_sampler(d, ok, nvrtc_noop(d, ok, dev, chained), launches),
                "check": lambda: check() or 1.0}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)
    print(json.dumps({**device_facts(d, ok, dev), "libcuda": libcuda}), flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as requests:
            answer_samples(samplers, requests, conn.sendall)


def without_shim(env: dict) -> dict:
    """`env` for a process that must load the real libcuda: the shim's directory off
    LD_LIBRARY_PATH, no worker address or token."""
    from gpu_worker.client import shim_dir

    lib = os.path.realpath(shim_dir())
    out = {k: v for k, v in env.items() if k not in ("GPULAB_WORKER", "GPULAB_TOKEN", "GPULAB_CHAIN_TO_WORKER")}
    kept = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and os.path.realpath(p) != lib]
    if kept:
        out["LD_LIBRARY_PATH"] = ":".join(kept)
    else:
        out.pop("LD_LIBRARY_PATH", None)
    return out


@contextlib.contextmanager
def native_peer(tmp: Path, env: dict, plan: Plan, chained: bool):
    """The native baseline process, started and ready; yields (its Unix socket path, its facts)."""
    address = str(tmp / "native.sock")
    log_path = tmp / "native.log"
    cmd = [sys.executable, __file__, "--native", json.dumps([address, plan.launches, chained])]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
        try:
            line = read_line(proc, NATIVE_START_S)
            if not line.startswith("{"):
                raise RuntimeError(f"the native baseline (cuda-python without the shim) did not start: {line!r}\n"
                                   f"{log_path.read_text()}")
            yield address, json.loads(line)
        finally:
            stop_group(proc)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line `proc` prints, or "" if it exits or stays silent for `timeout` seconds."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def no_gpu_reason() -> str | None:
    """None where an NVIDIA GPU is visible, else why not; the same check as `make validate-gpu`."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from validate_gpu import no_gpu_reason as check

    return check()


# ---------------------------------------------------------------- raw-socket baselines, client side


def connect(transport: str, address: str) -> socket.socket:
    if transport == "unix":
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address)
    else:
        host, port = address.rsplit(":", 1)
        conn = socket.create_connection((host, int(port)))
    tune(conn)
    return conn


def tune(conn: socket.socket) -> None:
    """Disable Nagle on TCP, as the shim and the worker do, so small frames are not held back."""
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def recv_exactly(conn: socket.socket, view: memoryview) -> None:
    """Fill `view` from `conn`; EOFError if the peer closes first."""
    while view:
        n = conn.recv_into(view)
        if not n:
            raise EOFError
        view = view[n:]


_PING = bytes(PING_BYTES)
_PONG = memoryview(bytearray(PING_BYTES))


def ping_once(conn: socket.socket) -> None:
    """One round trip, with a fast path for the usual whole reply so the baseline is as lean as
    Python gets (a slow baseline would flatter the shim)."""
    conn.sendall(_PING)
    n = conn.recv_into(_PONG)
    if n != PING_BYTES:
        recv_exactly(conn, _PONG[n:])  # a short read; n == 0 (peer gone) ends in EOFError there


def raw_stream_out(sink: socket.socket):
    """A sample function: bytes/s of sendall()ing 64 MiB until the sink acks having all of it,
    which is what a synchronous HtoD waits for too."""
    data = memoryview(bytearray(b"\7" * COPY_BYTES))
    ack = memoryview(bytearray(len(ACK)))

    def send():
        sink.sendall(LENGTH.pack(COPY_BYTES))
        sink.sendall(data)
        recv_exactly(sink, ack)

    return lambda: rate(send, COPY_BYTES)


def raw_stream_in(source: socket.socket):
    """A sample function: bytes/s from asking the source for 64 MiB to the last byte recv_into()
    a preallocated buffer, like a synchronous DtoH."""
    buf = memoryview(bytearray(COPY_BYTES))

    def receive():
        source.sendall(LENGTH.pack(COPY_BYTES))
        recv_exactly(source, buf)

    return lambda: rate(receive, COPY_BYTES)


def raw_frames(sink: socket.socket, n: int):
    """A sample function: frames/s of `n` launch-sized sendall()s, until the sink acks having
    drained them all (the raw counterpart of launches plus cuCtxSynchronize)."""
    frame = bytes(launch_frame_bytes())
    ack = memoryview(bytearray(len(ACK)))

    def burst():
        sink.sendall(LENGTH.pack(n * len(frame)))
        for _ in range(n):
            sink.sendall(frame)
        recv_exactly(sink, ack)

    return lambda: rate(burst, n)


# ---------------------------------------------------------------- raw-socket baselines, peer side


def read_length(conn: socket.socket) -> int:
    buf = bytearray(LENGTH.size)
    recv_exactly(conn, memoryview(buf))
    return LENGTH.unpack(buf)[0]


def echo_peer(conn: socket.socket) -> None:
    """Answer every 16-byte frame with a 16-byte frame: the cheapest possible round trip."""
    buf = bytearray(PING_BYTES)
    view = memoryview(buf)
    while True:
        recv_exactly(conn, view)
        conn.sendall(buf)


def sink_peer(conn: socket.socket) -> None:
    """Per length prefix, drain that many bytes into a preallocated 64 MiB buffer, then ack."""
    buf = memoryview(bytearray(COPY_BYTES))
    while True:
        left = read_length(conn)
        while left:
            n = conn.recv_into(buf[:min(left, COPY_BYTES)])
            if not n:
                raise EOFError
            left -= n
        conn.sendall(ACK)


def source_peer(conn: socket.socket) -> None:
    """Per requested length, sendall() that many bytes from a preallocated buffer."""
    buf = memoryview(bytearray(COPY_BYTES))
    while True:
        conn.sendall(buf[:read_length(conn)])


PEERS = {"echo": echo_peer, "sink": sink_peer, "source": source_peer}


def serve_one(listener: socket.socket, peer, cpus) -> None:
    """Forked peer process: serve one connection until the client goes away."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    conn, _ = listener.accept()
    tune(conn)
    with contextlib.suppress(EOFError, ConnectionError):
        peer(conn)


@contextlib.contextmanager
def raw_peers(transport: str, tmp: Path, names: list[str], cpus=None):
    """The named PEERS, each a forked Python process listening on `transport` (on `cpus` if
    given); yields {name: address} for connect()."""
    procs, addresses = [], {}
    with contextlib.ExitStack() as stack:
        for name in names:
            if transport == "unix":
                listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                listener.bind(str(tmp / f"raw-{name}.sock"))
                stack.callback(os.unlink, listener.getsockname())  # free the path for a later use
            else:
                listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            address = listener.getsockname()
            addresses[name] = address if transport == "unix" else f"{address[0]}:{address[1]}"
            procs.append(multiprocessing.get_context("fork").Process(
                target=serve_one, args=(listener, PEERS[name], cpus), daemon=True))
            procs[-1].start()
        try:
            yield addresses
        finally:
            for proc in procs:
                proc.join(5)
                proc.kill()  # only lingers if the client never connected


# ---------------------------------------------------------------- worker


@contextlib.contextmanager
def running_worker(tmp: Path, backend: str = "emulated", env: dict | None = None, name: str = "worker",
                   tree: Path = ROOT):
    """A worker listening on both transports; yields (pid, {"unix": addr, "tcp": addr}). It runs in
    `tree` (another revision's sources with --baseline, which `env` then puts on PYTHONPATH)."""
    cmd = [sys.executable, "-m", "gpu_worker.daemon", "--backend", backend,
           "--unix-socket", str(tmp / f"{name}.sock"), "--tcp", "127.0.0.1:0", "--token", TOKEN]
    if backend == "emulated":
        cmd += ["--emulated-kernels", str(tree / KERNELS.relative_to(ROOT))]
    log_path = tmp / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True, env=env)
        try:
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"worker did not start: {line!r}\n{log_path.read_text()}")
            addresses = line.split("listening on ")[1].split(" backend=")[0].split()
            yield proc.pid, {a.split("://")[0]: a for a in addresses}
        finally:
            stop_group(proc)


@contextlib.contextmanager
def pinned(pid: int, cpus: set):
    """Restrict every thread of every process of the worker's process group (it leads one) to
    `cpus` meanwhile; the session process it forks for the next client inherits that. Threads and
    helper processes too, so that a worker which hands calls to them is measured on one CPU as well."""
    before = {}
    for tid in group_threads(pid):
        with contextlib.suppress(ProcessLookupError):
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid, cpus_before in before.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus_before)


def group_threads(pgid: int) -> list[int]:
    """The thread ids of the processes in process group `pgid`."""
    tids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # the fields after the command's closing parenthesis: state, ppid, pgrp, ...
            if int((proc / "stat").read_text().rpartition(")")[2].split()[2]) == pgid:
                tids += [int(t.name) for t in (proc / "task").iterdir()]
    return tids


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- --baseline: an older worker beside this one


@dataclass
class Side:
    """One worker of a --baseline run: the sources it runs and the shim built from them."""

    tree: Path
    lib: Path  # the directory holding this side's libcuda.so.1
    env: dict  # the worker's environment: its tree first on PYTHONPATH


# per phase, the figures sampled and the Plan field that says how many (new, old) pairs of each
BASELINE_SAMPLES = {"latency": [("null_call_s", "call_reps"), ("alloc_free", "alloc_reps")],
                    "bulk": [("htod_Bps", "copy_reps"), ("dtoh_Bps", "copy_reps"), ("launch_rate", "launch_reps")]}


def git(*args: str) -> str:
    """A read-only git command in this repository (no optional locks: others may be committing)."""
    r = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def export_revision(rev: str, dest: Path) -> str:
    """`rev`'s committed files into `dest`, by git archive: the repository's checkout, index and
    worktree list stay untouched, and nothing is left behind if the run is killed; returns the commit id."""
    commit = git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")
    dest.mkdir()
    with subprocess.Popen(["git", "-C", str(ROOT), "archive", commit], stdout=subprocess.PIPE) as archive:
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.returncode:
        raise SystemExit(f"git archive {commit} failed ({archive.returncode})")
    return commit


def tree_state() -> str:
    """HEAD's short id, and whether the working tree differs from it (what the "new" side runs)."""
    changed = git("status", "--porcelain")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if changed else "")


def prepare_side(tree: Path, lib: Path) -> Side:
    """`tree`'s shim built into `lib` by `tree`'s own build script (as `make build` does), after
    checking that a worker started in `tree` imports gpu_worker from `tree`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    found = subprocess.run([sys.executable, "-c", "import gpu_worker; print(gpu_worker.__file__)"], cwd=tree,
                           env=env, capture_output=True, text=True).stdout.strip()
    if not found or not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"a worker started in {tree} would import gpu_worker from {found or 'nowhere'}")
    built = subprocess.run([sys.executable, str(tree / "gpu_worker" / "shim" / "build.py"), str(lib)], cwd=tree,
                           capture_output=True, text=True)
    if built.returncode:
        raise SystemExit(f"building the shim of {tree} failed:\n{built.stdout}{built.stderr}")
    return Side(tree, lib, env)


def side_main(plan: Plan, phase: str, lib: str, cpus: list | None) -> None:
    """Child process entry of a --baseline run: a client of one worker through that worker's own
    shim in `lib` (checked); measures one sample of its phase's figures per request on stdin."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    from cuda.bindings import driver as d

    ok = checker(d)
    shim_context(d, ok, lib)
    if phase == "latency":
        samplers = {"null_call_s": lambda: seconds_per_call(d.cuDriverGetVersion, plan.calls),
                    "alloc_free": alloc_free_sampler(d, ok, plan.allocs)}
    else:
        htod, dtoh, check, _ = copy_samplers(d, ok)
        samplers = {"htod_Bps": htod, "dtoh_Bps": dtoh, "launch_rate": shim_launches(d, ok, plan.launches),
                    "check": lambda: check() or 1.0}
    out = sys.stdout.buffer

    def send(data: bytes) -> None:
        out.write(data)
        out.flush()

    answer_samples(samplers, sys.stdin.buffer, send)


@contextlib.contextmanager
def side_client(name: str, side: Side, address: str, plan: Plan, phase: str, cpus, tmp: Path):
    """side_main for one worker, its environment routing libcuda.so.1 to that side's shim and worker;
    yields its SampleLink. Its stderr goes to `name`-client.log, shown if the run fails."""
    env = without_shim(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(side.lib), env.get("LD_LIBRARY_PATH")]))
    env.update(GPULAB_WORKER=address, GPULAB_TOKEN=TOKEN)
    args = [asdict(plan), phase, str(side.lib), sorted(cpus) if cpus else None]
    with open(tmp / f"{name}-client.log", "a") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--side", json.dumps(args)], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)

    def send(data: bytes) -> None:
        proc.stdin.write(data)
        proc.stdin.flush()

    try:
        yield SampleLink(send, proc.stdout, f"the {name} worker's client")
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # ends its loop: it exits, and its session on the worker with it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_group(proc)
        proc.stdout.close()


def measure_sides(transport: str, sides: dict, workers: dict, tmp: Path, plan: Plan) -> dict:
    """Every figure from the new and the old worker in turn, samples [new, old]: as in measure(),
    latency with the clients, the workers and their sessions on one CPU, bulk transfers unpinned."""
    cpu = {min(os.sched_getaffinity(0))}
    out = {}
    for phase, figures in BASELINE_SAMPLES.items():
        cpus = cpu if phase == "latency" else None
        with contextlib.ExitStack() as stack:
            if cpus:  # before the clients connect, so that the sessions forked for them inherit it
                for pid, _ in workers.values():
                    stack.enter_context(pinned(pid, cpus))
            links = [stack.enter_context(side_client(name, sides[name], workers[name][1][transport], plan, phase,
                                                     cpus, tmp)) for name in ("new", "old")]
            for key, reps in figures:
                out[key] = interleaved([link.sampler(key) for link in links], getattr(plan, reps))
            if phase == "bulk":
                for link in links:
                    link.sampler("check")()
    return out


def main_baseline(rev: str, plan: Plan, transports: list, quick: bool) -> int:
    """--baseline REV: this working tree's worker beside REV's, each reached through a shim built
    from its own sources, sampled in turn."""
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpulab-bench-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        stack.enter_context(logs_on_failure(tmp))
        commit = export_revision(rev, tmp / "old-tree")
        sides = {"new": prepare_side(ROOT, tmp / "new-lib"), "old": prepare_side(tmp / "old-tree", tmp / "old-lib")}
        workers = {name: stack.enter_context(running_worker(tmp, env=side.env, name=name, tree=side.tree))
                   for name, side in sides.items()}
        for transport in transports:
            rows += table_rows(transport, measure_sides(transport, sides, workers, tmp, plan), BASELINE_FIGURES)
    print(f"gpulab remote driver: this working tree's worker ({tree_state()}) vs {rev} ({commit[:10]}), side by side "
          f"on loopback, emulated backend ({'quick' if quick else 'full'} run, {time.perf_counter() - t0:.0f} s)")
    print(f"each worker runs its own sources, reached through a shim built from them; medians of interleaved "
          f"new/old samples: {plan.call_reps} x {plan.calls:,} null calls and {plan.alloc_reps} x {plan.allocs:,} "
          f"alloc/free pairs (pinned to one CPU), {plan.copy_reps} copies, {plan.launch_reps} x {plan.launches:,} "
          f"launches; ratio = median per-pair new/old")
    print_table(rows, ("new", "old"))
    return 0


# ---------------------------------------------------------------- report


@dataclass
class Figure:
    """How one metric is shown and judged."""

    key: str
    name: str
    fmt: str  # format of the value after scaling
    scale: float
    target: str
    passes: Callable[[float, float], bool] | None  # (median shim value, median per-pair ratio) -> verdict
    base: int = 1  # which side of each sample is the baseline (0 is the shim)


FIGURES = [
    Figure("null_call_s", "null call (cuDriverGetVersion)", "{:.1f} us", 1e6, "ratio <= 2.0", lambda v, r: r <= 2.0),
    Figure("htod_Bps", "64 MiB cuMemcpyHtoD", "{:.2f} GB/s", 1e-9, "ratio >= 0.8", lambda v, r: r >= 0.8),
    Figure("dtoh_Bps", "64 MiB cuMemcpyDtoH", "{:.2f} GB/s", 1e-9, "ratio >= 0.8", lambda v, r: r >= 0.8),
    Figure("launch_rate", "pipelined no-op launches", "{:,.0f} /s", 1, ">= 50,000 /s", lambda v, r: v >= 50_000),
]

# --backend cuda: samples are [shim, raw, native] for copies and [shim, native] for launches. The copies
# vs native carry no target: forwarding is bounded by the transport, which the raw-socket rows judge.
CUDA_FIGURES = [
    Figure("null_call_s", "null call (cuDriverGetVersion) vs raw ping-pong", "{:.1f} us", 1e6, "ratio <= 2.0",
           lambda v, r: r <= 2.0),
    Figure("htod_Bps", "64 MiB cuMemcpyHtoD vs raw socket", "{:.2f} GB/s", 1e-9, "ratio >= 0.8", lambda v, r: r >= 0.8),
    Figure("htod_Bps", "64 MiB cuMemcpyHtoD vs native", "{:.2f} GB/s", 1e-9, "(reference)", None, base=2),
    Figure("dtoh_Bps", "64 MiB cuMemcpyDtoH vs raw socket", "{:.2f} GB/s", 1e-9, "ratio >= 0.8", lambda v, r: r >= 0.8),
    Figure("dtoh_Bps", "64 MiB cuMemcpyDtoH vs native", "{:.2f} GB/s", 1e-9, "(reference)", None, base=2),
    Figure("launch_rate", "pipelined no-op launches vs native", "{:,.0f} /s", 1, ">= 50,000 /s",
           lambda v, r: v >= 50_000),
]


# --baseline: samples are [new, old]; issue 8's target, the forwarding path within 5% of the old worker's
BASELINE_FIGURES = [
    Figure("null_call_s", "null call (cuDriverGetVersion)", "{:.1f} us", 1e6, "ratio <= 1.05", lambda v, r: r <= 1.05),
    Figure("htod_Bps", "64 MiB cuMemcpyHtoD", "{:.2f} GB/s", 1e-9, "ratio >= 0.95", lambda v, r: r >= 0.95),
    Figure("dtoh_Bps", "64 MiB cuMemcpyDtoH", "{:.2f} GB/s", 1e-9, "ratio >= 0.95", lambda v, r: r >= 0.95),
    Figure("launch_rate", "pipelined no-op launches", "{:,.0f} /s", 1, "ratio >= 0.95", lambda v, r: r >= 0.95),
    Figure("alloc_free", "cuMemAlloc(1 MiB)+cuMemFree pairs", "{:,.0f} /s", 1, "(reported)", None),
]


def table_rows(transport: str, samples: dict, figures=FIGURES) -> list[tuple]:
    """One row per figure: median of each side, median of the per-sample shim/baseline ratios, verdict."""
    rows = []
    for f in figures:
        pairs = samples[f.key]
        shim, raw = (statistics.median(p[i] for p in pairs) for i in (0, f.base))
        ratio = statistics.median(p[0] / p[f.base] for p in pairs)
        verdict = "-" if f.passes is None else "PASS" if f.passes(shim, ratio) else "MISS"
        rows.append((transport, f.name, f.fmt.format(shim * f.scale), f.fmt.format(raw * f.scale), f"{ratio:.2f}",
                     f.target, verdict))
    return rows


def print_table(rows: list[tuple], sides=("measured", "baseline")) -> None:
    header = ("transport", "metric", *sides, "ratio", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["emulated", "cuda"], default="emulated",
                    help="the worker's backend: emulated (a test double: transport figures) or cuda (the real GPU, "
                         "also against cuda-python in-process without the shim)")
    ap.add_argument("--transport", choices=["unix", "tcp", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and launches (~30 s)")
    ap.add_argument("--baseline", metavar="REV",
                    help="instead of raw sockets, compare with the worker (and shim) of git revision REV, run side by "
                         "side: ratios new/old, plus cuMemAlloc+cuMemFree pairs per second (emulated backend)")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: one worker's client in a --baseline run
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: the measuring child process
    ap.add_argument("--native", help=argparse.SUPPRESS)  # internal: the native-baseline child process
    # internal, a smoke test without a GPU: the cuda worker and the native baseline drive an emulated
    # worker through the shim (GPULAB_CHAIN_TO_WORKER); every step runs, no figure means anything
    ap.add_argument("--chained", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.chained and args.backend != "cuda":
        ap.error("--chained goes with --backend cuda")
    if args.baseline and args.backend != "emulated":
        ap.error("--baseline compares workers on the emulated backend")
    return args


def measure(transport: str, worker: tuple, tmp: Path, plan: Plan, native: str | None = None,
            chained: bool = False) -> dict:
    """Both phases on one transport: latency pinned to one CPU, bulk transfers unpinned. With the
    native peer's address, the bulk phase is the cuda backend's (copies also against native)."""
    pid, addresses = worker
    backend = "cuda" if native else "emulated"
    cpu = {min(os.sched_getaffinity(0))}
    with pinned(pid, cpu), raw_peers(transport, tmp, ["echo"], cpu) as peers:
        out = run_client(addresses[transport], plan, "latency", transport, peers, cpu, backend, chained)
    with raw_peers(transport, tmp, ["sink", "source"]) as peers:
        if native:
            peers["native"] = native
        out.update(run_client(addresses[transport], plan, "bulk", transport, peers, None, backend, chained))
    return out


@contextlib.contextmanager
def logs_on_failure(tmp: Path):
    """On a failure, print the last lines of the workers' and the native baseline's logs to stderr
    before the temporary directory goes: a run on a lent GPU must say what went wrong."""
    try:
        yield
    except BaseException:
        for log in sorted(tmp.glob("*.log")):
            lines = log.read_text(errors="replace").strip().splitlines()[-30:]
            if lines:
                print(f"--- {log.name}, last lines:", *lines, sep="\n", file=sys.stderr)
        raise


def main_cuda(plan: Plan, transports: list, quick: bool, chained: bool) -> int:
    """--backend cuda: a cuda worker and the native baseline on the same GPU (on the emulated worker
    at the end of the chain with --chained)."""
    from gpu_worker.client import shim_env

    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpulab-bench-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        stack.enter_context(logs_on_failure(tmp))  # entered first: shows the logs once every process has stopped
        if chained:
            _, upstream = stack.enter_context(running_worker(tmp, name="upstream"))
            env = dict(shim_env(upstream["unix"], TOKEN), GPULAB_CHAIN_TO_WORKER="1")
        else:
            env = without_shim(os.environ)
        native, native_facts = stack.enter_context(native_peer(tmp, env, plan, chained))
        worker = stack.enter_context(running_worker(tmp, "cuda", env, "cuda-worker"))
        for transport in transports:
            samples = measure(transport, worker, tmp, plan, native, chained)
            facts = samples.pop("device")
            rows += table_rows(transport, samples, CUDA_FIGURES)
    run = "chained smoke" if chained else "quick" if quick else "full"
    if chained:
        print("CHAINED SMOKE TEST, NOT GPU FIGURES: the cuda worker and the native baseline drove an emulated "
              "worker through the shim")
    print(f"gpulab remote driver, worker backend cuda, on {facts['name']} (compute capability {facts['cc']}, "
          f"CUDA driver {facts['driver']}) ({run} run, {time.perf_counter() - t0:.0f} s)")
    where = ("through the shim to the emulated worker" if chained else "without the shim")
    if native_facts["name"] not in facts["name"]:
        where += f" on {native_facts['name']}, NOT the worker's device"
    print(f"baselines from the same run: raw Python sockets on loopback (null call, copies); cuda-python in-process "
          f"on device 0 {where}, libcuda {native_facts['libcuda']} (copies, launches); host buffers are pageable "
          f"numpy arrays on every side; no-op kernel compiled by NVRTC ({'PTX' if chained else 'cubin'})")
    print(f"medians of interleaved samples: {plan.call_reps} x {plan.calls:,} null calls (pinned to one CPU), "
          f"{plan.copy_reps} copies, {plan.launch_reps} x {plan.launches:,} launches; "
          f"ratio = median per-sample ratio to the baseline the metric names")
    print_table(rows)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client:
        plan, *rest = json.loads(args.client)
        client_main(Plan(**plan), *rest)
        return 0
    if args.native:
        native_main(*json.loads(args.native))
        return 0
    if args.side:
        plan, *rest = json.loads(args.side)
        side_main(Plan(**plan), *rest)
        return 0
    transports = ["unix", "tcp"] if args.transport == "both" else [args.transport]
    if args.backend == "cuda":
        why = None if args.chained else no_gpu_reason()
        if why:
            print(NO_GPU.format(why), file=sys.stderr)
            return 2
        return main_cuda(CHAINED if args.chained else QUICK if args.quick else FULL, transports, args.quick,
                         args.chained)
    plan = QUICK if args.quick else FULL
    if args.baseline:
        return main_baseline(args.baseline, plan, transports, args.quick)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpulab-bench-") as tmp, running_worker(Path(tmp)) as worker:
        for transport in transports:
            rows += table_rows(transport, measure(transport, worker, Path(tmp), plan))
    print(f"gpulab remote driver vs raw Python sockets on loopback ({'quick' if args.quick else 'full'} run, "
          f"{time.perf_counter() - t0:.0f} s)")
    print(f"medians of alternating shim/raw pairs: {plan.call_reps} x {plan.calls:,} null calls (pinned to one CPU), "
          f"{plan.copy_reps} copies, {plan.launch_reps} x {plan.launches:,} launches; ratio = median per-pair ratio")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
