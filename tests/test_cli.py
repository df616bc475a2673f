"""The `gpulab` command line: every subcommand is listed, and every option says what it does.

Run as a user runs it (`python -m gpulab.cli ...`, a process each): the help text is the
documentation of the options, so an option without a description is a bug."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from workertools import ROOT

SUBCOMMANDS = ["up", "worker", "pool", "vgpu", "run", "shim-path", "demo", "kernelspec"]
# Options each subcommand must offer (the spellings scripts, tests and the Makefile use).
EXPECTED = {
    "up": ["--ip", "--port", "--state-dir", "--backend", "--pool-port", "--worker-port", "--emulated-kernels",
           "--heartbeat-timeout", "--api-token", "--config"],
    "worker": ["--tcp", "--unix-socket", "--backend", "--token", "--tokens-file", "--vram-quota",
               "--emulated-memory", "--emulated-kernels", "--pool-url", "--name", "--advertise", "--node",
               "--heartbeat-interval", "--config", "-v", "--verbose"],
    "pool": ["--db-url", "--strategy", "--bind-url", "--prefix", "--heartbeat-timeout",
             "--vram-oversubscription", "--compute-oversubscription", "--admin-users", "--config"],
    "vgpu": [],  # its subcommands' options: tests/test_control_api.py
    "run": ["--worker", "--token"],
    "shim-path": [],
    "demo": ["--backend"],
    "kernelspec": [],  # its subcommands' options: tests/jupyter/test_kernel_provisioner.py
}


def gpulab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpulab.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def options_with_help(text: str) -> dict[str, str]:
    """{option: the first line of its description} from a traitlets help page.

    An option line starts with '-' in column 0; its description is the indented lines below
    it, before the generated 'Default:', 'Choices:' and 'Equivalent to:' lines."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"-{1,2}[A-Za-z]", line):
            continue
        names = [n.split("=")[0] for n in re.split(r",\s*", line.strip())]
        below = lines[i + 1] if i + 1 < len(lines) else ""
        described = below.startswith("    ") and not re.match(r"\s+(Default|Choices|Equivalent to):", below)
        for name in names:
            found[name] = below.strip() if described else ""
    return found


def test_top_level_help_lists_every_subcommand_with_a_description():
    p = gpulab("--help")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    for cmd in SUBCOMMANDS:
        assert cmd in lines, f"`gpulab --help` does not list {cmd}:\n{p.stdout}"
        described = lines[lines.index(cmd) + 1]
        assert described.startswith("    ") and len(described.strip()) > 10, f"{cmd} has no description"


def test_no_subcommand_is_an_error_that_shows_the_subcommands():
    p = gpulab()
    assert p.returncode != 0
    assert all(cmd in p.stdout.splitlines() for cmd in SUBCOMMANDS)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help_describes_every_option(cmd):
    p = gpulab(cmd, "--help")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    first = p.stdout.strip().splitlines()[0]
    assert len(first) > 20, f"`gpulab {cmd} --help` opens without a description: {first!r}"
    options = options_with_help(p.stdout)
    missing = [o for o in EXPECTED[cmd] if o not in options]
    assert not missing, f"`gpulab {cmd} --help` lacks {missing}:\n{p.stdout}"
    undescribed = [o for o, text in options.items() if not text]
    assert not undescribed, f"`gpulab {cmd} --help`: no description for {undescribed}:\n{p.stdout}"


def test_worker_help_all_shows_the_worker_traits():
    p = gpulab("worker", "--help-all")
    assert p.returncode == 0, p.stderr
    for trait in ("--GPUWorker.tcp", "--GPUWorker.tokens", "--GPUWorker.max_frame", "--GPUWorker.pool_token"):
        assert trait in p.stdout


def test_up_help_names_users_admin_dashboard_and_state_dir():
    text = gpulab("up", "--help").stdout
    for fact in ("alice", "bob", "carol", "gpulab-demo", "admin", "secrets.json", "/services/gpulab-pool/",
                 "GPULAB_STATE_DIR", "XDG_STATE_HOME", "~/.local/state/gpulab"):
        assert fact in text, f"`gpulab up --help` does not mention {fact}"


def test_worker_options_and_config_file_reach_the_traits(tmp_path):
    """Flags spelled as the tests, benchmarks and manifests spell them, a repeated list option,
    and a config file that the command line overrides."""
    config = tmp_path / "worker_config.py"
    config.write_text('c.GPUWorker.vram_quota = "1G"\nc.GPUWorker.emulated_memory = "4G"\n')
    p = gpulab("worker", "--backend", "emulated", "--tcp=127.0.0.1:0", "--unix-socket", str(tmp_path / "w.sock"),
               "--emulated-kernels", "a.b", "--emulated-kernels", "c.d", "--emulated-memory", "8G",
               "--heartbeat-interval", "0.5", "--config", str(config), "-v", "--show-config")
    assert p.returncode == 0, p.stderr
    shown = p.stdout
    assert ".emulated_kernels = ['a.b', 'c.d']" in shown
    assert ".emulated_memory = '8G'" in shown and ".vram_quota = '1G'" in shown
    assert ".heartbeat_interval = 0.5" in shown and ".verbose = True" in shown


def test_a_missing_config_file_is_an_error(tmp_path):
    p = gpulab("worker", "--config", str(tmp_path / "nope.py"), "--unix-socket", str(tmp_path / "w.sock"))
    assert p.returncode == 2 and "nope.py" in p.stderr


def test_run_passes_the_command_its_own_options(tmp_path):
    p = gpulab("run", "--worker", "unix:///tmp/x.sock", "--token", "t0",
               "sh", "-c", 'echo "$GPULAB_WORKER $GPULAB_TOKEN"')
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "unix:///tmp/x.sock t0"


def test_shim_path_prints_the_shim_directory():
    p = gpulab("shim-path")
    assert p.returncode == 0 and (Path(p.stdout.strip()) / "libcuda.so.1").exists()


@pytest.mark.parametrize("cmd,options", [("offload", ["--to", "--url", "--json"]), ("restore", ["--url", "--json"]),
                                         ("idle", ["--since", "--url", "--json"])])
def test_vgpu_tier_subcommands_describe_every_option(cmd, options):
    p = gpulab("vgpu", cmd, "--help")
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert f"gpulab vgpu {cmd} ID" in " ".join(p.stdout.split())  # the usage, in the description
    described = options_with_help(p.stdout)
    assert [o for o in options if o not in described] == []
    assert [o for o, text in described.items() if not text] == []
    assert cmd in gpulab("vgpu", "--help").stdout.splitlines()
