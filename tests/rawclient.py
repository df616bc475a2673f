"""A test tool: CUDA sessions that speak the worker's wire protocol themselves, without the shim.

One Python process can hold hundreds of these (a session is one Unix socket; the worker forks one
executor per session), where as many shim clients would be as many Python processes: more than a
2-core CI machine runs. Frames are built from gpu_worker's own tables (opcodes and request fields
from gpu_worker.api.table through codegen's wire rules, headers from gpu_worker.api.protocol), so
nothing here repeats a number of the protocol.

Unlike the shim, every call asks for a reply (FLAG_REPLY), those the shim pipelines included
(cuMemFree, set_context): each call returns its own result, ``(CUresult, values, reason)``, with
``values`` the reply's fields in the table's order (a copy to the host: its bytes) and ``reason``
the worker's sentence for a refused call ("" otherwise).
"""
from __future__ import annotations

import itertools
import os
import socket
import struct

from gpu_worker.api import codegen, table as T
from gpu_worker.api.protocol import (FLAG_REPLY, HELLO, OP_HELLO, OP_SET_CONTEXT, PROTOCOL_VERSION, REP_HEADER,
                                     REPLY_ENDED, REQ_HEADER)
from gpu_worker.api.wire import REPLY_KEEPALIVE

FUNCS = T.by_name()
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
_ids = itertools.count(0x1000)  # client-minted handle ids start here (the worker refuses lower ones)


def say_hello(sock: socket.socket, token: str) -> tuple[int, str]:
    """The handshake on a connected socket: HELLO with the protocol version, this pid and ``token``; the
    worker's (CUresult, message)."""
    tok = token.encode()
    sock.sendall(REQ_HEADER.pack(HELLO.size + len(tok), OP_HELLO, FLAG_REPLY)
                 + HELLO.pack(PROTOCOL_VERSION, os.getpid(), len(tok)) + tok)
    plen, res, _ = REP_HEADER.unpack(sock.recv(REP_HEADER.size, socket.MSG_WAITALL))
    return res, sock.recv(plen, socket.MSG_WAITALL).decode()


class RawSession:
    """One session on a worker's Unix socket. ``hello`` is (CUresult, message) of the handshake;
    ``ended`` is the sentence of the worker's REPLY_ENDED frame once one came (every call then
    returns its CUresult)."""

    def __init__(self, path: str, token: str, timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path[len("unix://"):] if path.startswith("unix://") else path)
        self.hello = say_hello(self.sock, token)
        self.ended = ""
        self.ended_code = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError("the worker closed the session")
            buf += got
        return bytes(buf)

    def _reply(self) -> tuple[int, bytes, str]:
        """The next reply, keepalives skipped: (CUresult, payload without its reason, reason)."""
        while True:
            plen, res, word = REP_HEADER.unpack(self._recv(REP_HEADER.size))
            if word & REPLY_KEEPALIVE:
                continue
            body = self._recv(plen)
            if word & REPLY_ENDED:  # the worker's last frame: u32 CUresult, then its sentence
                (self.ended_code,) = U32.unpack_from(body)
                self.ended = body[4:].decode("utf-8", "replace")
                return self.ended_code, b"", self.ended
            cut = len(body) - word
            return res, body[:cut], body[cut:].decode("utf-8", "replace")

    def _send(self, frame: bytes) -> tuple[int, bytes, str]:
        """Send a request and read its reply; a worker that already ended the session may have closed
        the socket, and its last frame (REPLY_ENDED) is then still there to read, as the shim finds it."""
        if self.ended:  # nothing follows that frame: every call returns its CUresult
            return self.ended_code, b"", self.ended
        try:
            self.sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return self._reply()

    def call(self, name: str, data: bytes = b"", **fields) -> tuple[int, tuple, str]:
        """Driver function ``name`` with its request fields by the table's parameter names (a minted
        handle is made up here when not given, and returned first); ``data`` is the variable field
        (a host-to-device copy's bytes, a string)."""
        f = FUNCS[name]
        fixed, var = codegen.wire_in(f)
        minted = []
        for p in fixed:
            if p.rule == "mint" and p.name not in fields:
                fields[p.name] = next(_ids)
                minted.append(fields[p.name])
        payload = struct.pack(codegen.in_struct(f), *(fields[p.name] for p in fixed))
        if var is not None:
            payload += U64.pack(len(data)) + data
        res, body, reason = self._send(REQ_HEADER.pack(len(payload), T.opcode(f), FLAG_REPLY) + payload)
        if res:
            return res, (), reason
        _fixed, out_var, out_bulk = codegen.wire_out(f)
        st = struct.Struct(codegen.out_struct(f))
        values = tuple(minted) + st.unpack_from(body)
        if out_var is not None:
            (n,) = U64.unpack_from(body, st.size)
            values += (body[st.size + 8:st.size + 8 + n],)
        if out_bulk is not None:
            values += (body,)
        return 0, values, ""

    # ---------------------------------------------------------------- shorthands
    def set_context(self, ctx: int) -> tuple[int, tuple, str]:
        res, _, reason = self._send(REQ_HEADER.pack(8, OP_SET_CONTEXT, FLAG_REPLY) + U64.pack(ctx))
        return res, (), reason

    def open_device(self, dev: int = 0) -> tuple[int, tuple, str]:
        """cuDevicePrimaryCtxRetain(dev), made current (what a program does first)."""
        r = self.call("cuDevicePrimaryCtxRetain", dev=dev)
        return r if r[0] else self.set_context(r[1][0])

    def alloc(self, n: int):
        return self.call("cuMemAlloc", bytesize=n)

    def free(self, ptr: int):
        return self.call("cuMemFree", dptr=ptr)

    def htod(self, ptr: int, data: bytes):
        return self.call("cuMemcpyHtoD", data, dstDevice=ptr, ByteCount=len(data))

    def dtoh(self, ptr: int, n: int):
        return self.call("cuMemcpyDtoH", srcDevice=ptr, ByteCount=n)

    def memset(self, ptr: int, byte: int, n: int):
        return self.call("cuMemsetD8", dstDevice=ptr, uc=byte, N=n)

    def sync(self):
        return self.call("cuCtxSynchronize")

    def mem_info(self):
        return self.call("cuMemGetInfo")

    def close(self) -> None:
        self.sock.close()
