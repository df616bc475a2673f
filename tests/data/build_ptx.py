"""Recompile kernels.cu into kernels.ptx with NVRTC (no GPU needed)."""
from pathlib import Path

from cuda.bindings import nvrtc

HERE = Path(__file__).resolve().parent


def _compile(source: bytes, arch: str):
    err, prog = nvrtc.nvrtcCreateProgram(source, b"kernels.cu", 0, [], [])
    (err,) = nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture={arch}".encode()])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.decode())
    return prog


def compile_ptx(source: bytes, arch: str = "compute_80") -> bytes:
    prog = _compile(source, arch)
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.rstrip(b"\0")


def compile_cubin(source: bytes, arch: str = "sm_90") -> bytes:
    """An ELF cubin (NVRTC compiles it without a GPU)."""
    prog = _compile(source, arch)
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return cubin


if __name__ == "__main__":
    (HERE / "kernels.ptx").write_bytes(compile_ptx((HERE / "kernels.cu").read_bytes()))
