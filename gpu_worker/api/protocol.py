"""Wire constants and frame structs for the worker and the Python-side tools.

The numbers are declared once in gpu_worker/api/table.py (WIRE, LAYOUTS) and generated
into wire.py (here) and gpu_worker/shim/gl_wire.h (the shim); docs/protocol.md is the
reference for both.
"""
import struct

from . import wire
from .wire import (FIRST_OPCODE, FLAG_REPLY, LAUNCH_ATTR_SIZE, MAX_FRAME, OP_HELLO, OP_LAUNCH,  # noqa: F401
                   OP_PARAM_LAYOUT, OP_SET_CONTEXT, PROTOCOL_VERSION)

REQ_HEADER = struct.Struct(wire.REQ_HEADER_FORMAT)
REP_HEADER = struct.Struct(wire.REP_HEADER_FORMAT)
HELLO = struct.Struct(wire.HELLO_FORMAT)
LAUNCH = struct.Struct(wire.LAUNCH_FORMAT)


class ProtocolError(Exception):
    """A frame that cannot be parsed: the session is closed, the worker goes on."""
