"""benchmarks/panel_polling.py --quick runs end to end (~40 s): every CPU window is measured, every
poller's refreshes succeed, and a tier action followed by the extension's Actions ends done with its
progress counted.  Its figures are judged by the benchmark, not here: this machine is shared and noisy."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from workertools import ROOT

SCRIPT = ROOT / "benchmarks" / "panel_polling.py"
PCT = r"\d+\.\d{3} % of one core"


def test_quick_run_prints_its_figures(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"^worker: emulated, 6 vGPUs, 6 with a live client process holding 4 MiB or more; refresh "
                     r"interval 2 s", out, re.M), out
    assert re.search(rf"^worker CPU, 4 s, idle sessions, nobody polling: {PCT}$", out, re.M), out
    assert re.search(rf"^worker CPU, 4 s, every session running a cell \(a call a second\), nobody polling: {PCT}$",
                     out, re.M), out
    assert re.search(rf"^worker CPU, 4 s, idle sessions, 5 servers with no panel open: {PCT} \(\d+ requests\)$",
                     out, re.M), out
    for what in ("idle sessions", "every session running a cell"):
        polled = re.search(rf"^worker CPU, 4 s, {what}, 5 panels polling: {PCT} \((\d+) refreshes, (\d+) requests "
                           rf"to the worker; 0 errors\)$", out, re.M)
        assert polled and int(polled.group(1)) >= 5, out  # each poller kept its interval
        if what != "idle sessions":  # (quiet ones may not be asked at all in 4 s: their pace is 10 s)
            assert int(polled.group(2)) >= 5, out  # every session changes: the worker was asked by each poller
    for what in ("idle sessions", "sessions running cells"):
        assert re.search(rf"^polling cost, {what}: [+-]\d+\.\d{{3}} % of one core \(ratio (\d+\.\d\d|inf)x; \d+ of 10 "
                         rf"refreshes\); target < 1 %: (MET|MISSED)$", out, re.M), out
    assert re.search(r"^pollers' own CPU \(the Jupyter servers' side\), panels on running sessions: \d+\.\d{3} % of "
                     r"one core per server$", out, re.M), out
    action = re.search(r"^action progress: offload to warm during a 1\.5 s call, done in (\d+\.\d\d) s; (\d+) updates "
                       r"\((\d+\.\d) per second\), longest gap (\d+\.\d\d) s; target >= 1 per second: (MET|MISSED)$",
                       out, re.M)
    assert action and int(action.group(2)) >= 1, out
    assert re.search(r"^action outcome: 32\.0 MiB of vGPU t-\w{8} now in the worker's host RAM", out, re.M), out
    assert list(tmp_path.iterdir()) == []  # its worker, sockets and files went with the run
