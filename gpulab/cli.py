"""`gpulab` command line: the one entry point above hub_spawner and gpu_worker.

One traitlets application whose subcommands are applications too, so every option is a
trait and its help is the documentation (`gpulab <cmd> --help`, `--help-all`).  Subcommands
are named by import string: `gpulab --help` imports none of them and answers at once.
"""
from __future__ import annotations

import os
import sys

from traitlets import Bool, Enum, Unicode
from traitlets.config import Application


class RunApp(Application):
    name = "gpulab-run"
    description = """Run a command with the gpulab shim as its libcuda.so.1.

    The command and its children reach the vGPU on a worker: LD_LIBRARY_PATH starts with the
    shim's directory and GPULAB_WORKER and GPULAB_TOKEN are set. Put the command after `--`.
    """
    examples = """
gpulab run --worker unix:///tmp/gpulab.sock --token s3cret -- python my_cuda_program.py
GPULAB_WORKER=tcp://gpuhost:7000 GPULAB_TOKEN=s3cret gpulab run -- python my_cuda_program.py
"""
    worker = Unicode("", help="Address of the worker, tcp://host:port or unix:///path "
                              "(default: $GPULAB_WORKER).").tag(config=True)
    token = Unicode("", help="Session token the worker accepts (default: $GPULAB_TOKEN).").tag(config=True)
    aliases = {"worker": "RunApp.worker", "token": "RunApp.token"}
    flags: dict = {}

    def parse_command_line(self, argv=None):
        """Options end where the command begins, so the command's own options stay its own
        (`gpulab run python -c ...` works without `--` too)."""
        argv = sys.argv[1:] if argv is None else list(argv)
        ours, i = [], 0
        while i < len(argv) and argv[i] != "--" and argv[i].startswith("-"):
            takes_value = argv[i].lstrip("-") in self.aliases
            ours += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
        command = argv[i + 1:] if argv[i:i + 1] == ["--"] else argv[i:]
        super().parse_command_line(ours)
        self.extra_args = command

    def start(self):
        from gpu_worker.client import shim_env

        cmd = self.extra_args
        if not cmd:
            print("gpulab run: give a command after --", file=sys.stderr)
            self.exit(2)
        env = shim_env(self.worker or None, self.token or None)
        if not env.get("GPULAB_WORKER"):
            print("gpulab run: set GPULAB_WORKER or pass --worker", file=sys.stderr)
            self.exit(2)
        os.execvpe(cmd[0], cmd, env)


class ShimPathApp(Application):
    name = "gpulab-shim-path"
    description = """Print the directory of the shim (libcuda.so.1), to put first on LD_LIBRARY_PATH.

    export LD_LIBRARY_PATH=$(gpulab shim-path)
    """
    aliases: dict = {}
    flags: dict = {}

    def start(self):
        from gpu_worker.client import shim_dir

        print(shim_dir())


class DemoApp(Application):
    name = "gpulab-demo"
    description = """Start a worker and run a short cuda-python program through the shim.

    The program does not know it runs on a vGPU: it allocates, copies, compiles and launches a
    kernel and checks the result. It shows the remote-CUDA path alone, without JupyterHub
    (for the whole lab, see `gpulab up`).
    """
    backend = Enum(["auto", "cuda", "emulated"], "auto", help="The worker's backend: 'cuda' (the GPU), "
                   "'emulated' (a test double, no GPU needed) or 'auto' (cuda when a GPU is visible)."
                   ).tag(config=True)
    aliases = {"backend": "DemoApp.backend"}
    flags: dict = {}

    def start(self):
        from gpu_worker.client.demo import main as demo_main

        self.exit(demo_main(self.backend))


class SubcommandApp(Application):
    """An application that is its subcommands only: without one, its help and exit status 2."""

    def start(self):
        if self.subapp is None:
            self.print_help()
            print(f"{self.name.replace('-', ' ')}: give a subcommand", file=sys.stderr)
            self.exit(2)
        self.subapp.start()


class KernelspecCommand(Application):
    """Where `gpulab kernelspec install|remove` acts: this environment (default), the user's, or a prefix."""

    user = Bool(False, help="The user's Jupyter data directory (~/.local/share/jupyter) instead of this "
                            "environment's.").tag(config=True)
    prefix = Unicode("", help="Under this prefix (PREFIX/share/jupyter/kernels), e.g. an image's environment; "
                              "default: this Python's environment (sys.prefix).").tag(config=True)
    kernel_name = Unicode("python3-vgpu", help="The kernelspec's name (its directory; what "
                                               "`jupyter kernelspec list` shows).").tag(config=True)
    aliases = {"prefix": "KernelspecCommand.prefix", "name": "KernelspecCommand.kernel_name"}
    flags = {"user": ({"KernelspecCommand": {"user": True}}, "Install for this user only (~/.local/share/jupyter)."),
             "sys-prefix": ({"KernelspecCommand": {"user": False, "prefix": ""}},
                            "Install into this Python's environment (the default).")}

    def start(self):
        try:
            print(self.act())
        except (OSError, ValueError) as e:
            print(f"{self.name.replace('-', ' ')}: {e}", file=sys.stderr)
            self.exit(1)


class KernelspecInstallApp(KernelspecCommand):
    name = "gpulab-kernelspec-install"
    description = """Install the "Python 3 (vGPU)" kernelspec: kernels started through it by a Jupyter
    server (JupyterLab, or VS Code / PyCharm connected to that server) run with the gpulab shim and the
    server's vGPU ($GPULAB_WORKER, $GPULAB_TOKEN, $GPULAB_CONTROL_URL), and load the %vgpu magics.
    Without a vGPU the server refuses to start them, saying why."""
    display_name = Unicode("Python 3 (vGPU)", help="The name front ends show in their kernel pickers."
                           ).tag(config=True)
    aliases = {**KernelspecCommand.aliases, "display-name": "KernelspecInstallApp.display_name"}

    def act(self) -> str:
        from server_extension.kernelspec import install

        path = install(self.kernel_name, self.display_name, user=self.user, prefix=self.prefix or None)
        return f"installed kernelspec {self.kernel_name} ({self.display_name}) in {path}"


class KernelspecRemoveApp(KernelspecCommand):
    name = "gpulab-kernelspec-remove"
    description = """Remove the "Python 3 (vGPU)" kernelspec from this environment (default), the user's
    directory (--user) or a prefix (--prefix)."""

    def act(self) -> str:
        from server_extension.kernelspec import remove

        return f"removed kernelspec {self.kernel_name} from {remove(self.kernel_name, self.user, self.prefix or None)}"


class KernelspecApp(SubcommandApp):
    name = "gpulab-kernelspec"
    description = """The "Python 3 (vGPU)" kernelspec, whose kernels run on the server's vGPU."""
    examples = """
gpulab kernelspec install
gpulab kernelspec install --user --name python3-vgpu --display-name "Python 3 (vGPU)"
gpulab kernelspec install --prefix /opt/conda
gpulab kernelspec remove --user
"""
    subcommands = {
        "install": ("gpulab.cli.KernelspecInstallApp", "Install the \"Python 3 (vGPU)\" kernelspec."),
        "remove": ("gpulab.cli.KernelspecRemoveApp", "Remove it."),
    }
    aliases: dict = {}
    flags: dict = {}


class GPULab(SubcommandApp):
    name = "gpulab"
    description = """gpulab: GPU labs for JupyterHub, with remote and fractional vGPUs.

    `gpulab up` starts everything on one machine (JupyterHub, the GPU pool, a worker); the other
    subcommands run one part each. `gpulab <subcommand> --help` describes its options.
    """
    subcommand_description = "Subcommands are launched as `{app} cmd [args]`."
    subcommands = {
        "up": ("hub_spawner.launcher.up.GPULabUp",
               "Start a GPU lab: JupyterHub with the GPU pool and a local worker, demo users and profiles."),
        "worker": ("gpu_worker.daemon.app.GPUWorkerApp",
                   "Run a GPU worker: serves vGPU sessions from the shim on this machine's GPU (or the "
                   "emulated device)."),
        "pool": ("hub_spawner.pool.app.GPUPool",
                 "Run the GPU pool service: worker registry, vGPU placement, dashboard (a JupyterHub service)."),
        "vgpu": ("gpulab.vgpu_cli.VGPUApp",
                 "A worker's vGPUs through its control API: list, show, trace (--follow), revoke."),
        "run": ("gpulab.cli.RunApp", "Run a command with the shim as its libcuda.so.1, on a worker's vGPU."),
        "shim-path": ("gpulab.cli.ShimPathApp", "Print the directory to put first on LD_LIBRARY_PATH."),
        "demo": ("gpulab.cli.DemoApp", "Start a worker and run a short CUDA program through the shim."),
        "kernelspec": ("gpulab.cli.KernelspecApp",
                       "Install or remove the \"Python 3 (vGPU)\" kernelspec: Jupyter kernels on the server's vGPU."),
    }
    aliases: dict = {}
    flags: dict = {}

    def emit_help_epilogue(self, classes):
        yield "Each subcommand's options: `gpulab <subcommand> --help` (every setting: `--help-all`)."


def main(argv=None) -> int:
    app = GPULab.instance()
    app.initialize(argv)
    app.start()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
