"""The executor's signals (SIGUSR1 revoke, SIGUSR2 tier request, SIGTERM stop) only set flags; the main loop
acts on them between two frames, woken from its wait for the next frame by the signal wakeup fd.

In process (an Executor served in the test's main thread, a RawSession in a thread): a SIGUSR2 raised
while the main thread holds the tier board's lock completes without deadlock, over and over; a restore
the daemon asked for that lost bytes fails the next touching call with the loss, once, and the request's
result says so; kept host buffers go POOL_KEEP after the last move though the program makes no call.
Through a real worker: a tier request that comes while another is being done is done too, the client
idle; SIGTERM during a busy loop of calls ends the session with the last frame and no spool file left.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import threading
import time

import pytest

from gpu_worker.api import errors as E
from gpu_worker.api.protocol import REP_HEADER, REQ_HEADER
from gpu_worker.backends.emulated import EmulatedBackend
from gpu_worker.daemon import tiers as T
from gpu_worker.daemon.executor import Executor, FrameReader
from gpu_worker.daemon.ledger import Ledger, Slot
from gpu_worker.daemon.session import Session
from gpu_worker.daemon.tierboard import TierBoard
from gpu_worker.daemon.tiers import COLD, HOT, WARM, TierStore

from rawclient import RawSession
from workertools import Worker

MiB = 1 << 20
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) if the block has not ended within ``seconds``."""
    def fire(*_):
        raise TimeoutError(f"the executor did not finish within {seconds} s: a deadlock?")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # a lock waited on inside a signal handler is not interrupted so: then the stacks, and the run ends
    faulthandler.dump_traceback_later(seconds + 10, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class InProcess:
    """One executor as the worker builds it (emulated backend, tier board, spool directory), served in this
    process's main thread; the client is a RawSession in a thread."""

    def __init__(self, tmp_path, memory=64 * MiB):
        self.backend = EmulatedBackend(total_memory=memory)
        self.ledger = Ledger(2, None)
        self.slot = Slot(self.ledger, self.ledger.claim())
        self.board = TierBoard([memory], 1 << 40)
        self.row = self.board.claim(os.getpid())
        self.spool = tmp_path / "spool"
        self.tiers = TierStore(self.backend, self.slot, self.board, self.row, [0], str(self.spool))
        self.session = Session(self.backend, label="test", slot=self.slot, tiers=self.tiers)
        self.path = str(tmp_path / "executor.sock")
        self.executor = None

    def ask(self, want: int) -> int:
        """The daemon's side of a tier request: the ledger, then SIGUSR2 (to this process)."""
        seq = self.ledger.request_tier(want)
        os.kill(os.getpid(), signal.SIGUSR2)
        return seq

    def done(self) -> tuple[int, int]:
        fig = self.ledger.read_slot(self.slot.index)
        return fig["done_seq"], fig["done_result"]

    def run(self, client, limit: float = 30.0):
        """client(raw) in a thread against the executor, served here until the client closes; its result."""
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(self.path)
        srv.listen(1)
        box = {}

        def side():
            raw = None
            try:
                raw = RawSession(self.path, "t0ken", timeout=limit)
                assert raw.open_device()[0] == 0
                box["result"] = client(raw)
            except BaseException as exc:  # noqa: BLE001 - raised in the test's thread below
                box["error"] = exc
            finally:
                if raw is not None:
                    raw.close()

        thread = threading.Thread(target=side, daemon=True)
        thread.start()
        conn, _ = srv.accept()
        srv.close()
        plen, _op, _flags = REQ_HEADER.unpack(conn.recv(REQ_HEADER.size, socket.MSG_WAITALL))
        conn.recv(plen, socket.MSG_WAITALL)  # the HELLO: the daemon's part
        conn.sendall(REP_HEADER.pack(8, 0, 0) + b"emulated")
        saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
        self.executor = ex = Executor(FrameReader(conn), self.session, 1 << 20)
        try:
            with deadline(limit):
                ex.watch_signals()
                try:
                    ex.serve()
                except EOFError:
                    pass
                self.session.close()
                ex.settle()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(-1)  # the pipe's ends are the executor's, closed with the process in the worker
            conn.close()
        thread.join(10)
        assert not thread.is_alive()
        if "error" in box:
            raise box["error"]
        return box["result"]


def test_a_tier_request_while_the_main_thread_holds_the_board_lock_completes(tmp_path):
    """A tier request whose SIGUSR2 comes while the main thread holds the tier board's lock, between two
    frames (freeing a restore's host buffer after the answer): a handler that moved memory there would wait
    on that lock for ever.  Every call is answered, the bytes are intact, the board's figures add up."""
    lab = InProcess(tmp_path)
    change = lab.board._add
    armed = []  # the tier asked inside the next uncharge the main thread makes

    def add(off, n):
        change(off, n)
        if armed and n < 0 and threading.current_thread() is threading.main_thread():
            lab.ledger.request_tier(armed.pop())
            signal.raise_signal(signal.SIGUSR2)  # its handler runs before the lock is let go

    lab.board._add = add

    def client(raw):
        slowest = 0.0
        for i in range(20):
            data = os.urandom(256 << 10)
            t0 = time.monotonic()
            _, (ptr,), _ = raw.alloc(len(data))
            assert raw.htod(ptr, data)[0] == 0
            seq = lab.ask(WARM)
            _wait(lambda: lab.done()[0] == seq)
            armed.append((WARM, COLD)[i % 2])
            res, (back,), why = raw.dtoh(ptr, len(data))  # restores; its host buffer is let go after the answer
            assert res == 0 and back == data, (i, res, why)
            _wait(lambda: lab.done()[0] == seq + 1)  # the request made inside the board's lock is done too
            assert lab.tiers.figures()[0] == 0, (i, lab.tiers.figures())
            res, (back,), why = raw.dtoh(ptr, len(data))
            assert res == 0 and back == data, (i, res, why)
            assert raw.free(ptr)[0] == 0
            slowest = max(slowest, time.monotonic() - t0)
        return slowest

    slowest = lab.run(client)
    assert not armed and lab.executor.tier_seq == 40
    assert slowest < 5, slowest
    assert lab.board.hot_on(0) == 0 and lab.board.warm_total() == 0, (lab.board.hot_on(0), lab.board.warm_total())


def test_a_restore_asked_by_the_daemon_that_lost_bytes_fails_the_next_touching_call_once(tmp_path):
    lab = InProcess(tmp_path)

    def client(raw):
        data = os.urandom(MiB)
        _, (ptr,), _ = raw.alloc(MiB)
        assert raw.htod(ptr, data)[0] == 0
        seq = lab.ask(COLD)
        _wait(lambda: lab.done() == (seq, 0))
        (f,) = [p for p in lab.spool.iterdir() if p.suffix == ".cold"]
        raw_bytes = bytearray(f.read_bytes())
        raw_bytes[1000] ^= 1
        f.write_bytes(raw_bytes)
        seq = lab.ask(HOT)
        _wait(lambda: lab.done()[0] == seq)
        assert lab.done() == (seq, E.ECC_UNCORRECTABLE)
        assert raw.mem_info()[0] == 0  # not touching: not told
        first = raw.dtoh(ptr, MiB)
        second = raw.dtoh(ptr, MiB)
        return first, second

    (res, _, why), (res2, (back,), _) = lab.run(client)
    assert res == E.ECC_UNCORRECTABLE and "were lost in the cold tier" in why and "zero-filled" in why, why
    assert res2 == 0 and back == bytes(MiB)  # told once; the allocation is back, zero-filled


def test_kept_host_buffers_go_pool_keep_after_a_restore_without_a_further_call(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "POOL_KEEP", 0.3)
    lab = InProcess(tmp_path)

    def client(raw):
        data = os.urandom(4 * MiB)
        _, (ptr,), _ = raw.alloc(len(data))
        assert raw.htod(ptr, data)[0] == 0
        seq = lab.ask(WARM)
        _wait(lambda: lab.done()[0] == seq)
        assert lab.tiers.figures() == (0, 4 * MiB, 0)
        res, (back,), _ = raw.dtoh(ptr, len(data))  # restores: the emptied host buffer is kept
        assert res == 0 and back == data
        _wait(lambda: lab.tiers.pool_bytes == 4 * MiB, 2)
        t0 = time.monotonic()
        _wait(lambda: lab.tiers.pool_bytes == 0, 5)  # the program is idle: no call, no signal
        return time.monotonic() - t0

    took = lab.run(client)
    assert took < 2, took


def _wait(cond, limit=10.0):
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "not within the limit"
        time.sleep(0.01)


# ------------------------------------------------------------- a real worker


@pytest.fixture
def worker(tmp_path, request):
    """A worker with a cold tier and room for an offload that takes a while."""
    spool = tmp_path / "spool"
    w = Worker(tmp_path, extra=("--vram-quota", "256M", "--spool-dir", str(spool)))
    request.addfinalizer(w.stop)
    w.spool = spool
    return w


def cold_files(root) -> list[str]:
    return [f for _dir, _dirs, files in os.walk(root) for f in files if f.endswith(".cold")]


def test_a_tier_request_while_another_is_done_is_done_too_with_the_client_idle(worker):
    raw = RawSession(worker.unix, worker.token)
    assert raw.open_device()[0] == 0
    data = os.urandom(96 * MiB)
    _, (ptr,), _ = raw.alloc(len(data))
    assert raw.htod(ptr, data)[0] == 0
    vid = worker.vgpus()[0]["id"]
    answers = {}

    def offload():
        answers["offload"] = worker.api(f"/api/vgpus/{vid}/offload", method="POST", body={"to": "cold"})

    th = threading.Thread(target=offload)
    th.start()
    # the offload is being written (96 MiB to disk): a restore is asked meanwhile
    _wait(lambda: worker.vgpus()[0]["tiers"]["cold"] > 0 or not th.is_alive(), 20)
    status, body = worker.api(f"/api/vgpus/{vid}/restore", method="POST", body={})
    th.join(40)
    assert status == 200 and body["tiers"] == {"hot": 96 * MiB, "warm": 0, "cold": 0}, (status, body)
    assert answers["offload"][0] in (200, 409), answers
    res, (back,), _ = raw.dtoh(ptr, len(data))
    assert res == 0 and back == data
    raw.close()


def test_sigterm_during_a_busy_loop_ends_the_session_with_the_last_frame_and_no_spool_file(worker):
    raw = RawSession(worker.unix, worker.token)
    assert raw.open_device()[0] == 0
    _, (ptr,), _ = raw.alloc(4 * MiB)
    assert raw.htod(ptr, os.urandom(4 * MiB))[0] == 0
    v = worker.vgpus()[0]
    status, body = worker.api(f"/api/vgpus/{v['id']}/offload", method="POST", body={"to": "cold"})
    assert status == 200 and body["tiers"]["cold"] == 4 * MiB, body
    assert cold_files(worker.spool)
    pid = v["processes"][0]["pid"]
    results = []

    def busy():
        while len(results) < 200_000:
            res, _, why = raw.mem_info()  # not touching: the memory stays cold
            results.append(res)
            if res:
                return

    th = threading.Thread(target=busy)
    th.start()
    _wait(lambda: len(results) > 200)
    os.kill(pid, signal.SIGTERM)
    th.join(10)
    assert not th.is_alive()
    assert results[-1] == E.DEVICE_UNAVAILABLE and set(results[:-1]) == {0}, results[-5:]
    assert "the gpulab worker stopped" in raw.ended and "4.0 MiB cold" in raw.ended, raw.ended
    assert cold_files(worker.spool) == []
    _wait(lambda: worker.vgpus()[0]["processes"] == [])  # the daemon reaped it
    raw.close()
