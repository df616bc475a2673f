"""The worker's side of freezing a native process (gpu_worker/daemon/native.py) when its next call comes while
the driver's checkpoint is under way: the thaw waits for the checkpoint's end and then undoes it, so the
process is never left locked with its frozen byte cleared (its calls would then wait in the driver for ever).

A test of the daemon's state machine alone: the checkpointer is a double whose checkpoint blocks until told."""
from __future__ import annotations

import socket
import threading
import time

from gpu_worker.api import errors as E
from gpu_worker.daemon.ledger import Ledger
from gpu_worker.daemon.native import Checkpointer, NativeLink, NativeProcesses


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

    def has_room(self, gpus, nbytes) -> bool:
        return True


class Registry:
    native_tier = None
    native_why_not = None


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
