"""Compile the shim into ``libcuda.so.1`` with the system C compiler (no CUDA toolkit needed)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent
# One job per file; gl_shim.h is their shared internal header.
SOURCES = ["transport.c", "memory.c", "context.c", "launch.c", "images.c", "procaddress.c", "log.c",
           "gl_generated.c"]
LIB_NAME = "libcuda.so.1"


def build(outdir: Path | str = SRC / "lib") -> Path:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / LIB_NAME
    cc = shlex.split(os.environ.get("CC", "cc"))
    cmd = [*cc, "-O2", "-g", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-fPIC", "-shared",
           "-fvisibility=hidden", "-Wl,-soname," + LIB_NAME, "-o", str(target),
           *[str(SRC / s) for s in SOURCES], "-lpthread"]
    subprocess.run(cmd, check=True)
    # Tools that look for the unversioned name (e.g. a linker) find the same library.
    alias = out / "libcuda.so"
    if alias.is_symlink() or alias.exists():
        alias.unlink()
    alias.symlink_to(LIB_NAME)
    return target


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else SRC / "lib"))
