"""VRAM tiering under a lab's load (issue 9), on one emulated worker in CI.

Over a hundred vGPUs whose quotas add up to four times the GPU's memory, each a raw session of
tests/rawclient.py (one Python process holds them all: a hundred shim clients would not fit a
2-core machine), with most of them idle and a few busy at a time, as in a lab. The worker must keep
every byte (each read-back equals what that vGPU last wrote), refuse nothing but with
CUDA_ERROR_OUT_OF_MEMORY and a reason, move vGPUs to host RAM and disk and back, never move a
high-QoS vGPU for a lower one, take low before medium, and leave no file in its spool directory.
Then the small cases: the eviction order step by step, and an immediate refusal when nothing can move.
"""
from __future__ import annotations

import datetime
import random
import re
import threading
import time
from pathlib import Path

from rawclient import RawSession
from workertools import Worker, spool_files

from gpu_worker.api import errors as E
from gpu_worker.client.tokens import token_hash

MiB = 1 << 20
QOS_RANK = {"low": 0, "medium": 1, "high": 2}


def tier_worker(make_worker, tmp_path: Path, tokens: dict, memory: int, **settings) -> Worker:
    """An emulated worker of one GPU of ``memory`` bytes, its vGPUs from ``tokens`` ({token: {"vram",
    "qos"}}) and tier settings as c.GPUWorker options, its spool in tmp_path/spool."""
    lines = [f"c.GPUWorker.tokens = {tokens!r}", f"c.GPUWorker.emulated_memory = {memory}",
             "c.GPUWorker.max_sessions_per_token = 4", f"c.GPUWorker.spool_dir = {str(tmp_path / 'spool')!r}"]
    lines += [f"c.GPUWorker.{k} = {v!r}" for k, v in settings.items()]
    config = tmp_path / f"tiers-{time.monotonic_ns()}.py"
    config.write_text("\n".join(lines) + "\n")
    return make_worker(token=None, extra=["--config", str(config)])


def vgpu_id(token: str) -> str:
    return "t-" + token_hash(token)[:8]  # a configured token's vGPU id (worker.static_grant)


EVICTION = re.compile(r"^(\S+ \S+) gpulab-worker\[\d+\] INFO eviction on GPU \d+ for vGPU (\S+) \(process \d+, "
                      r"[^)]*\): (.*); \S+ \S+ freed in ([\d.]+) s$", re.M)
VICTIM = re.compile(r"(\S+) -> (warm|cold) \(")


def log_time(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def evictions(log: str) -> list[tuple[float, str, list[tuple[str, str]]]]:
    """(when it began, requesting vGPU, [(victim, tier) in the order they were asked]) of each eviction in a
    worker's log (its line is written when it ends, with how long it took)."""
    return [(log_time(m.group(1)) - float(m.group(4)), m.group(2), VICTIM.findall(m.group(3)))
            for m in EVICTION.finditer(log)]


class Lab:
    """The test's side of each vGPU: its session and what it last wrote to each of its allocations."""

    def __init__(self, worker: Worker, tokens: dict, seed: int):
        self.w = worker
        self.rng = random.Random(seed)
        self.vgpus = []
        for tok, limits in tokens.items():
            s = RawSession(worker.unix, tok)
            assert s.hello[0] == 0, s.hello
            assert s.open_device() == (0, (), "")
            self.vgpus.append({"token": tok, "id": vgpu_id(tok), "qos": limits["qos"], "quota": limits["vram"],
                               "s": s, "bufs": {}})
        self.ooms: list[tuple[str, str, str]] = []  # (vGPU, call, reason)
        self.slowest = 0.0
        # per vGPU, its successful calls that left memory of it on the GPU ("hot": a touch restores all of
        # it, an allocation is new GPU memory) and its frees: (start, end, kind), wall clock
        self.events: dict[str, list[tuple[float, float, str]]] = {v["id"]: [] for v in self.vgpus}

    def _check(self, v, what: str, r) -> bool:
        """True on success; an OOM is counted with its reason; any other error fails the test."""
        res, _, reason = r
        if res == 0:
            return True
        assert res == E.OUT_OF_MEMORY, f"{v['id']} ({v['qos']}) {what}: CUresult {res}: {reason}"
        assert reason.strip(), f"{v['id']} {what}: CUDA_ERROR_OUT_OF_MEMORY without a reason"
        self.ooms.append((v["id"], what, reason))
        return False

    def _timed(self, fn, *args, v=None, kind="hot"):
        t0, w0 = time.monotonic(), time.time()
        r = fn(*args)
        self.slowest = max(self.slowest, time.monotonic() - t0)
        if v is not None and r[0] == 0:
            self.events[v["id"]].append((w0, time.time(), kind))
        return r

    def alloc(self, v, n: int) -> None:
        s = v["s"]
        r = self._timed(s.alloc, n, v=v)
        if self._check(v, f"cuMemAlloc({n})", r):
            ptr = r[1][0]
            data = self.rng.randbytes(n)
            if self._check(v, "cuMemcpyHtoD", self._timed(s.htod, ptr, data, v=v)):
                v["bufs"][ptr] = bytearray(data)
            else:  # never written: what it holds is not ours to check
                assert self._timed(s.free, ptr, v=v, kind="free")[0] == 0

    def write(self, v, ptr: int) -> None:
        data = self.rng.randbytes(len(v["bufs"][ptr]))
        if self._check(v, "cuMemcpyHtoD", self._timed(v["s"].htod, ptr, data, v=v)):
            v["bufs"][ptr] = bytearray(data)
            self.verify(v, ptr)

    def memset(self, v, ptr: int) -> None:
        buf = v["bufs"][ptr]
        start = self.rng.randrange(len(buf))
        n = self.rng.randrange(1, len(buf) - start + 1)
        byte = self.rng.randrange(256)
        if self._check(v, "cuMemsetD8", self._timed(v["s"].memset, ptr + start, byte, n, v=v)):
            buf[start:start + n] = bytes([byte]) * n

    def verify(self, v, ptr: int) -> bool:
        """Read the allocation back; False only for an OOM (a restore that found no room)."""
        want = v["bufs"][ptr]
        r = self._timed(v["s"].dtoh, ptr, len(want), v=v)
        if not self._check(v, "cuMemcpyDtoH", r):
            return False
        got = r[1][0]
        if got != want:
            at = next(i for i in range(len(want)) if got[i] != want[i])
            raise AssertionError(f"{v['id']} ({v['qos']}): the allocation at {ptr:#x} lost its bytes: byte {at} of "
                                 f"{len(want)} is {got[at]}, it was written as {want[at]}")
        return True

    def free(self, v, ptr: int) -> None:
        assert self._timed(v["s"].free, ptr, v=v, kind="free") == (0, (), "")
        del v["bufs"][ptr]

    def surely_hot(self, vid: str, at: float, asks: list[float], margin: float) -> bool:
        """Whether vGPU ``vid`` certainly had memory on the GPU at ``at``: its last call before was a
        success that left memory there, and the worker asked it to move at no time since that call began
        (``asks``: when it was asked, from the log). Only its own calls bring memory back."""
        before = [e for e in self.events[vid] if e[1] < at - margin]
        if not before or before[-1][2] != "hot" or any(e[0] <= at + margin for e in self.events[vid][len(before):]):
            return False
        start = before[-1][0]
        return not any(start - margin <= t <= at + margin for t in asks)

    def verify_all(self, vgpus, retry_after: float) -> int:
        """Every byte of every allocation read back; a vGPU refused for room is tried again later (once
        the idle policy has moved others). Returns the allocations checked."""
        pending = [(v, p) for v in vgpus for p in list(v["bufs"])]
        checked = 0
        for _attempt in range(4):
            left = [(v, p) for v, p in pending if not self.verify(v, p)]
            checked += len(pending) - len(left)
            if not left:
                return checked
            pending = left
            time.sleep(retry_after)
        raise AssertionError(f"{len(pending)} allocations could not be read back after 4 tries: {self.ooms[-3:]}")


class Watcher(threading.Thread):
    """Looks at the vGPUs through the control API twice a second: the most cold bytes seen, and any
    high-QoS vGPU seen off the GPU."""

    def __init__(self, w: Worker):
        super().__init__(daemon=True)
        self.w = w
        self.stop = threading.Event()
        self.cold_seen = 0
        self.warm_seen = 0
        self.high_off: list[tuple[str, dict]] = []
        self.looks = 0
        self.error = None

    def run(self):
        try:
            while not self.stop.wait(0.5):
                vgpus = self.w.vgpus()
                self.looks += 1
                self.cold_seen = max(self.cold_seen, sum(v["tiers"]["cold"] for v in vgpus))
                self.warm_seen = max(self.warm_seen, sum(v["tiers"]["warm"] for v in vgpus))
                self.high_off += [(v["id"], v["tiers"]) for v in vgpus
                                  if v["qos"] == "high" and (v["tiers"]["warm"] or v["tiers"]["cold"])]
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def lab_tokens(memory: int, counts: dict, quotas: dict) -> dict:
    tokens = {}
    for qos, n in counts.items():
        for i in range(n):
            tokens[f"{qos}-{i:03d}"] = {"vram": quotas[qos], "qos": qos}
    total = sum(t["vram"] for t in tokens.values())
    high = sum(t["vram"] for t in tokens.values() if t["qos"] == "high")
    assert total == 4 * memory and high <= memory, (total, high)  # oversubscribed 4x; high fits, as the pool books
    return tokens


def test_a_hundred_vgpus_at_four_times_the_memory_lose_no_byte(make_worker, tmp_path):
    memory = 64 * MiB
    # 12 high (48 MiB, within the GPU), 44 medium and 60 low: 116 vGPUs, 256 MiB of quotas
    tokens = lab_tokens(memory, {"high": 12, "medium": 44, "low": 60},
                        {"high": 4 * MiB, "medium": 2 * MiB, "low": 2 * MiB})
    w = tier_worker(make_worker, tmp_path, tokens, memory,
                    warm_after={"low": 1.0, "medium": 2.0, "high": 0.0},
                    cold_after={"low": 3.0, "medium": 6.0, "high": 0.0},
                    warm_budget=24 * MiB,  # far below the ~90 MiB beyond the GPU: some vGPUs must go cold
                    eviction_wait=10.0)
    t_start = time.monotonic()
    lab = Lab(w, tokens, seed=9)
    watcher = Watcher(w)
    watcher.start()
    rng = lab.rng
    # each vGPU fills ~60% of its quota in 2-3 allocations of random bytes, in a random order
    order = list(lab.vgpus)
    rng.shuffle(order)
    for v in order:
        k = rng.choice((2, 3))
        for _ in range(k):
            lab.alloc(v, (v["quota"] * 6 // 10 // k) & ~0xFFF)
    t_setup = time.monotonic()

    # a lab: a few people busy at a time (writing, reading back, clearing, allocating more), the rest idle
    soak = 20.0
    end = time.monotonic() + soak
    actions = 0
    active, rotate = [], 0.0
    while time.monotonic() < end:
        if time.monotonic() >= rotate:
            active, rotate = rng.sample(lab.vgpus, 6), time.monotonic() + 2.0
        v = rng.choice(active)
        x = rng.random()
        if not v["bufs"] or x > 0.97:
            used = sum(len(b) for b in v["bufs"].values())
            if used + v["quota"] // 8 <= v["quota"] * 9 // 10 or v["qos"] != "high":  # highs stay within the GPU
                lab.alloc(v, v["quota"] // 8)
        elif x > 0.95:
            lab.free(v, rng.choice(list(v["bufs"])))
        else:
            ptr = rng.choice(list(v["bufs"]))
            if x < 0.4:
                lab.write(v, ptr)
            elif x < 0.85:
                lab.verify(v, ptr)
            else:
                lab.memset(v, ptr)
        actions += 1
    t_soak = time.monotonic()

    checked = lab.verify_all(lab.vgpus, retry_after=2.5)  # no byte lost, anywhere
    t_verify = time.monotonic()
    watcher.stop.set()
    watcher.join()
    assert watcher.error is None, watcher.error
    time.sleep(0.5)  # the executors publish their counters a few times a second
    vgpus = {v["id"]: v for v in w.vgpus()}
    summary = (f"{len(lab.vgpus)} vGPUs, setup {t_setup - t_start:.1f} s, {actions} actions in {soak:.0f} s, "
               f"verify {t_verify - t_soak:.1f} s ({checked} allocations), {len(lab.ooms)} OOMs, slowest call "
               f"{lab.slowest:.2f} s, most warm {watcher.warm_seen / MiB:.1f} MiB, most cold "
               f"{watcher.cold_seen / MiB:.1f} MiB, {watcher.looks} looks")
    print(summary)
    for reason in sorted({re.sub(r"[\d.]+ ?[KMG]?i?B|0x[0-9a-f]+|\d+", "N", r) for _, _, r in lab.ooms}):
        print("  OOM:", reason)

    # the only errors were refusals for room, each saying why; the worker counted the same ones
    for vid, call, reason in lab.ooms:
        assert "this vGPU's quota is" in reason or "GPU 0 is full" in reason, (vid, call, reason)
    errors = {}
    for v in vgpus.values():
        for name, n in v["errors"].items():
            errors[name] = errors.get(name, 0) + n
    assert errors == ({"CUDA_ERROR_OUT_OF_MEMORY": len(lab.ooms)} if lab.ooms else {}), errors
    # no call waited past the eviction deadline (with room for a slow CI machine)
    assert lab.slowest < 10.0 + 5.0, summary
    # tiers were used: offloads and restores, some to disk
    moves = [v["moves"] for v in vgpus.values()]
    assert sum(m["offloads"] for m in moves) > 0 and sum(m["restores"] for m in moves) > 0, summary
    assert watcher.cold_seen > 0, summary
    assert sum(m["failures"] for m in moves) == 0, [(i, v["moves"]) for i, v in vgpus.items() if v["moves"]["failures"]]
    # a high-QoS vGPU (no idle policy, quotas within the GPU) never left it
    assert not watcher.high_off, watcher.high_off[:5]
    assert all(v["moves"]["offloads"] == 0 and v["tier"] in ("hot", "none")
               for v in vgpus.values() if v["qos"] == "high"), \
        [(v["id"], v["tier"], v["moves"]) for v in vgpus.values() if v["qos"] == "high"]
    log = w.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
    # each eviction (from the worker's log) took no vGPU of a higher QoS than the asker, lower QoS first
    rank = {v["id"]: QOS_RANK[v["qos"]] for v in lab.vgpus}
    done = evictions(log)
    assert done, "no eviction in the worker's log"
    for _at, asker, victims in done:
        ranks = [rank[vid] for vid, _tier in victims]
        assert ranks == sorted(ranks) and max(ranks) <= rank[asker], (asker, victims)
    # and no medium vGPU went while a low one was surely on the GPU (one client: one eviction at a time, and
    # only a vGPU's own calls bring its memory back; the worker's asks to move are in its log)
    daemon = f"gpulab-worker[{w.proc.pid}]"
    asks = {vid: [] for vid in rank}
    for line in log.splitlines():
        if daemon in line:
            for vid in set(re.findall(r"\bt-[0-9a-f]{8}\b", line)) & asks.keys():
                asks[vid].append(log_time(line[:23]))
    for at, asker, victims in done:
        if any(rank[vid] == 1 for vid, _ in victims):
            passed_over = [vid for vid in rank if rank[vid] == 0 and vid != asker and vid not in dict(victims)
                           and lab.surely_hot(vid, at, asks[vid], margin=0.05)]
            assert not passed_over, (f"an eviction for {asker} at {at:.3f} moved {victims} while these low-QoS "
                                     f"vGPUs were on the GPU: {passed_over}")
    mediums = sum(1 for _, _, v in done for vid, _ in v if rank[vid] == 1)
    print(f"  {len(done)} evictions, {sum(len(v) for _, _, v in done)} vGPUs moved by them, {mediums} of them medium")

    # every session closed: the worker leaves nothing in its spool
    for v in lab.vgpus:
        v["s"].close()
    spool = tmp_path / "spool"
    deadline = time.monotonic() + 15
    while spool_files(spool) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert spool_files(spool) == [], spool_files(spool)[:10]


def test_eviction_takes_the_least_recently_active_low_first_then_medium_never_high(make_worker, tmp_path):
    """One 16 MiB GPU, no idle policy (every move is an eviction): a medium vGPU allocating step by step
    pushes out the older low, then the newer low, then the other medium; the high one stays."""
    memory = 16 * MiB
    names = ["low_old", "low_new", "medium", "high", "asker"]
    qos = {"low_old": "low", "low_new": "low", "medium": "medium", "high": "high", "asker": "medium"}
    tokens = {n: {"vram": 12 * MiB, "qos": qos[n]} for n in names}
    w = tier_worker(make_worker, tmp_path, tokens, memory, warm_after={"low": 0, "medium": 0, "high": 0},
                    cold_after={"low": 0, "medium": 0, "high": 0}, warm_budget=64 * MiB)
    lab = Lab(w, tokens, seed=5)
    v = {n: next(x for x in lab.vgpus if x["token"] == n) for n in names}
    for n, size in (("low_old", 2), ("low_new", 2), ("medium", 4), ("high", 4)):
        lab.alloc(v[n], size * MiB)  # 12 MiB hot, touched in this order
        time.sleep(0.6)              # the last touch is published a few times a second

    def tiers():
        time.sleep(0.5)  # the executors publish their tier figures a few times a second
        now = {x["id"]: x["tier"] for x in w.vgpus()}
        return {n: now[v[n]["id"]] for n in names}

    steps = []
    for size in (6, 2, 2):  # shortfalls of 2 MiB each time
        lab.alloc(v["asker"], size * MiB)
        steps.append(tiers())
    assert not lab.ooms, lab.ooms
    hot = {n for n in names if steps[0][n] == "hot"}
    assert steps[0]["low_old"] in ("warm", "cold") and hot == {"low_new", "medium", "high", "asker"}, steps
    assert steps[1]["low_new"] in ("warm", "cold") and {"medium", "high", "asker"} <= \
        {n for n in names if steps[1][n] == "hot"}, steps
    assert steps[2]["medium"] in ("warm", "cold") and steps[2]["high"] == "hot", steps
    # and nothing was lost on the way
    assert lab.verify_all([v["medium"], v["low_old"], v["low_new"], v["high"], v["asker"]], retry_after=0.5)


def test_nothing_can_move_so_the_low_vgpu_is_refused_at_once_with_the_reason(make_worker, tmp_path):
    """A GPU full of a busy high-QoS vGPU: a low one's allocation, and its restore, fail at once (well
    under eviction_wait) with CUDA_ERROR_OUT_OF_MEMORY and a sentence; its offloaded bytes are kept."""
    memory = 16 * MiB
    tokens = {"high": {"vram": 16 * MiB, "qos": "high"}, "low": {"vram": 8 * MiB, "qos": "low"}}
    w = tier_worker(make_worker, tmp_path, tokens, memory, eviction_wait=10.0)
    lab = Lab(w, tokens, seed=3)
    high, low = lab.vgpus
    lab.alloc(low, 1 * MiB)
    status, body = w.api(f"/api/vgpus/{low['id']}/offload", method="POST", body={"to": "cold"})
    assert status == 200 and body["tier"] == "cold", (status, body)
    lab.alloc(high, 15 * MiB + MiB // 2)  # the GPU is full but for half a MiB, all of it a busy high vGPU's
    lab.write(high, next(iter(high["bufs"])))
    assert not lab.ooms, lab.ooms

    t0 = time.monotonic()
    res, _, reason = low["s"].alloc(4 * MiB)
    took_alloc = time.monotonic() - t0
    t0 = time.monotonic()
    ptr = next(iter(low["bufs"]))
    res2, _, reason2 = low["s"].dtoh(ptr, MiB)  # a touch: its restore finds no room either
    took_restore = time.monotonic() - t0
    print(f"refused in {took_alloc:.3f} s: {reason}\nrestore refused in {took_restore:.3f} s: {reason2}")
    assert res == E.OUT_OF_MEMORY and took_alloc < 2.0, (res, took_alloc, reason)
    assert res2 == E.OUT_OF_MEMORY and took_restore < 2.0, (res2, took_restore, reason2)
    for why in (reason, reason2):
        assert "GPU 0 is full" in why and "higher QoS than this one (low)" in why, why  # the cause, in words
    # the high vGPU was not touched, and the low one's bytes wait on disk until there is room
    assert next(x for x in w.vgpus() if x["id"] == high["id"])["tier"] == "hot"
    assert next(x for x in w.vgpus() if x["id"] == low["id"])["tier"] == "cold"
    lab.free(high, next(iter(high["bufs"])))
    assert lab.verify(low, ptr)
