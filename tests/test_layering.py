"""Dependencies run one way: gpulab (the CLI) -> hub_spawner and server_extension -> gpu_worker.client -> gpu_worker.

Read from the source with ast, so an import hidden inside a function or given as a string to
importlib counts too: the old CLI imported hub_spawner by string from gpu_worker."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from workertools import ROOT


def imported_modules(path: Path, package: str | None = None, strings: bool = True) -> set[str]:
    """Absolute names of every module a file imports, including relative imports resolved
    against its package and string arguments to importlib.import_module; with ``strings``, also
    modules named in string constants and run with ``-m`` (a process, but a dependency still)."""
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
        elif not strings:
            continue
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and names_a_module(node.value):
            names.add(node.value)  # a module named in a string, e.g. a table of subcommands
        elif isinstance(node, (ast.List, ast.Tuple)):  # [python, "-m", "some.module", ...] runs a module
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            names.update(str(m) for flag, m in zip(values, values[1:]) if flag == "-m" and isinstance(m, str))
    return names


def names_a_module(text: str) -> bool:
    """Is this string the dotted name of one of the project's modules or packages?"""
    if not text.startswith(("gpu_worker.", "hub_spawner", "gpulab.")) or not text.replace(".", "").replace("_", "").isalnum():
        return False
    base = ROOT.joinpath(*text.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def sources(part: str) -> list[Path]:
    return sorted(p for p in (ROOT / part).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", sources("gpu_worker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_gpu_worker_never_reaches_up(path):
    upward = {m for m in imported_modules(path) if m.split(".")[0] in ("hub_spawner", "gpulab")}
    assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"


@pytest.mark.parametrize("path", sources("hub_spawner"), ids=lambda p: str(p.relative_to(ROOT)))
def test_hub_spawner_uses_only_the_public_client(path):
    """Imports only: running the worker's command (`-m gpu_worker.daemon`) or naming a kernels module
    in its options is using gpu_worker's public interface, its command line."""
    internals = {m for m in imported_modules(path, strings=False)
                 if m.startswith("gpu_worker") and not (m == "gpu_worker.client" or m.startswith("gpu_worker.client."))}
    assert not internals, f"{path.relative_to(ROOT)} imports gpu_worker internals {sorted(internals)}"
    assert not {m for m in imported_modules(path) if m.split(".")[0] == "gpulab"}


@pytest.mark.parametrize("path", sources("server_extension"), ids=lambda p: str(p.relative_to(ROOT)))
def test_server_extension_uses_only_the_public_client(path):
    """The Jupyter server extension sits between the CLI and the worker's client: it may use gpu_worker.client
    (and itself), never gpu_worker's internals, the hub's parts or the CLI."""
    project = ("gpu_worker", "hub_spawner", "gpulab")
    wrong = {m for m in imported_modules(path) if m.split(".")[0] in project
             and not (m == "gpu_worker.client" or m.startswith("gpu_worker.client."))}
    assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_checker_sees_hidden_and_relative_imports(tmp_path):
    """The scan must catch the pattern that hid the old cycle (importlib with a string) and
    resolve relative imports to the module they name."""
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib, sys\nfrom ..daemon import session\n"
                     "def f():\n    return importlib.import_module('hub_spawner.launcher.up')\n"
                     "CMD = [sys.executable, '-m', 'hub_spawner.pool']\n"
                     "SUBCOMMANDS = {'up': 'hub_spawner.launcher.up'}\nlog = 'gpulab.worker'\n")
    found = imported_modules(probe, package="gpu_worker.client")
    assert {"hub_spawner.launcher.up", "hub_spawner.pool"} <= found
    assert "gpu_worker.daemon" in found
    assert "gpulab.worker" not in found  # a logger's name is not a module
