"""Build hooks: compile the shim (gpu_worker/shim) into the package as libcuda.so.1, and carry the
JupyterLab front end (server_extension/labextension, built from labextension/ with npm) in a wheel,
both as package data and under share/jupyter/labextensions/ where JupyterLab finds it, so that a
user installing the wheel needs no Node.js."""
import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shim_build():
    return _script("shim_build", HERE / "gpu_worker" / "shim" / "build.py").build


def _front_end(distribution, editable: bool) -> None:
    """Build the front end when it is missing (npm, Node.js and jupyterlab needed; otherwise a
    sentence); a wheel also installs it into share/jupyter/labextensions/@gpulab/vgpu-panel.
    An editable install only warns: `make build` builds it and links it into the venv."""
    lab = _script("build_labextension", HERE / "tools" / "build_labextension.py")
    if not lab.built():
        try:
            lab.build()
        except lab.BuildError as exc:
            if editable:
                print(f"warning: {exc}; the vGPU panel is missing until `make build`", file=sys.stderr)
                return
            raise SystemExit(f"{exc} A wheel without it would have no vGPU panel.") from None
    if editable:
        return
    # The list install_data reads, extended in place: data-files globs are read before this build.
    share = "share/jupyter/labextensions/" + lab.NAME
    for folder in sorted({p.parent for p in lab.OUTPUT.rglob("*") if p.is_file()}):
        files = sorted(str(p.relative_to(HERE)) for p in folder.iterdir() if p.is_file())
        rel = folder.relative_to(lab.OUTPUT).as_posix()
        distribution.data_files.append((share if rel == "." else f"{share}/{rel}", files))


class BuildWithShim(build_py):
    def run(self):
        if self.distribution.data_files is None:
            self.distribution.data_files = []
        _front_end(self.distribution, getattr(self, "editable_mode", False))
        super().run()
        build = _shim_build()
        if getattr(self, "editable_mode", False):
            build(HERE / "gpu_worker" / "shim" / "lib")
        else:
            build(Path(self.build_lib) / "gpu_worker" / "shim" / "lib")


setup(cmdclass={"build_py": BuildWithShim})
