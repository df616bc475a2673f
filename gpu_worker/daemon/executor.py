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

Signals: the daemon's signals only set flags; the executor acts on them between two frames, never
inside a call nor inside the tier store or the tier board (a handler runs between any two bytecodes of
the main thread, which may hold the board's lock).  While it waits for the next frame the executor
polls the session socket together with the signal wakeup fd (``signal.set_wakeup_fd``), so a signal
wakes it at once; the poll happens only when no byte is buffered, and never in the middle of a frame.

Revocation: the daemon marks the ledger and sends SIGUSR1; the executor frees the session's
memory at once (when it is waiting for the next frame, else right after the call) and answers
every later call with the reason.

VRAM tiers (tiers.py): the daemon writes a tier request into the ledger and sends SIGUSR2; the
executor moves the process's allocations at once when it is waiting for a frame, else right after
the call, keepalives flowing meanwhile, and writes the move's CUresult next to the request's number.
Before a call that needs the device memory (``TOUCHING`` and launches) a process whose memory is off
the GPU gets it back; such calls also stamp the touch time the idle policy reads.  A restore the
daemon asked for that lost bytes fails the process's next touching call with the loss, once.  Host
buffers kept after a move are freed ``tiers.POOL_KEEP`` seconds after it, calls or not (the wait for
a frame has that timeout).  SIGTERM (the worker stops): the executor deletes its cold files, tells
the program what was lost in a last ``REPLY_ENDED`` frame, and exits.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import select
import shutil
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
from . import tiers as _tiers
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
        self.poller = None  # the socket and the signal wakeup fd, once watch() was called
        self.wake_fd = -1

    def watch(self, wake_fd: int) -> None:
        """Let wait() return for a signal too: ``wake_fd`` is the read end of the signal wakeup fd."""
        self.wake_fd = wake_fd
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.poller.register(wake_fd, select.POLLIN)

    def wait(self, timeout_ms: int | None) -> bool:
        """Nothing is buffered, between two frames: True once the socket has bytes (or its end, which the
        read then finds); False when a signal came (the wakeup fd is drained) or ``timeout_ms`` passed."""
        ready = self.poller.poll(timeout_ms)
        for fd, _events in ready:
            if fd == self.wake_fd:
                try:
                    while os.read(fd, 256):
                        pass
                except BlockingIOError:
                    pass
                return False
        return bool(ready)

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
        self.send_lock = threading.Lock()
        self.busy_since = None  # perf_counter start of the frame being run, None while waiting for one
        self._keepalive = None
        self.records: collections.deque = collections.deque(maxlen=TRACE_BATCH)
        # set by the signal handlers (which do nothing else), acted on between two frames
        self.signalled = False     # any of the three below: look at them
        self.revoked = False       # SIGUSR1
        self.stopping = False      # SIGTERM
        # the trace's times are wall-clock for people, perf_counter here for cost
        self.epoch = time.time() - time.perf_counter()
        self.tiers = getattr(session, "tiers", None)  # tiers.TierStore (None: a test's bare session)
        self.tier_pending = False  # a SIGUSR2 came that this process has not looked at yet
        self.tier_seq = 0          # the last tier request acted on
        self.tier_lost = None      # a Refusal: a restore the daemon asked for lost bytes; the next touching call says so
        self.touch_stamped = 0.0   # perf_counter of the last touch stamp
        self.touch_published = 0.0

    def watch_signals(self) -> None:
        """From the daemon: SIGUSR1, the vGPU was revoked (the reason is in the ledger); SIGUSR2, a tier
        request (in the ledger too); SIGTERM, the worker stops.  The handlers only set flags: a handler runs
        between two bytecodes of the main thread, which may be inside the tier store or hold the tier
        board's lock; the wakeup fd ends the wait for the next frame so that the main loop acts at once."""
        if self.tiers is not None:
            # requests made before this process started concern allocations it never had
            self.tier_seq = self.session.slot.ledger.tier_request()[1]
            self.session.slot.set_done(self.tier_seq)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # a full pipe (signals while a long call runs) loses bytes, not signals: the flags hold them
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.reader.watch(wake_r)
        signal.signal(signal.SIGUSR1, self._on_revoke)
        signal.signal(signal.SIGUSR2, self._on_tier_request)
        signal.signal(signal.SIGTERM, self._on_stop)

    def _on_revoke(self, *_):
        self.revoked = self.signalled = True

    def _on_tier_request(self, *_):
        self.tier_pending = self.signalled = True

    def _on_stop(self, *_):
        self.stopping = self.signalled = True

    def _attend(self) -> None:
        """Act on the signals that came, between two frames."""
        self.signalled = False  # first: a signal from now on is seen at the next look
        if self.stopping:
            self._stop()
        if self.revoked and not self.session.ended:
            self._end_vgpu()
        if self.tier_pending:
            self._act_on_tiers()

    def _end_vgpu(self) -> None:
        self.session.end(self.session.slot.ledger.revoked or "this vGPU was revoked")

    # ----------------------------------------------------------------- tiers
    def _act_on_tiers(self) -> None:
        """Do what the ledger's tier requests ask, until none is new: offload (1 warm, 2 cold) or restore (0);
        each request's CUresult goes next to its number in the ledger (0: done)."""
        idle = self.busy_since is None
        if idle:  # keepalives flow while the memory moves: a client waiting for a reply knows why
            self.busy_since = time.perf_counter()
        try:
            while self.tier_pending and not self.stopping:
                self.tier_pending = False
                want, seq = self.session.slot.ledger.tier_request()
                if seq == self.tier_seq:
                    continue
                self.tier_seq = seq
                self.session.slot.set_done(seq, self._move(want, seq))
        finally:
            if idle:
                self.busy_since = None

    def _move(self, want: int, seq: int) -> int:
        """One tier request's move: its CUresult."""
        tiers = self.tiers
        if tiers is None or self.session.ended:
            return 0  # no memory of its own left to move
        try:
            if want:
                tiers.offload(want)
            else:
                tiers.restore()
                tiers.free_spent()
            return 0
        except CudaError as exc:
            why = getattr(exc, "why", "") or exc.detail
            if want == _tiers.HOT and exc.code == E.ECC_UNCORRECTABLE and isinstance(exc, Refusal):
                # the allocation is back, zero-filled: the program must not read zeros unwarned
                self.tier_lost = exc
                log.error("%s: tier request %d: %s (the next touching call is told)", self.session.label, seq, why)
            else:
                log.warning("%s: tier request %d (%s) not done: %s", self.session.label, seq,
                            ("hot", "warm", "cold")[min(want, 2)], why)
            return exc.code
        except Exception:
            log.exception("%s: tier request %d failed", self.session.label, seq)
            return E.UNKNOWN

    def _wait_ms(self) -> int | None:
        """How long the wait for the next frame may last: until the host buffers kept after the last move
        are due to go (tiers.trim), else no limit."""
        tiers = self.tiers
        if tiers is None or not (tiers.pool_bytes or tiers.stage):
            return None
        return max(0, math.ceil((tiers.moved_at + _tiers.POOL_KEEP - time.monotonic()) * 1000))

    # ------------------------------------------------------------------ stop
    def _stop(self) -> None:
        """SIGTERM, between two frames: the worker stops.  The process's memory cannot outlive it: its cold
        files go now, and the program is told what was lost in a last frame; then the process ends (its
        board row is the daemon's to release)."""
        try:
            tiers = self.tiers
            hot, warm, cold = tiers.figures() if tiers is not None else (self.session.slot.used, 0, 0)
            words = (f"the gpulab worker stopped; this process's device memory ({format_size(hot)} hot, "
                     f"{format_size(warm)} warm, {format_size(cold)} cold) is lost")
            if tiers is not None and tiers.spool:
                shutil.rmtree(tiers.spool, ignore_errors=True)
            # the keepalive thread holds the send lock for a moment at most
            if self.send_lock.acquire(timeout=0.5):
                self.sock.settimeout(1.0)
                self.sock.sendall(protocol.ended_frame(E.DEVICE_UNAVAILABLE, words))
            log.info("%s: the worker stops; session ended", self.session.label)
        except OSError:
            pass
        except BaseException:
            log.exception("%s: ending the session for the worker's stop failed", self.session.label)
        finally:
            os._exit(0)

    def settle(self) -> None:
        """The session is closed (its memory freed): a tier request not acted on is done, nothing being left."""
        if self.tiers is not None:
            seq = self.session.slot.ledger.tier_request()[1]
            if seq != self.tier_seq:
                self.tier_seq = seq
                self.session.slot.set_done(seq)

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
        watching = reader.poller is not None
        self._start_keepalive()
        while True:
            self.busy_since = None
            if self.signalled:  # between two frames: the one safe point for what signals ask
                self._attend()
            if tiers is not None and (tiers.spent or tiers.spent_files or tiers.pool_bytes or tiers.stage):
                tiers.free_spent()  # host copies of the last restore, once it was answered: kept a while
                tiers.trim()        # and freed once no move has needed them for a while
            # nothing buffered: wait for the next frame or a signal (or the kept buffers' time) in one poll
            if watching and reader.start == reader.end and not reader.wait(self._wait_ms()):
                continue
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
                if touches and (tiers.off or self.tier_lost):  # its memory is off the GPU: back first (a
                    self._restore()                                # refusal is this call's)
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

    def _restore(self):
        lost, self.tier_lost = self.tier_lost, None
        if lost is not None:  # an earlier restore, asked by the daemon, lost bytes: this call says so, once
            raise lost
        self.tiers.restore()

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
                if len(out) > 65536:
                    self.sock.sendall(header)
                    self.sock.sendall(out)
                else:
                    self.sock.sendall(header + bytes(out) + why)
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
