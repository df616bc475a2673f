"""benchmarks/compute_share.py --quick runs end to end (~10 s): both workers start, every row is measured
and printed, and nothing is left behind in the temporary directory.  Its figures are judged by the
benchmark itself (tests/test_compute_share.py holds the shares to their targets); here only that they
are figures, and that pacing visibly acts (the lone 25% vGPU stays far from the whole GPU)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from workertools import ROOT, load_script

SCRIPT = ROOT / "benchmarks" / "compute_share.py"
bench = load_script("gpulab_bench_compute_share", "benchmarks/compute_share.py")


def table(lines: list[str]) -> dict[str, list[str]]:
    """{first two cells: cells} of a printed table (after its header and rule)."""
    return {" / ".join(cells[:2]): cells for cells in (re.split(r"\s{2,}", ln.strip()) for ln in lines[2:]) if cells}


def test_quick_run_measures_every_row(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    shares_part, overhead_part = r.stdout.split("\n\n")
    shares = table(shares_part.splitlines()[1:])
    assert set(shares) == {"busy pair, both at once / quarter", "busy pair, both at once / three-quarters",
                           "alone, no burst / lone-quarter"}
    for cells in shares.values():
        assert cells[6] in ("PASS", "MISS") and re.fullmatch(r"[+-]\d+\.\d", cells[5]), cells
    lone = float(shares["alone, no burst / lone-quarter"][3].rstrip("%"))
    assert 0 < lone < 50  # paced: a 25% vGPU that may not burst is held well below the whole GPU
    overhead = table(overhead_part.splitlines()[1:])
    rows = {cells[0]: cells for cells in overhead.values()}
    assert set(rows) == {"100%, pacing on", "50% may burst, alone"}
    assert float(rows["100%, pacing on"][3]) > 0 and rows["100%, pacing on"][4] == "ratio >= 0.97"
    assert list(tmp_path.iterdir()) == []  # the workers' sockets, logs and tokens files went with the run


def test_share_rows_judge_the_pair_by_kernel_time_and_the_lone_vgpu_by_wall_time():
    pair = {"quarter": {"kernel": 1.0, "wall": 4.0, "share": 25.0},
            "three-quarters": {"kernel": 2.6, "wall": 4.0, "share": 65.0}}
    lone = {"lone-quarter": {"kernel": 1.3, "wall": 4.0, "share": 32.5}}
    rows = {r[1]: r for r in bench.share_rows(pair, lone)}
    assert rows["quarter"][4:] == ("27.8%", "+2.8", "PASS")
    assert rows["three-quarters"][4:] == ("72.2%", "-2.8", "PASS")
    assert rows["lone-quarter"][3:] == ("32.5%", "-", "+7.5", "MISS")


def test_overhead_is_the_median_per_sample_ratio_against_pacing_off():
    rows = {r[0]: r for r in bench.overhead_rows([[96.0, 100.0, 90.0], [200.0, 200.0, 100.0], [99.0, 100.0, 95.0]])}
    assert rows["100%, pacing on"][3:] == ("0.990", "ratio >= 0.97", "PASS")
    assert rows["50% may burst, alone"][3:] == ("0.900", "(reported)", "-")
