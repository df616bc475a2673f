"""benchmarks/panel_polling.py --quick runs end to end (~15 s): both CPU windows are measured, every
poller's refreshes succeed, and a tier action followed by the extension's Actions ends done with its
progress counted.  Its figures are judged by the benchmark, not here: this machine is shared and noisy."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from workertools import ROOT

SCRIPT = ROOT / "benchmarks" / "panel_polling.py"


def test_quick_run_prints_its_figures(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"^worker: emulated, 6 vGPUs, 6 with a live client process holding 4 MiB or more; refresh "
                     r"interval 2 s", out, re.M), out
    assert re.search(r"^worker CPU, 4 s without polling: \d+\.\d{3} % of one core$", out, re.M), out
    polled = re.search(r"^worker CPU, 4 s with 5 panels polling: \d+\.\d{3} % of one core \((\d+) refreshes, "
                       r"(\d+) expected, (\d+) requests to the worker; 0 errors\)$", out, re.M)
    assert polled and int(polled.group(1)) >= int(polled.group(2)) - 5, out  # each poller kept its interval
    assert int(polled.group(3)) >= int(polled.group(1)), out  # a refresh asks the worker at least once
    assert re.search(r"^polling cost: [+-]\d+\.\d{3} % of one core \(ratio (\d+\.\d\d|inf)x\); target < 1 %: "
                     r"(MET|MISSED)$", out, re.M), out
    assert re.search(r"^pollers' own CPU \(the Jupyter servers' side\): \d+\.\d{3} % of one core per server$", out, re.M)
    action = re.search(r"^action progress: offload to warm during a 1\.5 s call, done in (\d+\.\d\d) s; (\d+) updates "
                       r"\((\d+\.\d) per second\), longest gap (\d+\.\d\d) s; target >= 1 per second: (MET|MISSED)$",
                       out, re.M)
    assert action and int(action.group(2)) >= 1, out
    assert re.search(r"^action outcome: 32\.0 MiB of vGPU t-\w{8} now in the worker's host RAM", out, re.M), out
    assert list(tmp_path.iterdir()) == []  # its worker, sockets and files went with the run
