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
