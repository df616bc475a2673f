"""The executor: one process per session, reading frames and running them in order.

Requests are read through a buffer so that many pipelined frames cost one recv; bulk
copy data goes from the socket straight into device (or staging) memory.  A call
without a reply that fails latches its CUresult, which the next synchronizing call
returns; errors in STICKY stay for the rest of the session, as on a GPU.

A refusal's reason (:class:`~gpu_worker.api.errors.Refusal`) travels with the CUresult
at the end of the reply, and a latched error keeps its reason until it is returned, so
the person running the program reads why, not only the code.

Liveness: while a call has run for more than ``KEEPALIVE_AFTER_MS`` a small thread sends a
keepalive (a reply header flagged ``REPLY_KEEPALIVE``) every ``KEEPALIVE_EVERY_MS``, so the
shim, which gives up on a worker silent for its limit, tells a long kernel from a hung worker.

Accounting: each call leaves a record (start, end, opcode, bytes, CUresult) in a bounded queue;
the same small thread publishes the records and the counters into the process's slot of the
vGPU's ledger a few times a second, so the hot path pays for a tuple, not for shared memory.

Revocation: the daemon marks the ledger and sends SIGUSR1; the executor frees the session's
memory at once (between calls, or in the handler when it is waiting for the next frame) and
answers every later call with the reason.

VRAM tiers (tiers.py): the daemon writes a tier request into the ledger and sends SIGUSR2; the
executor moves the process's allocations at once when it is waiting for a frame, else right after
the call, keepalives flowing meanwhile.  Before a call that needs the device memory (``TOUCHING``
and launches) a process whose memory is off the GPU gets it back; such calls also stamp the touch
time the idle policy reads.  SIGTERM (the worker stops): the executor deletes its cold files, tells
the program what was lost in a last ``REPLY_ENDED`` frame, and exits.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import threading
import time

from ..api import errors as E
from ..api import protocol
from ..api.errors import CudaError, Refusal
from ..api.protocol import FLAG_REPLY, OP_LAUNCH, REP_HEADER, REQ_HEADER, ProtocolError
from ..api.table import TOUCHING
from ..api.wire import KEEPALIVE_AFTER_MS, KEEPALIVE_EVERY_MS, MAX_REASON, REPLY_KEEPALIVE
from ..client.units import format_size
from .dispatch_generated import IN_STRUCTS, OPS

log = logging.getLogger("gpulab.worker")

BULK_IN = {"cuMemcpyHtoD", "cuMemcpyHtoDAsync"}
TRACE_BATCH = 1024  # call records kept between two publications (older ones are dropped from the trace)
# opcodes of the calls that need the process's device memory on the GPU
TOUCHING_OPS = frozenset([op for op, (name, _mode, _factory) in OPS.items() if name in TOUCHING] + [OP_LAUNCH])
TOUCH_EVERY = 0.2  # seconds: a touching call stamps the touch time when the last stamp is older


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
        # grown as the bytes arrive, a buffer at a time: a header announcing a huge frame costs
        # nothing until its data comes (memory follows bytes received, not bytes announced)
        out = bytearray()
        step = len(self.buf)
        while len(out) < n:
            out += self.read(min(step, n - len(out)))
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
        self.latched_reason = ""  # the person's sentence for the latched error, if it has one
        self.sticky = 0
        self.sticky_untold = ""  # why a pipelined call made the context unusable, not yet returned
        self.calls = 0
        # replies and keepalives share the socket: one whole frame at a time
        # (reentrant: the SIGTERM handler runs in the thread it interrupts, which may hold it)
        self.send_lock = threading.RLock()
        self.sending = False  # this thread is in the middle of a reply
        self.last_words = ""  # set when the worker stops: the sentence of the session's last frame
        self.busy_since = None  # perf_counter start of the frame being run, None while waiting for one
        self._keepalive = None
        self.records: collections.deque = collections.deque(maxlen=TRACE_BATCH)
        self.revoked = False
        # the trace's times are wall-clock for people, perf_counter here for cost
        self.epoch = time.time() - time.perf_counter()
        self.tiers = getattr(session, "tiers", None)  # tiers.TierStore (None: a test's bare session)
        self.tier_pending = False  # a SIGUSR2 came that this process has not looked at yet
        self.tier_acting = False
        self.tier_seq = 0          # the last tier request acted on
        self.touch_stamped = 0.0   # perf_counter of the last touch stamp
        self.touch_published = 0.0

    def watch_signals(self) -> None:
        """From the daemon: SIGUSR1, the vGPU was revoked (the reason is in the ledger); SIGUSR2, a tier
        request (in the ledger too); SIGTERM, the worker stops."""
        if self.tiers is not None:
            # requests made before this process started concern allocations it never had
            self.tier_seq = self.session.slot.ledger.tier_request()[1]
            self.session.slot.set_done(self.tier_seq)
        signal.signal(signal.SIGUSR1, self._on_revoke)
        signal.signal(signal.SIGUSR2, self._on_tier_request)
        signal.signal(signal.SIGTERM, self._on_stop)

    def _on_revoke(self, *_):
        self.revoked = True
        if self.busy_since is None:  # waiting for a frame: no call is half done, end it now
            self._end_vgpu()

    def _end_vgpu(self) -> None:
        self.session.end(self.session.slot.ledger.revoked or "this vGPU was revoked")

    # ----------------------------------------------------------------- tiers
    def _on_tier_request(self, *_):
        self.tier_pending = True
        if self.busy_since is None and not self.tier_acting:  # waiting for a frame: move now
            self._act_on_tiers()

    def _act_on_tiers(self) -> None:
        """Do what the ledger's tier request asks, if it is new: offload (1 warm, 2 cold) or restore (0)."""
        self.tier_acting = True
        idle = self.busy_since is None
        try:
            while self.tier_pending:
                self.tier_pending = False
                want, seq = self.session.slot.ledger.tier_request()
                if seq == self.tier_seq:
                    continue
                self.tier_seq = seq
                if idle:  # keepalives flow while the memory moves: a client waiting for a reply knows why
                    self.busy_since = time.perf_counter()
                try:
                    if self.tiers is not None and not self.session.ended:
                        if want:
                            self.tiers.offload(want)
                        else:
                            self.tiers.restore()
                            self.tiers.free_spent()
                except CudaError as exc:
                    log.warning("%s: tier request %d (%s) not done: %s", self.session.label, seq,
                                ("hot", "warm", "cold")[min(want, 2)], getattr(exc, "why", "") or exc.detail)
                except Exception:
                    log.exception("%s: tier request %d failed", self.session.label, seq)
                self.session.slot.set_done(seq)
        finally:
            if idle:
                self.busy_since = None
            self.tier_acting = False

    def _on_stop(self, *_):
        """SIGTERM: the worker stops.  The process's memory cannot outlive it: cold files go now, and the
        program is told what was lost (its next call fails with that sentence)."""
        # once: a stopping worker signals its process group and then each executor
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            tiers = self.tiers
            hot, warm, cold = tiers.figures() if tiers is not None else (self.session.slot.used, 0, 0)
            self.last_words = (f"the gpulab worker stopped; this process's device memory ({format_size(hot)} hot, "
                               f"{format_size(warm)} warm, {format_size(cold)} cold) is lost")
            if tiers is not None:
                tiers.close()
        except BaseException:
            log.exception("%s: cleaning up for the worker's stop failed", self.session.label)
            os._exit(0)
        if self.sending:  # this thread was in the middle of a reply: the last frame follows it (_finish)
            return
        self._last_frame()

    def _last_frame(self) -> None:
        """Tell the program the session ended, between two frames, and end the process."""
        try:
            ended = getattr(protocol, "ended_frame", None)
            # the send lock is reentrant: this thread may hold it, between two frames; the keepalive
            # thread holds it for a moment
            if ended is not None and self.send_lock.acquire(timeout=0.5):
                self.sock.settimeout(1.0)
                self.sock.sendall(ended(E.DEVICE_UNAVAILABLE, self.last_words))
            log.info("%s: the worker stops; session ended", self.session.label)
        except OSError:
            pass
        finally:
            os._exit(0)

    def publish(self) -> None:
        """Counters and new call records into the ledger (from the keepalive thread, and at the end)."""
        records = []
        pop = self.records.popleft
        while True:
            try:
                t0, t1, op, nbytes, result = pop()
            except IndexError:
                break
            records.append((self.epoch + t0, t1 - t0, nbytes, op, 0, result))
        s = self.session
        s.slot.publish(self.calls, s.launches, s.bytes_in, s.bytes_out, records)
        tiers = self.tiers
        if tiers is not None and tiers.touched != self.touch_published:
            self.touch_published = tiers.touched
            s.slot.set_touch(tiers.touched)

    def _start_keepalive(self) -> None:
        if self._keepalive is None:
            self._keepalive = threading.Thread(target=self._keepalive_loop, name="gpulab-keepalive", daemon=True)
            self._keepalive.start()

    def _keepalive_loop(self) -> None:
        after, every = KEEPALIVE_AFTER_MS / 1000, KEEPALIVE_EVERY_MS / 1000
        last = 0.0
        frame = REP_HEADER.pack(0, 0, REPLY_KEEPALIVE)
        while True:
            time.sleep(0.25)
            self.publish()
            since, now = self.busy_since, time.perf_counter()
            if since is None or now - since < after or now - last < every:
                continue
            try:
                with self.send_lock:
                    self.sock.sendall(frame)
            except OSError:
                return  # the session is ending; serve() notices on its own
            last = now

    def serve(self) -> None:
        """Run frames until the client goes away or breaks the protocol."""
        reader = self.reader
        handlers = self.handlers
        session = self.session
        record = self.records.append
        clock = time.perf_counter
        tiers = self.tiers
        touching = TOUCHING_OPS if tiers is not None else frozenset()
        self._start_keepalive()
        while True:
            self.busy_since = None
            if self.revoked and not session.ended:  # revoked while a call ran
                self._end_vgpu()
            if self.tier_pending:  # a tier request came while a call ran
                self._act_on_tiers()
            if tiers is not None and (tiers.spent or tiers.spent_files or tiers.pool_bytes or tiers.stage):
                tiers.free_spent()  # host copies of the last restore, once it was answered: kept a while
                tiers.trim()        # and freed once no move has needed them for a while
            plen, op, flags = REQ_HEADER.unpack(reader.read(REQ_HEADER.size))
            t0 = self.busy_since = clock()
            touches = op in touching
            if touches and t0 - self.touch_stamped > TOUCH_EVERY:
                self.touch_stamped = t0
                tiers.touched = time.time()
            want_reply = flags & FLAG_REPLY
            entry = handlers.get(op)
            if entry is None:
                if plen > self.max_frame:
                    raise ProtocolError(f"unknown opcode {op} with a frame of {plen} bytes")
                reader.skip(plen)
                log.warning("%s: unknown opcode %d", self.session.label, op)
                self._finish(want_reply, E.NOT_SUPPORTED, b"", "unknown opcode %d" % op,
                             f"request {op} refused: this gpulab worker does not know it (is the shim newer "
                             "than the worker?)")
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
            result, out, detail, reason = 0, b"", "", ""
            try:
                if self.revoked:
                    self._raise_revoked()
                if self.sticky:
                    self._raise_sticky(want_reply)
                if mode == "syncpoint" and self.latched:
                    self._raise_latched()
                if touches and tiers.off:  # its memory is off the GPU: back first (a refusal is this call's)
                    tiers.restore()
                if bulk:
                    counted = _Counted(reader, remaining)
                    out = handler(payload, counted)
                    remaining = counted.left
                else:
                    out = handler(payload)
            except CudaError as exc:
                result, detail = exc.code, exc.detail
                if isinstance(exc, Refusal):
                    reason = exc.sentence(name)
                if exc.code in E.STICKY and not self.sticky:
                    self.sticky = exc.code
                    self.sticky_untold = "" if want_reply else reason
                session.slot.count_error(result)
            except ProtocolError:
                raise
            except Exception as exc:  # a worker bug must not look like success, nor kill the session
                log.exception("%s: internal error in %s", self.session.label, name)
                result, detail = E.UNKNOWN, f"internal error: {exc!r}"
                reason = f"{name} failed: an internal error in the gpulab worker (not your program's fault; " \
                         "the worker's log has the details)"
                session.slot.count_error(result)
            nbytes = session.call_bytes
            if nbytes:
                session.call_bytes = 0
            record((t0, clock(), op, nbytes, result))
            if remaining:
                reader.skip(remaining)
            self._finish(want_reply, result, out, f"{name}: {detail}", reason)

    def _raise_revoked(self):
        if not self.session.ended:
            self._end_vgpu()
        self.latched, self.latched_reason = 0, ""
        raise Refusal(E.DEVICE_UNAVAILABLE, f"{self.session.ended}. Every CUDA call of this program now fails; "
                                            "start your server again for a new vGPU", call="")

    def _raise_latched(self):
        err, why = self.latched, self.latched_reason
        self.latched, self.latched_reason = 0, ""
        if why:
            raise Refusal(err, why, call="")
        raise CudaError(err, "error of an earlier asynchronous call")

    def _raise_sticky(self, want_reply):
        """Every call fails once the context is unusable; the first reply after a pipelined call
        made it so says why, the others how to get out."""
        why = ""
        if want_reply:
            why, self.sticky_untold = self.sticky_untold, ""
        self.latched, self.latched_reason = 0, ""  # superseded: the sticky error is all a call returns now
        raise Refusal(self.sticky, why or f"the vGPU's context is unusable after {E.name_of(self.sticky)} (sticky, "
                                          "as on a GPU): every CUDA call fails until the program restarts (in "
                                          "Jupyter: restart the kernel)", call="")

    def _finish(self, want_reply, result, out, detail, reason="") -> None:
        if result:
            log.info("%s: CUresult %d (%s)", self.session.label, result, detail)
        if want_reply:
            why = _clip(reason) if result else b""
            if result:
                out = b""
            header = REP_HEADER.pack(len(out) + len(why), result, len(why))
            with self.send_lock:
                self.sending = True
                if len(out) > 65536:
                    self.sock.sendall(header)
                    self.sock.sendall(out)
                else:
                    self.sock.sendall(header + bytes(out) + why)
                self.sending = False
            if self.last_words:  # the worker stopped while this reply was going out
                self._last_frame()
        elif result and not self.latched:
            self.latched, self.latched_reason = result, reason


def _clip(reason: str) -> bytes:
    """The reason as UTF-8, cut to the wire's limit on a character boundary."""
    return reason.encode()[:MAX_REASON].decode("utf-8", "ignore").encode()


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
