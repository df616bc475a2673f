"""Fuzzed frames: random requests in valid framing and random bytes. Each may end its own
session, never the worker, never another session, and never an internal error."""
from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest

from workertools import PRELUDE, hello, rss

from gpu_worker.api import table as api_table
from gpu_worker.api.codegen import in_struct
from gpu_worker.api.protocol import FLAG_REPLY, OP_LAUNCH, OP_PARAM_LAYOUT, OP_SET_CONTEXT, REP_HEADER, REQ_HEADER
from gpu_worker.api.wire import MAX_REASON
from gpu_worker.daemon.dispatch_generated import OPS

FIXED_SIZE = {api_table.opcode(f): struct.calcsize(in_struct(f)) for f in api_table.FORWARDED}


def open_session(worker) -> socket.socket:
    """A session past its handshake."""
    s, res, why = hello(worker)
    assert res == 0, why
    return s


def fuzz_frames(worker, frames: int, seed: int) -> dict:
    """Send `frames` random requests in valid framing; count replies and sessions the worker closed."""
    rng = random.Random(seed)
    ops = sorted(OPS) + [OP_SET_CONTEXT, OP_LAUNCH, OP_PARAM_LAYOUT, 9999]
    replies = closed = 0
    s = open_session(worker)
    for _ in range(frames):
        op = rng.choice(ops)
        if op in FIXED_SIZE and rng.random() < 0.6:  # well-formed layout, random values
            payload = rng.randbytes(FIXED_SIZE[op])
        else:
            payload = rng.randbytes(rng.choice([0, 1, 4, 8, 12, 16, 20, 24, 28, 40, 64, 200]))
        try:
            s.sendall(REQ_HEADER.pack(len(payload), op, FLAG_REPLY) + payload)
            header = s.recv(REP_HEADER.size, socket.MSG_WAITALL)
            if len(header) < REP_HEADER.size:
                raise ConnectionError("closed")
            plen, res, reason_len = REP_HEADER.unpack(header)
            payload = s.recv(plen, socket.MSG_WAITALL) if plen else b""
            # a reason closes the payload, is UTF-8, and only a failed call has one
            assert reason_len <= min(plen, MAX_REASON) and (res != 0 or reason_len == 0)
            payload[len(payload) - reason_len:].decode("utf-8")
            replies += 1
        except (ConnectionError, OSError):
            closed += 1
            s.close()
            s = open_session(worker)
    s.close()
    return {"frames": frames, "replies": replies, "closed": closed}


def assert_worker_unharmed(worker) -> None:
    log = worker.log_text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
    assert worker.run(PRELUDE + "setup(); done(n=ok(d.cuDeviceGetCount()))").result == {"n": 1}


def test_random_requests_in_valid_frames(worker):
    stats = fuzz_frames(worker, 1500, seed=1234)
    assert stats["replies"] > 0 and stats["closed"] > 0  # both outcomes were exercised
    assert_worker_unharmed(worker)


@pytest.mark.long
def test_a_hundred_thousand_fuzzed_frames(worker):
    """The long run (`pytest --long -m long`): no crash, no internal error, no growth of the daemon."""
    daemon_before = rss(worker.proc.pid) >> 10
    start = time.monotonic()
    stats = fuzz_frames(worker, 100_000, seed=2026)
    seconds = time.monotonic() - start
    daemon_after = rss(worker.proc.pid) >> 10
    print(f"\nfuzz: {stats['frames']} frames in {seconds:.1f} s ({stats['frames'] / seconds:,.0f}/s), "
          f"{stats['replies']} replies, {stats['closed']} sessions closed by the worker, "
          f"daemon RSS {daemon_before} -> {daemon_after} KiB")
    assert stats["replies"] + stats["closed"] == stats["frames"] and stats["closed"] > 0
    assert daemon_after - daemon_before < 16 * 1024  # sessions come and go; the daemon does not keep them
    assert_worker_unharmed(worker)


def test_random_bytes_after_the_handshake(worker):
    rng = random.Random(99)
    for _ in range(30):
        s = open_session(worker)
        try:
            s.sendall(rng.randbytes(rng.randint(1, 4096)))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()
    assert "internal error" not in worker.log_text()
    assert worker.run(PRELUDE + "setup(); done(n=ok(d.cuDeviceGetCount()))").result == {"n": 1}


def test_garbage_instead_of_a_hello(worker):
    for junk in (b"", b"GET / HTTP/1.1\r\n\r\n", os.urandom(64)):
        s = socket.socket(socket.AF_UNIX)
        s.connect(worker.unix[len("unix://"):])
        s.settimeout(10)
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(64) in (b"",)  # closed without a reply
        s.close()
    assert worker.run(PRELUDE + "setup(); done(n=ok(d.cuDeviceGetCount()))").result == {"n": 1}
