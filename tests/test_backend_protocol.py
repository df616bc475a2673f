"""Both backends implement gpu_worker.backends.base.Backend, and the protocol says what is really called.

Checked by inspection, without a GPU: the cuda backend's class is importable anywhere (it calls
the driver only when instantiated).  The emulated backend's VRAM tiering hooks are also run here:
CI's data path for offload and restore (the cuda backend's: tests/test_gpu_tiering_backend.py).
"""
from __future__ import annotations

import ast
import inspect
import os
import struct
from pathlib import Path

import pytest
from cuda.bindings import driver as drv

from gpu_worker.api import errors as E
from gpu_worker.api.errors import CudaError, Refusal
from gpu_worker.backends.base import Backend
from gpu_worker.backends.cuda import CudaBackend
from gpu_worker.backends.emulated import EmulatedBackend
from gpu_worker.daemon.dispatch_generated import OPS
from gpu_worker.daemon.session import Session

DAEMON = Path(__file__).resolve().parent.parent / "gpu_worker" / "daemon"
BACKENDS = [EmulatedBackend, CudaBackend]
TIER_HOOKS = {"physical_size", "current_device", "synchronize_all", "mem_release", "mem_remap", "copy_out",
              "copy_in", "host_buffer", "host_free"}


def protocol_members() -> set[str]:
    return {n for n in vars(Backend) if not n.startswith("_")} | set(Backend.__annotations__)


def conformance_problems(cls) -> list[str]:
    """What keeps ``cls`` from serving as a Backend: members missing, or not callable as the session calls them."""
    problems = []
    for name in sorted(protocol_members()):
        if name in Backend.__annotations__ and name not in vars(Backend):
            if not isinstance(getattr(cls, name, None), str):
                problems.append(f"{name}: not a str class attribute")
            continue
        impl = inspect.getattr_static(cls, name, None)  # declared on the class: __getattr__ does not count
        if impl is None or not callable(impl):
            problems.append(f"{name}: missing")
            continue
        wanted = [p for p in inspect.signature(getattr(Backend, name)).parameters.values()][1:]
        try:  # the session passes every argument by position
            inspect.signature(impl).bind(None, *[object()] * len(wanted))
        except TypeError as exc:
            problems.append(f"{name}{inspect.signature(impl)}: cannot take {len(wanted)} arguments ({exc})")
    return problems


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_backend_provides_every_member_of_the_protocol(cls):
    assert TIER_HOOKS <= protocol_members()
    assert conformance_problems(cls) == []


def test_the_check_catches_a_missing_member_and_a_wrong_signature():
    class Broken(EmulatedBackend):
        mem_free = None

        def launch(self, func, grid, block):
            pass

    problems = conformance_problems(Broken)
    assert any(p.startswith("mem_free:") for p in problems)
    assert any(p.startswith("launch(") for p in problems)
    assert len(problems) == 2


def backend_attributes_used(path: Path) -> set[str]:
    """Names read on a backend in a daemon module: ``self.backend.X`` or ``backend.X``."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            target = node.value
            if (isinstance(target, ast.Attribute) and target.attr == "backend") or \
                    (isinstance(target, ast.Name) and target.id == "backend"):
                used.add(node.attr)
    return used


def test_the_protocol_declares_exactly_what_the_daemon_calls():
    used = set()
    for module in sorted(DAEMON.glob("*.py")):
        used |= backend_attributes_used(module)
    assert used == protocol_members()


def forwarded_by_name() -> list[str]:
    """Driver functions the generated dispatch takes from the backend by name (Session.impl)."""
    return sorted({name for name, _mode, factory in OPS.values() if factory is not None and not hasattr(Session, name)})


def test_every_forwarded_driver_function_is_served():
    names = forwarded_by_name()
    assert "cuStreamCreate" in names and "cuMemAlloc" not in names  # the session keeps memory to itself
    missing = [n for n in names if inspect.getattr_static(EmulatedBackend, n, None) is None]
    assert missing == [], "the emulated backend lacks forwarded functions"
    # the cuda backend writes out some and forwards the rest to cuda-python under the same name
    missing = [n for n in names if inspect.getattr_static(CudaBackend, n, None) is None and not hasattr(drv, n)]
    assert missing == [], "cuda-python has no function of these names"


# ------------------------------------------------------------- VRAM tiering hooks, emulated
def emulated(total_memory: int) -> EmulatedBackend:
    b = EmulatedBackend(total_memory=total_memory)
    (ctx,) = b.cuDevicePrimaryCtxRetain(0)
    b.set_current(ctx)
    return b


def test_emulated_offload_and_restore_keep_bytes_and_address():
    b = emulated(1 << 20)
    assert b.current_device() == 0
    assert (b.physical_size(1000), b.physical_size(256)) == (1024, 256)
    ptr = b.mem_alloc(1000)
    data = os.urandom(1000)
    b.view(ptr, 1000)[:] = data
    host = b.host_buffer(1000)
    b.synchronize_all()
    b.copy_out(ptr, 1000, host)
    free = b.cuMemGetInfo()[0]
    b.mem_release(ptr)
    assert b.cuMemGetInfo()[0] == free + 1000
    with pytest.raises(Refusal) as fault:  # a kernel's access, or a copy: never while offloaded
        b.view(ptr + 8, 4, illegal=True)
    assert fault.value.code == E.ILLEGAL_ADDRESS and "its memory is offloaded" in fault.value.why
    A = drv.CUpointer_attribute  # queries still answer: the range stays known
    assert b.cuPointerGetAttribute(int(A.CU_POINTER_ATTRIBUTE_RANGE_SIZE), ptr + 8) == (struct.pack("<Q", 1000),)
    assert b.cuPointerGetAttribute(int(A.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR), ptr + 8) == (struct.pack("<Q", ptr),)
    b.mem_remap(ptr)
    assert b.cuMemGetInfo()[0] == free and len(b.view(ptr, 1000)) == 1000  # memory again (its bytes undefined,
    # as on a GPU: the emulated device reuses what it released)
    b.copy_in(ptr, 1000, host)
    assert bytes(b.view(ptr, 1000)) == data
    b.host_free(host)
    with pytest.raises(ValueError):  # the freed buffer cannot be read by mistake
        host[0]
    b.mem_free(ptr)
    assert b.cuMemGetInfo()[0] == 1 << 20


def test_emulated_remap_on_a_full_device_is_refused_and_changes_nothing():
    b = emulated(4096)
    ptr = b.mem_alloc(3000)
    b.mem_release(ptr)
    other = b.mem_alloc(2000)  # takes the room the release gave back
    with pytest.raises(CudaError) as full:
        b.mem_remap(ptr)
    assert full.value.code == E.OUT_OF_MEMORY
    assert b.cuMemGetInfo()[0] == 4096 - 2000
    with pytest.raises(Refusal, match="offloaded"):
        b.view(ptr, 1)
    b.mem_free(other)
    b.mem_remap(ptr)
    assert b.cuMemGetInfo()[0] == 4096 - 3000
    b.mem_release(ptr)
    b.mem_free(ptr)  # freed while offloaded: its reservation goes, no device bytes twice
    assert b.cuMemGetInfo()[0] == 4096


def test_emulated_tier_hooks_refuse_a_move_out_of_order():
    b = emulated(1 << 20)
    ptr = b.mem_alloc(64)
    with pytest.raises(CudaError) as hot:
        b.mem_remap(ptr)
    assert hot.value.code == E.INVALID_VALUE
    b.mem_release(ptr)
    with pytest.raises(CudaError) as twice:
        b.mem_release(ptr)
    assert twice.value.code == E.INVALID_VALUE
    b.set_current(None)
    with pytest.raises(CudaError) as none:
        b.current_device()
    assert none.value.code == E.INVALID_CONTEXT
