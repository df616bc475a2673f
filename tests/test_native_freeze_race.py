"""The worker's side of freezing a native process (gpu_worker/daemon/native.py): when its next call comes while
the driver's checkpoint is under way, the thaw waits for the checkpoint's end and then undoes it, so the
process is never left locked with its frozen byte cleared (its calls would then wait in the driver for ever);
and the host memory a checkpoint keeps counts in the worker's warm budget, which a freeze may not pass.

Tests of the daemon's state machine alone: the checkpointer is a double whose checkpoint blocks until told."""
from __future__ import annotations

import socket
import threading
import time

from gpu_worker.api import errors as E
from gpu_worker.daemon.ledger import Ledger, Slot
from gpu_worker.daemon.native import Checkpointer, NativeLink, NativeProcesses
from gpu_worker.daemon.tierboard import TierBoard


class HeldCheckpointer(Checkpointer):
    """A double of the driver's checkpoint: freeze blocks until ``release`` is set; every call is noted."""

    backend = "double"

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[str] = []

    def freeze(self, pid: int) -> int:
        self.calls.append("freeze")
        self.entered.set()
        self.release.wait(10)
        return E.SUCCESS

    def thaw(self, pid: int) -> int:
        self.calls.append("thaw")
        return E.SUCCESS

    def has_room(self, gpus, need) -> bool:
        return True


class Registry:
    native_tier = None
    native_why_not = None

    def __init__(self, warm_budget: int = 1 << 30):
        self.tierboard = TierBoard([0], warm_budget)

    def reap(self, pid: int) -> None:
        pass


class VGPU:
    def __init__(self):
        self.ledger = Ledger(2, 1 << 30)
        self.grant = {"gpus": ["GPU-0"]}
        self.id = "7"


def test_a_call_during_the_checkpoint_thaws_the_process_once_the_checkpoint_ends():
    checkpointer = HeldCheckpointer()
    natives = NativeProcesses(Registry(), checkpointer)
    ours, theirs = socket.socketpair()
    v = VGPU()
    link = NativeLink(ours, v, 4242, 0, "test process")
    natives.links[link.pid] = link
    outcome = {}
    freezing = threading.Thread(target=lambda: outcome.update(freeze=natives._freeze(link)))
    freezing.start()
    assert checkpointer.entered.wait(10)  # past the grace period: the driver is locking the process
    assert link.state == "checkpointing" and v.ledger.frozen(0)
    thawing = threading.Thread(target=lambda: outcome.update(thaw=natives._thaw(link)))
    thawing.start()
    time.sleep(0.1)
    assert thawing.is_alive()  # it waits for the checkpoint, rather than clear the byte of a process being locked
    checkpointer.release.set()
    freezing.join(10)
    thawing.join(10)
    assert outcome == {"freeze": E.SUCCESS, "thaw": E.SUCCESS}
    assert checkpointer.calls == ["freeze", "thaw"]  # the checkpoint was undone by a restore
    assert link.state == "running" and not v.ledger.frozen(0)
    ours.close()
    theirs.close()


def frozen_link(natives, used: int, pid: int) -> NativeLink:
    """A native process of a fresh vGPU holding ``used`` bytes by its ledger slot."""
    v = VGPU()
    slot = v.ledger.claim()
    assert Slot(v.ledger, slot).charge(used) is None
    ours, theirs = socket.socketpair()
    theirs.close()
    link = NativeLink(ours, v, pid, slot, f"test process {pid}")
    natives.links[pid] = link
    return link


def test_a_checkpoint_counts_in_the_warm_budget_and_is_refused_past_it():
    """Two processes of 48 MiB and a warm budget of 64 MiB: the first freeze charges its 48 MiB on the tier board;
    the second is refused before the driver is asked (CUDA_ERROR_OUT_OF_MEMORY, the reason for the control API);
    a thaw gives the budget back, and so does a frozen process that ends."""
    checkpointer = HeldCheckpointer()
    checkpointer.release.set()
    registry = Registry(warm_budget=64 << 20)
    natives = NativeProcesses(registry, checkpointer)
    board = registry.tierboard
    first, second = frozen_link(natives, 48 << 20, 101), frozen_link(natives, 48 << 20, 102)
    assert natives._freeze(first) == E.SUCCESS
    assert first.state == "frozen" and board.warm_total() == 48 << 20
    assert natives._freeze(second) == E.OUT_OF_MEMORY
    assert second.state == "running" and not second.vgpu.ledger.frozen(second.slot)
    assert checkpointer.calls == ["freeze"]  # the driver was never asked for the second
    assert natives.why_not_pid(102) == ("its checkpoint would keep 48.0 MiB in host memory and the warm budget "
                                        "(64.0 MiB) has 16.0 MiB left: the driver's checkpoint has no colder tier")
    assert board.warm_total() == 48 << 20
    assert natives._thaw(first) == E.SUCCESS and board.warm_total() == 0
    assert natives._freeze(second) == E.SUCCESS and board.warm_total() == 48 << 20
    assert natives.why_not_pid(102) == ""
    natives.closed(second)  # it ended while frozen: its host memory is gone with it
    assert board.warm_total() == 0
    assert checkpointer.calls == ["freeze", "thaw", "freeze"]


def test_a_process_that_ends_during_its_checkpoint_leaves_nothing_in_the_warm_budget():
    """The driver's checkpoint of a 48 MiB process is under way when the process ends: once the checkpoint
    returns, the warm budget holds nothing of it (the end gave back what the freeze had counted)."""
    checkpointer = HeldCheckpointer()
    registry = Registry()
    natives = NativeProcesses(registry, checkpointer)
    link = frozen_link(natives, 48 << 20, 103)
    freezing = threading.Thread(target=natives._freeze, args=(link,))
    freezing.start()
    assert checkpointer.entered.wait(10)
    assert registry.tierboard.warm_total() == 48 << 20  # counted before the driver was asked
    natives.closed(link)
    assert registry.tierboard.warm_total() == 0
    checkpointer.release.set()
    freezing.join(10)
    assert registry.tierboard.warm_total() == 0


def test_two_freezes_at_once_cannot_both_take_the_budget_s_last_room_where_the_board_counts_the_moves():
    """With a checkpointer whose moves the tier board counts itself (the emulated double's), the first freeze's
    48 MiB are on the board only once its checkpoint ends; meanwhile a second 48 MiB freeze on a 64 MiB budget is
    refused (before: the board showed 0 and both went ahead), and says it would take the room once there is some."""
    checkpointer = HeldCheckpointer()
    checkpointer.counted_on_board = True
    registry = Registry(warm_budget=64 << 20)
    natives = NativeProcesses(registry, checkpointer)
    first, second = frozen_link(natives, 48 << 20, 105), frozen_link(natives, 48 << 20, 106)
    freezing = threading.Thread(target=natives._freeze, args=(first,))
    freezing.start()
    assert checkpointer.entered.wait(10)  # the first is in its checkpoint; the board counts nothing yet
    assert registry.tierboard.warm_total() == 0
    assert natives._freeze(second) == E.OUT_OF_MEMORY
    assert "the warm budget (64.0 MiB) has 16.0 MiB left" in natives.why_not_pid(106)
    assert not natives.budget_has_room(second.vgpu)
    checkpointer.release.set()
    freezing.join(10)
    assert first.state == "frozen" and natives.pending == 0  # from now on the board's own count holds them
    assert natives._thaw(first) == E.SUCCESS
    assert natives.budget_has_room(second.vgpu)  # the idle policy asks again
    assert natives._freeze(second) == E.SUCCESS


def test_without_a_warm_tier_no_process_is_frozen_and_the_reason_says_so():
    checkpointer = HeldCheckpointer()
    natives = NativeProcesses(Registry(warm_budget=0), checkpointer)
    link = frozen_link(natives, 1 << 20, 104)
    assert natives._freeze(link) == E.OUT_OF_MEMORY and checkpointer.calls == []
    assert natives.why_not_pid(104) == ("its checkpoint would keep 1.0 MiB in host memory and this worker has no "
                                        "warm tier (its warm_budget is 0): the driver's checkpoint has no colder tier")


def test_a_process_s_memory_is_split_over_its_gpus_as_the_shim_placed_it():
    """Allocations where the shim charged them, the context on the GPUs allocated on (else the first), what the
    shim did not place evenly; nothing lost to rounding."""
    from gpu_worker.daemon.native import split_by_gpu

    assert split_by_gpu({"used": 48, "overhead": 10, "on_gpus": [0, 48] + [0] * 6}, 2) == [0, 58]
    assert split_by_gpu({"used": 0, "overhead": 10, "on_gpus": [0] * 8}, 3) == [10, 0, 0]
    assert split_by_gpu({"used": 9, "overhead": 3, "on_gpus": [4, 0, 4] + [0] * 5}, 3) == [7, 0, 5]
    assert split_by_gpu({"used": 7, "overhead": 0}, 2) == [4, 3]  # a slot without figures per GPU
