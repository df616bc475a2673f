"""Whose Unix account each lab user's server runs under in `gpulab up`.

A server that runs as the hub's own user can read the lab's secrets (the state directory) and,
through /proc, every other server's `GPULAB_TOKEN`.  So, run as root, `gpulab up` makes one Unix
user per lab user (a prefix plus the hub name, home under /home, no login shell) and starts each
server as that user.  It can only when the servers' Python, gpulab and its shim are usable by
those users: a virtual environment whose interpreter lives under a mode-700 /root is not.  Where
it cannot, every server shares one account and the banner says why; that mode is for trying only.
"""
from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys

from traitlets import Unicode

from hub_spawner.spawner import GPULocalProcessSpawner

PROBE_UID = 65534  # "nobody": any account that is not the hub's and in none of its groups
# What a server needs from this installation: the interpreter, the single-user server, the
# server extension and the shim library its kernels load.
PROBE = ("import importlib.util, jupyterhub, server_extension, gpu_worker.shim as s\n"
         "assert importlib.util.find_spec('jupyterhub.singleuser')\n"
         "open(s.shim_dir() / 'libcuda.so.1', 'rb').close()\n")
SBIN = os.pathsep.join(["/usr/sbin", "/sbin"])


def closed_to_others(path: str) -> str:
    """The first directory on the way to `path` that other users cannot enter, or the file itself
    when they cannot read and run it, as "<path> (mode 700)"; "" when nothing is in the way."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        here = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(here).st_mode
        except OSError:
            return ""
        needed = stat.S_IXOTH | (stat.S_IROTH if here == path else 0)
        if mode & needed != needed:
            return f"{here} (mode {stat.S_IMODE(mode):o})"
    return ""


def python_usable_by_others(python: str) -> str:
    """"" when another user can run `python` with gpulab and its shim, else what went wrong.

    Asked for real, as PROBE_UID in a child: permission bits alone miss ACLs, mounts and the
    paths a virtual environment pulls in."""
    try:
        probe = subprocess.run([python, "-c", PROBE], user=PROBE_UID, group=PROBE_UID, extra_groups=[],
                               cwd="/", env={"PATH": os.environ.get("PATH", "")}, capture_output=True,
                               text=True, timeout=60)
    except OSError as exc:
        return f"another user cannot run {python} ({exc.strerror or exc})"
    except subprocess.SubprocessError as exc:
        return f"another user cannot run {python} ({exc})"
    if probe.returncode == 0:
        return ""
    last = (probe.stderr.strip().splitlines() or ["exit status %d" % probe.returncode])[-1]
    return f"another user cannot use {python} with gpulab ({last})"


def shared_account_reason(requested: str, euid: int, python: str, check=python_usable_by_others) -> str:
    """Why every server must share the hub's account ("" when each lab user can have one).

    `requested` is GPULabUp.user_accounts: "shared" says so, "separate" and "auto" ask for
    accounts when they can be had (`gpulab up` refuses to start when "separate" cannot)."""
    if requested == "shared":
        return "--user-accounts=shared was given"
    if euid != 0:
        name = pwd.getpwuid(euid).pw_name if _known_uid(euid) else str(euid)
        return (f"gpulab up runs as {name}, not root, so it cannot start servers as other Unix users "
                "(run it as root for one account per user)")
    if not useradd_path():
        return "useradd is missing, so no Unix users can be made (install the passwd package)"
    problem = check(python)
    if problem:
        blocked = closed_to_others(python)
        where = f": {blocked} is closed to other users" if blocked else ""
        return (f"{problem}{where}. To fix: install gpulab in a virtual environment that all users can read and "
                "run, outside /root and any other private directory, made from a Python outside them too "
                "(e.g. `/usr/bin/python3 -m venv /opt/gpulab`, install gpulab into it), and start "
                "`/opt/gpulab/bin/gpulab up`")
    return ""


def useradd_path() -> str | None:
    """useradd, on PATH or in the sbin directories a non-login root shell may lack."""
    return shutil.which("useradd", path=os.pathsep.join([os.environ.get("PATH", ""), SBIN]))


def _known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def ensure_unix_users(names: list[str], prefix: str) -> str:
    """Make the Unix user `prefix + name` for each lab user that has none yet (home under useradd's
    base directory, normally /home, mode 0700 whatever the distribution's default; no login shell:
    the hub starts the servers). An existing user of that name is used as it is. Returns what
    failed ("" when all exist)."""
    useradd = useradd_path()
    nologin = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)), "/bin/false")
    for name in names:
        unix = prefix + name
        try:
            pwd.getpwnam(unix)
            continue
        except KeyError:
            pass
        made = subprocess.run([useradd, "--create-home", "--user-group", "--shell", nologin,
                               "--comment", f"gpulab lab user {name}", unix], capture_output=True, text=True)
        if made.returncode:
            return f"useradd {unix} failed: {made.stderr.strip() or made.returncode}"
        os.chmod(pwd.getpwnam(unix).pw_dir, 0o700)
    return ""


class GPULabUserSpawner(GPULocalProcessSpawner):
    """GPULocalProcessSpawner whose Unix user is `unix_user_prefix` + the hub name, so lab users
    never take over system accounts that happen to share their names ("admin")."""

    unix_user_prefix = Unicode("gpulab-", help="Prefix of the Unix user each server runs as.").tag(config=True)

    @property
    def unix_user(self) -> str:
        return self.unix_user_prefix + self.user.name

    def make_preexec_fn(self, name):
        return super().make_preexec_fn(self.unix_user)

    def user_env(self, env):
        """The account has no login shell (nobody logs in to it); JupyterLab's terminals need one."""
        env.update(USER=self.unix_user, HOME=pwd.getpwnam(self.unix_user).pw_dir,
                   SHELL=shutil.which("bash") or "/bin/sh")
        return env


if __name__ == "__main__":  # `python -m hub_spawner.launcher.accounts`: what `gpulab up` would decide here
    print(shared_account_reason("auto", os.geteuid(), sys.executable) or "one Unix account per lab user")
