"""benchmarks/pool_scale.py --quick runs end to end (5 and 20 simulated workers, bursts of 20, 3 s heartbeat
windows): on SQLite, and on PostgreSQL where tools/postgres_server.py can start one.  Every row of its table has
its figures, every allocation of a burst is counted (here, where 20 fit, all 201), the window's heartbeats came
at their pace, no request failed and no worker was marked lost; the fit and the targets' lines are printed.
The figures themselves are judged by the benchmark, not here: this machine is shared and noisy."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from workertools import ROOT

SCRIPT = ROOT / "benchmarks" / "pool_scale.py"
NUM = r"\d+\.\d"


def postgres_works() -> bool:
    sys.path.insert(0, str(ROOT))
    try:
        from tools.postgres_server import TemporaryPostgres

        TemporaryPostgres(settings={"fsync": "off"}).start().stop()
        return True
    except Exception:
        return False


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_quick_run_prints_its_table(database, tmp_path):
    if database == "postgresql" and not postgres_works():
        if os.environ.get("CI"):  # make test's bootstrap installs it there: a skip would hide the gap
            pytest.fail("no PostgreSQL server could be started (tools/postgres_server.py)")
        pytest.skip("no PostgreSQL server could be started here (tools/postgres_server.py)")
    out_json = tmp_path / "scale.json"
    # its SQLite files and logs in tmp_path, to see that it leaves none; PostgreSQL's own server runs as the postgres
    # user where we are root, which cannot enter pytest's private tmp_path: that one keeps the usual TMPDIR
    env = dict(os.environ, TMPDIR=str(tmp_path)) if database == "sqlite" else None
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--databases", database, "--json", str(out_json)],
                       cwd=ROOT, capture_output=True, text=True, timeout=90, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(rf"^pool scale: 5,20 workers x 8 GPUs of 80 GiB; heartbeats every 1 s, window 3 s; 3 bursts of "
                     rf"20 allocations .*; databases {database}$", out, re.M), out
    rows = re.findall(rf"^\s+(5|20)\s+(40|160) \| +({NUM}) +({NUM}) +({NUM}) ms \| +(\d+) +(\d+) \| +(\d+\.\d\d) "
                      rf"+({NUM}) \| +({NUM}) +({NUM}) \| +(\d+)/(\d+) +\| +({NUM})", out, re.M)
    assert [(w, g) for w, g, *_ in rows] == [("5", "40"), ("20", "160")], out
    for row in rows:
        p50, p95, top = map(float, row[2:5])
        assert 0 < p50 <= p95 <= top, out
        assert (int(row[5]), int(row[6])) == (60, 0), out  # 3 bursts of 20: all placed, none refused
        assert float(row[7]) > 0, out  # the pool's CPU per heartbeat
        assert int(row[11]) >= 0.8 * int(row[12]), out  # the window's heartbeats came at their pace
    assert "failed (not 201/503" not in out, out
    assert re.search(rf"^{database}: workers marked lost by the pool during the run \(no heartbeat read within its "
                     rf"heartbeat_timeout, \d+ s\): 5 workers: 0, 20 workers: 0$", out, re.M), out
    assert re.search(rf"^{database} fit over 5,20 workers: allocation p95 ~ workers\^-?\d+\.\d\d, CPU per heartbeat ~ "
                     rf"workers\^-?\d+\.\d\d$", out, re.M), out
    assert re.search(rf"^{database} targets at 1000 workers: not measured \(sizes 5,20\)$", out, re.M), out
    results = json.loads(out_json.read_text())["results"][database]["rows"]
    assert [row["workers"] for row in results] == [5, 20]
    assert all(row["vgpus_reported"] == 20 for row in results)  # the first burst's vGPUs, in the workers' heartbeats
    assert list(p for p in tmp_path.iterdir() if p != out_json) == []  # its databases, logs, server went with it
