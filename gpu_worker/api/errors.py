"""CUresult codes the worker raises, and the exception that carries one."""

SUCCESS = 0
INVALID_VALUE = 1
OUT_OF_MEMORY = 2
NOT_INITIALIZED = 3
DEVICE_UNAVAILABLE = 46
NO_DEVICE = 100
INVALID_DEVICE = 101
INVALID_IMAGE = 200
INVALID_CONTEXT = 201
INVALID_PTX = 218
INVALID_HANDLE = 400
NOT_FOUND = 500
NOT_READY = 600
ILLEGAL_ADDRESS = 700
LAUNCH_OUT_OF_RESOURCES = 701
LAUNCH_FAILED = 719
NOT_PERMITTED = 800
NOT_SUPPORTED = 801
UNKNOWN = 999

# Errors that leave a context unusable on a real GPU: every later call returns them.
STICKY = frozenset({ILLEGAL_ADDRESS, 714, 715, 716, 717, 718, LAUNCH_FAILED, 720})


class CudaError(Exception):
    """Raised by the hypervisor or a backend; becomes the CUresult of the call."""

    def __init__(self, code: int, detail: str = ""):
        super().__init__(detail or f"CUresult {code}")
        self.code = int(code)
        self.detail = detail
