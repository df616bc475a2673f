"""What one client can cost a worker: bounded whatever it sends, and nothing outlives the daemon.

Real workers on a Unix socket, raw frames from the test (as a hostile client would send them) or
programs through the shim. Every test is bounded in connections and in time."""
from __future__ import annotations

import os
import signal
import textwrap
import time

from workertools import PRELUDE, PTX_FILE, alive, children_of, connect, hello, rss

from gpu_worker.api import table as api_table
from gpu_worker.api.protocol import FLAG_REPLY, REQ_HEADER
from gpu_worker.backends.ptx import parse_entries, ptx_version

MiB = 1 << 20
PTX = str(PTX_FILE)


def executor_of(worker, before: set) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        new = set(children_of(worker.proc.pid)) - before
        if new:
            return new.pop()
        time.sleep(0.02)
    raise AssertionError("no executor appeared")


def test_idle_connections_cost_no_process_and_end_at_the_deadline(make_worker):
    worker = make_worker(extra=("--GPUWorker.handshake_timeout=2",))
    daemon = worker.proc.pid
    rss_before = rss(daemon)
    started = time.monotonic()
    idle = [connect(worker) for _ in range(200)]  # connected, never a byte sent
    time.sleep(0.5)
    assert children_of(daemon) == []  # no executor for a connection that has not shown a token
    grown = rss(daemon) - rss_before
    assert grown < 16 * MiB, f"the daemon grew by {grown / MiB:.1f} MiB for 200 idle connections"
    # a real client is served meanwhile
    s, res, _ = hello(worker)
    assert res == 0
    s.close()
    for c in idle:  # every idle connection is closed by the deadline (those over the cap at once)
        c.settimeout(max(started + 2 + 3 - time.monotonic(), 0.1))
        try:
            assert c.recv(1) == b""
        except ConnectionResetError:
            pass
        c.close()
    assert time.monotonic() - started < 2 + 3
    while "GPUWorker.handshake_timeout" not in worker.log_text():  # logged just after the closes
        assert time.monotonic() - started < 2 + 5
        time.sleep(0.05)


def test_an_announced_frame_costs_memory_only_as_its_bytes_arrive(worker):
    before = set(children_of(worker.proc.pid))
    s, res, _ = hello(worker)
    assert res == 0
    executor = executor_of(worker, before)
    base = rss(executor)
    op = api_table.opcode(next(f for f in api_table.FORWARDED if f.name == "cuModuleLoadData"))
    s.sendall(REQ_HEADER.pack(256 * MiB, op, FLAG_REPLY) + b"\0" * MiB)  # 256 MiB announced, 1 MiB sent
    time.sleep(0.5)
    grown = rss(executor) - base
    assert grown < 24 * MiB, f"the executor grew by {grown / MiB:.0f} MiB for 1 MiB received"
    s.close()


# Three module loads (the third meets the cap), then the first unloaded: what both module caps need.
LOAD_THREE = f"""
setup()
image = open({PTX!r}, "rb").read() + b"\\0"
mods = [d.cuModuleLoadData(image) for _ in range(3)]
third = name(mods[2])
ok(d.cuModuleUnload(mods[0][1]))
"""


def test_handle_and_module_caps_refuse_with_a_reason(make_worker):
    worker = make_worker(extra=("--GPUWorker.max_handles=8", "--GPUWorker.max_modules=2"))
    p = worker.run(PRELUDE + LOAD_THREE + textwrap.dedent("""
        res = d.cuModuleLoadData(image)  # an unloaded module makes room
        again = name(res)
        ok(d.cuModuleUnload(res[1]))
        for _ in range(10):  # and so do its functions: a load/get/unload loop never reaches the cap
            mod = ok(d.cuModuleLoadData(image))
            ok(d.cuModuleGetFunction(mod, b"vec_add"))
            ok(d.cuModuleUnload(mod))
        streams = [d.cuStreamCreate(0) for _ in range(10)]  # pipelined: refusals latch
        sync = name(d.cuCtxSynchronize())
        done(third=third, again=again, sync=sync)
    """))
    assert p.result == {"third": "CUDA_ERROR_OUT_OF_MEMORY", "again": "CUDA_SUCCESS",
                        "sync": "CUDA_ERROR_OUT_OF_MEMORY"}
    assert "cuModuleLoadData refused: this vGPU already holds 2 loaded modules" in p.stderr
    assert "cuStreamCreate refused: this vGPU already holds 8 handles" in p.stderr


def test_module_image_bytes_are_capped(make_worker):
    size = os.path.getsize(PTX) + 1
    worker = make_worker(extra=(f"--GPUWorker.max_module_bytes={2 * size + 100}B",))
    p = worker.run(PRELUDE + LOAD_THREE + textwrap.dedent("""
        again = name(d.cuModuleLoadData(image))
        done(third=third, again=again)
    """))
    assert p.result == {"third": "CUDA_ERROR_OUT_OF_MEMORY", "again": "CUDA_SUCCESS"}
    assert "cuModuleLoadData refused: this vGPU's loaded modules already take" in p.stderr


def test_sessions_per_token_are_capped(make_worker):
    worker = make_worker(extra=("--GPUWorker.max_sessions_per_token=2",))
    first, r1, _ = hello(worker)
    second, r2, _ = hello(worker)
    third, r3, why = hello(worker)
    assert (r1, r2, r3) == (0, 0, 46)  # CUDA_ERROR_DEVICE_UNAVAILABLE
    assert "already has 2 sessions" in why
    third.close()
    first.close()
    deadline = time.monotonic() + 5
    while True:  # the daemon notices the executor's end within its loop's half second
        s, res, _ = hello(worker)
        s.close()
        if res == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert res == 0
    second.close()


def _best_of(fn, arg, n=3) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - t)
    return best


def test_ptx_parsing_is_linear():
    """Crafted PTX (entries that never close, endless blank lines) costs time in proportion to
    its size; the regexes this replaced took 10 s of CPU for 100 KiB."""
    for unit, fn in ((".entry a(", parse_entries), ("\n", ptx_version), (".entry a(.param .u64 ", parse_entries)):
        small = unit * (10 * 1024 // len(unit))
        big = unit * (100 * 1024 // len(unit))
        t_small, t_big = _best_of(fn, small), _best_of(fn, big)
        # linear: ~10x; quadratic: ~100x. Loose, and a floor for timer noise on tiny figures
        assert t_big < 30 * t_small + 0.02, f"{unit!r}: 10 KiB in {t_small:.4f} s, 100 KiB in {t_big:.4f} s"
        assert t_big < 0.5


def test_wrong_tokens_are_throttled_with_one_log_line(make_worker):
    worker = make_worker(extra=("--GPUWorker.wrong_token_burst=3", "--GPUWorker.wrong_token_window=3"))
    reasons = []
    started = time.monotonic()
    for _ in range(20):
        s, res, why = hello(worker, token="not-the-token")
        s.close()
        assert res == 800  # CUDA_ERROR_NOT_PERMITTED
        reasons.append(why)
    assert time.monotonic() - started < 3
    assert all("not valid" in r for r in reasons[:3])
    assert all("too many wrong session tokens" in r for r in reasons[3:])
    assert worker.log_text().count("wrong session token") == 1
    s, res, _ = hello(worker)  # throttled: even the right token waits for the window's end
    s.close()
    assert res == 800
    time.sleep(max(started + 3.2 - time.monotonic(), 0))
    s, res, _ = hello(worker)
    s.close()
    assert res == 0


def test_executors_die_with_their_daemon(worker):
    before = set(children_of(worker.proc.pid))
    s, res, _ = hello(worker)
    assert res == 0
    executor = executor_of(worker, before)
    os.kill(worker.proc.pid, signal.SIGKILL)  # the daemon only
    worker.proc.wait()
    deadline = time.monotonic() + 1.5
    while alive(executor) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(executor), "the executor outlived its daemon"
    s.settimeout(2)
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass
    s.close()


SLOW_POOL_WORKER = """
import sys, time
from gpu_worker.daemon.worker import GPUWorker

from gpu_worker.client.tokens import token_hash

def slow_pool(h):
    '''Stands in for the pool link's grant look-up: every one is printed; the token 'slow' takes 2 s.'''
    print("look-up", h, flush=True)
    time.sleep(2 if h == token_hash("slow") else 0)
    return None

w = GPUWorker(unix_socket=sys.argv[1], backend="emulated", token="good", wrong_token_burst=3,
              wrong_token_window=60)
w.prepare()
w.listen()
w.registry.set_lookup(slow_pool)
print("ready", flush=True)
w.serve_forever()
"""


def test_a_slow_pool_look_up_delays_no_other_handshake_and_wrong_tokens_stop_reaching_the_pool(tmp_path):
    import subprocess
    import sys
    import threading
    from types import SimpleNamespace

    sock = tmp_path / "w.sock"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_POOL_WORKER, str(sock)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        worker = SimpleNamespace(unix=f"unix://{sock}", token="good")
        slow = {}
        t = threading.Thread(target=lambda: slow.update(res=hello(worker, token="slow")[1]))
        t.start()
        time.sleep(0.3)  # the slow look-up is under way
        started = time.monotonic()
        s, res, _ = hello(worker)
        s.close()
        assert res == 0 and time.monotonic() - started < 1.0, "a slow pool look-up held up another handshake"
        t.join(10)
        assert slow["res"] == 800
        for _ in range(20):  # 'slow' was the first wrong token from this source; two more reach the pool
            s, res, _ = hello(worker, token="bad")
            s.close()
            assert res == 800
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert out.count("look-up") == 3, out


def test_servers_of_other_unix_users_reach_the_unix_socket_and_the_token_decides(make_worker, tmp_path):
    """Each user's server runs as its own Unix user on a GPU node: the worker's socket takes connections from
    all of them (mode 0666), and the token alone decides which vGPU, if any, a connection gets."""
    import pwd
    import socket
    import tempfile

    from rawclient import say_hello

    if os.geteuid() != 0:
        import pytest

        pytest.skip("needs root to act as another Unix user")
    where = tempfile.mkdtemp(prefix="gpulab-run-")  # like /run/gpulab: a directory every user may enter
    os.chmod(where, 0o755)
    sock = os.path.join(where, "worker.sock")
    w = make_worker(unix_socket=sock)
    assert w.unix == f"unix://{sock}" and os.stat(sock).st_mode & 0o777 == 0o666
    nobody = pwd.getpwnam("nobody").pw_uid
    answers = []
    for token in (w.token, "not-the-token"):
        r, wr = os.pipe()
        child = os.fork()
        if child == 0:  # as user nobody: connect and say hello
            os.close(r)
            try:
                os.setuid(nobody)
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(sock)
                res, msg = say_hello(s, token)
                os.write(wr, f"{res} {msg}".encode())
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, then the child exits
                os.write(wr, f"error {exc!r}".encode())
            os._exit(0)
        os.close(wr)
        with os.fdopen(r) as f:
            answers.append(f.read())
        os.waitpid(child, 0)
    os.unlink(sock)
    os.rmdir(where)
    assert answers[0].startswith("0 "), answers
    assert answers[1] == "800 the session token is not valid for this worker", answers  # NOT_PERMITTED
