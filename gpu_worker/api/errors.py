"""CUresult codes the worker raises, and the exceptions that carry one.

Two kinds, because two readers: the program gets the exact CUresult either way; the person
running it reads the reason of a :class:`Refusal` (the shim prints it on stderr, i.e. in the
notebook cell), while a plain :class:`CudaError` is the driver's own answer that programs
handle without anyone reading it (a probe for a missing kernel name, NOT_READY, ...).
"""

SUCCESS = 0
INVALID_VALUE = 1
OUT_OF_MEMORY = 2
NOT_INITIALIZED = 3
DEVICE_UNAVAILABLE = 46
NO_DEVICE = 100
INVALID_DEVICE = 101
INVALID_IMAGE = 200
INVALID_CONTEXT = 201
ECC_UNCORRECTABLE = 214  # what a GPU says of bytes it could not keep (a lost cold file, tiers.py)
INVALID_PTX = 218
INVALID_HANDLE = 400
ILLEGAL_STATE = 401
NOT_FOUND = 500
NOT_READY = 600
ILLEGAL_ADDRESS = 700
LAUNCH_OUT_OF_RESOURCES = 701
LAUNCH_FAILED = 719
NOT_PERMITTED = 800
NOT_SUPPORTED = 801
STREAM_CAPTURE_UNSUPPORTED = 900
STREAM_CAPTURE_INVALIDATED = 901
STREAM_CAPTURE_UNMATCHED = 903
UNKNOWN = 999

# Errors that leave a context unusable on a real GPU: every later call returns them.
STICKY = frozenset({ILLEGAL_ADDRESS, 714, 715, 716, 717, 718, LAUNCH_FAILED, 720})


def name_of(code: int) -> str:
    """CUDA_ERROR_... for a code, as cuda-bindings names it."""
    from cuda.bindings import driver

    try:
        return driver.CUresult(code).name
    except ValueError:
        return f"CUresult {code}"


class CudaError(Exception):
    """Raised by the hypervisor or a backend; becomes the CUresult of the call (and a log line)."""

    def __init__(self, code: int, detail: str = ""):
        super().__init__(detail or f"CUresult {code}")
        self.code = int(code)
        self.detail = detail


class Refusal(CudaError):
    """A call the vGPU refuses for a reason the person running the program should read.

    ``why`` is said in the person's terms, with the numbers that matter ("this vGPU's quota is
    2.0 GiB, 1.9 GiB free"). The sentence sent to the client is ``"<call> refused: <why>"``;
    ``call`` defaults to the name of the function being served, and ``call=""`` makes ``why``
    the whole sentence.
    """

    def __init__(self, code: int, why: str, call: str | None = None):
        super().__init__(code, why)
        self.why = why
        self.call = call

    def sentence(self, function: str) -> str:
        if self.call == "":
            return self.why
        return f"{self.call or function} refused: {self.why}"
