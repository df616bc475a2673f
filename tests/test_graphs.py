"""CUDA graphs through the shim: stream capture, instantiation and graph launch, on a vGPU.

The same client program runs against an emulated worker (everywhere) and a cuda worker (`-m gpu`):
three launches of a kernel adding 1 are captured on a stream, nothing runs while capturing, the
graph is instantiated and launched twice (+6), outlives its graph, and a destroyed executable graph
is refused with the driver's exact error; capture errors are the driver's own.
"""
from __future__ import annotations

import pytest

from workertools import PRELUDE

ADD_PTX = r"""
.version 8.0
.target sm_80
.address_size 64
.visible .entry add_inplace(.param .u64 data, .param .u32 value, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<5>;
    ld.param.u64 %rd1, [data];
    ld.param.u32 %r1, [value];
    ld.param.u32 %r2, [n];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r6, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r6, %r2;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r6, 4;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.u32 %r7, [%rd4];
    add.s32 %r7, %r7, %r1;
    st.global.u32 [%rd4], %r7;
DONE:
    ret;
}
"""

ADD_CU = (b'extern "C" __global__ void add_inplace(int *data, int value, unsigned n)'
          b'{ unsigned i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) data[i] += value; }')

# The kernel: PTX on the emulated device; on a GPU a cubin for its architecture (a driver older than
# NVRTC's PTX ISA could not JIT PTX, see docs/validation.md).
GRAPH_PRELUDE = PRELUDE + f"""
import ctypes

def load_add(dev):
    if b"emulated" in ok(d.cuDeviceGetName(128, dev)):
        return ok(d.cuModuleLoadData({ADD_PTX!r}.encode() + b"\\0"))
    from cuda.bindings import nvrtc
    A = d.CUdevice_attribute
    major = ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
    minor = ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
    err, prog = nvrtc.nvrtcCreateProgram({ADD_CU!r}, b"add.cu", 0, [], [])
    assert nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=sm_{{major}}{{minor}}".encode()])[0] == 0
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return ok(d.cuModuleLoadData(cubin))

GLOBAL = d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL
N = 1024
dev, ctx = setup()
fn = ok(d.cuModuleGetFunction(load_add(dev), b"add_inplace"))
buf = ok(d.cuMemAlloc(N * 4))
stream = ok(d.cuStreamCreate(1))  # non-blocking

def add(value, s=None):
    return d.cuLaunchKernel(fn, N // 256, 1, 1, 256, 1, 1, 0, stream if s is None else s,
                            ((buf, value, N), (None, ctypes.c_int, ctypes.c_uint)), 0)

def read():
    host = np.empty(N, np.int32)
    ok(d.cuMemcpyDtoH(host, buf, N * 4))
    return sorted(set(host.tolist()))
"""

CAPTURE_AND_REPLAY = GRAPH_PRELUDE + """
ok(d.cuMemsetD32(buf, 10, N))
ok(d.cuStreamBeginCapture(stream, GLOBAL))
capturing = int(ok(d.cuStreamIsCapturing(stream)))
for _ in range(3):
    ok(add(1))
graph = ok(d.cuStreamEndCapture(stream))
after_capture = read()  # a captured launch does not run
gexec = ok(d.cuGraphInstantiate(graph, 0))
ok(d.cuGraphLaunch(gexec, stream))
ok(d.cuGraphLaunch(gexec, stream))
ok(d.cuStreamSynchronize(stream))
twice = read()
ok(d.cuGraphDestroy(graph))  # the executable graph outlives its graph
ok(d.cuGraphLaunch(gexec, stream))
ok(d.cuStreamSynchronize(stream))
thrice = read()
ok(d.cuGraphExecDestroy(gexec))
relaunch = name(d.cuGraphLaunch(gexec, stream))  # pipelined: the error comes with the next synchronize
relaunch_sync = name(d.cuStreamSynchronize(stream))

# a memset on the capturing stream is recorded too: replays set, then add
ok(d.cuStreamBeginCapture(stream, GLOBAL))
ok(d.cuMemsetD32Async(buf, 5, N, stream))
ok(add(2))
g2 = ok(d.cuStreamEndCapture(stream))
x2 = ok(d.cuGraphInstantiate(g2, 0))
ok(d.cuGraphLaunch(x2, stream))
ok(d.cuGraphLaunch(x2, stream))
ok(d.cuStreamSynchronize(stream))
memset_graph = read()
done(capturing=capturing, after_capture=after_capture, twice=twice, thrice=thrice,
     relaunch=relaunch, relaunch_sync=relaunch_sync, memset_graph=memset_graph,
     not_capturing=int(ok(d.cuStreamIsCapturing(stream))), end_idle=name(d.cuStreamEndCapture(stream)),
     legacy=name(d.cuStreamBeginCapture(d.CUstream(0), GLOBAL)))
"""

CAPTURE_REFUSED = GRAPH_PRELUDE + """
ok(d.cuMemsetD32(buf, 0, N))
host = np.ones(N, np.int32)
ok(d.cuStreamBeginCapture(stream, GLOBAL))
ok(add(1))
ok(d.cuMemcpyHtoDAsync(buf, host, N * 4, stream))  # pipelined: refused on the worker
status = int(ok(d.cuStreamIsCapturing(stream)))
again = name(d.cuStreamBeginCapture(stream, GLOBAL))
end = name(d.cuStreamEndCapture(stream))
latched = name(d.cuCtxSynchronize())
done(status=status, again=again, end=end, latched=latched, data=read())
"""


def check_capture_and_replay(res):
    assert res["capturing"] == 1  # CU_STREAM_CAPTURE_STATUS_ACTIVE
    assert res["after_capture"] == [10]
    assert res["twice"] == [16]
    assert res["thrice"] == [19]
    assert res["relaunch"] == "CUDA_SUCCESS"
    assert res["relaunch_sync"] == "CUDA_ERROR_INVALID_HANDLE"
    assert res["memset_graph"] == [7]
    assert res["not_capturing"] == 0
    assert res["end_idle"] == "CUDA_ERROR_ILLEGAL_STATE"
    assert res["legacy"] == "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"


def check_capture_refused(res, stderr):
    assert res["status"] == 2  # CU_STREAM_CAPTURE_STATUS_INVALIDATED
    assert res["again"] == "CUDA_ERROR_ILLEGAL_STATE"
    assert res["end"] == "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"
    assert res["latched"] == "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"
    assert res["data"] == [0]  # neither the captured launch nor the copy ran
    assert "cannot be captured on a gpulab vGPU" in stderr


def test_capture_instantiate_and_launch_a_graph(worker):
    check_capture_and_replay(worker.run(CAPTURE_AND_REPLAY).result)


def test_a_host_copy_in_a_capture_is_refused_and_invalidates_it(worker):
    r = worker.run(CAPTURE_REFUSED)
    check_capture_refused(r.result, r.stderr)


@pytest.mark.gpu
def test_graphs_on_a_gpu(make_worker):
    w = make_worker(backend="cuda", extra=("--vram-quota", "1G"))
    check_capture_and_replay(w.run(CAPTURE_AND_REPLAY).result)
    r = w.run(CAPTURE_REFUSED)
    check_capture_refused(r.result, r.stderr)


def test_emulated_capture_joins_streams_by_event_and_replays_in_issue_order():
    """Fork and join: a second stream waiting on an event of the capture joins it; ending the capture
    on the joined stream is UNMATCHED; the graph replays both streams' work."""
    from gpu_worker.api import errors as E
    from gpu_worker.api.errors import CudaError
    from gpu_worker.backends.emulated import EmulatedBackend

    b = EmulatedBackend()
    (ctx,) = b.cuDevicePrimaryCtxRetain(0)
    b.set_current(ctx)
    ptr = b.mem_alloc(16)
    (s1,) = b.cuStreamCreate(1)
    (s2,) = b.cuStreamCreate(1)
    (fork,) = b.cuEventCreate(0)
    b.cuStreamBeginCapture(s1, 0)
    b.cuMemsetD8Async(ptr, 1, 8, s1)
    b.cuEventRecord(fork, s1)
    b.cuStreamWaitEvent(s2, fork, 0)
    assert b.cuStreamIsCapturing(s2) == (1,)
    b.cuMemsetD8Async(ptr + 8, 2, 8, s2)
    assert bytes(b.view(ptr, 16)) == bytes(16)  # recorded, not run
    with pytest.raises(CudaError) as exc:
        b.cuStreamEndCapture(s2)
    assert exc.value.code == E.STREAM_CAPTURE_UNMATCHED
    (graph,) = b.cuStreamEndCapture(s1)
    assert b.cuStreamIsCapturing(s2) == (0,)
    (gexec,) = b.cuGraphInstantiate(graph, 0)
    b.graph_launch(gexec, s1)
    assert bytes(b.view(ptr, 16)) == b"\1" * 8 + b"\2" * 8
