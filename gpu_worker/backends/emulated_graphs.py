"""CUDA graphs on the emulated backend (a test double): stream capture and graph replay.

A stream in capture mode does not run what is issued to it: kernel launches, device-to-device
copies and memsets on it are recorded, in issue order, as operations of the graph being captured
(each a callable taking the stream it is replayed on).  cuStreamEndCapture hands the records over
as a graph; cuGraphInstantiate copies them into an executable graph; a graph launch replays them
in order on its stream, so a graph launched into a capturing stream is itself recorded, as a child
graph is on a GPU.  A linear replay in issue order is one valid order of the graph the driver
would build (the emulated device runs one operation at a time anyway).

Errors are the driver's: beginning a capture twice or ending one that is not running is
CUDA_ERROR_ILLEGAL_STATE, the legacy default stream cannot capture, ending a capture on a stream
that joined it rather than the one that began it is CUDA_ERROR_STREAM_CAPTURE_UNMATCHED, and an
operation a graph cannot hold (a copy to or from host memory, which lives in the client; waiting
on the capturing stream) is refused with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates the
capture, whose end then returns CUDA_ERROR_STREAM_CAPTURE_INVALIDATED.  Another stream joins a
capture by waiting on an event recorded in it (fork and join across streams).

EmulatedBackend mixes this class in and calls its hooks (_capturing, _captured, _refuse_in_capture,
_capture_event_record, _join_capture) from its stream operations.
"""
from __future__ import annotations

from ..api import errors as E
from ..api.errors import CudaError, Refusal

# CUstreamCaptureStatus
CAPTURE_NONE, CAPTURE_ACTIVE, CAPTURE_INVALIDATED = 0, 1, 2
CAPTURE_MODES = (0, 1, 2)  # global, thread-local, relaxed
# CUgraphInstantiate_flags: auto-free on launch, upload, device launch, use node priority
INSTANTIATE_FLAGS = 1 | 2 | 4 | 8


class _Capture:
    """A capture in progress: the stream that began it and the operations recorded so far."""

    def __init__(self, origin):
        self.origin = origin
        self.ops: list = []
        self.invalid = False
        self.streams = [origin]  # the origin and the streams that joined it


class _Graph:
    def __init__(self, ops):
        self.ops = ops


class _GraphExec:
    def __init__(self, ops):
        self.ops = tuple(ops)


def _capture_of(stream) -> _Capture | None:
    return getattr(stream, "capture", None) if stream is not None else None


class GraphCapture:
    """Stream capture and graph launch for EmulatedBackend."""

    # ------------------------------------------------------------- the hooks
    @staticmethod
    def _capturing(stream) -> bool:
        return _capture_of(stream) is not None

    def _captured(self, stream, op) -> bool:
        """Record ``op`` (a callable taking the stream to run on) if ``stream`` is capturing: True
        means the caller must not run it now."""
        capture = _capture_of(stream)
        if capture is None:
            return False
        capture.ops.append(op)
        return True

    def _refuse_in_capture(self, stream, why: str = "") -> None:
        """An operation a graph cannot hold, issued to a capturing stream: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
        and the capture is invalidated, as the driver does.  ``why``: a refusal of the vGPU's own, for the
        person (the driver's own rules, such as no waiting on a capturing stream, go without one)."""
        capture = _capture_of(stream)
        if capture is None:
            return
        capture.invalid = True
        if why:
            raise Refusal(E.STREAM_CAPTURE_UNSUPPORTED, f"{why} (the stream is being captured into a CUDA graph, "
                                                        "and that capture is now invalid)")
        raise CudaError(E.STREAM_CAPTURE_UNSUPPORTED, "not allowed on a capturing stream; capture invalidated")

    def _capture_event_record(self, event, stream) -> bool:
        """An event recorded in a capturing stream marks a point of the capture (other streams may wait on
        it to join), not a time: True when the caller must not record a time."""
        capture = _capture_of(stream)
        event.capture = capture
        return capture is not None

    def _join_capture(self, stream, event) -> None:
        """A stream waiting on an event recorded in a capture joins that capture."""
        capture = getattr(event, "capture", None)
        if capture is None or stream is None or _capture_of(stream) is capture:
            return
        if _capture_of(stream) is not None:  # two captures cannot merge
            capture.invalid = True
            raise CudaError(E.STREAM_CAPTURE_INVALIDATED, "the stream is capturing another graph")
        stream.capture = capture
        capture.streams.append(stream)

    # --------------------------------------------------------- driver calls
    def cuStreamBeginCapture(self, stream, mode):
        self._ctx()
        if stream is None:
            raise CudaError(E.STREAM_CAPTURE_UNSUPPORTED, "the legacy default stream cannot be captured")
        if mode not in CAPTURE_MODES:
            raise CudaError(E.INVALID_VALUE, f"capture mode {mode}")
        if _capture_of(stream) is not None:
            raise CudaError(E.ILLEGAL_STATE, "the stream is already capturing")
        stream.capture = _Capture(stream)

    def cuStreamEndCapture(self, stream):
        capture = _capture_of(stream)
        if capture is None:
            raise CudaError(E.ILLEGAL_STATE, "the stream is not capturing")
        if capture.origin is not stream:
            raise CudaError(E.STREAM_CAPTURE_UNMATCHED, "the capture was begun on another stream")
        for s in capture.streams:
            s.capture = None
        if capture.invalid:
            raise CudaError(E.STREAM_CAPTURE_INVALIDATED, "the capture was invalidated")
        return (_Graph(capture.ops),)

    def cuStreamIsCapturing(self, stream):
        capture = _capture_of(stream)
        if capture is None:
            return (CAPTURE_NONE,)
        return (CAPTURE_INVALIDATED if capture.invalid else CAPTURE_ACTIVE,)

    def cuGraphInstantiate(self, graph, flags):
        if flags & ~INSTANTIATE_FLAGS:
            raise CudaError(E.INVALID_VALUE, f"instantiate flags {flags:#x}")
        return (_GraphExec(graph.ops),)

    def graph_launch(self, graph_exec, stream):
        self._ctx()
        for op in graph_exec.ops:
            op(stream)

    def cuGraphExecDestroy(self, graph_exec):
        """Nothing to release: the session forgets the id, and a later launch of it is INVALID_HANDLE."""

    def cuGraphDestroy(self, graph):
        """An executable graph keeps its own copy of the operations, as on a GPU."""
