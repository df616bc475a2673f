"""The "Python 3 (vGPU)" kernelspec: written, installed and removed (`gpulab kernelspec install|remove`).

Its kernels run this Python's ipykernel, started by the vGPU provisioner (provisioner.py), which gives
them the shim and the session's credentials, and load the `%vgpu` magics at start (``--ext gpulab``)
so a notebook can ask about its vGPU in its first cell.  Where it goes follows Jupyter's own rules
(jupyter_client's KernelSpecManager): the user's data directory, this environment's prefix, or a
prefix given.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from gpu_worker.client import shim_dir

from .provisioner import NAME as PROVISIONER

KERNEL_NAME = "python3-vgpu"
DISPLAY_NAME = "Python 3 (vGPU)"


def kernel_json(display_name: str = DISPLAY_NAME, python: str = sys.executable, config: dict | None = None) -> dict:
    """The kernelspec's kernel.json: ipykernel with the magics, started by the vGPU provisioner.

    Its env stanza puts the shim first on LD_LIBRARY_PATH too, for front ends that start kernelspecs
    themselves and skip provisioners (VS Code's and PyCharm's local kernels, docs/ide.md); under a
    Jupyter server the provisioner does it again, once, with the credentials and the checks."""
    return {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--ext=gpulab"],
        "env": {"LD_LIBRARY_PATH": f"{shim_dir()}:${{LD_LIBRARY_PATH}}"},
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "debugger": True,
            "kernel_provisioner": {"provisioner_name": PROVISIONER, "config": dict(config or {})},
        },
    }


def kernels_dir(user: bool = False, prefix: str | None = None) -> str:
    """The kernels directory an install with these choices writes to."""
    if user:
        from jupyter_core.paths import jupyter_data_dir

        return os.path.join(jupyter_data_dir(), "kernels")
    return os.path.join(prefix or sys.prefix, "share", "jupyter", "kernels")


def install(name: str = KERNEL_NAME, display_name: str = DISPLAY_NAME, user: bool = False,
            prefix: str | None = None, config: dict | None = None) -> str:
    """Install the kernelspec (replacing one of that name there); its directory."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / name
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps(kernel_json(display_name, config=config), indent=2) + "\n")
        logos = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3"
        for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
            if (logos / logo).is_file():  # ipykernel's Python logos, so the launcher shows one
                shutil.copy(logos / logo, spec / logo)
        return KernelSpecManager().install_kernel_spec(str(spec), name, user=user,
                                                        prefix=None if user else (prefix or sys.prefix))


def remove(name: str = KERNEL_NAME, user: bool = False, prefix: str | None = None, anywhere: bool = False) -> str:
    """Remove the kernelspec from the chosen location (or, with `anywhere`, wherever Jupyter finds it):
    the directory removed; FileNotFoundError with a sentence if there is none."""
    if anywhere:
        try:
            path = KernelSpecManager().get_kernel_spec(name).resource_dir
        except NoSuchKernel:
            raise FileNotFoundError(f"no kernelspec named {name} is installed where Jupyter looks") from None
    else:
        path = os.path.join(kernels_dir(user, prefix), name)
        if not os.path.isfile(os.path.join(path, "kernel.json")):
            raise FileNotFoundError(f"no kernelspec named {name} in {kernels_dir(user, prefix)}")
    shutil.rmtree(path)
    return path
