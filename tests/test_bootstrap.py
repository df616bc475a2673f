"""Set-up decisions (tools/bootstrap.py), the Makefile's use of them, and the GPU validation report.

The bootstrap's decision is a pure function of facts about the machine, so each situation below
is a machine described in a few fields, not a machine changed. The Makefile is checked with
`make -n`, which prints the commands without running them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from workertools import ROOT, gpu_present, load_script

bs = load_script("gpulab_bootstrap", "tools/bootstrap.py")
vg = load_script("gpulab_validate_gpu", "benchmarks/validate_gpu.py")

VENV = "/srv/lab/.venv"
EVERYTHING = bs.Facts()  # defaults: root on Debian with every piece present
FRESH_DEBIAN = bs.Facts(cc=False, libc_headers=False, chromium=False, prometheus=False, postgresql=False,
                        node=False, npm=False, node_path="",
                        node_package=None, proxy=False, venv=False, venv_module=False)
# NodeSource's nodejs 20.20.2-1nodesource1: Provides and Conflicts npm, and ships /usr/bin/npm.
NODESOURCE = dict(node=True, npm=True, node_package="nodejs", node_provides=("nodejs-dev", "nodejs-legacy", "npm"))


def plan(facts, goal="test"):
    return bs.decide(facts, bs.NEEDS[goal], VENV)


def apt_packages(p):
    return [s.arg for s in p.steps if s.kind == "apt-install"]


def argvs(p, root=True):
    return [bs.command(s, root) for s in p.steps]


def test_fresh_debian_installs_each_piece_with_its_own_apt_command_after_one_update():
    p = plan(FRESH_DEBIAN)
    assert p.problems == []
    assert [s.kind for s in p.steps][0] == "apt-update"
    assert [s.kind for s in p.steps].count("apt-update") == 1
    assert apt_packages(p) == ["gcc", "libc6-dev", "python3-venv", "chromium", "prometheus", "postgresql", "nodejs",
                              "npm"]
    for argv in argvs(p):
        if "install" in argv and "apt-get" in argv:  # one package per apt-get install
            assert argv[-5:-1] == ["apt-get", "install", "-y", "--no-install-recommends"], argv
    kinds = [s.kind for s in p.steps]
    assert kinds[-2:] == ["venv", "proxy"]  # the venv first: the proxy goes into it
    assert bs.command(p.steps[-1]) == ["npm", "install", "-g", "--prefix", VENV, "--no-fund", "--no-audit",
                                       "--loglevel=error", "configurable-http-proxy"]


def test_nodesource_node_that_ships_npm_gets_no_debian_npm():
    """The failure this replaces: chromium missing beside NodeSource's nodejs made one apt line
    with `nodejs npm` in it, which apt refused (nodejs : Conflicts: npm)."""
    p = plan(dataclasses.replace(EVERYTHING, chromium=False, proxy=False, **NODESOURCE))
    assert apt_packages(p) == ["chromium"]
    assert [s.kind for s in p.steps] == ["apt-update", "apt-install", "proxy"]
    assert not any("npm" in argv or "nodejs" in argv for argv in argvs(p) if "apt-get" in argv)


def test_nodesource_node_whose_npm_is_gone_is_a_sentence_not_debian_npm():
    facts = dataclasses.replace(EVERYTHING, proxy=False, **dict(NODESOURCE, npm=False))
    p = plan(facts)
    assert p.steps == []
    assert len(p.problems) == 1
    assert "provides npm itself" in p.problems[0] and "apt-get install --reinstall nodejs" in p.problems[0]


def test_debian_nodejs_without_npm_gets_debian_npm_for_the_proxy():
    p = plan(dataclasses.replace(EVERYTHING, npm=False, proxy=False, node_package="nodejs",
                                 node_provides=("nodejs-abi-108",)))
    assert apt_packages(p) == ["npm"]
    assert [s.kind for s in p.steps] == ["apt-update", "apt-install", "proxy"]


def test_node_from_no_package_without_npm_is_a_sentence():
    p = plan(dataclasses.replace(EVERYTHING, npm=False, proxy=False, node_path="/opt/node/bin/node",
                                 node_package=None))
    assert p.steps == []
    assert "/opt/node/bin/node is not from a Debian package" in p.problems[0]


def test_npm_builds_the_front_end_even_with_the_proxy_there():
    no_npm = dataclasses.replace(EVERYTHING, npm=False, node_package="nodejs", node_provides=("nodejs-abi-108",))
    for goal in ("test", "demo"):  # `make labextension` runs npm ci and the JupyterLab builder
        p = plan(no_npm, goal)
        assert apt_packages(p) == ["npm"] and "front end" in p.steps[-1].why, p
    assert plan(no_npm, "gpu").steps == []  # the device machine builds no front end


def test_everything_present_means_nothing_to_do():
    for goal in bs.NEEDS:
        p = plan(EVERYTHING, goal)
        assert (p.steps, p.problems) == ([], [])


def test_only_the_proxy_missing_installs_it_into_the_venv_without_apt():
    p = plan(dataclasses.replace(EVERYTHING, proxy=False))
    assert [(s.kind, s.arg) for s in p.steps] == [("proxy", VENV)]


def test_no_c_compiler():
    p = plan(dataclasses.replace(EVERYTHING, cc=False))
    assert [(s.kind, s.arg) for s in p.steps] == [("apt-update", ""), ("apt-install", "gcc")]
    # gcc without recommends has no libc headers: those come on their own too
    p = plan(dataclasses.replace(EVERYTHING, cc=False, libc_headers=False))
    assert apt_packages(p) == ["gcc", "libc6-dev"]


def test_apt_update_runs_once_per_set_up():
    p = plan(dataclasses.replace(EVERYTHING, chromium=False, apt_updated=True))
    assert [s.kind for s in p.steps] == ["apt-install"]


def test_not_root_without_sudo_names_what_to_install():
    facts = dataclasses.replace(FRESH_DEBIAN, root=False, sudo=False)
    p = plan(facts)
    assert p.steps == []  # nothing it can do: even the venv waits for python3-venv
    text = " ".join(p.problems)
    assert "not root, and no sudo" in text
    for pkg in ("gcc", "libc6-dev", "python3-venv", "chromium", "prometheus", "postgresql", "nodejs", "npm"):
        assert f"apt-get install -y --no-install-recommends {pkg}" in text
    # what needs no root still happens: a venv and the proxy when only chromium is missing
    p = plan(dataclasses.replace(EVERYTHING, root=False, sudo=False, chromium=False, proxy=False, venv=False))
    assert [s.kind for s in p.steps] == ["venv", "proxy"]
    assert "chromium" in p.problems[0]


def test_not_root_with_sudo_uses_sudo_for_apt_only():
    p = plan(dataclasses.replace(EVERYTHING, root=False, sudo=True, chromium=False, proxy=False))
    assert argvs(p, root=False) == [
        ["sudo", "apt-get", "update"],
        ["sudo", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "--no-install-recommends",
         "chromium"],
        ["npm", "install", "-g", "--prefix", VENV, "--no-fund", "--no-audit", "--loglevel=error",
         "configurable-http-proxy"],
    ]


def test_no_apt_get_names_the_pieces():
    p = plan(dataclasses.replace(EVERYTHING, apt=False, cc=False, chromium=False))
    assert p.steps == []
    assert "no apt-get" in p.problems[0] and "gcc" in p.problems[0] and "chromium" in p.problems[0]


def test_prometheus_is_installed_for_the_tests_without_starting_its_service(tmp_path):
    """promtool checks the shipped alert rules and a test runs Prometheus on a port of its own: the
    package's service (port 9090, started by its postinst) must not start on a CI machine, where no
    policy-rc.d forbids it and no systemd is there to manage it."""
    p = plan(dataclasses.replace(EVERYTHING, prometheus=False))
    assert apt_packages(p) == ["prometheus"]
    assert apt_packages(plan(dataclasses.replace(EVERYTHING, prometheus=False), "demo")) == []
    argv = bs.command(p.steps[-1])
    assert argv[-5:] == [*bs.APT_INSTALL, "prometheus"]
    # the wrapper, run with a policy path of our own and a command that shows what invoke-rc.d would see
    script = argv[argv.index("-c") + 1].replace("/usr/sbin/policy-rc.d", str(tmp_path / "policy-rc.d"))
    probe = [f"{tmp_path / 'policy-rc.d'} prometheus start; echo $?"]
    r = subprocess.run(["sh", "-c", script, "no-service", "sh", "-c", *probe], capture_output=True, text=True)
    assert r.stdout.strip() == "101"  # "action forbidden": invoke-rc.d does not start the service
    assert not (tmp_path / "policy-rc.d").exists()  # removed again
    (tmp_path / "policy-rc.d").write_text("#!/bin/sh\nexit 0\n")  # a machine's own policy is left alone
    r = subprocess.run(["sh", "-c", script, "no-service", "true"])
    assert r.returncode == 0 and (tmp_path / "policy-rc.d").read_text() == "#!/bin/sh\nexit 0\n"
    assert bs.command(bs.Step("apt-install", "chromium")) == ["env", "DEBIAN_FRONTEND=noninteractive",
                                                              *bs.APT_INSTALL, "chromium"]  # others: plain


def test_postgresql_is_installed_for_the_tests_and_its_cluster_left_stopped(tmp_path):
    """The pool's tests start PostgreSQL in a directory of their own (tools/postgres_server.py): Debian's
    package makes a cluster 'main' on port 5432, which must not start, nor be left running where the
    machine's own policy-rc.d let it start."""
    p = plan(dataclasses.replace(EVERYTHING, postgresql=False))
    assert apt_packages(p) == ["postgresql"]
    assert apt_packages(plan(dataclasses.replace(EVERYTHING, postgresql=False), "demo")) == []
    argv = bs.command(p.steps[-1])
    assert argv[-5:] == [*bs.APT_INSTALL, "postgresql"]
    assert argv[argv.index("-c") + 1] == bs.NO_START  # the service is kept from starting as prometheus's
    # what runs after the install, with stand-ins for postgresql-common's programs
    for name, script in {"pg_lsclusters": 'printf "%s\\n" "15 main 5432 online postgres /var/lib/x /var/log/x" '
                                          '"16 other 5433 down postgres /var/lib/y /var/log/y"',
                         "pg_ctlcluster": f'echo "$@" >> {tmp_path / "stopped"}'}.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / name).chmod(0o755)
    after = argv[argv.index("after-install") - 1]
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    r = subprocess.run(["sh", "-c", after, "after-install", "true"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "stopped").read_text() == "15 main stop\n"  # the online one only
    r = subprocess.run(["sh", "-c", after, "after-install", "false"], env=env)  # a failed install stops nothing more
    assert r.returncode != 0 and (tmp_path / "stopped").read_text() == "15 main stop\n"


def test_goals_need_different_pieces():
    bare = dataclasses.replace(EVERYTHING, chromium=False, proxy=False, cc=False)
    assert "chromium" not in apt_packages(plan(bare, "demo"))
    assert "chromium" in apt_packages(plan(bare, "test"))
    gpu = plan(bare, "gpu")  # the device machine: compiler and venv only, no Node.js, no browser
    assert apt_packages(gpu) == ["gcc"] and "proxy" not in [s.kind for s in gpu.steps]


class FakeMachine:
    """A machine whose facts change as steps run: what `bootstrap()` sees between steps."""

    def __init__(self, facts, nodejs_ships_npm):
        self.facts, self.ran, self.ships_npm = facts, [], nodejs_ships_npm

    def probe(self, venv):
        return self.facts

    def execute(self, step, facts, venv):
        self.ran.append((step.kind, step.arg))
        change = {"gcc": {"cc": True}, "libc6-dev": {"libc_headers": True}, "chromium": {"chromium": True},
                  "prometheus": {"prometheus": True}, "postgresql": {"postgresql": True},
                  "python3-venv": {"venv_module": True}, "npm": {"npm": True}}.get(step.arg, {})
        if step.arg == "nodejs":
            change = dict(node=True, node_package="nodejs", npm=self.ships_npm,
                          node_provides=("npm",) if self.ships_npm else ())
        if step.kind == "venv":
            change = {"venv": True}
        if step.kind == "proxy":
            change = {"proxy": True}
        self.facts = dataclasses.replace(self.facts, **change)
        return 0


@pytest.mark.parametrize("ships_npm", [False, True], ids=["debian-nodejs", "nodesource-nodejs"])
def test_bootstrap_decides_again_after_each_step(ships_npm, capsys):
    m = FakeMachine(FRESH_DEBIAN, nodejs_ships_npm=ships_npm)
    assert bs.bootstrap(bs.NEEDS["test"], VENV, probe=m.probe, execute=m.execute) == 0
    installed = [arg for kind, arg in m.ran if kind == "apt-install"]
    assert installed == ["gcc", "libc6-dev", "python3-venv", "chromium", "prometheus", "postgresql", "nodejs"] + (
        [] if ships_npm else ["npm"])
    assert [k for k, _ in m.ran].count("apt-update") == 1
    assert m.ran[-2:] == [("venv", VENV), ("proxy", VENV)]


def test_bootstrap_stops_when_a_step_does_not_give_what_it_should(capsys):
    class Stubborn(FakeMachine):
        def execute(self, step, facts, venv):
            self.ran.append((step.kind, step.arg))
            return 0  # claims success, changes nothing

    m = Stubborn(dataclasses.replace(EVERYTHING, chromium=False), False)
    assert bs.bootstrap(bs.NEEDS["test"], VENV, probe=m.probe, execute=m.execute) == 1
    assert "chromium is still missing" in capsys.readouterr().err


def test_dry_run_with_simulated_facts_prints_the_plan():
    r = subprocess.run([sys.executable, "tools/bootstrap.py", "--for", "test", "--dry-run", "--venv", VENV,
                        "--facts", '{"chromium": false, "node_provides": ["npm"]}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "apt-get install -y --no-install-recommends chromium" in r.stdout
    assert not re.search(r"apt-get install.* npm\b", r.stdout)


# ------------------------------------------------------------------------------- Makefile


def make_n(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL")}
    r = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("goal", ["test", "demo", "validate-gpu"])
def test_make_dry_run_has_no_combined_apt_line_and_runs_the_bootstrap(goal, tmp_path):
    out = make_n(goal, f"VENV={tmp_path / 'venv'}")
    pieces = r"\b(gcc|chromium|nodejs|npm)\b"
    for line in out.splitlines():
        if "apt-get" in line and "install" in line:
            assert len(re.findall(pieces, line)) <= 1, line
    assert "gcc chromium nodejs npm" not in out
    needs = {"test": "test", "demo": "demo", "validate-gpu": "gpu"}[goal]
    assert f"tools/bootstrap.py --for {needs} --venv {tmp_path / 'venv'}" in out
    assert f"{tmp_path / 'venv'}/bin/python -m pip install" in out  # into the venv, not the system python


def test_make_demo_passes_args_to_gpulab_up(tmp_path):
    out = make_n("demo", "ARGS=--port 8001 --state-dir /tmp/lab", f"VENV={tmp_path / 'venv'}")
    assert f"{tmp_path / 'venv'}/bin/gpulab up --port 8001 --state-dir /tmp/lab" in out.splitlines()


def test_make_uses_the_active_virtual_environment(tmp_path):
    env = dict(os.environ, VIRTUAL_ENV=str(tmp_path / "active"))
    env.pop("MAKEFLAGS", None)
    out = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=env).stdout
    assert f"--venv {tmp_path / 'active'}" in out
    assert f"{tmp_path / 'active'}/bin/python -m pytest" in out


def test_make_with_a_wheelhouse_installs_without_an_index(tmp_path):
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "traitlets-5.14.3-py3-none-any.whl").write_bytes(b"")
    out = make_n("validate-gpu", f"WHEELHOUSE={tmp_path / 'whl'}", f"VENV={tmp_path / 'venv'}")
    line = next(x for x in out.splitlines() if "pip install" in x)
    assert "--no-index --no-deps --no-build-isolation -e ." in line
    assert str(tmp_path / "whl" / "traitlets-5.14.3-py3-none-any.whl") in line


# ------------------------------------------------------------------------------- make validate-gpu


@pytest.mark.skipif(gpu_present(), reason="checks the refusal on a machine without a GPU")
def test_validate_gpu_refuses_without_a_gpu_before_installing_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL")}
    r = subprocess.run(["make", "validate-gpu", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert "no NVIDIA GPU visible" in r.stderr
    assert not (tmp_path / "venv").exists()  # refused before the set-up


def test_gpu_visible():
    nodes = {"/dev/nvidiactl": False, "/dev/nvidia0": False}
    assert not vg.gpu_visible(nodes, None)
    assert vg.gpu_visible({**nodes, "/dev/nvidia0": True}, None)
    assert not vg.gpu_visible({**nodes, "/dev/nvidia0": True}, "")  # nvidia-smi ran and lists none
    assert vg.gpu_visible(nodes, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-3a1f...)\n")


PYTEST_OUT = """\
..F.
=================================== short test summary info ===================================
FAILED tests/test_gpu.py::test_numba_cuda_kernel - AssertionError: linker entry point missing
SKIPPED [1] tests/test_gpu.py:90: needs two GPUs
2 passed, 1 failed, 1 skipped, 212 deselected, 1 warning in 41.27s
"""

BENCH_OUT = """\
gpulab remote driver vs raw Python sockets on loopback (full run, 71 s)
medians of alternating shim/raw pairs: 31 x 2,000 null calls (pinned to one CPU), 21 copies, 9 x 200,000 launches
transport  metric                          measured     baseline     ratio  target        result
---------  ------------------------------  -----------  -----------  -----  ------------  ------
unix       null call (cuDriverGetVersion)  13.4 us      9.9 us       1.36   ratio <= 2.0  PASS
unix       64 MiB cuMemcpyHtoD             6.27 GB/s    6.71 GB/s    0.93   ratio >= 0.8  PASS
tcp        pipelined no-op launches        418,561 /s   202,809 /s   2.07   >= 50,000 /s  PASS
"""


def fake_report(pytest_out=PYTEST_OUT, pytest_rc=1, bench_out=BENCH_OUT):
    return vg.Report(
        date="2026-11-22",
        machine={"gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory": "81559 MiB", "compute": "9.0",
                           "driver": "580.159.04"}], "cuda": "13.0"},
        versions={"cuda-bindings": "13.0.3", "cuda-core": "0.4.1", "torch": "2.11.0", "cuda-python": None},
        python="3.12.3", system="Linux 6.18.44", cpus=16, commit="0a7fae6",
        pytest=vg.Run("pytest -m gpu", ["python", "-m", "pytest", "-m", "gpu"], pytest_rc, 41.3, pytest_out),
        benches=[vg.Run("remote driver", ["/x/bin/python", str(vg.ROOT / "benchmarks" / "remote_driver.py"), "--backend", "cuda"],
                        0, 71.2, bench_out, "Worker backend: cuda (the real GPU).")])


def test_pytest_gpu_leaves_out_what_this_machine_cannot_collect(monkeypatch):
    """The device machine carries neither JupyterHub nor Jupyter's server packages: a collection error
    there would stop `pytest -m gpu` before any GPU test ran."""
    import importlib.util

    real = importlib.util.find_spec
    cmd, note = vg.pytest_command()
    assert "--ignore=tests/jupyter" not in cmd and "tests/jupyter" not in note  # all installed here
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("jupyterhub", "pytest_jupyter") else real(name, *a))
    cmd, note = vg.pytest_command()
    assert "--ignore=tests/hub" in cmd and "--ignore=tests/jupyter" in cmd
    assert "tests/jupyter/ not collected: pytest_jupyter not installed here." in note


def test_pytest_summary_is_parsed():
    assert vg.pytest_counts(PYTEST_OUT) == {"passed": 2, "failed": 1, "skipped": 1, "deselected": 212,
                                            "warnings": 1}
    assert vg.pytest_counts("====== 3 passed, 9 errors in 1.00s ======") == {"passed": 3, "error": 9}
    assert vg.pytest_counts("no tests ran in 0.01s") == {}


def test_report_is_markdown_for_docs_validation():
    text = vg.format_report(fake_report())
    lines = text.splitlines()
    assert lines[0] == "## 2026-11-22 — GPU validation (`make validate-gpu`)"
    assert ("Machine: 1 × NVIDIA H100 80GB HBM3 (81559 MiB, compute capability 9.0); driver 580.159.04 "
            "(CUDA 13.0); 16 CPUs; Linux 6.18.44; Python 3.12.3. Commit 0a7fae6.") in lines
    assert "Versions: cuda-bindings 13.0.3, cuda-core 0.4.1, torch 2.11.0. Not installed: cuda-python." in lines
    assert ("### `pytest -m gpu`: NOT PASSED — 2 passed, 1 failed, 1 skipped, 212 deselected, 1 warnings "
            "(41 s, exit 1)") in lines
    i = lines.index("| outcome | count |")
    assert lines[i + 1:i + 4] == ["|---|---|", "| passed | 2 |", "| failed | 1 |"]
    assert ("- `FAILED tests/test_gpu.py::test_numba_cuda_kernel - AssertionError: linker entry point missing`"
            in lines)
    assert "### `python benchmarks/remote_driver.py --backend cuda` (71 s, ok)" in lines
    assert "Worker backend: cuda (the real GPU)." in lines
    i = lines.index("| transport | metric | measured | baseline | ratio | target | result |")
    assert lines[i + 1] == "|---|---|---|---|---|---|---|"
    assert lines[i + 2] == "| unix | null call (cuDriverGetVersion) | 13.4 us | 9.9 us | 1.36 | ratio <= 2.0 | PASS |"
    assert lines[i + 4] == "| tcp | pipelined no-op launches | 418,561 /s | 202,809 /s | 2.07 | >= 50,000 /s | PASS |"
    assert len([x for x in lines if x.startswith("| unix") or x.startswith("| tcp")]) == 3


def test_each_part_alone_reports_only_itself():
    """`--part benchmarks` has no pytest run (its section is left out); `--part tests` no benchmarks; the
    heading names the part, so that two reports pasted one after the other say which is which."""
    rep = fake_report()
    rep.pytest, rep.part = None, "benchmarks"
    text = vg.format_report(rep)
    assert text.splitlines()[0] == "## 2026-11-22 — GPU validation (`make validate-gpu PART=benchmarks`)"
    assert "pytest -m gpu" not in text and "| outcome | count |" not in text
    assert "### `python benchmarks/remote_driver.py --backend cuda` (71 s, ok)" in text
    rep = fake_report()
    rep.benches, rep.part = [], "tests"
    text = vg.format_report(rep)
    assert text.splitlines()[0] == "## 2026-11-22 — GPU validation (`make validate-gpu PART=tests`)"
    assert "### `pytest -m gpu`: NOT PASSED" in text and "remote_driver" not in text
    with pytest.raises(SystemExit):
        vg.main(["--part", "everything"])  # argparse: not one of all, tests, benchmarks


def test_make_passes_the_part_on(tmp_path):
    out = make_n("validate-gpu", "PART=tests", f"VENV={tmp_path / 'venv'}")
    assert any(line.rstrip().endswith("benchmarks/validate_gpu.py --part tests") for line in out.splitlines()), out


def test_all_skipped_is_not_a_pass_and_a_missing_table_shows_the_output():
    rep = fake_report(pytest_out="sss\n3 skipped, 200 deselected in 0.50s\n", pytest_rc=0,
                      bench_out="Traceback (most recent call last):\nRuntimeError: worker did not start\n")
    assert not vg.pytest_passed(rep.pytest)
    text = vg.format_report(rep)
    assert "### `pytest -m gpu`: NOT PASSED — 3 skipped, 200 deselected (41 s, ok)" in text
    assert "No figures: the benchmark printed no table." in text
    assert "RuntimeError: worker did not start" in text
    rep.pytest.output, rep.pytest.rc = "...\n3 passed, 200 deselected in 9.00s\n", 0
    assert vg.pytest_passed(rep.pytest)
    assert "### `pytest -m gpu`: PASS — 3 passed, 200 deselected (41 s, ok)" in vg.format_report(rep)
