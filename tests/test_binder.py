"""Binder's steps, built as repo2docker would: binder/postBuild in a fresh virtual environment (its bin
first on PATH, as repo2docker's Python is) on a copy of the checkout, then, in that environment, the
server extension enabled, the "Python 3 (vGPU)" kernelspec there, the front end installed, a CUDA
program under binder/start seeing the emulated vGPU's quota, and the tour notebook run end to end.

pip and npm may use their caches; postBuild takes a minute or two on a small machine (about 75 s on
2 cores here, front end build included), so the environment is built once for the module's tests
(the time of each step is printed: run with -s)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from workertools import ROOT

QUOTA = 1 << 30
POSTBUILD_LIMIT = 900  # seconds: a clean install from pip's cache takes far less; a hang fails the test

ALLOCATE = """
import json
import numpy as np
from cuda.bindings import driver as d

def ok(res):
    assert res[0] == d.CUresult.CUDA_SUCCESS, res[0].name
    return res[1] if len(res) == 2 else res[1:]

ok(d.cuInit(0))
dev = ok(d.cuDeviceGet(0))
ok(d.cuCtxSetCurrent(ok(d.cuDevicePrimaryCtxRetain(dev))))
data = np.arange(1 << 20, dtype=np.uint32)
ptr = ok(d.cuMemAlloc(data.nbytes))
ok(d.cuMemcpyHtoD(ptr, data, data.nbytes))
back = np.zeros_like(data)
ok(d.cuMemcpyDtoH(back, ptr, data.nbytes))
free, total = ok(d.cuMemGetInfo())
print(json.dumps({"total": total, "free": free, "same": bool((back == data).all()),
                  "name": ok(d.cuDeviceGetName(128, dev)).split(b"\\0")[0].decode()}))
"""


def checkout_copy(dest: Path) -> None:
    """The files a clone would have: tracked and new, not ignored (so no built front end, no node_modules:
    postBuild builds the front end as on Binder)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("binder")
    repo, venv = tmp / "repo", tmp / "venv"
    checkout_copy(repo)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPULAB_", "JUPYTER", "PYTHON")) and k not in ("LD_LIBRARY_PATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(venv), HOME=str(tmp / "home"),
               JUPYTER_CONFIG_DIR=str(tmp / "home" / ".jupyter"), GPULAB_STATE_DIR=str(tmp / "state"))
    (tmp / "home").mkdir()
    started = time.monotonic()
    p = subprocess.run(["bash", str(repo / "binder" / "postBuild")], cwd=tmp / "home", env=env, capture_output=True,
                       text=True, timeout=POSTBUILD_LIMIT)
    took = time.monotonic() - started
    print(f"\nbinder/postBuild in a fresh venv: {took:.0f} s")
    assert p.returncode == 0, f"postBuild failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    yield repo, venv, env, tmp
    stop_worker(tmp)


def stop_worker(tmp: Path) -> None:
    """End the worker binder/start left running (its pid file says which) and wait until it is gone."""
    pid_file = tmp / "state" / "worker.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and running(pid):
        time.sleep(0.05)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def run(env, *cmd, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_binder_builds_clean_and_serves_the_emulated_vgpu(binder_env):
    repo, venv, env, tmp = binder_env
    home = tmp / "home"
    py = str(venv / "bin" / "python")
    where = run(env, py, "-c", "import gpulab, server_extension; print(gpulab.__file__)", cwd=home).stdout
    assert where.startswith(str(venv)), where  # installed, not the source tree

    ext = run(env, "jupyter", "server", "extension", "list", cwd=home)
    listing = re.sub(r"\x1b\[[0-9;]*m", "", ext.stdout + ext.stderr)  # its colours
    assert re.search(r"server_extension enabled\s+- Validating server_extension...\s+server_extension\s+OK",
                     listing), listing

    specs = json.loads(run(env, "jupyter", "kernelspec", "list", "--json", cwd=home).stdout)["kernelspecs"]
    spec = specs["python3-vgpu"]
    assert spec["resource_dir"].startswith(str(venv)) and spec["spec"]["display_name"] == "Python 3 (vGPU)"
    assert spec["spec"]["metadata"]["kernel_provisioner"]["provisioner_name"] == "gpulab-vgpu"

    started = time.monotonic()
    p = run(env, str(repo / "binder" / "start"), py, "-c", ALLOCATE, cwd=home)
    assert p.returncode == 0, p.stdout + p.stderr
    facts = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"binder/start + a CUDA program: {time.monotonic() - started:.1f} s")
    assert facts["total"] == QUOTA and facts["same"]
    assert facts["free"] == QUOTA - (4 << 20)
    assert "emulated" in facts["name"] and "emulated vGPU of 1G (test double, no GPU)" in p.stderr
    stop_worker(tmp)  # the next binder/start's worker takes the same name and spool directory

    started = time.monotonic()
    tour = tmp / "tour.ipynb"
    shutil.copy(repo / "binder" / "gpulab-tour.ipynb", tour)
    p = run(env, str(repo / "binder" / "start"), "jupyter", "nbconvert", "--to", "notebook", "--execute",
            "--inplace", "--ExecutePreprocessor.timeout=120", str(tour), cwd=home, timeout=300)
    stop_worker(tmp)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    print(f"the tour notebook under binder/start: {time.monotonic() - started:.1f} s")
    out = "\n".join(o.get("text", "") for c in nbformat.read(tour, 4).cells if c.cell_type == "code"
                    for o in c.outputs)
    assert "bytes intact after the offload: True" in out, out
    assert "is warm: 0 bytes hot, 256.0 MiB warm" in out and "is cold: 0 bytes hot, 0 bytes warm, 256.0 MiB cold" in out
    assert "cuMemAlloc" in out and "VRAM:     256.0 MiB / 1.0 GiB" in out, out


def test_binder_start_serves_jupyterlab_with_the_vgpu(binder_env):
    """What Binder runs: `binder/start jupyter lab ...`; the server extension sees the emulated vGPU."""
    _, _, env, tmp = binder_env
    repo = binder_env[0]
    log = open(tmp / "lab.log", "w+")
    lab = subprocess.Popen([str(repo / "binder" / "start"), "jupyter", "lab", "--no-browser", "--ServerApp.port=0",
                            "--IdentityProvider.token=binder-test", f"--ServerApp.root_dir={tmp / 'home'}",
                            *(["--allow-root"] if os.geteuid() == 0 else [])],  # Binder's user is not root; CI's may be
                           env=env, cwd=tmp / "home", stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline and lab.poll() is None:
            time.sleep(0.2)
            found = re.search(r"(http://(?:127\.0\.0\.1|localhost):\d+/)lab", (tmp / "lab.log").read_text())
            url = found and found.group(1)
        assert url, (tmp / "lab.log").read_text()
        page = urllib.request.urlopen(urllib.request.Request(url + "lab?token=binder-test"), timeout=30).read()
        assert b"JupyterLab" in page
        req = urllib.request.Request(url + "gpulab/api/vgpus", headers={"Authorization": "token binder-test"})
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert answer["configured"] and answer["emulated"], answer
        (v,) = answer["vgpus"]
        assert v["quota"] == QUOTA
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        lab.wait(30)
        log.close()
        stop_worker(tmp)


def test_binder_installs_the_front_end_from_the_wheel(binder_env):
    """The panel ships prebuilt in the wheel (no Node.js needed at run time): JupyterLab lists it."""
    _, _, env, tmp = binder_env
    lab = run(env, "jupyter", "labextension", "list", cwd=tmp / "home")
    listing = re.sub(r"\x1b\[[0-9;]*m", "", lab.stdout + lab.stderr)
    assert re.search(r"@gpulab/vgpu-panel v\S+ enabled OK", listing), listing
