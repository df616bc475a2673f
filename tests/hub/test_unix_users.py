"""One Unix user per lab user in `gpulab up`: the decision (stubbed checks) and, as root with a Python
other users can run, a real lab whose servers run as their own users and cannot read each other's
GPU token nor the lab's secrets. Unix users made here are `gpulab-t<pid>-*` and are removed."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hub_spawner.launcher.accounts import closed_to_others, shared_account_reason, useradd_path
from hubtools import API_TOKEN, Hub, remove_unix_users
from kernel_client import run_in_kernel

PREFIX = f"gpulab-t{os.getpid()}-"


def test_asked_for_shared_or_not_root_means_shared():
    ok = lambda python: ""  # noqa: E731  a Python every user can run
    assert "--user-accounts=shared" in shared_account_reason("shared", 0, "/usr/bin/python3", ok)
    reason = shared_account_reason("auto", 1234, "/usr/bin/python3", ok)
    assert "not root" in reason and "run it as root" in reason


def test_root_with_a_python_others_can_run_gets_separate_accounts(monkeypatch):
    if not useradd_path():
        pytest.skip("no useradd here")
    asked = []
    assert shared_account_reason("auto", 0, "/opt/gpulab/bin/python", lambda py: asked.append(py) or "") == ""
    assert asked == ["/opt/gpulab/bin/python"]


def test_a_python_under_a_private_directory_is_named_with_the_fix():
    top = Path(tempfile.mkdtemp(prefix="gpulab-test-", dir="/tmp"))
    try:
        top.chmod(0o755)
        (top / "open" / "bin").mkdir(parents=True)
        (top / "private" / "bin").mkdir(parents=True)
        for python in (top / "open" / "bin" / "python", top / "private" / "bin" / "python"):
            python.touch(mode=0o755)
        (top / "private").chmod(0o700)
        assert closed_to_others(str(top / "open" / "bin" / "python")) == ""
        private = str(top / "private" / "bin" / "python")
        assert closed_to_others(private) == f"{top / 'private'} (mode 700)"
        if useradd_path():
            reason = shared_account_reason("auto", 0, private, lambda py: f"another user cannot run {py}")
            assert f"{top / 'private'} (mode 700) is closed to other users" in reason
            assert "virtual environment that all users can read" in reason and "outside /root" in reason
    finally:
        shutil.rmtree(top)


def public_venv() -> Path | None:
    """A virtual environment every user can run, made from the system's Python of this version and
    seeing this environment's packages: the test venv's own interpreter may live under a mode-700
    /root (pyenv). None where there is no such Python."""
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    if not system or closed_to_others(system):
        return None
    # the packages and the checkout (the shim) must be open to other users too: a clone under a
    # private home cannot be shared, whatever interpreter runs it
    if any(closed_to_others(d) for d in [*site.getsitepackages(), str(Path(__file__).resolve().parent)]):
        return None
    venv = Path(tempfile.mkdtemp(prefix="gpulab-venv-", dir="/tmp"))
    venv.chmod(0o755)
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True)
    [lib] = venv.glob("lib/python3*/site-packages")
    (lib / "gpulab-test.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
    return venv


SEPARATE_PROBE = """
import os, glob
print("uid", os.getuid())
try:
    open({secrets!r}).read()
    print("secrets readable")
except PermissionError:
    print("secrets denied")
seen, own = [], 0
for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        continue
    seen += [path for secret in {secrets_values!r} if secret.encode() in text]
    own += {own!r}.encode() in text
print("secrets seen in", len(seen), "places", seen)
print("own token seen", own > 0)
"""


def server_environ(user: str) -> dict:
    """The environment of `user`'s single-user server (read as root)."""
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{entry}/environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if b"jupyterhub.singleuser" in cmd and env.get("JUPYTERHUB_USER") == user:
            return env | {"pid": entry, "uid": str(os.stat(f"/proc/{entry}").st_uid)}
    raise AssertionError(f"no server of {user} found")


@pytest.mark.skipif(os.geteuid() != 0 or not useradd_path(),
                    reason="needs root and useradd")
def test_each_server_runs_as_its_own_user_and_sees_no_secrets(tmp_path):
    venv = public_venv()
    if venv is None:
        pytest.skip(f"no system python{sys.version_info.major}.{sys.version_info.minor} other users can run")
    state = tmp_path / "state"
    hub = None
    try:
        hub = Hub(state, accounts="separate", python=str(venv / "bin" / "python"),
                  extra=["--unix-user-prefix", PREFIX])
        assert f"each user's server runs as its own Unix user ({PREFIX}alice" in hub.log_text()
        assert "SHARED ACCOUNT" not in hub.log_text()
        for user in ("alice", "bob"):
            status, _ = hub.api("POST", f"users/{user}/server", {"profile": "small", "vram": "1g"})
            assert status in (201, 202)
            hub.wait_ready(user)
        alice, bob = server_environ("alice"), server_environ("bob")
        assert int(alice["uid"]) == pwd.getpwnam(PREFIX + "alice").pw_uid
        assert int(bob["uid"]) == pwd.getpwnam(PREFIX + "bob").pw_uid
        assert alice["USER"] == PREFIX + "alice" and alice["HOME"] == pwd.getpwnam(PREFIX + "alice").pw_dir
        assert stat.S_IMODE(os.stat(alice["HOME"]).st_mode) == 0o700
        assert bob["GPULAB_TOKEN"] and alice["GPULAB_TOKEN"] != bob["GPULAB_TOKEN"]

        # what alice's code must not find anywhere in /proc: bob's vGPU token, the lab's secrets, the
        # worker's pool credential (alice's own token is in her own processes, which is fine)
        values = [bob["GPULAB_TOKEN"], bob["JUPYTERHUB_API_TOKEN"],
                  *json.loads((state / "secrets.json").read_text()).values(),
                  *[p.read_text().strip() for p in state.glob("*.credential")]]
        out = run_in_kernel(hub.url, "alice", API_TOKEN, SEPARATE_PROBE.format(
            secrets=str(state / "secrets.json"), secrets_values=values, own=alice["GPULAB_TOKEN"]))
        assert f"uid {alice['uid']}" in out and "secrets denied" in out, out
        assert "secrets seen in 0 places" in out and "own token seen True" in out, out  # the search works
        # the shim and the vGPU work for a server that is not root's
        out = run_in_kernel(hub.url, "alice", API_TOKEN, "from cuda.bindings import driver as d\n"
                            "d.cuInit(0); d.cuCtxSetCurrent(d.cuDevicePrimaryCtxRetain(0)[1])\n"
                            "print(*d.cuMemGetInfo())")
        assert out.startswith("<CUresult.CUDA_SUCCESS") and int(out.split()[-1]) == 1 << 30, out
    finally:
        if hub is not None:
            hub.stop()
        remove_unix_users(PREFIX)
        shutil.rmtree(venv, ignore_errors=True)
    assert not any(p.pw_name.startswith(PREFIX) for p in pwd.getpwall())
