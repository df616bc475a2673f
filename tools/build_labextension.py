#!/usr/bin/env python3
"""Build the JupyterLab front end (labextension/, TypeScript) into server_extension/labextension/.

One owner for the build steps, used by `make labextension` and by setup.py when a wheel is built
without a prebuilt front end: `npm ci` when labextension/node_modules does not match
package-lock.json, `tsc`, then @jupyterlab/builder's `build-labextension` in production mode.

`jupyter labextension build` would do the last step, but JupyterLab 4.6 hands it to a separate
`jupyter-builder` program; the builder from npm needs only JupyterLab's staging package.json (its
shared-package versions), which the installed `jupyterlab` Python package carries. So the front
end is built against the JupyterLab it will run in. Standard library only.

    python3 tools/build_labextension.py            # build (npm ci only when needed)
    python3 tools/build_labextension.py --check    # say what is missing to build, build nothing
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "labextension"
OUTPUT = ROOT / "server_extension" / "labextension"
NAME = "@gpulab/vgpu-panel"


class BuildError(Exception):
    """Why the front end cannot be built here, as a sentence for the person who asked."""


def built(output: Path = OUTPUT) -> bool:
    """Whether a production build is there (its package.json and remote entry)."""
    static = output / "static"
    return (output / "package.json").is_file() and static.is_dir() and any(static.glob("remoteEntry.*.js"))


def core_path() -> Path:
    """JupyterLab's staging directory (its package.json names the shared packages and versions)."""
    spec = importlib.util.find_spec("jupyterlab")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(
            f"cannot build the JupyterLab front end: the Python package jupyterlab is not installed for "
            f"{sys.executable} (install it, or build the wheel with --no-build-isolation in a venv that has it)")
    staging = Path(list(spec.submodule_search_locations)[0]) / "staging"
    if not (staging / "package.json").is_file():
        raise BuildError(f"cannot build the JupyterLab front end: {staging}/package.json is missing from jupyterlab")
    return staging


def tools() -> tuple[str, str]:
    """node and npm, or the sentence saying which is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        missing = " and ".join(n for n, p in (("Node.js (node)", node), ("npm", npm)) if not p)
        raise BuildError(
            f"cannot build the JupyterLab front end: {missing} not found on PATH. `make build` installs them "
            f"(tools/bootstrap.py); a wheel built elsewhere with the front end needs no Node.js to install.")
    return node, npm


def _modules_current() -> bool:
    """npm ci writes node_modules/.package-lock.json; older than package-lock.json means stale."""
    stamp = SOURCE / "node_modules" / ".package-lock.json"
    return stamp.is_file() and stamp.stat().st_mtime >= (SOURCE / "package-lock.json").stat().st_mtime


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=SOURCE)
    if result.returncode != 0:
        raise BuildError(f"building the JupyterLab front end failed: `{' '.join(cmd)}` exited with {result.returncode}")


def build() -> Path:
    """Build into server_extension/labextension/; returns that directory."""
    node, npm = tools()
    core = core_path()
    if not _modules_current():
        _run([npm, "ci", "--no-fund", "--no-audit", "--loglevel=error"])
    bin_dir = SOURCE / "node_modules" / ".bin"
    _run([node, str(bin_dir / "tsc"), "--sourceMap", "false"])
    if OUTPUT.exists():
        shutil.rmtree(OUTPUT)  # the builder leaves old hashed bundles behind otherwise
    _run([node, str(SOURCE / "node_modules" / "@jupyterlab" / "builder" / "lib" / "build-labextension.js"),
          "--core-path", str(core), "."])
    if not built():
        raise BuildError(f"the JupyterLab front end build wrote no remote entry into {OUTPUT}")
    return OUTPUT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the front end can be built here")
    args = parser.parse_args(argv)
    try:
        if args.check:
            tools()
            core_path()
            print("the JupyterLab front end can be built here")
        else:
            print(f"built {NAME} into {build().relative_to(ROOT)}")
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
