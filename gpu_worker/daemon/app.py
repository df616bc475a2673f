"""`gpulab worker` (also `python -m gpu_worker.daemon`): the command line of a GPU worker daemon.

A traitlets application whose options are aliases of the `GPUWorker` traits, so the trait help
is the one description of each option (`gpulab worker --help`, `--help-all`, config files).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from traitlets import Bool, TraitError, Unicode
from traitlets.config import Application


def _strip_shim_from_env(argv: list[str]) -> None:
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
        os.execve(sys.executable, [sys.executable, "-m", "gpu_worker.daemon", *argv], env)


def _quiet_exit(*_):
    """SIGINT/SIGTERM before the accept loop runs: nothing to clean up, so no KeyboardInterrupt trace."""
    raise SystemExit(0)


class GPUWorkerApp(Application):
    name = "gpulab-worker"
    description = """Run a gpulab worker: the GPU side of remote vGPUs.

    It accepts sessions from the gpulab shim (libcuda.so.1 in a user's kernel) over TCP
    and/or a Unix socket, checks each session's token and forks one executor process per
    session. With --pool-url it registers with a GPU pool and takes the tokens the pool
    issues. SIGINT or SIGTERM stops it and its sessions.
    """
    examples = """
gpulab worker --unix-socket /tmp/gpulab.sock --token s3cret --vram-quota 8G
gpulab worker --backend emulated --tcp 127.0.0.1:7000 --emulated-kernels tests/emulated_kernels.py
GPULAB_POOL_TOKEN=... gpulab worker --tcp 0.0.0.0:7000 --pool-url http://pool-host:8766/ --name gpu-node-1
gpulab worker --config worker_config.py     # c.GPUWorker.vram_quota = "8G", ...
"""

    config_file = Unicode("", help="A traitlets config file (Python: `c.GPUWorker.vram_quota = '8G'`) "
                                   "loaded before the command line, whose options win.").tag(config=True)
    verbose = Bool(False, help="Log at DEBUG level (every session event).").tag(config=True)

    aliases = {
        "tcp": "GPUWorker.tcp",
        "unix-socket": "GPUWorker.unix_socket",
        "backend": "GPUWorker.backend",
        "token": "GPUWorker.token",
        "tokens-file": "GPUWorker.tokens_file",
        "vram-quota": "GPUWorker.vram_quota",
        "emulated-memory": "GPUWorker.emulated_memory",
        "emulated-kernels": "GPUWorker.emulated_kernels",
        "pool-url": "GPUWorker.pool_url",
        "name": "GPUWorker.name",
        "advertise": "GPUWorker.advertise",
        "node": "GPUWorker.node",
        "heartbeat-interval": "GPUWorker.heartbeat_interval",
        "emulated-gpus": "GPUWorker.emulated_gpus",
        "control": "GPUWorker.control",
        "warm-budget": "GPUWorker.warm_budget",
        "spool-dir": "GPUWorker.spool_dir",
        "config": "GPUWorkerApp.config_file",
    }
    flags = {
        ("v", "verbose"): ({"GPUWorkerApp": {"verbose": True}}, "Log at DEBUG level (every session event)."),
        "show-config": Application.flags["show-config"],
    }

    def initialize(self, argv=None):
        argv = sys.argv[1:] if argv is None else list(argv)
        _strip_shim_from_env(argv)  # before anything imports cuda-python
        from .worker import GPUWorker

        self.classes = [GPUWorkerApp, GPUWorker]  # for --help-all; GPUWorker imported after the re-exec
        super().initialize(argv)
        if self.config_file:
            if not os.path.isfile(self.config_file):
                self.exit_with(f"config file {self.config_file} not found")
            path = os.path.abspath(self.config_file)
            self.load_config_file(os.path.basename(path), os.path.dirname(path))

    def exit_with(self, message: str) -> None:
        print(f"gpulab worker: {message}", file=sys.stderr)
        self.exit(2)

    def start(self):
        signal.signal(signal.SIGINT, _quiet_exit)
        signal.signal(signal.SIGTERM, _quiet_exit)
        logging.basicConfig(level=logging.DEBUG if self.verbose else logging.INFO,
                            format="%(asctime)s gpulab-worker[%(process)d] %(levelname)s %(message)s")
        from ..client.limits import LimitError
        from .worker import GPUWorker

        try:
            worker = GPUWorker(parent=self)
        except TraitError as exc:  # a limit that is not one: its sentence names the setting
            self.exit_with(str(exc))
        if not worker.token and not worker.tokens_file and "token" not in self.config.GPUWorker:
            worker.token = os.environ.get("GPULAB_TOKEN", "")
        worker.prepare()
        try:
            addrs = worker.listen()
        except (ValueError, OSError, LimitError) as exc:
            self.exit_with(str(exc))
        label = worker.kind + (" (TEST DOUBLE: no GPU)" if worker.kind == "emulated" else "")
        print(f"gpulab worker listening on {' '.join(addrs)} backend={label}", flush=True)
        control = worker.start_control()
        if control:
            print(f"gpulab worker control API at {control}", flush=True)
        worker.connect_pool(addrs, control)
        worker.serve_forever()


def main(argv=None) -> int:
    app = GPUWorkerApp.instance()
    app.initialize(argv)
    app.start()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
