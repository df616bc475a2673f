"""Helpers: real worker processes and client programs running through the built shim."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = str(ROOT / "tests" / "emulated_kernels.py")
PTX_FILE = ROOT / "tests" / "data" / "kernels.ptx"


def load_script(name: str, path: str):
    """A script of the repository (`tools/bootstrap.py`, a benchmark) imported as module `name`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def spool_files(path: Path) -> list[str]:
    """Files under a worker's spool directory, relative to it, the worker's lock file aside (the directories of
    vGPUs may stay after their files went). The worker removes files while this looks: os.walk passes over a
    directory that went where rglob would raise, and a caller waiting for an empty spool asks again."""
    return sorted(str((Path(top) / name).relative_to(path)) for top, _dirs, names in os.walk(path)
                  for name in names if name != ".lock")


def gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


class Worker:
    """A `gpulab worker` process; its log is kept for assertions."""

    def __init__(self, tmp: Path, token="t0ken", backend="emulated", tcp=False, extra=(), env=None, unix_socket=None):
        self.token = token
        self.sock = Path(unix_socket) if unix_socket else tmp / f"worker-{time.monotonic_ns()}.sock"
        self.log_path = tmp / f"worker-{time.monotonic_ns()}.log"
        self.admin = f"admin-{time.monotonic_ns()}"  # the control API's admin token
        cmd = [sys.executable, "-m", "gpu_worker.daemon", "--backend", backend,
               "--unix-socket", str(self.sock), "--emulated-kernels", KERNELS,
               f"--GPUWorker.admin_token={self.admin}", *extra]
        env = dict(os.environ if env is None else env)
        env.setdefault("GPULAB_STATE_DIR", str(tmp / "state"))  # its control URL and admin token go there
        if token is not None:
            cmd += ["--token", token]
        if tcp:
            cmd += ["--tcp", "127.0.0.1:0"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
                                     start_new_session=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"worker did not start: {line!r} {self.log_path.read_text()}")
        self.addresses = line.split("listening on ")[1].split(" backend=")[0].split()
        self.unix = next(a for a in self.addresses if a.startswith("unix://"))
        self.tcp = next((a for a in self.addresses if a.startswith("tcp://")), None)
        line = self.proc.stdout.readline()
        self.control = line.split("control API at ")[1].strip() if "control API at" in line else None

    def api(self, path: str, token=None, method="GET", body=None, timeout=10):
        """A control API call (docs/vgpu.md) as admin, or with ``token``: (status, JSON). An offload may
        take up to the control API's 30 s wait: such calls pass a longer ``timeout``."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.control + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {token or self.admin}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def vgpus(self) -> list[dict]:
        status, body = self.api("/api/vgpus")
        assert status == 200, body
        return body["vgpus"]

    def env(self, address=None, token=None):
        from gpu_worker.client import shim_env

        return shim_env(address or self.unix, self.token if token is None else token)

    def run(self, code: str, address=None, token=None, timeout=60, check=True, env_extra=None):
        """Run a Python client through the shim; it prints one JSON document."""
        env = self.env(address, token)
        env.update(env_extra or {})
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
        if check and p.returncode != 0:
            raise AssertionError(f"client failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        p.result = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else None
        return p

    def start(self, code: str, token=None) -> subprocess.Popen:
        """A Python client through the shim driven line by line: text pipes for its stdin, stdout, stderr."""
        return subprocess.Popen([sys.executable, "-c", code], env=self.env(token=token), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# Shared prelude of client programs: the driver API with errors as names.
PRELUDE = """
import json, sys
import numpy as np
from cuda.bindings import driver as d

def ok(res):
    err = res[0]
    if err != d.CUresult.CUDA_SUCCESS:
        raise SystemExit(f"CUDA call failed: {err.name}")
    return res[1] if len(res) == 2 else res[1:]

def name(res):
    return res[0].name

def setup():
    ok(d.cuInit(0))
    dev = ok(d.cuDeviceGet(0))
    ctx = ok(d.cuDevicePrimaryCtxRetain(dev))
    ok(d.cuCtxSetCurrent(ctx))
    return dev, ctx

def done(**kw):
    print(json.dumps(kw))
"""


# A client that lists the devices its vGPU shows: count, uuid, memory and name of each.
SEE_DEVICES = PRELUDE + """
import uuid
ok(d.cuInit(0))
n = ok(d.cuDeviceGetCount())
devs = []
for i in range(n):
    dev = ok(d.cuDeviceGet(i))
    u = ok(d.cuDeviceGetUuid(dev))
    devs.append({"uuid": "GPU-" + str(uuid.UUID(bytes=bytes(u.bytes))), "memory": ok(d.cuDeviceTotalMem(dev)),
                 "name": ok(d.cuDeviceGetName(64, dev)).split(b"\\0")[0].decode()})
done(count=n, devices=devs, beyond=name(d.cuDeviceGet(n)))
"""


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rss(pid: int) -> int:
    """Resident memory of `pid` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


# A kernel whose host implementation (tests/emulated_kernels.py) sleeps its argument in milliseconds:
# a long call on the emulated device.
SLEEP_PTX = r"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry sleep_ms(.param .u32 sleep_ms_param_0)
{
    ret;
}
"""


class LineProgram:
    """A client program driven a line at a time on stdin, answering each with one JSON line; its first
    line (after start-up) is its own."""

    def __init__(self, worker: Worker, code: str, args=(), env_extra=None):
        env = {**worker.env(), **(env_extra or {})}
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.first = self.said()

    def said(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the program stopped: {self.proc.stderr.read()}")
        return json.loads(line)

    def tell(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def __call__(self, cmd: str) -> dict:
        self.tell(cmd)
        return self.said()

    def close(self):
        self.proc.kill()
        self.proc.wait()


def connect(worker: Worker) -> socket.socket:
    """A raw connection to the worker's Unix socket, retried while its listen queue is full."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        try:
            s.connect(worker.unix[len("unix://"):])
            return s
        except BlockingIOError:  # the listen backlog is full for a moment: the daemon is accepting
            s.close()
            assert time.monotonic() < deadline
            time.sleep(0.01)


def hello(worker: Worker, token=None) -> tuple[socket.socket, int, str]:
    """A raw session: the socket, the HELLO's CUresult and its message."""
    from rawclient import say_hello

    s = connect(worker)
    return (s, *say_hello(s, worker.token if token is None else token))


# PRELUDE plus launch_sleep(ms): client programs that need the worker busy in one long call.
SLEEP_PRELUDE = PRELUDE + f"""
def launch_sleep(ms):
    mod = ok(d.cuModuleLoadData({SLEEP_PTX!r}.encode() + b"\\0"))
    fn = ok(d.cuModuleGetFunction(mod, b"sleep_ms"))
    arg = np.array([ms], np.uint32)
    ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, np.array([arg.ctypes.data], np.uint64).ctypes.data, 0))
"""


def metric_samples(text: str) -> dict:
    """{(sample name, ((label, value), ...)): value} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}
