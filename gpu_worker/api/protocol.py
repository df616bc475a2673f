"""Wire constants and frame structs for the worker and the Python-side tools.

The numbers are declared once in gpu_worker/api/table.py (WIRE, LAYOUTS) and generated
into wire.py (here) and gpu_worker/shim/gl_wire.h (the shim); docs/protocol.md is the
reference for both.
"""
import struct

from . import wire
from .errors import INVALID_VALUE, CudaError
from .table import MEMPOOL_ATTR_SIZES
from .wire import (FIRST_OPCODE, FLAG_REPLY, LAUNCH_ATTR_SIZE, MAX_FRAME, MAX_REASON, OP_HELLO,  # noqa: F401
                   OP_LAUNCH, OP_PARAM_LAYOUT, OP_SET_CONTEXT, PROTOCOL_VERSION, REPLY_ENDED)

REQ_HEADER = struct.Struct(wire.REQ_HEADER_FORMAT)
REP_HEADER = struct.Struct(wire.REP_HEADER_FORMAT)
HELLO = struct.Struct(wire.HELLO_FORMAT)
LAUNCH = struct.Struct(wire.LAUNCH_FORMAT)
MEMPOOL_PROPS = struct.Struct(wire.MEMPOOL_PROPS_FORMAT)


class ProtocolError(Exception):
    """A frame that cannot be parsed: the session is closed, the worker goes on."""


def clip_reason(reason: str) -> bytes:
    """A sentence for the person as UTF-8, cut to MAX_REASON bytes on a character boundary."""
    return reason.encode()[:MAX_REASON].decode("utf-8", "ignore").encode()


def ended_frame(code: int, reason: str) -> bytes:
    """The worker's last frame of a session (``REPLY_ENDED``): the CUresult every later call of the
    program returns, and the sentence saying why. It may come instead of any reply, or while the
    shim is still sending; nothing follows it."""
    why = clip_reason(reason)
    return REP_HEADER.pack(4 + len(why), code, REPLY_ENDED | len(why)) + struct.pack("<I", code) + why


def pool_attribute_bytes(attr: int, value: int) -> bytes:
    """A memory pool attribute's value as the driver writes it: a cuuint64_t or an int (MEMPOOL_ATTR_SIZES)."""
    return struct.pack("<Q" if MEMPOOL_ATTR_SIZES[attr] == 8 else "<i", value)


def pool_attribute_value(attr: int, data) -> int:
    """The value a program passed to cuMemPoolSetAttribute; CUDA_ERROR_INVALID_VALUE for an unknown attribute."""
    size = MEMPOOL_ATTR_SIZES.get(attr)
    if size is None or len(data) != size:
        raise CudaError(INVALID_VALUE, f"memory pool attribute {attr} with a {len(data)}-byte value")
    return struct.unpack("<Q" if size == 8 else "<i", bytes(data))[0]
