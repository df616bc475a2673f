"""`gpulab` command line: the one entry point above hub_spawner and gpu_worker."""
from __future__ import annotations

import argparse
import os
import sys

from gpu_worker.client import shim_dir, shim_env


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
    print(shim_dir())
    return 0


def cmd_demo(args) -> int:
    from gpu_worker.client.demo import main as demo_main

    return demo_main(args.backend)


# Commands with parsers of their own: `gpulab up --help`, `gpulab pool --help-all`.
DELEGATED = {"up": "hub_spawner.launcher.up", "pool": "hub_spawner.pool.app", "worker": "gpu_worker.daemon.app"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:]) or 0
    ap = argparse.ArgumentParser(prog="gpulab", description="gpulab: remote vGPUs for Jupyter. Also: "
                                 "`gpulab up` (JupyterHub with GPU pool, the embedded default), `gpulab pool`.")
    sub = ap.add_subparsers(dest="cmd", required=True)

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
