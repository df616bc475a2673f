"""`gpulab worker` (also `python -m gpu_worker.daemon`): run a GPU worker daemon."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from traitlets.config import Config, PyFileConfigLoader


def _strip_shim_from_env() -> None:
    """The worker must load the real libcuda: re-exec without the shim on the library path.

    GPULAB_CHAIN_TO_WORKER=1 keeps the shim on purpose: the cuda backend then drives another
    worker through the shim, which is how its code is tested on machines without a GPU."""
    from ..shim import LIB_DIR

    if os.environ.get("GPULAB_CHAIN_TO_WORKER") == "1":
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    kept = [p for p in parts if os.path.realpath(p) != os.path.realpath(LIB_DIR)]
    if kept != parts:
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(kept))
        os.execve(sys.executable, [sys.executable, "-m", "gpu_worker.daemon", *sys.argv[1:]], env)


def cmd_worker(args) -> int:
    _strip_shim_from_env()
    from .worker import GPUWorker

    cfg = Config()
    if args.config:
        cfg.merge(PyFileConfigLoader(os.path.basename(args.config), os.path.dirname(os.path.abspath(args.config))).load_config())
    for flag, trait in [("tcp", "tcp"), ("unix_socket", "unix_socket"), ("backend", "backend"), ("token", "token"),
                        ("tokens_file", "tokens_file"), ("vram_quota", "vram_quota"),
                        ("emulated_memory", "emulated_memory"), ("pool_url", "pool_url"), ("name", "name"),
                        ("advertise", "advertise"), ("node", "node")]:
        value = getattr(args, flag)
        if value is not None:
            cfg.GPUWorker[trait] = value
    if args.heartbeat_interval is not None:
        cfg.GPUWorker.heartbeat_interval = args.heartbeat_interval
    if args.emulated_kernels:
        cfg.GPUWorker.emulated_kernels = args.emulated_kernels
    if args.token is None and "GPULAB_TOKEN" in os.environ and not args.tokens_file:
        cfg.GPUWorker.token = os.environ["GPULAB_TOKEN"]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s gpulab-worker[%(process)d] %(levelname)s %(message)s")
    worker = GPUWorker(config=cfg)
    worker.prepare()
    addrs = worker.listen()
    label = worker.kind + (" (TEST DOUBLE: no GPU)" if worker.kind == "emulated" else "")
    print(f"gpulab worker listening on {' '.join(addrs)} backend={label}", flush=True)
    worker.connect_pool(addrs)
    worker.serve_forever()
    return 0


def main(argv=None) -> int:
    w = argparse.ArgumentParser(prog="gpulab worker", description="Run a GPU worker daemon.")
    w.add_argument("--tcp", help="host:port to listen on")
    w.add_argument("--unix-socket", dest="unix_socket", help="Unix socket path to listen on")
    w.add_argument("--backend", choices=["auto", "cuda", "emulated"])
    w.add_argument("--token", help="accepted session token (default: $GPULAB_TOKEN)")
    w.add_argument("--tokens-file", dest="tokens_file", help="JSON {token: {vram: bytes}}, re-read per session")
    w.add_argument("--vram-quota", dest="vram_quota", help="default per-session VRAM quota, e.g. 8G")
    w.add_argument("--emulated-memory", dest="emulated_memory", help="memory of the emulated device, e.g. 16G")
    w.add_argument("--emulated-kernels", dest="emulated_kernels", action="append",
                   help="module registering host kernels for the emulated backend (repeatable)")
    w.add_argument("--pool-url", dest="pool_url", help="GPU pool service URL to register with")
    w.add_argument("--name", help="worker name in the pool")
    w.add_argument("--advertise", help="tcp://host:port clients use to reach this worker")
    w.add_argument("--node", help="node this worker runs on (for local vGPUs)")
    w.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float,
                   help="seconds between heartbeats to the pool (default 5)")
    w.add_argument("--config", help="traitlets config file (c.GPUWorker.*)")
    w.add_argument("-v", "--verbose", action="store_true")

    return cmd_worker(w.parse_args(argv)) or 0


if __name__ == "__main__":
    raise SystemExit(main())
