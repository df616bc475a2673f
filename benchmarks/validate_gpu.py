#!/usr/bin/env python
"""GPU validation in one command: `pytest -m gpu`, the GPU benchmarks, and a dated report.

    make validate-gpu                       # installs, then runs this
    python benchmarks/validate_gpu.py [--output report.md] [--preflight]

A claim about a GPU counts only once it has run on one (docs/validation.md), and a device machine
is lent for minutes: this puts everything such a run should show into one report, in the shape
docs/validation.md uses, with what it ran on (device, driver, library versions) and when.

Without a visible NVIDIA GPU it refuses at once with a sentence and a non-zero exit, before
anything is installed (`--preflight` does only that check, with the standard library). The exit
status is non-zero when `pytest -m gpu` does not pass (no GPU test run counts as not passing) or a
benchmark fails to run; the report is printed either way.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV_NODES = ("/dev/nvidiactl", "/dev/nvidia0")  # what tests/workertools.gpu_present looks at
PYTEST_TIMEOUT_S = 300
PYTEST_ALONE_TIMEOUT_S = 540  # `--part tests`: one device call (at most 600 s) for the GPU tests alone
PARTS = {"all": "`make validate-gpu`", "tests": "`make validate-gpu PART=tests`",
         "benchmarks": "`make validate-gpu PART=benchmarks`"}
BENCH_TIMEOUT_S = 150  # `remote_driver.py --backend cuda --quick` aims at under a minute; with the pytest
                       # run and the install, inside 8 minutes on an H100 machine
NATIVE_TIMEOUT_S = 300  # `native.py --quick`: three PyTorch children, 16 GiB frozen and thawed (not yet timed on a GPU)

# Distributions whose versions say what the run used (absent ones are reported as absent).
VERSIONS = ["gpulab", "cuda-python", "cuda-bindings", "cuda-core", "cuda-pathfinder", "nvidia-cuda-nvrtc",
            "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "jax", "jaxlib", "torch", "numpy",
            "nvidia-ml-py", "traitlets", "jupyterhub", "pytest"]

NO_GPU = ("no NVIDIA GPU visible: `make validate-gpu` needs one ({}), so nothing was run. "
          "Run it on a GPU machine (docs/validation.md says how to carry this repository there).")

PYTEST_WORDS = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "deselected", "warnings")


def gpu_visible(dev_nodes: dict, smi_listing: str | None) -> bool:
    """Whether a GPU can be used: nvidia-smi lists one, or (without nvidia-smi) a device node exists.
    `dev_nodes` maps path -> exists; `smi_listing` is `nvidia-smi -L` output, None if it failed or is absent."""
    if smi_listing is not None:
        return any(line.startswith("GPU ") for line in smi_listing.splitlines())
    return any(dev_nodes.values())


def _smi(*args: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def no_gpu_reason() -> str | None:
    """None where an NVIDIA GPU is visible, else why not (benchmarks/remote_driver.py asks this too)."""
    if gpu_visible({p: os.path.exists(p) for p in DEV_NODES}, _smi("-L")):
        return None
    return "nvidia-smi lists no GPU" if shutil.which("nvidia-smi") else f"no nvidia-smi and no {' or '.join(DEV_NODES)}"


def preflight() -> int:
    why = no_gpu_reason()
    if why is None:
        return 0
    print(NO_GPU.format(why), file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------- facts


def device_facts() -> dict:
    """Name, memory, compute capability and driver of each GPU, and the driver's CUDA version."""
    out = _smi("--query-gpu=name,memory.total,compute_cap,driver_version", "--format=csv,noheader") or ""
    gpus = [dict(zip(("name", "memory", "compute", "driver"), (c.strip() for c in line.split(","))))
            for line in out.strip().splitlines() if line.strip()]
    m = re.search(r"CUDA Version:\s*([\d.]+)", _smi() or "")
    return {"gpus": gpus, "cuda": m.group(1) if m else "?"}


def versions(names=VERSIONS) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or "unknown (no git here)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git here)"


# ---------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One command's outcome, as the report shows it."""

    title: str
    command: list
    rc: int | None  # None: timed out
    seconds: float
    output: str
    note: str = ""


def run(title: str, cmd: list, timeout: float, note: str = "") -> Run:
    print(f"validate-gpu: {title}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = "".join(s.decode(errors="replace") if isinstance(s, bytes) else s for s in (e.stdout, e.stderr) if s)
    sys.stderr.write(out[-4000:])
    return Run(title, cmd, rc, time.perf_counter() - t0, out, note)


def pytest_counts(output: str) -> dict:
    """Outcome counts from pytest's last summary line ("3 passed, 1 skipped, 120 deselected in 9.1s")."""
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b", line)
        if found and re.search(r"\bin [\d.]+s", line) or line.strip(" =").startswith("no tests ran"):
            counts = {}
            for n, word in found:
                word = {"errors": "error", "warning": "warnings"}.get(word, word)
                counts[word] = counts.get(word, 0) + int(n)
            return counts
    return {}


def pytest_problems(output: str) -> list[str]:
    """The short-summary lines (-rfEs) for tests that failed, errored or were skipped."""
    return [line.strip() for line in output.splitlines() if re.match(r"(FAILED|ERROR|SKIPPED) ", line.strip())]


def _rule(lines: list[str]) -> int | None:
    """Index of the dashed rule under the header of the table benchmarks/remote_driver.py prints."""
    return next((i for i, line in enumerate(lines[1:], 1) if re.fullmatch(r"-+( +-+)+", line.strip())), None)


def bench_rows(output: str) -> tuple[list[str], list[list[str]]]:
    """The table benchmarks/remote_driver.py prints (columns two or more spaces apart, a dashed
    rule under the header) as (header, rows)."""
    lines = output.splitlines()
    i = _rule(lines)
    if i is None:
        return [], []
    header = re.split(r"\s{2,}", lines[i - 1].strip())
    rows = []
    for row in lines[i + 1:]:
        cells = re.split(r"\s{2,}", row.strip())
        if len(cells) != len(header):
            break
        rows.append(cells)
    return header, rows


def bench_preamble(output: str) -> list[str]:
    """The lines the benchmark prints above its table: what the figures are from (backend, device,
    driver, baselines, repetitions), which the table alone does not say."""
    lines = output.splitlines()
    i = _rule(lines)
    return [] if i is None else [line.strip() for line in lines[:i - 1] if line.strip()][-6:]


def pytest_passed(r: Run) -> bool:
    """Passed only if pytest exited 0 and at least one GPU test ran and passed: all skipped is not a pass."""
    counts = pytest_counts(r.output)
    return r.rc == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")


# ---------------------------------------------------------------------------- report


@dataclass
class Report:
    date: str
    machine: dict  # device_facts()
    versions: dict
    python: str
    system: str
    cpus: int
    commit: str
    pytest: Run | None  # None: the benchmarks part alone
    benches: list = field(default_factory=list)
    part: str = "all"


def _markdown_table(header: list, rows: list) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _status(r: Run) -> str:
    return "timed out" if r.rc is None else ("ok" if r.rc == 0 else f"exit {r.rc}")


def _shown(cmd: list) -> str:
    """A command as a reader would type it: `python`, and paths relative to the repository."""
    def short(i, c):
        if i == 0:
            return "python"
        return os.path.relpath(c, ROOT) if os.path.isabs(c) and Path(c).is_relative_to(ROOT) else c
    return " ".join(short(i, c) for i, c in enumerate(cmd))


def format_report(rep: Report) -> str:
    """Markdown in the shape of docs/validation.md: a dated heading, the machine, then each run."""
    gpus = rep.machine.get("gpus") or []
    gpu_text = "; ".join(f"{g.get('name', '?')} ({g.get('memory', '?')}, compute capability {g.get('compute', '?')})"
                         for g in gpus) or "no GPU listed by nvidia-smi"
    driver = gpus[0].get("driver", "?") if gpus else "?"
    present = [f"{k} {v}" for k, v in rep.versions.items() if v]
    absent = [k for k, v in rep.versions.items() if not v]
    out = [f"## {rep.date} — GPU validation ({PARTS[rep.part]})", "",
           f"Machine: {len(gpus)} × {gpu_text}; driver {driver} (CUDA {rep.machine.get('cuda', '?')}); "
           f"{rep.cpus} CPUs; {rep.system}; Python {rep.python}. Commit {rep.commit}.", "",
           f"Versions: {', '.join(present)}." + (f" Not installed: {', '.join(absent)}." if absent else ""), ""]

    if rep.pytest is not None:
        out += _pytest_section(rep.pytest)

    for b in rep.benches:
        out += [f"### `{_shown(b.command)}` ({b.seconds:.0f} s, {_status(b)})", ""]
        if b.note:
            out += [b.note, ""]
        header, rows = bench_rows(b.output)
        if rows:
            out += [f"- {line}" for line in bench_preamble(b.output)] + [""]
            out += _markdown_table(header, rows) + [""]
        else:
            out += ["No figures: the benchmark printed no table. Its last lines:", "", "```",
                    *b.output.strip().splitlines()[-15:], "```", ""]
    return "\n".join(out).rstrip() + "\n"


def _pytest_section(p: Run) -> list[str]:
    counts = pytest_counts(p.output)
    summary = ", ".join(f"{counts[w]} {w}" for w in PYTEST_WORDS if counts.get(w)) or "no summary line"
    verdict = "PASS" if pytest_passed(p) else "NOT PASSED"
    out = [f"### `pytest -m gpu`: {verdict} — {summary} ({p.seconds:.0f} s, {_status(p)})", ""]
    if p.note:
        out += [p.note, ""]
    if counts:
        out += _markdown_table(["outcome", "count"], [[w, str(counts[w])] for w in PYTEST_WORDS if w in counts]) + [""]
    problems = pytest_problems(p.output)
    if problems:
        out += [f"- `{line}`" for line in problems] + [""]
    return out


# ---------------------------------------------------------------------------- main


def remote_driver_command() -> tuple[list, str]:
    """benchmarks/remote_driver.py on the `cuda` backend, quick: the lent machine's minutes are few."""
    return ([sys.executable, str(ROOT / "benchmarks" / "remote_driver.py"), "--backend", "cuda", "--quick"],
            "Worker backend: cuda (the real GPU). Baselines from the same run: raw Python sockets on loopback, and "
            "cuda-python in-process on the same GPU without the shim (pageable host buffers on every side).")


def tiering_command() -> tuple[list, str]:
    """benchmarks/tiering.py with the data path and first touch on the real GPU, quick."""
    return ([sys.executable, str(ROOT / "benchmarks" / "tiering.py"), "--backend", "cuda", "--quick"],
            "VRAM tiers on the real GPU: offload and restore against plain copies between the same memories "
            "(pinned host buffers) and sequential file I/O, measured in the same run; first touch of a warm 4 GiB "
            "vGPU through a worker. Its density case runs on the emulated device (4x a card would need that much "
            "host RAM and disk).")


def native_command() -> tuple[list, str]:
    """benchmarks/native.py, quick: PyTorch natively under the shim, and freeze/thaw through the driver's checkpoint."""
    return ([sys.executable, str(ROOT / "benchmarks" / "native.py"), "--quick"],
            "Native mode (the real driver in-process under the native libcuda.so.1, a cuda worker's ledger): a PyTorch "
            "training step against the same child without the shim, and freeze/thaw of 4 and 16 GiB through the "
            "worker's control API against pinned copies, all measured in the same run.")


# What tests/jupyter/ (the server extension, the kernel provisioner) imports.
JUPYTER_TEST_NEEDS = ("jupyter_server", "jupyter_client", "pytest_jupyter")


def pytest_command() -> tuple[list, str]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    notes = []
    # A machine with only the carried wheels (docs/validation.md) lacks the hub's and Jupyter's
    # dependencies; their tests could not even be collected there (a collection error stops the run).
    if importlib.util.find_spec("jupyterhub") is None:
        cmd.append("--ignore=tests/hub")
        notes.append("tests/hub/ not collected: JupyterHub is not installed here "
                     "(the hub's own GPU path also needs Node.js and configurable-http-proxy).")
    missing = [m for m in JUPYTER_TEST_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        cmd.append("--ignore=tests/jupyter")
        notes.append(f"tests/jupyter/ not collected: {', '.join(missing)} not installed here.")
    return cmd, " ".join(notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preflight", action="store_true", help="only check that an NVIDIA GPU is visible")
    ap.add_argument("--output", help="also write the report to this file")
    ap.add_argument("--part", choices=list(PARTS), default="all",
                    help="the GPU tests, the benchmarks, or both (the default); each part alone fits one device "
                         "call of 10 minutes")
    args = ap.parse_args(argv)
    if preflight() != 0:
        return 2
    if args.preflight:
        return 0

    tests = None
    if args.part in ("all", "tests"):
        cmd, note = pytest_command()
        tests = run("pytest -m gpu", cmd, PYTEST_TIMEOUT_S if args.part == "all" else PYTEST_ALONE_TIMEOUT_S, note)
    benches = []
    if args.part in ("all", "benchmarks"):
        bench_cmd, bench_note = remote_driver_command()
        tier_cmd, tier_note = tiering_command()
        native_cmd, native_note = native_command()
        benches = [run("remote driver benchmark", bench_cmd, BENCH_TIMEOUT_S,
                       bench_note + " `benchmarks/spawn.py` is not run: it measures the hub, not the GPU."),
                   run("tiering benchmark", tier_cmd, BENCH_TIMEOUT_S, tier_note),
                   run("native mode benchmark", native_cmd, NATIVE_TIMEOUT_S, native_note)]
    rep = Report(date=datetime.date.today().isoformat(), machine=device_facts(), versions=versions(),
                 python=platform.python_version(), system=f"{platform.system()} {platform.release()}",
                 cpus=os.cpu_count() or 0, commit=commit(), pytest=tests, benches=benches, part=args.part)
    text = format_report(rep)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    ok = (tests is None or pytest_passed(tests)) and all(b.rc == 0 for b in benches)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
