"""`gpulab` command line: worker, run, shim-path, demo."""
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
    from .shim import LIB_DIR

    if os.environ.get("GPULAB_CHAIN_TO_WORKER") == "1":
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    kept = [p for p in parts if os.path.realpath(p) != os.path.realpath(LIB_DIR)]
    if kept != parts:
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(kept))
        os.execve(sys.executable, [sys.executable, "-m", "gpu_worker.cli", *sys.argv[1:]], env)


def cmd_worker(args) -> int:
    _strip_shim_from_env()
    from .daemon import GPUWorker

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


def shim_env(worker: str | None = None, token: str | None = None, base=None) -> dict:
    """An environment in which CUDA programs use the gpulab shim."""
    from .shim import shim_dir

    env = dict(os.environ if base is None else base)
    lib = str(shim_dir())
    env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    if worker:
        env["GPULAB_WORKER"] = worker
    if token:
        env["GPULAB_TOKEN"] = token
    return env


def cmd_run(args) -> int:
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        print("gpulab run: give a command after --", file=sys.stderr)
        return 2
    env = shim_env(args.worker, args.token)
    if not env.get("GPULAB_WORKER"):
        print("gpulab run: set GPULAB_WORKER or pass --worker", file=sys.stderr)
        return 2
    os.execvpe(cmd[0], cmd, env)


def cmd_shim_path(args) -> int:
    from .shim import shim_dir

    print(shim_dir())
    return 0


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args.backend)


# Commands with parsers of their own: `gpulab up --help`, `gpulab pool --help-all`.
DELEGATED = {"up": "hub_spawner.up", "pool": "hub_spawner.pool"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:]) or 0
    ap = argparse.ArgumentParser(prog="gpulab", description="gpulab: remote vGPUs for Jupyter. Also: "
                                 "`gpulab up` (JupyterHub with GPU pool, the embedded default), `gpulab pool`.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("worker", help="run a GPU worker daemon")
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
    w.set_defaults(fn=cmd_worker)

    r = sub.add_parser("run", help="run a command with the shim as libcuda.so.1")
    r.add_argument("--worker", help="tcp://host:port or unix:///path (default: $GPULAB_WORKER)")
    r.add_argument("--token", help="session token (default: $GPULAB_TOKEN)")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("shim-path", help="print the directory to put on LD_LIBRARY_PATH")
    s.set_defaults(fn=cmd_shim_path)

    d = sub.add_parser("demo", help="start a worker and run a short CUDA program through the shim")
    d.add_argument("--backend", choices=["auto", "cuda", "emulated"], default="auto")
    d.set_defaults(fn=cmd_demo)

    args = ap.parse_args(argv)
    return args.fn(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
