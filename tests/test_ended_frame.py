"""A worker that stops ends each session with a last frame (REPLY_ENDED) saying why: the program's
call gets the worker's CUresult, the person reads the worker's sentence instead of "connection lost",
and every later call returns the same code. The shim finds that frame where a reply would come, and
also when the worker has already closed the socket while the program was still sending.

A fake worker (a Unix socket served by a thread of the test, speaking the wire format through
gpu_worker.api.protocol) and real cuda.bindings programs through the built shim."""
from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time

from workertools import PRELUDE, ROOT

from gpu_worker.api.protocol import FLAG_REPLY, OP_HELLO, REP_HEADER, REQ_HEADER, ended_frame
from gpu_worker.api.table import by_name, opcode

DEVICE_UNAVAILABLE = 46
SENTENCE = "the gpulab worker stopped; this process's device memory (1.0 MiB hot, 0 B warm, 2.0 MiB cold) is lost"


class FakeWorker:
    """Opens the one session it accepts and answers every call that wants a reply with success (16 bytes
    of small numbers: a device, a context id), until a request with opcode `until` comes; then
    `then(conn, flags)` ends the session, and the socket is closed."""

    def __init__(self, path, until: str, then):
        self.until, self.then = opcode(by_name()[until]), then
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.address = "unix://" + str(path)
        self.failure = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.srv.accept()
            with conn:
                while True:
                    plen, op, flags = REQ_HEADER.unpack(_recv(conn, REQ_HEADER.size))
                    _recv(conn, plen)
                    if op == self.until:
                        self.then(conn, flags)
                        return
                    if flags & FLAG_REPLY:
                        reply(conn, b"fake worker" if op == OP_HELLO else (1).to_bytes(8, "little") * 2)
        except Exception as exc:  # noqa: BLE001 - reported by finish()
            self.failure = exc
        finally:
            self.srv.close()

    def finish(self):
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the fake worker is still serving"
        assert self.failure is None, f"fake worker: {self.failure!r}"


def reply(conn, body: bytes):
    conn.sendall(REP_HEADER.pack(len(body), 0, 0) + body)


def end(conn, flags=0):
    conn.sendall(ended_frame(DEVICE_UNAVAILABLE, SENTENCE))


def _recv(sock, n):
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise EOFError("the client closed the session")
        buf += got
    return bytes(buf)


def run_client(fake: FakeWorker, code: str, gated=False) -> tuple[dict, str]:
    """Client program `code` (after PRELUDE) against `fake`; `gated`: once it prints "ready" it waits
    until the fake worker has ended the session and closed the socket."""
    from gpu_worker.client import shim_env

    env = shim_env(fake.address, "t0ken")
    env["GPULAB_TIMEOUT"] = "3"  # a shim that waited for anything more would fail the test soon
    env["GPULAB_DEBUG"] = "1"  # says where the shim found the frame
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + code], env=env, cwd=ROOT, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if gated:
            assert p.stdout.readline().strip() == "ready"
            fake.finish()
            p.stdin.write("go\n")
            p.stdin.flush()
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    fake.finish()
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


# the client pipelines memsets (no reply awaited) until one fails, then makes a synchronizing call
MEMSETS = """
import time
t0, n, r = time.monotonic(), 0, "CUDA_SUCCESS"
while r == "CUDA_SUCCESS" and n < 2_000_000:
    r = name(d.cuMemsetD8Async(4096, 0, 16, 0))
    n += 1
done(r=r, n=n, took=time.monotonic() - t0, later=name(d.cuCtxSynchronize()))
"""
UNAVAILABLE = "CUDA_ERROR_DEVICE_UNAVAILABLE"


def assert_told(err: str, where: str):
    assert f"gpulab: {SENTENCE}" in err.splitlines(), err
    assert f"gpulab debug: the worker ended the session {where}" in err, err
    assert "connection to the worker lost" not in err and "has not answered" not in err, err


def test_a_call_answered_with_an_ended_frame_returns_its_code_and_shows_the_sentence(tmp_path):
    fake = FakeWorker(tmp_path / "w.sock", "cuMemAlloc", end)
    res, err = run_client(fake, """
setup()
r = name(d.cuMemAlloc(1 << 20))
done(r=r, later=name(d.cuDeviceGetCount()), again=name(d.cuMemAlloc(64)))
""")
    assert res == {"r": UNAVAILABLE, "later": UNAVAILABLE, "again": UNAVAILABLE}, err
    assert_told(err, "instead of replying")


def test_an_ended_frame_left_unread_before_the_worker_closed_is_found_when_a_send_fails(tmp_path):
    """The worker ends the session and closes while the program is idle (a notebook between cells); the
    program's next calls are pipelined, their flush fails, and the shim finds the frame still unread."""
    def reply_then_end(conn, flags):
        reply(conn, (1).to_bytes(8, "little") * 2)
        end(conn)

    fake = FakeWorker(tmp_path / "w.sock", "cuDeviceGetCount", reply_then_end)
    res, err = run_client(fake, """
setup()
ok(d.cuDeviceGetCount())
print("ready", flush=True)
sys.stdin.readline()
""" + MEMSETS, gated=True)
    assert res["r"] == UNAVAILABLE and res["later"] == UNAVAILABLE, (res, err)
    assert res["n"] >= 65536 // 44  # the first flush failed, not a call before it
    assert_told(err, "before this call was sent")


def test_an_ended_frame_sent_while_the_program_is_blocked_sending_is_read_at_once(tmp_path):
    """The worker stops reading, so the program's pipelined memsets fill the socket and it waits to send;
    the frame the worker sends then is read at once, without waiting for the liveness limit."""
    def stall_then_end(conn, flags):
        time.sleep(0.5)  # the client fills the socket in milliseconds
        end(conn)
        waiting = select.poll()
        waiting.register(conn, 0)  # until the client closes the session (POLLHUP)
        waiting.poll(10_000)

    fake = FakeWorker(tmp_path / "w.sock", "cuMemsetD8Async", stall_then_end)
    res, err = run_client(fake, "setup()\n" + MEMSETS)
    assert res["r"] == UNAVAILABLE and res["later"] == UNAVAILABLE, (res, err)
    assert res["took"] < 3  # GPULAB_TIMEOUT: the shim did not wait for a silence after the frame
    assert_told(err, "while a request was being sent")


def test_an_ended_frame_carries_the_code_and_the_sentence_cut_on_a_character_boundary():
    from gpu_worker.api.wire import MAX_REASON, REPLY_ENDED

    frame = ended_frame(DEVICE_UNAVAILABLE, "é" * MAX_REASON)  # 2 bytes a character: 2048 bytes
    plen, result, word = REP_HEADER.unpack_from(frame)
    assert (result, word & REPLY_ENDED, len(frame)) == (DEVICE_UNAVAILABLE, REPLY_ENDED, REP_HEADER.size + plen)
    assert int.from_bytes(frame[REP_HEADER.size:REP_HEADER.size + 4], "little") == DEVICE_UNAVAILABLE
    sentence = frame[REP_HEADER.size + 4:]
    assert len(sentence) == word & ~REPLY_ENDED == MAX_REASON and sentence.decode() == "é" * (MAX_REASON // 2)
    odd = ended_frame(DEVICE_UNAVAILABLE, "x" + "é" * MAX_REASON)[REP_HEADER.size + 4:]
    assert len(odd) == MAX_REASON - 1 and odd.decode() == "x" + "é" * (MAX_REASON // 2 - 1)
