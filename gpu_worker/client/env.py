"""The environment in which an unmodified CUDA program uses the gpulab shim."""
from __future__ import annotations

import os

from ..shim import shim_dir


def shim_env(worker: str | None = None, token: str | None = None, base=None) -> dict:
    """A copy of ``base`` (default: this process's environment) with the shim first on
    LD_LIBRARY_PATH and, when given, the worker address and session token."""
    env = dict(os.environ if base is None else base)
    lib = str(shim_dir())
    env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    if worker:
        env["GPULAB_WORKER"] = worker
    if token:
        env["GPULAB_TOKEN"] = token
    return env


def default_state_dir() -> str:
    """$GPULAB_STATE_DIR, else the XDG state directory: a lab's databases and secrets are state, not config."""
    if os.environ.get("GPULAB_STATE_DIR"):
        return os.environ["GPULAB_STATE_DIR"]
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, "gpulab")


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU: the worker's backend "auto" is then cuda, else emulated."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0"))
