"""The generated stubs and dispatch must match the table, and the table must be coherent."""
import subprocess
import sys

from gpu_worker.api import table as T
from gpu_worker.daemon.dispatch_generated import OPS
from gpu_worker.client import shim_dir


def test_generated_files_are_current():
    p = subprocess.run([sys.executable, "-m", "gpu_worker.api.codegen", "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_every_forwarded_function_has_an_opcode_and_an_exported_symbol():
    names = {name for name, _, _ in OPS.values()}
    assert names == {f.name for f in T.FORWARDED}
    exported = subprocess.run(["nm", "-D", "--defined-only", str(shim_dir() / "libcuda.so.1")],
                              capture_output=True, text=True, check=True).stdout
    symbols = {line.split()[-1] for line in exported.splitlines()}
    missing = {f.symbol for f in T.FORWARDED} - symbols
    assert not missing
    # every driver entry point a program could dlsym answers (with NOT_SUPPORTED at worst)
    all_names = (T.__file__.replace("api/table.py", "shim/driver_api_names.txt"))
    wanted = set(open(all_names).read().split())
    plain_abi_changed = {f.name for f in T.FORWARDED if f.symbol != f.name}
    assert not (wanted - symbols - plain_abi_changed - set(T.LOCAL))


def test_async_functions_return_nothing():
    for f in T.FORWARDED:
        if f.mode == "async":
            assert not [p for p in f.params if p.rule in ("out", "outstr", "outbytes", "outvar", "hostout")], f.name
        assert not f.send_now or f.mode == "async", f"{f.name}: send_now is for pipelined calls"
    # what frees device memory reaches the worker at once (the vGPU's usage figure stays current)
    assert T.by_name()["cuMemFree"].send_now


def test_wire_constants_agree_with_the_table():
    """The shim's gl_wire.h and the worker's wire/protocol modules carry exactly the table's numbers."""
    import re
    import struct

    from gpu_worker.api import protocol, wire
    from gpu_worker.api.codegen import WIRE_H

    header = dict(re.findall(r"^#define GL_(\w+) (\d+)u", WIRE_H.read_text(), re.M))
    expected = {c.name: c.value for c in T.WIRE}
    expected.update({f"{lay.name}_SIZE": struct.calcsize(lay.format) for lay in T.LAYOUTS})
    assert {k: int(v) for k, v in header.items()} == expected
    for c in T.WIRE:
        assert getattr(wire, c.name) == c.value
    for lay in T.LAYOUTS:
        assert getattr(protocol, lay.name).format == lay.format
    assert protocol.FIRST_OPCODE == T.FIRST_OPCODE == min(OPS)
    # nothing in the hand-written shim spells a wire number out again
    shim = WIRE_H.parent
    for src in [*shim.glob("*.c"), shim / "gl_shim.h"]:
        if src.name == "gl_generated.c":
            continue
        text = src.read_text()
        assert not re.search(r"#define GL_(OP_\w+|\w+_HEADER\w*|FLAG_\w+|PROTOCOL_VERSION|LAUNCH_ATTR_SIZE)\b", text), src
