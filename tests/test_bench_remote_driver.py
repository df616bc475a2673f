"""benchmarks/remote_driver.py's cuda mode, in the parts that can be checked without a GPU: it refuses
at once where none is visible, its samples interleave fairly, and NVRTC gives the image it loads;
and its comparison with an older worker (`--baseline REV`) runs end to end.
(Its whole cuda path runs without a GPU with `--backend cuda --chained`, a few seconds; a GPU run
happens in `make validate-gpu`.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from workertools import ROOT, gpu_present, load_script

SCRIPT = ROOT / "benchmarks" / "remote_driver.py"


rd = load_script("gpulab_bench_remote_driver", "benchmarks/remote_driver.py")


@pytest.mark.skipif(gpu_present(), reason="checks the refusal on a machine without a GPU")
def test_cuda_backend_refuses_at_once_without_a_gpu(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--backend", "cuda", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 2
    assert r.stderr.startswith("no NVIDIA GPU visible (") and "--backend emulated" in r.stderr
    assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no worker, no native baseline was started


def test_backend_option():
    assert rd.parse_args([]).backend == "emulated"
    assert rd.parse_args(["--backend", "cuda", "--quick"]).backend == "cuda"
    with pytest.raises(SystemExit):
        rd.parse_args(["--chained"])  # the chained smoke test is a cuda-mode run only


def test_samples_interleave_with_the_first_side_rotating():
    calls = []
    sides = [lambda name=name, value=value: calls.append(name) or value for name, value in zip("abc", (1.0, 2.0, 3.0))]
    assert rd.interleaved(sides, 4) == [[1.0, 2.0, 3.0]] * 4  # each row in the sides' order, whoever went first
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"  # warm-up, then each side first in turn
    calls.clear()
    rd.paired(lambda: calls.append("s") or 1.0, lambda: calls.append("r") or 2.0, 3)
    assert "".join(calls) == "sr" + "sr" + "rs" + "sr"  # the emulated run's order, unchanged


def test_nvrtc_compiles_the_noop_kernel_to_a_cubin_for_the_device():
    cubin = rd.compile_noop(9, 0)
    assert cubin[:4] == b"\x7fELF"
    ptx = rd.compile_noop(9, 0, "ptx")
    assert b".entry gpulab_noop" in ptx and b".target sm_90" in ptx
    with pytest.raises(SystemExit, match="could not compile gpulab_noop with --gpu-architecture=sm_11"):
        rd.compile_noop(1, 1)


def test_baseline_runs_an_older_worker_beside_this_one(tmp_path):
    """--baseline HEAD: HEAD's worker and shim beside the working tree's (~15 s); both sides measured,
    a ratio per figure, and nothing left behind in the temporary directory (HEAD's files, two shims)."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--baseline", "HEAD", "--quick", "--transport", "unix"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "this working tree's worker" in lines[0] and " vs HEAD (" in lines[0]
    rows = {cells[1]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[4:])}
    assert set(rows) == {f.name for f in rd.BASELINE_FIGURES}
    for cells in rows.values():
        assert cells[0] == "unix" and float(cells[4]) > 0
    assert rows["cuMemAlloc(1 MiB)+cuMemFree pairs"][2].endswith(" /s")
    assert list(tmp_path.iterdir()) == []
