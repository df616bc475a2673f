"""Wire constants and frame structs for the worker and the Python-side tools.

The numbers are declared once in gpu_worker/api/table.py (WIRE, LAYOUTS) and generated
into wire.py (here) and gpu_worker/shim/gl_wire.h (the shim); docs/protocol.md is the
reference for both.
"""
import struct

from . import wire
from .wire import (FIRST_OPCODE, FLAG_REPLY, LAUNCH_ATTR_SIZE, MAX_FRAME, MAX_REASON, OP_HELLO,  # noqa: F401
                   OP_LAUNCH, OP_PARAM_LAYOUT, OP_SET_CONTEXT, PROTOCOL_VERSION, REPLY_ENDED)

REQ_HEADER = struct.Struct(wire.REQ_HEADER_FORMAT)
REP_HEADER = struct.Struct(wire.REP_HEADER_FORMAT)
HELLO = struct.Struct(wire.HELLO_FORMAT)
LAUNCH = struct.Struct(wire.LAUNCH_FORMAT)


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
