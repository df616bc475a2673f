"""The worker's tier set-up and bookkeeping, in process: the spool subdirectory it owns and locks
(gpu_worker/daemon/worker.py `open_spool`), idle times merged with their defaults, and the ledger
fields of tier moves (ledger.py: each written alone, a move's CUresult next to its request number,
read back by vgpus.py `tier_failures`).  One real worker: a second one on the same spool refuses."""
from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from traitlets.config import Config

from gpu_worker.api.errors import INVALID_VALUE, OUT_OF_MEMORY
from gpu_worker.daemon import ledger as L
from gpu_worker.daemon import vgpus as vgpus_module
from gpu_worker.daemon.ledger import Ledger, Slot
from gpu_worker.daemon.vgpus import VGPURegistry
from gpu_worker.daemon.worker import SPOOL_LOCK, GPUWorker
from workertools import ROOT

MiB = 1 << 20


# ------------------------------------------------------------------------------ the spool


def opened(spool, name="lab1") -> tuple[GPUWorker, str]:
    w = GPUWorker(name=name, spool_dir=str(spool))
    return w, w.open_spool()


def test_the_worker_works_in_its_own_locked_subdirectory_and_leaves_the_rest_alone(tmp_path):
    spool = tmp_path / "scratch"
    spool.mkdir()
    (spool / "thesis.tex").write_text("years of work")
    (spool / "data").mkdir()
    (spool / "data" / "run1.csv").write_text("1,2,3")
    w, path = opened(spool)
    try:
        assert path == str(spool / "gpulab-lab1")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert (spool / "thesis.tex").read_text() == "years of work"
        assert (spool / "data" / "run1.csv").read_text() == "1,2,3"
        assert "worker lab1 (pid %d" % os.getpid() in (spool / "gpulab-lab1" / SPOOL_LOCK).read_text()
    finally:
        os.close(w._spool_lock)


def test_a_second_worker_of_the_same_name_on_the_same_spool_refuses(tmp_path):
    first, path = opened(tmp_path)
    try:
        with pytest.raises(ValueError) as refused:
            opened(tmp_path)
        said = str(refused.value)
        assert said.startswith(f"the spool directory {path} is in use by worker lab1 (pid {os.getpid()}, host "), said
        assert "two workers cannot share it" in said and "--spool-dir or --name" in said
        # another name gets its own subdirectory beside it
        other, other_path = opened(tmp_path, "lab2")
        os.close(other._spool_lock)
        assert other_path == str(tmp_path / "gpulab-lab2")
    finally:
        os.close(first._spool_lock)
    again, _ = opened(tmp_path)  # the lock went with the first worker
    os.close(again._spool_lock)


def test_what_a_killed_worker_left_in_its_subdirectory_goes_at_the_next_start(tmp_path, caplog):
    own = tmp_path / "gpulab-lab1"
    (own / "17" / "4242").mkdir(parents=True)
    (own / "17" / "4242" / "7f0000000000.cold").write_bytes(b"x" * 3000)
    (own / "17" / "4242" / "7f0000200000.cold").write_bytes(b"y" * 1000)
    (own / "stray").write_bytes(b"z" * 96)
    (tmp_path / "neighbour.cold").write_bytes(b"not ours")
    with caplog.at_level(logging.WARNING, logger="gpulab.worker"):
        w, path = opened(tmp_path)
    os.close(w._spool_lock)
    assert sorted(os.listdir(path)) == [SPOOL_LOCK]
    assert (tmp_path / "neighbour.cold").read_bytes() == b"not ours"
    (line,) = [r.getMessage() for r in caplog.records if "cold-tier files" in r.getMessage()]
    assert line.startswith(f"removed 3 cold-tier files (4.0 KiB) a previous run of this worker left in {path}"), line


def test_a_spool_subdirectory_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("mine")
    (tmp_path / "spool").mkdir()
    os.symlink(elsewhere, tmp_path / "spool" / "gpulab-lab1")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        opened(tmp_path / "spool")
    assert (elsewhere / "keep").read_text() == "mine"


def test_a_real_second_worker_on_the_same_spool_exits_with_the_sentence(tmp_path):
    spool = tmp_path / "spool"

    def start(sock):
        return subprocess.Popen([sys.executable, "-m", "gpu_worker.daemon", "--backend", "emulated",
                                 "--unix-socket", str(tmp_path / sock), "--token", "t0ken", "--name", "lab1",
                                 f"--GPUWorker.spool_dir={spool}", "--control", "off"],
                                cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "GPULAB_STATE_DIR": str(tmp_path / "state")})

    first = start("a.sock")
    try:
        assert "listening on" in first.stdout.readline()
        second = start("b.sock")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 2, (out, err)
        assert (f"gpulab worker: the spool directory {spool / 'gpulab-lab1'} is in use by worker lab1 "
                f"(pid {first.pid}, host ") in err, err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


# ------------------------------------------------------------------------------ idle times


def test_idle_times_given_for_some_levels_keep_the_defaults_of_the_others():
    w = GPUWorker(warm_after={"low": 60}, cold_after={"medium": "120"})
    assert w.warm_after == {"low": 60.0, "medium": 1800.0, "high": 0.0}
    assert w.cold_after == {"low": 3600.0, "medium": 120.0, "high": 0.0}
    c = Config()
    c.GPUWorker.warm_after = {"high": 30}
    assert GPUWorker(config=c).warm_after == {"low": 600.0, "medium": 1800.0, "high": 30.0}
    assert GPUWorker().warm_after == {"low": 600.0, "medium": 1800.0, "high": 0.0}


@pytest.mark.parametrize("value, words", [
    ({"gold": 5}, "c.GPUWorker.warm_after: 'gold' is not a QoS level (low, medium, high)"),
    ({"low": -1}, "c.GPUWorker.warm_after['low']: -1.0 is negative (0 means never)"),
    ({"low": "soon"}, "c.GPUWorker.warm_after['low']: 'soon' is not a number of seconds"),
])
def test_a_bad_idle_time_stops_the_worker_with_its_name(value, words):
    from traitlets import TraitError

    with pytest.raises(TraitError) as bad:
        GPUWorker(warm_after=value)
    assert str(bad.value) == words


# ------------------------------------------------------------------------------ the ledger's tier fields


def test_each_tier_field_is_written_alone_at_its_offset():
    ledger = Ledger(2, None)
    i = ledger.claim()
    slot = Slot(ledger, i)
    slot.set_touch(1234.5)
    slot.set_tiers(3 * MiB, 2 * MiB, MiB)
    start = slot.off + L.TIER_OFF
    before = bytes(ledger.map[start:start + L.TIERS.size])
    slot.count_move("offload", 5 * MiB, 0.5)
    slot.count_move("restore", 4 * MiB, 0.25)
    slot.count_move("failure")
    slot.set_done(7, OUT_OF_MEMORY)
    after = bytes(ledger.map[start:start + L.TIERS.size])
    mine = set()
    for at, size in ((L.T_OFFLOADS, 4), (L.T_RESTORES, 4), (L.T_FAILURES, 4), (L.T_DONE, 4), (L.T_RESULT, 4),
                     (L.T_BYTES_OUT, 8), (L.T_BYTES_IN, 8), (L.T_SECONDS_OUT, 8), (L.T_SECONDS_IN, 8)):
        mine.update(range(at, at + size))
    assert [k for k in range(L.TIERS.size) if before[k] != after[k] and k not in mine] == []
    rec = ledger.read_slot(i)
    assert {k: rec[k] for k in ("hot", "warm", "cold", "offloads", "restores", "failures", "done_seq",
                                "done_result", "bytes_offloaded", "bytes_restored", "offload_seconds",
                                "restore_seconds", "last_touch")} == {
        "hot": 3 * MiB, "warm": 2 * MiB, "cold": MiB, "offloads": 1, "restores": 1, "failures": 1, "done_seq": 7,
        "done_result": OUT_OF_MEMORY, "bytes_offloaded": 5 * MiB, "bytes_restored": 4 * MiB,
        "offload_seconds": 0.5, "restore_seconds": 0.25, "last_touch": 1234.5}
    slot.set_done(8)
    assert (ledger.read_slot(i)["done_seq"], ledger.read_slot(i)["done_result"]) == (8, 0)
    assert L.RING_OFF == L.TIER_OFF + L.TIERS.size and L.T_TOUCH == L.TIERS.size - 8
    ledger.close()


def test_moves_counted_while_another_thread_stamps_touches_never_set_the_stamp_back():
    ledger = Ledger(1, None)
    slot = Slot(ledger, ledger.claim())
    stop = threading.Event()
    written = [0.0]

    def stamp():
        t = 1.0
        while not stop.is_set():
            slot.set_touch(t)
            written[0] = t
            t += 1.0

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stamper = threading.Thread(target=stamp)
    stamper.start()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            seen = written[0]
            slot.count_move("offload", 1, 0.0)
            assert ledger.read_slot(0)["last_touch"] >= seen
    finally:
        stop.set()
        stamper.join()
        sys.setswitchinterval(interval)
    assert ledger.read_slot(0)["last_touch"] == written[0]
    ledger.close()


class _Quiet:
    """os for vgpus.py whose kill reaches nobody: the test writes each process's answer."""

    def __getattr__(self, name):
        return getattr(os, name)

    def kill(self, pid, sig):
        pass


def test_the_registry_names_each_process_whose_move_failed(monkeypatch):
    monkeypatch.setattr(vgpus_module, "os", _Quiet())
    reg = VGPURegistry([{"uuid": "GPU-0", "index": 0, "model": "Emulated GPU", "memory": 1000 * MiB}], "emulated",
                       warm_budget=1000 * MiB)
    grant = reg.check_grant({"token_hash": "hash-v", "id": "v", "qos": "low", "vram": 100 * MiB}, "test")
    reg.set_static([grant])
    slots = []
    for pid in (4_100_001, 4_100_002, 4_100_003):
        v, slot = reg.open_slot(grant, 1, 0)
        reg.bind(v, slot, pid, reg.claim_row())
        slots.append(Slot(v.ledger, slot))
    seq, told = reg.request_tier("v", 0)
    assert len(told) == 3 and reg.tier_failures("v", seq) == {}
    slots[0].set_done(seq)
    slots[1].set_done(seq, OUT_OF_MEMORY)
    assert reg.tier_done("v", seq) is False and reg.tier_failures("v", seq) == {4_100_002: OUT_OF_MEMORY}
    slots[2].set_done(seq, INVALID_VALUE)
    assert reg.tier_done("v", seq) is True
    assert reg.tier_failures("v", seq) == {4_100_002: OUT_OF_MEMORY, 4_100_003: INVALID_VALUE}
    # a later request that worked replaces the old answers
    seq2, _ = reg.request_tier("v", 0)
    for s in slots:
        s.set_done(seq2)
    assert reg.tier_failures("v", seq2) == {} and reg.tier_failures("nobody", seq2) == {}
