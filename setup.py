"""Build hook: compile the shim (gpu_worker/shim) into the package as libcuda.so.1."""
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _shim_build():
    spec = importlib.util.spec_from_file_location("shim_build", HERE / "gpu_worker" / "shim" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build


class BuildWithShim(build_py):
    def run(self):
        super().run()
        build = _shim_build()
        if getattr(self, "editable_mode", False):
            build(HERE / "gpu_worker" / "shim" / "lib")
        else:
            build(Path(self.build_lib) / "gpu_worker" / "shim" / "lib")


setup(cmdclass={"build_py": BuildWithShim})
