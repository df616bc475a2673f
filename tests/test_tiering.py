"""VRAM tiers: the tier store's data path in process (emulated backend), then restore on touch through a
real worker and the shim.

In process: a Session with a TierStore on a real tier board and spool directory; bytes, pointers and
module globals survive random hot -> warm -> cold -> hot cycles; cold files are checksummed; the warm
budget sends the rest cold; a full GPU refuses with the reason, after asking the daemon's eviction link
(a fake daemon here).  Through a worker: each kind of touching call restores the process's memory first
and sees its bytes; queries do not restore.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from gpu_worker.api import errors as E
from gpu_worker.api.errors import Refusal
from gpu_worker.backends.emulated import EmulatedBackend
from gpu_worker.daemon import tiers as T
from gpu_worker.daemon.ledger import Ledger, Slot
from gpu_worker.daemon.session import Session
from gpu_worker.daemon.tierboard import TierBoard
from gpu_worker.daemon.tiers import COLD, HOT, WARM, TierStore

from workertools import PRELUDE, PTX_FILE, SLEEP_PRELUDE, Worker

MiB = 1 << 20
U64 = struct.Struct("<Q")
GLOBAL_PTX = b"""
.version 8.0
.target sm_90
.address_size 64
.visible .global .align 4 .b8 table[4096];
\0"""


class Lab:
    """One executor's session as the worker builds it, in this process."""

    def __init__(self, tmp_path, memory=256 * MiB, budget=1 << 40, evict_sock=None):
        self.backend = EmulatedBackend(total_memory=memory)
        self.ledger = Ledger(2, None)
        self.slot = Slot(self.ledger, self.ledger.claim())
        self.board = TierBoard([memory], budget)
        self.row = self.board.claim(os.getpid())
        self.spool = tmp_path / "spool" / "v1" / str(os.getpid())
        self.tiers = TierStore(self.backend, self.slot, self.board, self.row, [0], str(self.spool), evict_sock)
        self.session = Session(self.backend, slot=self.slot, tiers=self.tiers)
        (hid,) = self.session.cuDevicePrimaryCtxRetain(0)
        self.session.set_context(U64.pack(hid))

    def alloc(self, n: int) -> int:
        return self.session.cuMemAlloc(n)[0]

    def write(self, ptr: int, data: bytes) -> None:
        view, commit = self.backend.write_target(ptr, len(data), None)
        view[:] = data
        commit(True)

    def read(self, ptr: int, n: int) -> bytes:
        self.session.check_span(ptr, n)
        return bytes(self.backend.read_source(ptr, n, None))

    def figures(self) -> dict:
        return self.ledger.read_slot(self.slot.index)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.spool)) if self.spool.exists() else []


@pytest.fixture
def small_chunks(monkeypatch):
    """Cold files written and read in many chunks (and the CRC thread kept busy) with small allocations."""
    monkeypatch.setattr(T, "CHUNK", 64 << 10)


def test_random_bytes_survive_50_random_tier_cycles(tmp_path, small_chunks):
    lab = Lab(tmp_path)
    s = lab.session
    rng = np.random.default_rng(9)
    sizes = [int(rng.integers(1, 700 << 10)) for _ in range(6)] + [1, 300 << 10]
    ptrs = [lab.alloc(n) for n in sizes]
    data = {p: rng.bytes(n) for p, n in zip(ptrs, sizes)}
    for p, b in data.items():
        lab.write(p, b)
    # a module global: the driver's memory, it stays on the GPU through every move
    mod = lab.backend.cuModuleLoadData(GLOBAL_PTX)[0]
    s.bind("module", 0x1000, mod)
    gptr, gsize = s.cuModuleGetGlobal(mod, "table")
    gbytes = rng.bytes(gsize)
    lab.write(gptr, gbytes)
    phys = sum(lab.backend.physical_size(n) for n in sizes)
    assert lab.slot.used == phys and lab.figures()["hot"] == phys
    moves = {"offload": 0, "restore": 0}
    offloaded = 0
    for cycle in range(50):
        steps = list(rng.permutation(["warm", "cold", "restore"]))
        if rng.random() < 0.5:
            steps.insert(int(rng.integers(0, 3)), str(rng.choice(["warm", "cold"])))
        for step in steps + ["restore"]:
            where_before = lab.tiers.figures()
            if step == "restore":
                got = lab.tiers.restore()
                lab.tiers.free_spent()  # the executor does it once the touching call is answered
                if any(where_before[1:]):
                    moves["restore"] += 1
                    assert got == sum(sizes)
                assert not lab.tiers.off and lab.files() == []  # hot: nothing left on disk
                assert lab.tiers.figures() == (phys, 0, 0)
                assert lab.board.row_figures(lab.row)["hot"][0] == phys and lab.board.warm_total() == 0
            else:
                want = WARM if step == "warm" else COLD
                expected = sum(n for p, n in zip(ptrs, sizes) if lab.tiers.allocs[p].tier < want)
                assert lab.tiers.offload(want) == expected
                if expected:
                    moves["offload"] += 1
                    offloaded += expected
                assert lab.tiers.off
                assert lab.board.row_figures(lab.row)["hot"][0] == 0
                if want == COLD:
                    assert lab.files() == sorted(f"{p:x}.cold" for p in ptrs)
                    assert lab.tiers.figures() == (0, 0, phys) and lab.board.warm_total() == 0
                else:
                    cold = sum(lab.backend.physical_size(n) for p, n in zip(ptrs, sizes)
                               if lab.tiers.allocs[p].tier == COLD)
                    assert lab.tiers.figures() == (0, phys - cold, cold)
            assert lab.read(gptr, gsize) == gbytes  # never moved, never touched
        for p, n in zip(ptrs, sizes):
            assert lab.read(p, n) == data[p], f"cycle {cycle}: bytes of {p:#x} changed"
            assert s.cuMemGetAddressRange(p) == (p, n)  # pointers never change
        assert s.cuModuleGetGlobal(mod, "table") == (gptr, gsize)
        # the program goes on writing between cycles
        p = ptrs[int(rng.integers(0, len(ptrs)))]
        data[p] = rng.bytes(len(data[p]))
        lab.write(p, data[p])
    fig = lab.figures()
    assert (fig["offloads"], fig["restores"], fig["failures"]) == (moves["offload"], moves["restore"], 0)
    assert fig["bytes_restored"] == moves["restore"] * sum(sizes) and fig["restore_seconds"] > 0
    assert fig["bytes_offloaded"] == offloaded and fig["offload_seconds"] > 0
    assert lab.slot.used == phys  # moves change where, never what the quota is charged
    s.free_all()
    assert not lab.spool.exists() and lab.figures()["hot"] == 0


def test_a_damaged_or_missing_cold_file_is_a_loss_said_and_counted(tmp_path, small_chunks):
    lab = Lab(tmp_path)
    rng = np.random.default_rng(3)
    sizes = [200 << 10, 5000, 100 << 10]
    ptrs = [lab.alloc(n) for n in sizes]
    data = [rng.bytes(n) for n in sizes]
    for p, b in zip(ptrs, data):
        lab.write(p, b)
    lab.tiers.offload(COLD)
    path = lab.spool / f"{ptrs[1]:x}.cold"
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x40  # one bit
    path.write_bytes(raw)
    with pytest.raises(Refusal) as exc:
        lab.tiers.restore()
    assert exc.value.code == E.ECC_UNCORRECTABLE == 214
    assert f"the bytes of the allocation at {ptrs[1]:#x}" in exc.value.why
    assert "were lost in the cold tier" in exc.value.why and "CRC-32 of its bytes 0..5000 does not match" in exc.value.why
    lab.tiers.free_spent()  # the executor does it once the call is answered: emptied files go then
    fig = lab.figures()
    assert fig["failures"] == 1 and fig["restores"] == 1
    assert not lab.tiers.off and lab.files() == []
    assert lab.read(ptrs[0], sizes[0]) == data[0] and lab.read(ptrs[2], sizes[2]) == data[2]  # the others came back
    assert lab.read(ptrs[1], sizes[1]) == bytes(sizes[1])  # zero-filled, never half-right

    lab.tiers.offload(COLD)
    os.unlink(lab.spool / f"{ptrs[2]:x}.cold")
    with pytest.raises(Refusal) as exc:
        lab.tiers.restore()
    assert exc.value.code == 214 and "its file is gone" in exc.value.why and f"{ptrs[2]:#x}" in exc.value.why
    assert lab.figures()["failures"] == 2
    assert lab.read(ptrs[0], sizes[0]) == data[0]


def test_offload_to_warm_past_the_budget_goes_cold_for_the_rest(tmp_path):
    lab = Lab(tmp_path, budget=3 * MiB)
    rng = np.random.default_rng(5)
    ptrs = [lab.alloc(MiB) for _ in range(5)]
    data = [rng.bytes(MiB) for _ in ptrs]
    for p, b in zip(ptrs, data):
        lab.write(p, b)
    lab.tiers.offload(WARM)
    tiers = [lab.tiers.allocs[p].tier for p in ptrs]
    assert tiers.count(WARM) == 3 and tiers.count(COLD) == 2
    assert lab.board.warm_total() == 3 * MiB
    assert lab.tiers.figures() == (0, 3 * MiB, 2 * MiB)
    assert len(lab.files()) == 2
    # warm -> cold frees the warm budget
    lab.tiers.offload(COLD)
    assert lab.board.warm_total() == 0 and len(lab.files()) == 5
    lab.tiers.restore()
    assert [lab.read(p, MiB) for p in ptrs] == data
    # a budget of 0: no warm tier at all
    lab0 = Lab(tmp_path / "zero", budget=0)
    p = lab0.alloc(4096)
    lab0.tiers.offload(WARM)
    assert lab0.tiers.figures() == (0, 0, 4096) and lab0.files() == [f"{p:x}.cold"]


def test_freeing_an_offloaded_allocation_drops_it_without_a_restore(tmp_path):
    lab = Lab(tmp_path, budget=MiB)
    a, b, c = lab.alloc(MiB), lab.alloc(MiB), lab.alloc(MiB)
    lab.tiers.offload(WARM)  # a warm, b and c cold
    assert lab.tiers.figures() == (0, MiB, 2 * MiB)
    lab.session.cuMemFree(a)
    lab.session.cuMemFree(b)
    assert lab.board.warm_total() == 0 and lab.files() == [f"{c:x}.cold"]
    assert lab.slot.used == MiB and lab.tiers.figures() == (0, 0, MiB) and lab.tiers.off
    assert lab.figures()["restores"] == 0
    d = lab.alloc(2048)  # a new allocation while offloaded is hot; nothing comes back for it
    assert lab.tiers.allocs[d].tier == HOT and lab.tiers.allocs[c].tier == COLD
    lab.session.cuMemFree(c)
    assert not lab.tiers.off and lab.files() == [] and lab.tiers.figures() == (2048, 0, 0)


def test_a_full_gpu_refuses_at_once_with_the_reason_and_loses_nothing(tmp_path):
    lab = Lab(tmp_path, memory=8 * MiB)
    other = lab.board.claim(12345)  # another executor's memory on the same GPU
    assert lab.board.charge_hot(other, 0, 5 * MiB)
    p = lab.alloc(2 * MiB)
    data = os.urandom(2 * MiB)
    lab.write(p, data)
    with pytest.raises(Refusal) as exc:
        lab.alloc(2 * MiB)
    assert exc.value.code == E.OUT_OF_MEMORY
    assert exc.value.sentence("cuMemAlloc") == (
        "cuMemAlloc(2.0 MiB) refused: GPU 0 is full: 7.0 MiB of its 8.0 MiB held by vGPUs (2.0 MiB by this "
        "process), 2.0 MiB more wanted; no worker daemon can move other vGPUs' memory here; try again later")
    assert lab.slot.used == 2 * MiB  # the quota's charge was undone

    lab.tiers.offload(WARM)
    assert lab.board.charge_hot(other, 0, 2 * MiB)  # someone took the room meanwhile
    with pytest.raises(Refusal) as exc:
        lab.tiers.restore()
    assert exc.value.code == E.OUT_OF_MEMORY and "nothing was lost" in exc.value.why
    assert lab.tiers.figures() == (0, 2 * MiB, 0) and lab.tiers.off  # where it was
    lab.board.uncharge_hot(other, 0, 7 * MiB)
    lab.tiers.restore()
    assert lab.read(p, 2 * MiB) == data


def _fake_daemon(sock: socket.socket, board: TierBoard, other: int, answers: list, waits=None) -> list:
    """Answers eviction requests as the daemon would: frees ``other``'s bytes, or refuses; "slow" takes
    all the time the request allows, then says it freed a byte (it did not).  Each request's ``wait`` goes
    to ``waits``."""
    asked = []

    def run():
        for answer in answers:
            msg = sock.recv(4096)
            if not msg:
                return
            req = json.loads(msg)
            wait = req.pop("wait")
            if waits is not None:
                waits.append(wait)
            asked.append(req)
            if answer == "slow":
                time.sleep(wait)
                sock.send(json.dumps({"freed": 1}).encode())
            elif answer == "free":
                held = board.row_figures(other)["hot"][req["gpu"]]
                board.uncharge_hot(other, req["gpu"], held)
                sock.send(json.dumps({"freed": held}).encode())
            else:
                sock.send(json.dumps({"refused": answer}).encode())

    threading.Thread(target=run, daemon=True).start()
    return asked


def test_a_full_gpu_asks_the_daemon_for_room(tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lab = Lab(tmp_path, memory=8 * MiB, evict_sock=theirs)
    other = lab.board.claim(12345)
    lab.board.charge_hot(other, 0, 7 * MiB)
    waits = []
    asked = _fake_daemon(ours, lab.board, other, ["free", "only vGPUs of higher QoS hold memory there", "free"], waits)
    p = lab.alloc(4 * MiB)  # after the daemon moved the other vGPU off
    assert asked == [{"gpu": 0, "need": 4 * MiB}] and lab.tiers.allocs[p].tier == HOT
    lab.board.charge_hot(other, 0, 4 * MiB)
    with pytest.raises(Refusal) as exc:
        lab.alloc(4 * MiB)
    assert "only vGPUs of higher QoS hold memory there" in exc.value.why and len(asked) == 2
    # a restore asks once for room for all it brings back
    lab.board.uncharge_hot(other, 0, 4 * MiB)
    q = lab.alloc(MiB)
    data = os.urandom(MiB)
    lab.write(q, data)
    lab.tiers.offload(WARM)
    lab.board.charge_hot(other, 0, 7 * MiB)
    lab.tiers.restore()
    assert asked[2] == {"gpu": 0, "need": 5 * MiB} and len(asked) == 3
    assert lab.read(q, MiB) == data and lab.tiers.figures() == (5 * MiB, 0, 0)
    assert all(9 < w <= 10 for w in waits), waits  # the daemon is told what is left of eviction_wait (10 s)


def test_the_asks_of_one_allocation_share_one_deadline(tmp_path, monkeypatch):
    """A daemon that takes all the time it is given and frees too little: the rounds do not add up to
    EVICTION_ROUNDS times eviction_wait; the call is refused at eviction_wait (the margin unused)."""
    monkeypatch.setattr(T, "EVICTION_MARGIN", 0.5)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lab = Lab(tmp_path, memory=8 * MiB, evict_sock=theirs)
    lab.tiers.eviction_wait = 0.3
    other = lab.board.claim(12345)
    lab.board.charge_hot(other, 0, 7 * MiB)
    asked = _fake_daemon(ours, lab.board, other, ["slow"] * (T.EVICTION_ROUNDS + 1))
    t0 = time.monotonic()
    with pytest.raises(Refusal) as exc:
        lab.alloc(4 * MiB)
    took = time.monotonic() - t0
    assert 0.25 < took < 0.75, took
    assert exc.value.why.endswith("other vGPUs did not make room within 0.3 s; try again later"), exc.value.why
    assert len(asked) == 1 and lab.slot.used == 0 and lab.board.hot_on(0) == 7 * MiB


class _FailsOnce:
    """Wraps a backend method: the ``nth`` call raises ``exc``, the others go through."""

    def __init__(self, fn, nth: int, exc: BaseException):
        self.fn, self.nth, self.exc, self.calls = fn, nth, exc, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.nth:
            raise self.exc
        return self.fn(*args)


@pytest.mark.parametrize("tier", [WARM, COLD])
def test_a_restore_that_fails_after_the_remap_keeps_the_bytes_and_a_later_restore_works(tmp_path, tier):
    lab = Lab(tmp_path)
    if tier == COLD:
        lab.backend.host_view = lambda ptr, n: None  # the GPU's path: staged copies through copy_in
    ptrs = [lab.alloc(MiB) for _ in range(3)]
    data = [os.urandom(MiB) for _ in ptrs]
    for p, b in zip(ptrs, data):
        lab.write(p, b)
    lab.tiers.offload(tier)
    lab.backend.copy_in = _FailsOnce(lab.backend.copy_in, 2, E.CudaError(E.LAUNCH_FAILED, "injected"))
    with pytest.raises(Refusal) as exc:
        lab.tiers.restore()
    assert exc.value.code == E.LAUNCH_FAILED, exc.value.why  # the driver's own code
    why = exc.value.why
    assert f"the allocation at {ptrs[1]:#x} (1.0 MiB) could not be copied back to the GPU (injected)" in why, why
    assert why.endswith("nothing was lost: try again later"), why
    hot = sum(a.phys for a in lab.tiers.allocs.values() if a.tier == HOT)
    assert [lab.tiers.allocs[p].tier for p in ptrs] == [HOT, tier, tier]
    assert lab.board.hot_on(0) == hot == MiB and lab.tiers.off  # the remapped memory went again
    lab.tiers.free_spent()  # the first one's emptied host buffer or file goes once the call is answered
    assert lab.board.warm_total() == (2 * MiB if tier == WARM else 0)
    assert len(lab.files()) == (2 if tier == COLD else 0)
    assert lab.tiers.restore() == 2 * MiB
    assert [lab.read(p, MiB) for p in ptrs] == data
    assert lab.board.hot_on(0) == 3 * MiB and lab.tiers.figures() == (3 * MiB, 0, 0)


def test_a_restore_whose_staging_buffers_fail_keeps_the_files(tmp_path):
    lab = Lab(tmp_path)
    p = lab.alloc(MiB)
    data = os.urandom(MiB)
    lab.write(p, data)
    lab.tiers.offload(COLD)
    lab.tiers._empty_pool()  # no staging buffer kept from the offload
    lab.backend.host_buffer = _FailsOnce(lab.backend.host_buffer, 1, MemoryError())
    with pytest.raises(Refusal) as exc:
        lab.tiers.restore()
    assert exc.value.code == E.OUT_OF_MEMORY and f"{p:#x}" in exc.value.why and "MemoryError" in exc.value.why
    assert lab.board.hot_on(0) == 0 and lab.tiers.figures() == (0, 0, MiB) and lab.files() == [f"{p:x}.cold"]
    lab.tiers.restore()
    assert lab.read(p, MiB) == data


def test_a_loss_is_said_even_when_the_rest_cannot_come_back(tmp_path):
    lab = Lab(tmp_path, memory=8 * MiB)
    a, b = lab.alloc(2 * MiB), lab.alloc(2 * MiB)
    data = os.urandom(2 * MiB)
    lab.write(b, data)
    lab.tiers.offload(COLD)
    os.unlink(lab.spool / f"{a:x}.cold")
    other = lab.board.claim(12345)
    lab.board.charge_hot(other, 0, 5 * MiB)  # room for one of the two
    with pytest.raises(Refusal) as exc:
        lab.tiers.restore()
    why = exc.value.why
    assert exc.value.code == E.ECC_UNCORRECTABLE, why
    assert why.startswith(f"the bytes of the allocation at {a:#x} (2.0 MiB) were lost in the cold tier (its file is "
                          "gone); it is back on the GPU, zero-filled; the rest of this process's memory cannot "
                          "come back now: GPU 0 is full: "), why
    assert why.endswith("; it is kept: try again later"), why
    lab.board.uncharge_hot(other, 0, 5 * MiB)
    lab.tiers.restore()
    assert lab.read(b, 2 * MiB) == data and lab.read(a, 2 * MiB) == bytes(2 * MiB)


# ------------------------------------------------------------- through a real worker


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path, extra=("--vram-quota", "64M", "--spool-dir", str(tmp_path / "spool")))
    w.spool = tmp_path / "spool"
    yield w
    w.stop()


TOUCH_CLIENT = PRELUDE + f"""
import ctypes, os, time, urllib.request
setup()
ctl, admin = os.environ["T_CONTROL"], os.environ["T_ADMIN"]

def api(path, body=None):
    req = urllib.request.Request(ctl + path, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={{"Authorization": "token " + admin}})
    with urllib.request.urlopen(req, timeout=40) as r:
        return json.loads(r.read())

def vgpu():
    return api("/api/vgpus")["vgpus"][0]

def offload(to="cold"):
    v = api("/api/vgpus/" + vgpu()["id"] + "/offload", {{"to": to}})
    assert v["tier"] == to, v
    return v

n = 4096
rng = np.random.default_rng(11)
a_host = rng.integers(0, 1 << 31, n, dtype=np.int32)
b_host = rng.integers(0, 1 << 31, n, dtype=np.int32)
a = ok(d.cuMemAlloc(n * 4)); b = ok(d.cuMemAlloc(n * 4))
ok(d.cuMemcpyHtoD(a, a_host, n * 4)); ok(d.cuMemcpyHtoD(b, b_host, n * 4))
mod = ok(d.cuModuleLoadData(open({str(PTX_FILE)!r}, "rb").read()))
scale = ok(d.cuModuleGetFunction(mod, b"scale_inplace"))
stream = ok(d.cuStreamCreate(0))
event = ok(d.cuEventCreate(0))
results = {{}}

def round_(name, call, check=None):
    offload()
    out = call()
    ok(d.cuMemGetInfo())  # a reply: the worker has run the call (a launch has none)
    after = vgpu()
    results[name] = {{"ok": out is None or out == d.CUresult.CUDA_SUCCESS or out is True,
                      "tier": after["tier"], "check": check() if check else True}}

def back(ptr):
    out = np.zeros(n, np.int32)
    ok(d.cuMemcpyDtoH(out, ptr, n * 4))
    return out

# queries first: they do not restore
offload()
info = ok(d.cuMemGetInfo())
attr = ok(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0))
results["queries"] = {{"ok": True, "tier": vgpu()["tier"], "check": int(info[1]) == 64 << 20}}

new = rng.integers(0, 1 << 31, n, dtype=np.int32)
round_("cuMemcpyHtoD", lambda: d.cuMemcpyHtoD(a, new, n * 4)[0], lambda: bool((back(a) == new).all()))
a_host = new
got = np.zeros(n, np.int32)
round_("cuMemcpyDtoH", lambda: d.cuMemcpyDtoH(got, b, n * 4)[0], lambda: bool((got == b_host).all()))
round_("cuMemcpyDtoD", lambda: d.cuMemcpyDtoD(b, a, n * 4)[0], lambda: bool((back(b) == a_host).all()))
b_host = a_host.copy()
round_("cuMemsetD32", lambda: d.cuMemsetD32(b, 7, n)[0], lambda: bool((back(b) == 7).all()))
b_host[:] = 7
P = (None, ctypes.c_int, ctypes.c_int)
round_("launch", lambda: d.cuLaunchKernel(scale, n // 256, 1, 1, 256, 1, 1, 0, 0, ((a, 3, n), P), 0)[0],
       lambda: bool((back(a) == a_host * 3).all()))
a_host = a_host * 3
round_("cuCtxSynchronize", lambda: d.cuCtxSynchronize()[0], lambda: bool((back(a) == a_host).all()))
round_("cuStreamSynchronize", lambda: d.cuStreamSynchronize(stream)[0], lambda: bool((back(b) == b_host).all()))
ok(d.cuEventRecord(event, stream))
round_("cuEventSynchronize", lambda: d.cuEventSynchronize(event)[0], lambda: bool((back(a) == a_host).all()))
# warm too, and a kernel after a cold restore computes the right result
offload("warm")
ok(d.cuLaunchKernel(scale, n // 256, 1, 1, 256, 1, 1, 0, 0, ((b, 5, n), P), 0))
ok(d.cuMemGetInfo())
results["warm_launch"] = {{"ok": True, "tier": vgpu()["tier"], "check": bool((back(b) == b_host * 5).all())}}
done(results=results, moves=vgpu()["moves"])
"""


def test_every_kind_of_touching_call_restores_first_and_queries_do_not(worker):
    r = worker.run(TOUCH_CLIENT, env_extra={"T_CONTROL": worker.control, "T_ADMIN": worker.admin}, timeout=120)
    res = r.result["results"]
    assert res.pop("queries") == {"ok": True, "tier": "cold", "check": True}
    for name, got in res.items():
        assert got == {"ok": True, "tier": "hot", "check": True}, (name, got, r.stderr)
    moves = r.result["moves"]
    # one offload for the queries (the first round finds it cold still), one per other round
    assert moves["offloads"] == 9 and moves["restores"] == 9 and moves["failures"] == 0, moves
    assert moves["bytes_restored"] == 9 * 2 * 4096 * 4, moves
    assert [f for _root, _dirs, files in os.walk(worker.spool) for f in files if f.endswith(".cold")] == []


IN_A_CALL_CLIENT = SLEEP_PRELUDE + """
import os, threading, time, urllib.request
setup()
ctl, admin = os.environ["T_CONTROL"], os.environ["T_ADMIN"]

def api(path, body=None):
    req = urllib.request.Request(ctl + path, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "token " + admin})
    with urllib.request.urlopen(req, timeout=40) as r:
        return json.loads(r.read())

n = 1 << 20
data = np.frombuffer(os.urandom(n), np.uint8)
p = ok(d.cuMemAlloc(n))
ok(d.cuMemcpyHtoD(p, data, n))
vid = api("/api/vgpus")["vgpus"][0]["id"]
asked = {}

def offload():
    time.sleep(0.3)  # the kernel is running
    t0 = time.monotonic()
    asked["v"] = api("/api/vgpus/" + vid + "/offload", {"to": "cold"})
    asked["took"] = time.monotonic() - t0

th = threading.Thread(target=offload)
th.start()
launch_sleep(1200)  # the worker is in this call for 1.2 s
ok(d.cuMemGetInfo())  # sends the launch (the shim holds launches until a call with a reply); not touching
th.join()
cold = api("/api/vgpus")["vgpus"][0]["tier"]
before = time.time()
back = np.zeros(n, np.uint8)
ok(d.cuMemcpyDtoH(back, p, n))
time.sleep(0.6)  # the executor publishes its touch stamp a few times a second
v = api("/api/vgpus")["vgpus"][0]
done(tier=asked["v"]["tier"], took=asked["took"], cold=cold, same=bool((back == data).all()), after=v["tier"],
     touch=v["processes"][0]["last_touch"], before=before)
"""


def test_a_tier_request_during_a_call_is_done_right_after_it(worker):
    r = worker.run(IN_A_CALL_CLIENT, env_extra={"T_CONTROL": worker.control, "T_ADMIN": worker.admin})
    res = r.result
    assert res["tier"] == "cold" == res["cold"], (res, r.stderr, worker.log_text()[-3000:])
    assert 0.5 < res["took"] < 5, res  # it waited for the kernel's end (not for a timeout)
    assert res["same"] and res["after"] == "hot"
    assert res["before"] - 0.5 < res["touch"] < res["before"] + 1, res
