#!/usr/bin/env python
"""Loopback benchmark of the gpulab remote driver, each figure against a raw-socket baseline.

    python benchmarks/remote_driver.py [--transport unix|tcp|both] [--quick]

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


@dataclass
class Plan:
    """How much work each figure takes; --quick trades precision for time."""

    call_reps: int  # (shim, raw) pairs for the null call
    calls: int  # round trips timed per null-call repetition
    copy_reps: int  # (shim, raw) pairs per copy direction
    launch_reps: int  # (shim, raw) pairs for the launch rate
    launches: int  # launches (or raw frames) timed per launch-rate repetition


FULL = Plan(call_reps=31, calls=2000, copy_reps=21, launch_reps=9, launches=200_000)
QUICK = Plan(call_reps=9, calls=1000, copy_reps=7, launch_reps=5, launches=30_000)


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
    shim(), raw()  # warm-up: connections, page faults, lazy initialisation
    pairs = []
    for i in range(reps):
        if i % 2:
            r = raw()
            s = shim()
        else:
            s = shim()
            r = raw()
        pairs.append([s, r])
    return pairs


# ---------------------------------------------------------------- client process (through the shim)


def client_main(plan: Plan, phase: str, transport: str, peers: dict, cpus: list | None) -> None:
    """Child process entry: measure one phase, shim and raw baselines pairwise; print one JSON line."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    from cuda.bindings import driver as d

    def ok(res):
        if res[0] != d.CUresult.CUDA_SUCCESS:
            raise SystemExit(f"CUDA call failed: {res[0].name}")
        return res[1] if len(res) == 2 else None

    ok(d.cuInit(0))
    assert_shim_loaded()
    ok(d.cuCtxSetCurrent(ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0))))))
    conns = {name: connect(transport, address) for name, address in peers.items()}
    if phase == "latency":
        echo = conns["echo"]
        null = lambda: seconds_per_call(d.cuDriverGetVersion, plan.calls)  # noqa: E731
        ping = lambda: seconds_per_call(functools.partial(ping_once, echo), plan.calls)  # noqa: E731
        out = {"null_call_s": paired(null, ping, plan.call_reps)}
    else:
        out = copy_figures(d, ok, conns["sink"], conns["source"], plan)
        out["launch_rate"] = paired(shim_launches(d, ok, plan.launches), raw_frames(conns["sink"], plan.launches),
                                    plan.launch_reps)
    ok(d.cuDriverGetVersion())  # the session is still healthy after all of it
    print(json.dumps(out))


def assert_shim_loaded() -> None:
    """Refuse to report numbers unless this process's libcuda is the gpulab shim, not a driver."""
    from gpu_worker.client import shim_dir

    with open("/proc/self/maps") as f:
        libs = {os.path.realpath(line.split()[-1]) for line in f if "libcuda.so" in line}
    expected = os.path.realpath(shim_dir() / "libcuda.so.1")
    if libs != {expected}:
        raise SystemExit(f"libcuda loaded from {sorted(libs)}, expected only {expected}")


def copy_figures(d, ok, sink, source, plan: Plan) -> dict:
    """Paired samples of 64 MiB copies each way; the data is checked afterwards so a fast but
    wrong copy cannot pass. Host buffers are touched first so page faults are not timed."""
    import numpy as np

    host = np.full(COPY_BYTES, 7, np.uint8)
    back = np.zeros(COPY_BYTES, np.uint8)
    dev = ok(d.cuMemAlloc(COPY_BYTES))
    htod = lambda: rate(lambda: ok(d.cuMemcpyHtoD(dev, host, COPY_BYTES)), COPY_BYTES)  # noqa: E731
    dtoh = lambda: rate(lambda: ok(d.cuMemcpyDtoH(back, dev, COPY_BYTES)), COPY_BYTES)  # noqa: E731
    out = {"htod_Bps": paired(htod, raw_stream_out(sink), plan.copy_reps),
           "dtoh_Bps": paired(dtoh, raw_stream_in(source), plan.copy_reps)}
    if not (back == 7).all():
        raise SystemExit("cuMemcpyDtoH returned other bytes than cuMemcpyHtoD sent")
    ok(d.cuMemFree(dev))
    return out


def shim_launches(d, ok, n: int):
    """A sample function: launches/s of `n` pipelined gpulab_noop launches, up to the
    cuCtxSynchronize that waits for the worker to have run them all."""
    fn = ok(d.cuModuleGetFunction(ok(d.cuModuleLoadData(PTX_FILE.read_bytes())), b"gpulab_noop"))
    launch = d.cuLaunchKernel

    def burst():
        for _ in range(n):
            res = launch(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0)
        ok(res)
        ok(d.cuCtxSynchronize())

    return lambda: rate(burst, n)


def run_client(address: str, plan: Plan, phase: str, transport: str, peers: dict, cpus=None) -> dict:
    """Run client_main in a child whose environment routes libcuda.so.1 to the worker."""
    from gpu_worker.client import shim_env

    args = [asdict(plan), phase, transport, peers, sorted(cpus) if cpus else None]
    cmd = [sys.executable, __file__, "--client", json.dumps(args)]
    p = subprocess.run(cmd, env=shim_env(address, TOKEN), cwd=ROOT, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"client on {address} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


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
def running_worker(tmp: Path):
    """An emulated worker listening on both transports; yields (pid, {"unix": addr, "tcp": addr})."""
    cmd = [sys.executable, "-m", "gpu_worker.daemon", "--backend", "emulated",
           "--unix-socket", str(tmp / "worker.sock"), "--tcp", "127.0.0.1:0", "--token", TOKEN,
           "--emulated-kernels", str(KERNELS)]
    log_path = tmp / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
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
    """Restrict the (single-threaded) worker daemon to `cpus` meanwhile; the session process it
    forks for the next client inherits that."""
    before = os.sched_getaffinity(pid)
    os.sched_setaffinity(pid, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(pid, before)


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


# ---------------------------------------------------------------- report


@dataclass
class Figure:
    """How one metric is shown and judged."""

    key: str
    name: str
    fmt: str  # format of the value after scaling
    scale: float
    target: str
    passes: Callable[[float, float], bool]  # (median shim value, median per-pair ratio) -> verdict


FIGURES = [
    Figure("null_call_s", "null call (cuDriverGetVersion)", "{:.1f} us", 1e6, "ratio <= 2.0", lambda v, r: r <= 2.0),
    Figure("htod_Bps", "64 MiB cuMemcpyHtoD", "{:.2f} GB/s", 1e-9, "ratio >= 0.8", lambda v, r: r >= 0.8),
    Figure("dtoh_Bps", "64 MiB cuMemcpyDtoH", "{:.2f} GB/s", 1e-9, "ratio >= 0.8", lambda v, r: r >= 0.8),
    Figure("launch_rate", "pipelined no-op launches", "{:,.0f} /s", 1, ">= 50,000 /s", lambda v, r: v >= 50_000),
]


def table_rows(transport: str, samples: dict) -> list[tuple]:
    """One row per figure: median of each side, median of the per-pair shim/raw ratios, verdict."""
    rows = []
    for f in FIGURES:
        pairs = samples[f.key]
        shim, raw = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        ratio = statistics.median(s / r for s, r in pairs)
        rows.append((transport, f.name, f.fmt.format(shim * f.scale), f.fmt.format(raw * f.scale), f"{ratio:.2f}",
                     f.target, "PASS" if f.passes(shim, ratio) else "MISS"))
    return rows


def print_table(rows: list[tuple]) -> None:
    header = ("transport", "metric", "measured", "baseline", "ratio", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=["unix", "tcp", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and launches (~30 s)")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: the measuring child process
    return ap.parse_args(argv)


def measure(transport: str, worker: tuple, tmp: Path, plan: Plan) -> dict:
    """Both phases on one transport: latency pinned to one CPU, bulk transfers unpinned."""
    pid, addresses = worker
    cpu = {min(os.sched_getaffinity(0))}
    with pinned(pid, cpu), raw_peers(transport, tmp, ["echo"], cpu) as peers:
        out = run_client(addresses[transport], plan, "latency", transport, peers, cpu)
    with raw_peers(transport, tmp, ["sink", "source"]) as peers:
        out.update(run_client(addresses[transport], plan, "bulk", transport, peers))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client:
        plan, *rest = json.loads(args.client)
        client_main(Plan(**plan), *rest)
        return 0
    plan = QUICK if args.quick else FULL
    transports = ["unix", "tcp"] if args.transport == "both" else [args.transport]
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
