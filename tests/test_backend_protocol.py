"""Both backends implement gpu_worker.backends.base.Backend, and the protocol says what is really called.

Checked by inspection, without a GPU: the cuda backend's class is importable anywhere (it calls
the driver only when instantiated)."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from cuda.bindings import driver as drv

from gpu_worker.backends.base import Backend
from gpu_worker.backends.cuda import CudaBackend
from gpu_worker.backends.emulated import EmulatedBackend
from gpu_worker.daemon.dispatch_generated import OPS
from gpu_worker.daemon.session import Session

DAEMON = Path(__file__).resolve().parent.parent / "gpu_worker" / "daemon"
BACKENDS = [EmulatedBackend, CudaBackend]


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
    for module in ("session.py", "worker.py", "executor.py", "pacing.py"):
        used |= backend_attributes_used(DAEMON / module)
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
