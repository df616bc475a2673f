"""Compile the shims with the system C compiler (no CUDA toolkit needed).

``lib/libcuda.so.1`` forwards driver calls to a worker; ``lib/native/libcuda.so.1`` (native mode, x86-64)
passes them to the node's real driver in-process, hooking what the hypervisor must see. The native
shim's exported pass-through entry points are generated here, at build time, from
``native/driver_exports.txt``: each is a jump through a table the shim fills when it loads the real driver.
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent
# One job per file; gl_shim.h is their shared internal header.
SOURCES = ["transport.c", "memory.c", "context.c", "launch.c", "images.c", "procaddress.c", "log.c",
           "gl_generated.c"]
LIB_NAME = "libcuda.so.1"


NATIVE = SRC / "native"
NATIVE_SOURCES = ["real.c", "attach.c", "memory.c", "devices.c", "launch.c"]
# The NVML stand-in: the same loader and ledger attachment, its own hooks.
NVML_NAME = "libnvidia-ml.so.1"
NVML_SOURCES = ["real.c", "attach.c", "nvml.c"]
FLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-fPIC", "-shared", "-fvisibility=hidden"]


def _compile(target: Path, sources: list, extra: list = ()) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    cc = shlex.split(os.environ.get("CC", "cc"))
    subprocess.run([*cc, *FLAGS, "-Wl,-soname," + target.name, *extra, "-o", str(target), *[str(s) for s in sources],
                    "-ldl", "-lpthread"], check=True)
    # Tools that look for the unversioned name (e.g. a linker) find the same library.
    alias = target.parent / target.name.rsplit(".", 1)[0]
    if alias.is_symlink() or alias.exists():
        alias.unlink()
    alias.symlink_to(target.name)
    return target


def build(outdir: Path | str = SRC / "lib") -> Path:
    """The forwarding shim, and beside it (in ``native/``) the native one where it can be built."""
    target = _compile(Path(outdir) / LIB_NAME, [SRC / s for s in SOURCES])
    if native_supported():
        build_native(Path(outdir) / "native")
    return target


def build_driver_double(outdir: Path | str) -> Path:
    """A test double of a GPU node's driver for native mode on machines without a GPU: the forwarding shim
    reading GPULAB_DRIVER_WORKER and GPULAB_DRIVER_TOKEN (so it holds a session of its own beside the native
    shim above it), bound to its own symbols (-Bsymbolic) as a real driver library is."""
    return _compile(Path(outdir) / LIB_NAME, [SRC / s for s in SOURCES],
                    ['-DGL_ENV_PREFIX="GPULAB_DRIVER_"', "-Wl,-Bsymbolic"])


# ----------------------------------------------------------------------------------------- native mode
def native_supported() -> bool:
    """The pass-through entry points are a few instructions of x86-64 each."""
    return platform.machine() in ("x86_64", "AMD64")


def driver_exports(listing: str = "driver_exports.txt") -> list[str]:
    lines = (NATIVE / listing).read_text().split("\n")
    return [name.strip() for name in lines if name.strip() and not name.startswith("#")]


def native_hooks(sources: list[str] = NATIVE_SOURCES, prefix: str = "cu") -> list[str]:
    """The entry points a native library defines itself (GL_EXPORT functions, and those made by its macros)."""
    names = []
    for src in sources:
        text = (NATIVE / src).read_text()
        names += re.findall(rf"GL_EXPORT \w+ ({prefix}\w+)\(", text)
        names += re.findall(rf"^[A-Z_]+\(({prefix}\w+), \"", text, re.M)
    return sorted(set(names))


# Every other exported name: if the worker froze this process (a word of its ledger slot), thaw first,
# keeping the caller's arguments (integer and vector registers) intact; then jump to the real function.
TRAMPOLINE = """
    .globl {name}
    .type {name}, @function
{name}:
    movq gl_frozen_at(%rip), %r11
    cmpb $0, (%r11)
    jne 1f
    jmp *gl_slots+{offset}(%rip)
1:  movl ${index}, %r11d
    jmp gl_thaw_then_jump
    .size {name}, .-{name}
"""

THAW_THEN_JUMP = """
    .text
    .type gl_thaw_then_jump, @function
gl_thaw_then_jump:
    pushq %rdi
    pushq %rsi
    pushq %rdx
    pushq %rcx
    pushq %r8
    pushq %r9
    pushq %r11
    subq $128, %rsp
""" + "".join(f"    movdqu %xmm{i}, {16 * i}(%rsp)\n" for i in range(8)) + """\
    call gl_thaw_if_frozen
""" + "".join(f"    movdqu {16 * i}(%rsp), %xmm{i}\n" for i in range(8)) + """\
    addq $128, %rsp
    popq %r11
    popq %r9
    popq %r8
    popq %rcx
    popq %rdx
    popq %rsi
    popq %rdi
    leaq gl_slots(%rip), %rax
    jmp *(%rax,%r11,8)
    .size gl_thaw_then_jump, .-gl_thaw_then_jump
"""


def native_exports_source(listing: str = "driver_exports.txt", hooks: list[str] | None = None) -> str:
    """The C file of the pass-through entry points (and their addresses), the table they jump through, and the
    hooks' table."""
    hooks = native_hooks() if hooks is None else hooks
    names = [n for n in driver_exports(listing) if n not in set(hooks)]
    quoted = ", ".join('"' + n + '"' for n in names)
    out = [f"/* GENERATED by gpu_worker/shim/build.py from native/{listing} at build time. */",
           "#include <stddef.h>",
           f"const char *const gl_export_names[] = {{{quoted}}};",
           f"void *gl_slots[{len(names)}];",
           f"const size_t gl_nexports = {len(names)};",
           "typedef struct { const char *name; void *hook; } gl_hook;"]
    out += [f"extern void {n}(void);" for n in hooks + names]
    out.append("void *const gl_entries[] = {" + ", ".join(f"(void *){n}" for n in names) + "};")
    out.append("const gl_hook gl_hooks[] = {" + ", ".join(f'{{"{n}", (void *){n}}}' for n in hooks) + "};")
    out.append(f"const size_t gl_nhooks = {len(hooks)};")
    asm = THAW_THEN_JUMP + "".join(TRAMPOLINE.format(name=n, index=i, offset=8 * i) for i, n in enumerate(names))
    out.append("__asm__(" + "\n".join(f'"{line}\\n"' for line in asm.split("\n")) + ");")
    return "\n".join(out) + "\n"


def build_native(outdir: Path | str = SRC / "lib" / "native") -> Path:
    if not native_supported():
        raise RuntimeError(f"native mode is built for x86-64 only, not {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        exports = Path(tmp) / "exports_generated.c"
        exports.write_text(native_exports_source())
        target = _compile(Path(outdir) / LIB_NAME, [*(NATIVE / s for s in NATIVE_SOURCES), SRC / "log.c", exports],
                          ["-I" + str(SRC)])
        nvml = Path(tmp) / "nvml_exports_generated.c"
        nvml.write_text(native_exports_source("nvml_exports.txt", native_hooks(NVML_SOURCES, "nvml")))
        _compile(Path(outdir) / NVML_NAME, [*(NATIVE / s for s in NVML_SOURCES), SRC / "log.c", nvml],
                 ["-I" + str(SRC), "-DGL_NVML"])
        return target


def exports_from_header(cuda_h: str) -> list[str]:
    """The driver's exported names as cuda.h declares them (each per-thread-stream and legacy variant too),
    with the forwarding shim's, for native/driver_exports.txt."""
    names = set(driver_exports())
    for define in ([], ["-DCUDA_API_PER_THREAD_DEFAULT_STREAM"], ["-D__CUDA_API_VERSION_INTERNAL"]):
        text = subprocess.run(["cc", "-E", "-P", "-I" + str(Path(cuda_h).parent), *define, "-"], input="#include <cuda.h>",
                              capture_output=True, text=True, check=True).stdout
        for decl in " ".join(text.split("\n")).split(";"):
            if re.match(r"\s*(extern\s+)?CUresult\s", decl):
                names.update(re.findall(r"\b(cu\w+)\s*\(", decl))
    return sorted(names)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--exports-from"]:
        head = [line for line in (NATIVE / "driver_exports.txt").read_text().split("\n") if line.startswith("#")]
        (NATIVE / "driver_exports.txt").write_text("\n".join(head + exports_from_header(sys.argv[2])) + "\n")
    else:
        print(build(sys.argv[1] if len(sys.argv) > 1 else SRC / "lib"))
