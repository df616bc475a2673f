"""Liveness: a worker that stops answering becomes a CUDA error with a reason within the
client's limit (GPULAB_TIMEOUT), while a legitimately long call (a synchronize waiting on a long
kernel) keeps going, because the executor sends keepalives while a call runs.

Real worker processes on the emulated backend and real cuda.bindings programs through the shim."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

from workertools import PRELUDE, ROOT, SLEEP_PRELUDE, children_of

LIMIT = 3  # seconds: GPULAB_TIMEOUT for these tests (the shim's minimum)
SLACK = 3


def executor_pid(worker) -> int:
    """The executor the worker forked for our one session (its only child)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = children_of(worker.proc.pid)
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("the worker forked no executor")


@contextlib.contextmanager
def executor_stopped(worker, p: subprocess.Popen):
    """Once client `p` prints "ready": its executor stopped (SIGSTOP) and the client told to go on.
    Afterwards the executor is resumed and the client killed, whatever happened."""
    pid = None
    try:
        assert p.stdout.readline().strip() == "ready"
        pid = executor_pid(worker)
        os.kill(pid, signal.SIGSTOP)
        p.stdin.write("go\n")
        p.stdin.flush()
        yield
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)
        p.kill()
        p.wait()


def client(env, code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def listening(path, backlog: int):
    """A Unix socket that listens and never does anything else: a worker that does not answer."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(backlog)
    return str(path), srv


def limited_env(path: str) -> dict:
    """A client's environment for that socket, giving up after LIMIT seconds of silence."""
    from gpu_worker.client import shim_env

    env = shim_env("unix://" + path, "t0ken")
    env["GPULAB_TIMEOUT"] = str(LIMIT)
    return env


def test_a_worker_that_never_answers_the_handshake_fails_cuinit_with_a_reason(tmp_path):
    path, srv = listening(tmp_path / "silent.sock", 4)
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    env = limited_env(path)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", PRELUDE + "done(r=name(d.cuInit(0)))"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    srv.close()
    assert json.loads(p.stdout)["r"] == "CUDA_ERROR_NO_DEVICE", p.stderr
    assert "has not answered for 3 s" in p.stderr and "GPULAB_TIMEOUT" in p.stderr
    assert LIMIT <= took < LIMIT + SLACK + 2  # + the interpreter's start


def test_connecting_to_a_worker_that_never_accepts_times_out(tmp_path):
    """A listen queue that stays full (the worker never accepts): connect gives up within the limit."""
    path, srv = listening(tmp_path / "full.sock", 0)
    queued = []
    for _ in range(64):  # fill the queue
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            break
        queued.append(c)
    env = limited_env(path)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", PRELUDE + "done(r=name(d.cuInit(0)))"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    for c in queued:
        c.close()
    srv.close()
    assert json.loads(p.stdout)["r"] == "CUDA_ERROR_NO_DEVICE", p.stderr
    assert "no connection within 3 s (GPULAB_TIMEOUT)" in p.stderr
    assert LIMIT <= took < LIMIT + SLACK + 2


def test_a_stopped_executor_fails_the_next_call_within_the_limit(worker):
    env = worker.env()
    env["GPULAB_TIMEOUT"] = str(LIMIT)
    p = client(env, PRELUDE + """
import time
setup()
p = ok(d.cuMemAlloc(64))
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
r = name(d.cuCtxSynchronize())
took = time.monotonic() - t0
done(r=r, took=took, after=name(d.cuMemAlloc(64)))
""")
    with executor_stopped(worker, p):
        out, err = p.communicate(timeout=LIMIT + SLACK + 10)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["r"] == "CUDA_ERROR_DEVICE_UNAVAILABLE" and res["after"] == "CUDA_ERROR_DEVICE_UNAVAILABLE"
    assert LIMIT - 0.2 <= res["took"] < LIMIT + SLACK
    assert "has not answered for 3 s" in err and err.count("has not answered") == 1, err


def test_a_long_kernel_is_not_a_hung_worker(worker):
    """A synchronize waiting 14 s on a kernel succeeds under the default 10 s limit: the worker keeps
    the connection alive while the call runs."""
    r = worker.run(SLEEP_PRELUDE + f"""
import time
setup()
t0 = time.monotonic()
launch_sleep(14000)
r = name(d.cuCtxSynchronize())
done(r=r, took=time.monotonic() - t0)
""", env_extra={"GPULAB_TIMEOUT": ""}, timeout=90)
    assert r.result["r"] == "CUDA_SUCCESS", r.stderr
    assert r.result["took"] >= 13.5
    assert "has not answered" not in r.stderr


def test_exit_does_not_wait_for_a_thread_blocked_on_the_worker(worker):
    """A thread waits on a stopped executor (holding the connection); the program still exits at once."""
    env = worker.env()
    env["GPULAB_TIMEOUT"] = "60"
    p = client(env, PRELUDE + """
import threading, time
setup()
print("ready", flush=True)
sys.stdin.readline()
threading.Thread(target=d.cuCtxSynchronize, daemon=True).start()
time.sleep(0.5)
print("exiting", flush=True)
""")
    with executor_stopped(worker, p):
        assert p.stdout.readline().strip() == "exiting"
        t0 = time.monotonic()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - t0
    assert took <= 2, f"exit took {took:.1f} s"


def test_a_big_copy_sent_while_the_worker_runs_a_long_kernel_is_not_a_timeout(worker):
    """The copy's bytes wait in the socket while the worker runs a 7 s kernel; the shim, blocked sending,
    reads the worker's keepalives meanwhile and goes on."""
    r = worker.run(SLEEP_PRELUDE + f"""
import time
setup()
n = 32 << 20
p = ok(d.cuMemAlloc(n))
src = np.random.default_rng(1).integers(0, 255, n, dtype=np.uint8)
t0 = time.monotonic()
launch_sleep(7000)
r = name(d.cuMemcpyHtoD(p, src, n))
back = np.zeros(n, np.uint8)
ok(d.cuMemcpyDtoH(back, p, n))
done(r=r, took=time.monotonic() - t0, same=bool((back == src).all()))
""", env_extra={"GPULAB_TIMEOUT": str(LIMIT)}, timeout=60)
    assert r.result["r"] == "CUDA_SUCCESS" and r.result["same"], r.stderr
    assert r.result["took"] >= 6.5
    assert "has not answered" not in r.stderr


def test_the_executor_sends_keepalives_only_while_a_call_runs_long():
    """In process: a 2.6 s call is preceded on the wire by keepalives, a quick one by none."""
    from gpu_worker.api.protocol import FLAG_REPLY, REP_HEADER, REQ_HEADER
    from gpu_worker.api.wire import REPLY_KEEPALIVE
    from gpu_worker.daemon.executor import Executor, FrameReader
    from gpu_worker.daemon.ledger import Ledger, Slot

    class Session:
        label = "test"
        call_bytes = launches = bytes_in = bytes_out = 0
        ended = ""
        ledger = Ledger(1, None)
        slot = Slot(ledger, ledger.claim())

        def handlers(self):
            return {100: ("slow", "sync", lambda payload: (time.sleep(2.6), b"done")[1]),
                    101: ("quick", "sync", lambda payload: b"ok")}

    ours, theirs = socket.socketpair()
    ex = Executor(FrameReader(theirs), Session(), 1 << 20)
    threading.Thread(target=lambda: _serve_quietly(ex), daemon=True).start()

    def call(op):
        ours.sendall(REQ_HEADER.pack(0, op, FLAG_REPLY))
        keepalives = 0
        while True:
            plen, res, rlen = REP_HEADER.unpack(_recv(ours, REP_HEADER.size))
            if rlen & REPLY_KEEPALIVE:
                assert plen == 0 and res == 0
                keepalives += 1
                continue
            return keepalives, _recv(ours, plen)

    try:
        assert call(101) == (0, b"ok")
        assert call(100) == (1, b"done")  # after 1 s, then every 2 s: one within 2.6 s
        time.sleep(1.5)
        assert call(101) == (0, b"ok")  # idle time is not a call: nothing queued meanwhile
    finally:
        ours.close()


def _serve_quietly(ex):
    try:
        ex.serve()
    except (EOFError, OSError):
        pass


def _recv(sock, n):
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        assert got, "executor closed the socket"
        buf += got
    return buf
