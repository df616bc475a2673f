"""The executor: one process per session, reading frames and running them in order.

Requests are read through a buffer so that many pipelined frames cost one recv; bulk
copy data goes from the socket straight into device (or staging) memory.  A call
without a reply that fails latches its CUresult, which the next synchronizing call
returns; errors in STICKY stay for the rest of the session, as on a GPU.
"""
from __future__ import annotations

import logging
import socket

from ..api import errors as E
from ..api.errors import CudaError
from ..api.protocol import FLAG_REPLY, REP_HEADER, REQ_HEADER, ProtocolError
from .dispatch_generated import IN_STRUCTS

log = logging.getLogger("gpulab.worker")

BULK_IN = {"cuMemcpyHtoD", "cuMemcpyHtoDAsync"}


class FrameReader:
    """Buffered reads from the session socket."""

    def __init__(self, sock: socket.socket, size: int = 1 << 20):
        self.sock = sock
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def _fill(self, need: int) -> None:
        if self.end - self.start >= need:
            return
        if self.start + need > len(self.buf):
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start:self.end]
            self.start, self.end = 0, n
        while self.end - self.start < need:
            got = self.sock.recv_into(self.mv[self.end:])
            if got == 0:
                raise EOFError("client closed the session")
            self.end += got

    def read(self, n: int) -> memoryview:
        """The next ``n`` bytes; the view is valid until the next read."""
        if n <= len(self.buf):
            self._fill(n)
            v = self.mv[self.start:self.start + n]
            self.start += n
            return v
        out = bytearray(n)
        self.read_into(memoryview(out))
        return memoryview(out)

    def read_into(self, dst: memoryview) -> None:
        n = len(dst)
        have = min(self.end - self.start, n)
        dst[:have] = self.mv[self.start:self.start + have]
        self.start += have
        pos = have
        while pos < n:
            got = self.sock.recv_into(dst[pos:], n - pos)
            if got == 0:
                raise EOFError("client closed the session in the middle of a frame")
            pos += got

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, len(self.buf))
            self.read(k)
            n -= k


class Executor:
    def __init__(self, reader: FrameReader, session, max_frame: int):
        self.sock = reader.sock
        self.session = session
        self.max_frame = max_frame
        self.reader = reader
        self.handlers = session.handlers()
        self.latched = 0
        self.sticky = 0
        self.calls = 0

    def serve(self) -> None:
        """Run frames until the client goes away or breaks the protocol."""
        reader = self.reader
        handlers = self.handlers
        while True:
            plen, op, flags = REQ_HEADER.unpack(reader.read(REQ_HEADER.size))
            want_reply = flags & FLAG_REPLY
            entry = handlers.get(op)
            if entry is None:
                if plen > self.max_frame:
                    raise ProtocolError(f"unknown opcode {op} with a frame of {plen} bytes")
                reader.skip(plen)
                log.warning("%s: unknown opcode %d", self.session.label, op)
                self._finish(want_reply, E.NOT_SUPPORTED, b"", "unknown opcode %d" % op)
                continue
            name, mode, handler = entry
            self.calls += 1
            bulk = name in BULK_IN
            if bulk:
                prefix = IN_STRUCTS[name].size + 8
                if plen < prefix:
                    raise ProtocolError(f"{name}: frame of {plen} bytes is too short")
                payload = bytes(reader.read(prefix))
                remaining = plen - prefix
            else:
                if plen > self.max_frame:
                    raise ProtocolError(f"{name}: frame of {plen} bytes exceeds the limit of {self.max_frame}")
                payload = reader.read(plen)
                remaining = 0
            result, out, detail = 0, b"", ""
            try:
                if self.sticky:
                    raise CudaError(self.sticky, "an earlier error left the context unusable")
                if mode == "syncpoint" and self.latched:
                    err, self.latched = self.latched, 0
                    raise CudaError(err, "error of an earlier asynchronous call")
                if bulk:
                    counted = _Counted(reader, remaining)
                    out = handler(payload, counted)
                    remaining = counted.left
                else:
                    out = handler(payload)
            except CudaError as exc:
                result, detail = exc.code, exc.detail
                if exc.code in E.STICKY:
                    self.sticky = exc.code
            except ProtocolError:
                raise
            except Exception as exc:  # a worker bug must not look like success, nor kill the session
                log.exception("%s: internal error in %s", self.session.label, name)
                result, detail = E.UNKNOWN, f"internal error: {exc!r}"
            if remaining:
                reader.skip(remaining)
            self._finish(want_reply, result, out, f"{name}: {detail}")

    def _finish(self, want_reply, result, out, detail) -> None:
        if result:
            log.info("%s: CUresult %d (%s)", self.session.label, result, detail)
        if want_reply:
            if result:
                out = b""
            header = REP_HEADER.pack(len(out), result, 0)
            if len(out) > 65536:
                self.sock.sendall(header)
                self.sock.sendall(out)
            else:
                self.sock.sendall(header + bytes(out))
        elif result and not self.latched:
            self.latched = result


class _Counted:
    """Lets a bulk handler read exactly the rest of its frame."""

    def __init__(self, reader: FrameReader, n: int):
        self.reader = reader
        self.left = n

    def read_into(self, dst: memoryview) -> None:
        if len(dst) > self.left:
            raise ProtocolError("bulk data overruns its frame")
        self.reader.read_into(dst)
        self.left -= len(dst)
