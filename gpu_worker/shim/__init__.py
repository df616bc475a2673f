"""Where the built shim lives: put shim_dir() first on LD_LIBRARY_PATH."""
from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent / "lib"


def shim_dir() -> Path:
    """The directory holding the gpulab libcuda.so.1 (built by `pip install`)."""
    if not (LIB_DIR / "libcuda.so.1").exists():
        raise FileNotFoundError(f"the gpulab shim is not built: {LIB_DIR / 'libcuda.so.1'} is missing "
                                "(run `pip install -e .` or `make build`)")
    return LIB_DIR


def native_dir() -> Path:
    """The directory holding the native build of libcuda.so.1 (and libnvidia-ml.so.1): on a GPU's own
    node it loads the real driver in-process and accounts to the vGPU's ledger on the node's worker."""
    return shim_dir() / "native"
