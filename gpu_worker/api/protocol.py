"""Wire constants and frame helpers shared by the worker and the Python-side tools.

The C side (gpu_worker/shim/gl_shim.h) carries the same numbers; docs/protocol.md is
the reference for both.
"""
import struct

PROTOCOL_VERSION = 1
REQ_HEADER = struct.Struct("<QII")  # payload length, opcode, flags
REP_HEADER = struct.Struct("<QiI")  # payload length, CUresult, reserved
FLAG_REPLY = 1

OP_HELLO = 1
OP_SET_CONTEXT = 2
OP_LAUNCH = 3
OP_PARAM_LAYOUT = 4

HELLO = struct.Struct("<IIQ")  # protocol version, client pid, token length
LAUNCH = struct.Struct("<Q7IQI")  # function id, grid xyz, block xyz, shared mem, stream id, attr count
LAUNCH_ATTR_SIZE = 72

# Frames larger than this (bulk copies excepted, which are bounded by the destination
# allocation) close the session: they cannot be a well-formed request.
DEFAULT_MAX_FRAME = 256 << 20


class ProtocolError(Exception):
    """A frame that cannot be parsed: the session is closed, the worker goes on."""
