"""The daemon's tier policy (gpu_worker/daemon/tiering.py), in process, with the clock and executors the test sets.

`decide` is a pure function: each test gives it records and a time.  Eviction and the idle tick
run over a real VGPURegistry whose processes are fabricated: ledger slots and tier-board rows
written by the test, and a stand-in for the executors that acts on a tier request the moment its
SIGUSR2 is sent (moving its board row's hot bytes to warm or cold, as tiers.py does).  Last, one
real worker: an idle hint through the control API moves a vGPU warm, a touch brings it back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from gpu_worker.daemon import vgpus as vgpus_module
from gpu_worker.daemon.ledger import Slot
from gpu_worker.daemon.tiering import COLD, HOT, WARM, Tiering, TierState, decide, idle_clock, tier_name
from gpu_worker.daemon.vgpus import VGPURegistry
from workertools import PRELUDE, ROOT, Worker

MiB = 1 << 20
WARM_AFTER = {"low": 600, "medium": 1800, "high": 0}
COLD_AFTER = {"low": 3600, "medium": 7200, "high": 0}
T0 = 1_700_000_000.0


def state(qos="low", touches=(T0,), started=(T0 - 100,), hint=(0.0, 0.0), tiers=(MiB, 0, 0), asked=(0, 0.0),
          vid="7"):
    return TierState(vid, qos, list(touches), list(started), hint, tiers, asked)


def at(s: TierState, seconds: float):
    return decide([s], T0 + seconds, WARM_AFTER, COLD_AFTER)


# ------------------------------------------------------------------------------ decide()


def test_low_goes_warm_then_cold_after_its_times():
    s = state()
    assert at(s, 599) == []
    assert at(s, 600) == [("7", WARM)]
    warm = s._replace(tiers=(0, MiB, 0), asked=(WARM, T0 + 600))
    assert at(warm, 3599) == []
    assert at(warm, 3600) == [("7", COLD)]
    assert at(s, 3600) == [("7", COLD)]  # still hot past cold_after: straight to cold


def test_each_qos_has_its_times_and_0_is_never():
    assert at(state(qos="medium"), 1799) == [] and at(state(qos="medium"), 1800) == [("7", WARM)]
    assert at(state(qos="medium"), 7200) == [("7", COLD)]
    assert at(state(qos="high"), 10 * 365 * 86400) == []
    assert at(state(qos="gold"), 10 * 365 * 86400) == []  # a QoS the worker has no times for stays


def test_a_touch_restarts_the_clock():
    assert at(state(touches=(T0, T0 + 500)), 700) == []
    assert at(state(touches=(T0, T0 + 500)), 1100) == [("7", WARM)]


def test_a_process_that_never_touched_counts_from_the_first_start():
    s = state(touches=(0.0, 0.0), started=(T0, T0 + 300))
    assert idle_clock(s) == T0
    assert at(s, 600) == [("7", WARM)]


def test_an_idle_hint_starts_the_clock_at_its_since():
    hinted = state(touches=(T0,), hint=(T0 - 1000, T0 + 10))
    assert idle_clock(hinted) == T0 - 1000
    assert at(state(), 10) == [] and at(hinted, 10) == [("7", WARM)]
    assert at(hinted, 2600) == [("7", COLD)]  # 3600 s since the hint's since


def test_a_touch_after_the_hint_wins():
    s = state(touches=(T0 + 20,), hint=(T0 - 1000, T0 + 10))
    assert idle_clock(s) == T0 + 20
    assert at(s, 30) == [] and at(s, 620) == [("7", WARM)]


def test_a_tier_is_asked_once_per_idle_spell():
    asked = state(asked=(WARM, T0 + 600))  # asked, not acted on yet: still hot
    assert at(asked, 700) == []
    assert at(asked, 3600) == [("7", COLD)]  # colder is a new request
    assert at(state(asked=(COLD, T0 + 600)), 3700) == []  # an eviction already sent it colder
    touched = asked._replace(touches=[T0 + 800])  # touched (restored) since: a new spell
    assert at(touched, 1399) == [] and at(touched, 1400) == [("7", WARM)]


def test_only_colder_and_only_what_is_there():
    assert at(state(tiers=(0, 0, 0)), 10_000) == []  # nothing allocated
    assert at(state(tiers=(0, 0, MiB)), 10_000) == []  # all cold already
    assert at(state(tiers=(0, MiB, 0)), 1000) == []  # warm already, not yet cold_after
    assert at(state(tiers=(MiB, 0, MiB)), 600) == [("7", WARM)]  # hot part of a mixed one


def test_a_restore_by_hand_counts_as_a_touch():
    s = state(asked=(HOT, T0 + 1000))
    assert idle_clock(s) == T0 + 1000
    assert at(s, 1500) == [] and at(s, 1600) == [("7", WARM)]


def test_several_vgpus_in_one_call():
    many = [state(vid="a"), state(vid="b", qos="high"), state(vid="c", touches=(T0 + 590,)),
            state(vid="d", tiers=(0, MiB, 0), asked=(WARM, T0))]
    assert decide(many, T0 + 3600, WARM_AFTER, COLD_AFTER) == [("a", COLD), ("c", WARM), ("d", COLD)]


def test_tier_names():
    assert [tier_name(*t) for t in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)]] == [
        "none", "hot", "warm", "cold", "mixed", "mixed"]


# ------------------------------------------------------------------------------ over a real registry

GPU = {"uuid": "GPU-00000000-0000-0000-0000-000000000000", "index": 0, "model": "Emulated GPU",
       "memory": 1000 * MiB}


class Executors:
    """Stands in for os in vgpus.py: a SIGUSR2 to a fabricated pid acts on the vGPU's tier request at
    once, as an executor's handler would (unless `lazy`); every signal is noted."""

    def __init__(self, registry: VGPURegistry):
        self.registry = registry
        self.lazy = False
        self.signals: list[tuple[int, int]] = []
        self.moved: list[tuple[str, int]] = []  # (vGPU id, tier) in the order the processes acted

    def __getattr__(self, name):
        return getattr(os, name)

    def kill(self, pid, sig):
        self.signals.append((pid, sig))
        if sig != signal.SIGUSR2 or self.lazy:
            return
        reg, board = self.registry, self.registry.tierboard
        v = reg.by_pid[pid]
        want, seq = v.ledger.tier_request()
        row, slot = v.rows[pid], Slot(v.ledger, v.procs[pid])
        rec = v.ledger.read_slot(v.procs[pid])
        hot, warm, cold = rec["hot"], rec["warm"], rec["cold"]
        if want == WARM and hot and board.charge_warm(row, hot):
            board.uncharge_hot(row, 0, hot)
            slot.count_move("offload", hot, 0.01)
            hot, warm = 0, warm + hot
        elif want in (WARM, COLD) and (hot or warm):
            board.uncharge_hot(row, 0, hot)
            board.uncharge_warm(row, warm)
            slot.count_move("offload", hot + warm, 0.02)
            hot, warm, cold = 0, 0, cold + hot + warm
        elif want == HOT and (warm or cold):
            board.charge_hot(row, 0, warm + cold)
            board.uncharge_warm(row, warm)
            slot.count_move("restore", warm + cold, 0.03)
            hot, warm, cold = hot + warm + cold, 0, 0
        slot.set_tiers(hot, warm, cold)
        slot.set_done(seq)
        self.moved.append((v.id, want))


@pytest.fixture
def reg(monkeypatch):
    registry = VGPURegistry([GPU], "emulated", warm_budget=1000 * MiB)
    executors = Executors(registry)
    monkeypatch.setattr(vgpus_module, "os", executors)
    registry.executors = executors
    return registry


_pids = iter(range(4_000_000, 5_000_000))  # above any real pid (pid_max is at most 4194304)


def vgpu(reg: VGPURegistry, vid: str, qos: str, hot: int, touch: float, procs: int = 1):
    """A vGPU with `procs` fabricated processes holding `hot` bytes each on the GPU, last touched at `touch`."""
    grant = reg.check_grant({"token_hash": f"hash-{vid}", "id": vid, "qos": qos, "vram": 1000 * MiB}, "test")
    reg.set_static([grant])
    for _ in range(procs):
        v, slot = reg.open_slot(grant, 1, 0)
        row, pid = reg.claim_row(), next(_pids)
        reg.bind(v, slot, pid, row)
        assert reg.tierboard.charge_hot(row, 0, hot)
        Slot(v.ledger, slot).set_tiers(hot, 0, 0)
        Slot(v.ledger, slot).set_touch(touch)
    return reg.table[f"hash-{vid}"]


def evict(tiering: Tiering, requester, need: int, gpu: int = 0) -> dict:
    pid = next(iter(requester.procs), 0)
    return json.loads(tiering.handle(requester, pid, json.dumps({"gpu": gpu, "need": need}).encode()))


def test_eviction_takes_the_lowest_qos_first_then_the_least_recently_active(reg):
    now = time.time()
    vgpu(reg, "low-recent", "low", 150 * MiB, now - 10)
    vgpu(reg, "low-old", "low", 150 * MiB, now - 500)
    vgpu(reg, "medium-old", "medium", 150 * MiB, now - 5000)
    vgpu(reg, "high-old", "high", 150 * MiB, now - 9000)
    me = vgpu(reg, "me", "medium", 300 * MiB, now)
    tiering = Tiering(reg, WARM_AFTER, COLD_AFTER, eviction_wait=5)
    # 900 MiB of 1000 in use; 250 more need 150 freed: the least recently active low-QoS vGPU
    assert evict(tiering, me, 250 * MiB) == {"freed": 150 * MiB}
    assert reg.executors.moved == [("low-old", WARM)]
    # 750 in use; 500 more need 250: the other low one, then the medium one (as old as any, but QoS first)
    assert evict(tiering, me, 500 * MiB) == {"freed": 300 * MiB}
    assert reg.executors.moved[1:] == [("low-recent", WARM), ("medium-old", WARM)]
    assert reg.tierboard.hot_on(0) == 450 * MiB and reg.tierboard.warm_total() == 450 * MiB
    # a high-QoS vGPU is never moved for a medium one: nothing else can move, refused at once
    t0 = time.monotonic()
    answer = evict(tiering, me, 700 * MiB)
    assert time.monotonic() - t0 < 0.5
    assert answer == {"refused": "the other vGPUs there have a higher QoS than this one (medium) and are never "
                                 "moved for it"}  # the cause alone: the executor says the GPU's figures
    assert [s for s in reg.executors.moved if s[0] == "high-old"] == []
    described = reg.get("low-old")
    assert (described["tier"], described["tiers"]["warm"], described["moves"]["offloads"]) == ("warm", 150 * MiB, 1)


def test_eviction_stops_once_the_shortfall_is_covered(reg):
    now = time.time()
    for i in range(5):
        vgpu(reg, f"v{i}", "low", 150 * MiB, now - 100 * (5 - i))
    me = vgpu(reg, "me", "low", 200 * MiB, now)
    # 950 in use; 300 more need 250: the two oldest, no more
    assert evict(Tiering(reg, WARM_AFTER, COLD_AFTER, 5), me, 300 * MiB) == {"freed": 300 * MiB}
    assert reg.executors.moved == [("v0", WARM), ("v1", WARM)]


def test_past_the_warm_budget_victims_go_cold(reg):
    reg.tierboard.close()
    from gpu_worker.daemon.tierboard import TierBoard

    reg.tierboard = TierBoard([GPU["memory"]], 200 * MiB)
    now = time.time()
    vgpu(reg, "a", "low", 150 * MiB, now - 300)
    vgpu(reg, "b", "low", 150 * MiB, now - 200)
    me = vgpu(reg, "me", "low", 600 * MiB, now)
    assert evict(Tiering(reg, WARM_AFTER, COLD_AFTER, 5), me, 300 * MiB) == {"freed": 300 * MiB}
    assert reg.executors.moved == [("a", WARM), ("b", COLD)]  # 150 fit the 200 MiB budget, 300 would not


def test_with_room_already_the_answer_is_the_room(reg):
    me = vgpu(reg, "me", "low", 100 * MiB, time.time())
    tiering = Tiering(reg, WARM_AFTER, COLD_AFTER, 5)
    assert evict(tiering, me, 50 * MiB) == {"freed": 900 * MiB}
    assert reg.executors.moved == []


@pytest.mark.parametrize("others,words", [
    ([], "no other vGPU holds memory there"),
    ([("big", "low", 100)], "moving every vGPU there of QoS low or lower would free only 100.0 MiB of the "
                            "200.0 MiB needed"),
])
def test_when_nothing_can_move_the_refusal_is_at_once_with_the_reason(reg, others, words):
    now = time.time()
    for vid, qos, mib in others:
        vgpu(reg, vid, qos, mib * MiB, now - 1000)
    me = vgpu(reg, "me", "low", (900 - sum(o[2] for o in others)) * MiB, now)
    t0 = time.monotonic()
    answer = evict(Tiering(reg, WARM_AFTER, COLD_AFTER, 10), me, 300 * MiB)
    assert time.monotonic() - t0 < 0.5
    assert answer == {"refused": words}
    assert reg.executors.moved == []


def test_a_vgpu_waiting_on_an_eviction_is_never_a_victim(reg):
    now = time.time()
    other = vgpu(reg, "other", "low", 500 * MiB, now - 1000)
    me = vgpu(reg, "me", "low", 400 * MiB, now)
    tiering = Tiering(reg, WARM_AFTER, COLD_AFTER, 5)
    tiering.waiting[other.id] += 1  # it asked for room too, and waits for the GPU's lock
    answer = evict(tiering, me, 200 * MiB)
    assert answer["refused"].endswith("the other vGPUs there are waiting for room themselves")
    assert reg.executors.moved == []


def test_victims_that_do_not_move_end_in_a_refusal_within_eviction_wait(reg):
    reg.executors.lazy = True
    now = time.time()
    vgpu(reg, "stuck", "low", 500 * MiB, now - 1000)
    me = vgpu(reg, "me", "low", 400 * MiB, now)
    t0 = time.monotonic()
    answer = evict(Tiering(reg, WARM_AFTER, COLD_AFTER, 0.3), me, 200 * MiB)
    assert 0.25 < time.monotonic() - t0 < 2
    assert answer["refused"].endswith("the vGPUs asked to make room (stuck) did not move within 0.3 s")
    assert [sig for _pid, sig in reg.executors.signals] == [signal.SIGUSR2]


def test_one_eviction_at_a_time_per_gpu_and_its_waiters_are_not_victims(reg):
    now = time.time()
    other = vgpu(reg, "other", "low", 500 * MiB, now - 1000)
    me = vgpu(reg, "me", "low", 400 * MiB, now)
    tiering = Tiering(reg, WARM_AFTER, COLD_AFTER, 0.3)
    tiering.gpu_locks[0].acquire()  # an eviction on GPU 0 under way
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(evict(tiering, other, 200 * MiB)))
    waiter.start()
    time.sleep(0.1)
    assert tiering.waiting == {"other": 1}
    tiering.gpu_locks[1].acquire(timeout=0)  # another GPU's lock is its own
    waiter.join(5)
    assert answers == [{"refused": "another vGPU's wait for room there took longer than 0.3 s"}]
    assert tiering.waiting == {}
    tiering.gpu_locks[0].release()
    assert evict(tiering, me, 200 * MiB) == {"freed": 500 * MiB}  # free again: the other one moves now
    assert reg.executors.moved == [("other", WARM)]


def test_a_request_counts_as_waiting_from_its_arrival_and_its_wait_bounds_the_answer(reg):
    """Counted at once (never a victim while it waits for a thread or the GPU's lock); the executor's
    ``wait`` (what is left of its deadline) shortens the daemon's, never lengthens it."""
    reg.executors.lazy = True
    now = time.time()
    vgpu(reg, "stuck", "low", 500 * MiB, now - 1000)
    me = vgpu(reg, "me", "low", 400 * MiB, now)
    tiering = Tiering(reg, WARM_AFTER, COLD_AFTER, 5)
    replies = []
    t0 = time.monotonic()
    tiering.request(me, 1, json.dumps({"gpu": 0, "need": 200 * MiB, "wait": 0.3}).encode(), replies.append)
    assert tiering.waiting == {"me": 1}  # from the moment it arrived, not from when its thread starts
    deadline = time.monotonic() + 5
    while not replies and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 0.25 < time.monotonic() - t0 < 2
    assert json.loads(replies[0]) == {"refused": "the vGPUs asked to make room (stuck) did not move within 0.3 s"}
    assert tiering.waiting == {}
    long = json.dumps({"gpu": 0, "need": 200 * MiB, "wait": 99}).encode()
    t0 = time.monotonic()
    assert json.loads(Tiering(reg, WARM_AFTER, COLD_AFTER, 0.3).handle(me, 1, long))["refused"].endswith("0.3 s")
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("message", [b"", b"{", b"[]", b'{"gpu": 0}', b'{"gpu": "0", "need": 5}',
                                     b'{"gpu": 0, "need": 0}', b'{"gpu": 99, "need": 5}',
                                     b'{"gpu": 0, "need": 5, "wait": "1"}', b'{"gpu": 0, "need": 5, "wait": -1}'])
def test_a_malformed_request_is_refused_with_a_sentence(reg, message):
    me = vgpu(reg, "me", "low", MiB, time.time())
    answer = json.loads(Tiering(reg, WARM_AFTER, COLD_AFTER, 5).handle(me, 1, message))
    assert answer["refused"].startswith("the worker did not understand this process's request for room")


def test_the_idle_tick_asks_once_and_the_description_follows(reg):
    now = time.time()
    idle = vgpu(reg, "idle", "low", 10 * MiB, now - 700, procs=2)
    vgpu(reg, "busy", "low", 10 * MiB, now - 5)
    vgpu(reg, "high", "high", 10 * MiB, now - 1e6)
    tiering = Tiering(reg, WARM_AFTER, COLD_AFTER, 5)
    assert tiering.tick(now) == [("idle", WARM)]
    assert reg.executors.moved == [("idle", WARM), ("idle", WARM)]  # each of its processes
    assert tiering.tick(now + 1) == []
    d = reg.get("idle")
    assert (d["tier"], d["tiers"], d["moves"]["offloads"], d["moves"]["bytes_offloaded"]) == (
        "warm", {"hot": 0, "warm": 20 * MiB, "cold": 0}, 2, 20 * MiB)
    assert 699 < d["idle_seconds"] < 800
    assert reg.get("busy")["tier"] == "hot"
    # an idle hint sets the clock of the busy one back: it goes warm at the next tick
    assert reg.set_idle_hint("busy", now - 3000, now)
    assert reg.get("busy")["idle_seconds"] >= 3000
    assert tiering.tick(now + 1) == [("busy", WARM)]
    # an ended process's moves stay in the vGPU's figures
    for pid in list(idle.procs):
        reg.reap(pid)
    assert reg.get("idle")["moves"]["offloads"] == 2 and reg.get("idle")["tier"] == "none"
    # a restore asked by hand, then done: the tier request is numbered, and every live process acted
    seq, told = reg.request_tier("busy", HOT)
    assert len(told) == 1 and reg.tier_done("busy", seq) is True and reg.get("busy")["tier"] == "hot"
    assert reg.tier_done("nobody", 1) is None


def test_tier_done_waits_for_every_process(reg):
    reg.executors.lazy = True
    v = vgpu(reg, "two", "low", MiB, time.time(), procs=2)
    seq, told = reg.request_tier("two", WARM)
    assert len(told) == 2 and reg.tier_done("two", seq) is False
    first, second = sorted(v.procs.values())
    Slot(v.ledger, first).set_done(seq)
    assert reg.tier_done("two", seq) is False
    Slot(v.ledger, second).set_done(seq)
    assert reg.tier_done("two", seq) is True


# ------------------------------------------------------------------------------ through a worker

def test_an_idle_hint_moves_a_real_vgpu_warm_and_a_touch_brings_it_back(tmp_path):
    """A worker whose medium vGPUs go warm after an hour: an idle hint saying the program has been idle
    longer moves it at the next tick of the policy; the program's next touching call restores it, and
    the hint no longer counts."""
    worker = Worker(tmp_path, extra=("--GPUWorker.control=127.0.0.1:0", "--vram-quota", "64M",
                                     "--GPUWorker.warm_after={'low': 0, 'medium': 3600, 'high': 0}",
                                     "--GPUWorker.cold_after={'low': 0, 'medium': 0, 'high': 0}"))
    client = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent("""
        dev, ctx = setup()
        ptr = ok(d.cuMemAlloc(8 << 20))
        done(ready=True)
        sys.stdout.flush()
        for line in sys.stdin:  # each line: touch the memory once
            ok(d.cuMemsetD8(ptr, 7, 8 << 20))
            done(touched=True)
            sys.stdout.flush()
        """)], env=worker.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert json.loads(client.stdout.readline() or "{}").get("ready"), worker.log_text()
        (v,) = worker.vgpus()
        assert (v["qos"], v["tier"], v["tiers"]["hot"]) == ("medium", "hot", 8 << 20)

        def wait_for(tier):
            deadline = time.monotonic() + 10
            while (got := worker.vgpus()[0])["tier"] != tier:
                assert time.monotonic() < deadline, (got, worker.log_text())
                time.sleep(0.1)
            return got

        time.sleep(1.5)
        assert worker.vgpus()[0]["tier"] == "hot"  # an hour is far
        status, v = worker.api(f"/api/vgpus/{v['id']}/idle", method="POST", body={"since": time.time() - 4000})
        assert status == 200 and v["idle_seconds"] >= 4000, v
        v = wait_for("warm")
        assert v["tiers"] == {"hot": 0, "warm": 8 << 20, "cold": 0} and v["moves"]["offloads"] == 1
        assert "idle for 4" in worker.log_text()  # the policy's log line: idle for 4000 s and more
        client.stdin.write("touch\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline())["touched"]
        v = wait_for("hot")
        assert v["moves"]["restores"] == 1
        deadline = time.monotonic() + 3  # published by the executor's flush thread
        while worker.vgpus()[0]["idle_seconds"] > 100:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)  # two more ticks: the touch came after the hint, which no longer counts
        assert worker.vgpus()[0]["tier"] == "hot"
    finally:
        client.stdin.close()
        client.wait(30)
        worker.stop()
