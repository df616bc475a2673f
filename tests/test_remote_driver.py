"""Real cuda.bindings / cuda.core programs, through the built shim, against a real worker
process on the emulated backend (a test double: there is no GPU here)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gpu_worker.backends.emulated import DRIVER_VERSION
from workertools import PRELUDE, PTX_FILE, ROOT


def test_device_queries_report_the_vgpu(worker):
    r = worker.run(PRELUDE + """
dev, ctx = setup()
A = d.CUdevice_attribute
done(name=ok(d.cuDeviceGetName(128, dev)).split(b"\\0")[0].decode(),
     count=ok(d.cuDeviceGetCount()),
     version=ok(d.cuDriverGetVersion()),
     cc=[ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)),
         ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))],
     pools=ok(d.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, dev)),
     total=ok(d.cuDeviceTotalMem(dev)),
     info=list(ok(d.cuMemGetInfo())),
     uuid=len(bytes(ok(d.cuDeviceGetUuid(dev)).bytes)),
     ctxdev=int(ok(d.cuCtxGetDevice())),
     bad_device=name(d.cuDeviceGet(3)),
     bad_attr=name(d.cuDeviceGetAttribute(99999, dev)))
""")
    res = r.result
    assert "emulated" in res["name"] and "test double" in res["name"]
    # as new as the installed CUDA release, so that no library warns about an older driver
    assert res["count"] == 1 and res["version"] == DRIVER_VERSION >= 13000 and res["cc"] == [9, 0]
    assert res["pools"] == 0  # the hypervisor must see every allocation
    assert res["total"] == 64 << 20 and res["info"] == [64 << 20, 64 << 20]
    assert res["uuid"] == 16 and res["ctxdev"] == 0
    assert res["bad_device"] == "CUDA_ERROR_INVALID_DEVICE"
    assert res["bad_attr"] == "CUDA_ERROR_INVALID_VALUE"


def test_copies_round_trip_random_bytes(worker):
    r = worker.run(PRELUDE + """
import hashlib
setup()
rng = np.random.default_rng(7)
out = {}
stream = ok(d.cuStreamCreate(0))
for size in (1, 4097, 3 << 20):
    src = rng.integers(0, 256, size, dtype=np.uint8)
    a = ok(d.cuMemAlloc(size)); b = ok(d.cuMemAlloc(size))
    ok(d.cuMemcpyHtoD(a, src, size))
    ok(d.cuMemcpyDtoD(b, a, size))
    back = np.zeros(size, np.uint8)
    ok(d.cuMemcpyDtoH(back, b, size))
    # the async path on a stream, then the unified cuMemcpy
    back2 = np.zeros(size, np.uint8)
    ok(d.cuMemcpyHtoDAsync(a, src[::-1].copy(), size, stream))
    ok(d.cuMemcpyDtoHAsync(back2, a, size, stream))
    ok(d.cuStreamSynchronize(stream))
    back3 = np.zeros(size, np.uint8)
    ok(d.cuMemcpy(int(back3.ctypes.data), int(b), size))
    out[size] = [bool((back == src).all()), bool((back2 == src[::-1]).all()), bool((back3 == src).all())]
    ok(d.cuMemFree(a)); ok(d.cuMemFree(b))
m = ok(d.cuMemAlloc(64))
ok(d.cuMemsetD8(m, 0xAB, 64))
b8 = np.zeros(64, np.uint8); ok(d.cuMemcpyDtoH(b8, m, 64))
ok(d.cuMemsetD16(m, 0x1234, 32))
b16 = np.zeros(32, np.uint16); ok(d.cuMemcpyDtoH(b16, m, 64))
ok(d.cuMemsetD32Async(m, 0xDEADBEEF, 16, stream)); ok(d.cuStreamSynchronize(stream))
b32 = np.zeros(16, np.uint32); ok(d.cuMemcpyDtoH(b32, m, 64))
base, size = ok(d.cuMemGetAddressRange(int(m) + 10))
done(out=out, d8=bool((b8 == 0xAB).all()), d16=bool((b16 == 0x1234).all()), d32=bool((b32 == 0xDEADBEEF).all()),
     range=[int(base) == int(m), int(size)])
""")
    res = r.result
    assert res["out"] == {str(s): [True, True, True] for s in (1, 4097, 3 << 20)}
    assert res["d8"] and res["d16"] and res["d32"]
    assert res["range"] == [True, 64]


def test_quota_is_enforced_and_reported(worker):
    r = worker.run(PRELUDE + """
setup()
a = ok(d.cuMemAlloc(40 << 20))
free1, total1 = ok(d.cuMemGetInfo())
over = name(d.cuMemAlloc(30 << 20))
ok(d.cuMemFree(a))
ok(d.cuCtxSynchronize())
free2, total2 = ok(d.cuMemGetInfo())
b = ok(d.cuMemAlloc(30 << 20))
done(free1=free1, total1=total1, over=over, free2=free2, after_free=int(b) != 0, zero=name(d.cuMemAlloc(0)))
""")
    res = r.result
    assert res["total1"] == 64 << 20 and res["free1"] == 24 << 20
    assert res["over"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert res["free2"] == 64 << 20 and res["after_free"]
    assert res["zero"] == "CUDA_ERROR_INVALID_VALUE"
    assert "this vGPU's quota is 64.0 MiB, 24.0 MiB free" in worker.log_text()


def test_ptx_module_launch_with_mixed_parameters(worker):
    r = worker.run(PRELUDE + f"""
import ctypes
setup()
ptx = open({str(PTX_FILE)!r}, "rb").read()
mod = ok(d.cuModuleLoadData(ptx))
fn = ok(d.cuModuleGetFunction(mod, b"axpy_mixed"))
missing = name(d.cuModuleGetFunction(mod, b"no_such_kernel"))
n = 1000
rng = np.random.default_rng(1)
x = rng.random(n, dtype=np.float32); y = rng.random(n, dtype=np.float32)
dx = ok(d.cuMemAlloc(x.nbytes)); dy = ok(d.cuMemAlloc(y.nbytes))
ok(d.cuMemcpyHtoD(dx, x, x.nbytes)); ok(d.cuMemcpyHtoD(dy, y, y.nbytes))
params = ((2.5, dx, dy, n, 0.25), (ctypes.c_float, None, None, ctypes.c_int, ctypes.c_double))
ok(d.cuLaunchKernel(fn, (n + 127) // 128, 1, 1, 128, 1, 1, 0, 0, params, 0))
out = np.zeros(n, np.float32)
ok(d.cuMemcpyDtoH(out, dy, out.nbytes))
infos = [tuple(int(v) for v in ok(d.cuFuncGetParamInfo(fn, i))) for i in range(5)]
past_end = name(d.cuFuncGetParamInfo(fn, 5))
done(match=bool(np.allclose(out, 2.5 * x + y + 0.25)), missing=missing, infos=infos, past_end=past_end)
""")
    res = r.result
    assert res["match"]
    assert res["missing"] == "CUDA_ERROR_NOT_FOUND"
    # float @0, two pointers @8/@16, int @24, double aligned @32: the PTX .entry signature's layout
    assert res["infos"] == [[0, 4], [8, 8], [16, 8], [24, 4], [32, 8]]
    assert res["past_end"] == "CUDA_ERROR_INVALID_VALUE"


def test_pipelined_launch_errors_surface_at_synchronize(worker):
    r = worker.run(PRELUDE + f"""
setup()
mod = ok(d.cuModuleLoadData(open({str(PTX_FILE)!r}, "rb").read()))
scale = ok(d.cuModuleGetFunction(mod, b"scale_inplace"))
noop = ok(d.cuModuleGetFunction(mod, b"gpulab_noop"))
vec = ok(d.cuModuleGetFunction(mod, b"vec_add"))
import ctypes
n = 256
buf = ok(d.cuMemAlloc(n * 4))
ok(d.cuMemcpyHtoD(buf, np.arange(n, dtype=np.int32), n * 4))
P = (None, ctypes.c_int, ctypes.c_int)
launches = [name(d.cuLaunchKernel(scale, 1, 1, 1, n, 1, 1, 0, 0, ((buf, 2, n), P), 0)) for _ in range(20)]
launches += [name(d.cuLaunchKernel(noop, 1, 1, 1, 32, 1, 1, 0, 0, 0, 0)) for _ in range(30)]
# an invalid launch shape: accepted without a round trip, reported at the next synchronizing call
bad = name(d.cuLaunchKernel(noop, 1, 1, 1, 4096, 1, 1, 0, 0, 0, 0))
sync1 = name(d.cuCtxSynchronize())
sync2 = name(d.cuCtxSynchronize())
out = np.zeros(n, np.int32); ok(d.cuMemcpyDtoH(out, buf, n * 4))
# a kernel reading outside the session's memory: sticky, like an illegal address on a GPU
P3 = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
oob = name(d.cuLaunchKernel(vec, 1, 1, 1, 32, 1, 1, 0, 0, ((int(buf), int(buf) + 4096, int(buf), n), P3), 0))
sync3 = name(d.cuCtxSynchronize())
after = name(d.cuMemAlloc(16))
done(launches=sorted(set(launches)), bad=bad, sync1=sync1, sync2=sync2,
     scaled=bool((out == np.arange(n) * 2 ** 20).all()), oob=oob, sync3=sync3, after=after)
""")
    res = r.result
    assert res["launches"] == ["CUDA_SUCCESS"] and res["bad"] == "CUDA_SUCCESS"
    assert res["sync1"] == "CUDA_ERROR_INVALID_VALUE"
    assert res["sync2"] == "CUDA_SUCCESS"  # not sticky: returned once
    assert res["scaled"]
    assert res["oob"] == "CUDA_SUCCESS" and res["sync3"] == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert res["after"] == "CUDA_ERROR_ILLEGAL_ADDRESS"  # sticky for the rest of the session


def test_a_pipelined_free_reaches_the_worker_at_once(make_worker, tmp_path):
    """cuMemFree needs no reply, yet the worker's usage figure (what the pool and its dashboard
    show) drops at once, while the program goes on without any synchronizing call."""
    w = make_worker()
    client = subprocess.Popen([sys.executable, "-c", PRELUDE + """
import time
setup()
p = ok(d.cuMemAlloc(8 << 20))
print("allocated", flush=True)
sys.stdin.readline()
ok(d.cuMemFree(p))
print("freed", flush=True)
time.sleep(60)  # no synchronizing call: only the shim can have sent the free
"""], env=w.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def used() -> int:
        return sum(v["used"] for v in w.vgpus())

    try:
        assert client.stdout.readline().strip() == "allocated"
        assert used() == 8 << 20
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "freed"
        t0 = time.monotonic()
        while used() != 0 and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        assert used() == 0
        assert time.monotonic() - t0 < 1.0, "the free reached the worker late"
    finally:
        client.kill()
        client.wait()


def test_sessions_cannot_touch_each_others_memory(worker):
    owner = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + """
setup()
p = ok(d.cuMemAlloc(4096))
ok(d.cuMemcpyHtoD(p, np.full(4096, 7, np.uint8), 4096))
print(int(p), flush=True)
sys.stdin.readline()
back = np.zeros(4096, np.uint8); ok(d.cuMemcpyDtoH(back, p, 4096))
done(intact=bool((back == 7).all()))
"""], env=worker.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ptr = int(owner.stdout.readline())
        r = worker.run(PRELUDE + f"""
setup()
mine = ok(d.cuMemAlloc(4096))
buf = np.zeros(4096, np.uint8)
read = name(d.cuMemcpyDtoH(buf, {ptr}, 4096))
write = name(d.cuMemcpyHtoD({ptr}, buf, 4096))
memset = name(d.cuMemsetD8({ptr}, 0, 4096))
dtod = name(d.cuMemcpyDtoD(mine, {ptr}, 4096))
straddle = name(d.cuMemcpyHtoD(int(mine) + 4000, buf, 4096))
free = name(d.cuMemFree({ptr}))
sync = name(d.cuCtxSynchronize())
done(read=read, write=write, memset=memset, dtod=dtod, straddle=straddle, free=free, sync=sync)
""")
        owner.stdin.write("go\n")
        owner.stdin.flush()
        out, _ = owner.communicate(timeout=30)
    finally:
        owner.kill()
    res = r.result
    refused = "CUDA_ERROR_INVALID_VALUE"
    assert [res[k] for k in ("read", "write", "memset", "dtod", "straddle")] == [refused] * 5
    assert res["free"] == "CUDA_SUCCESS" and res["sync"] == refused  # frees are pipelined
    assert '"intact": true' in out
    assert "is not in this vGPU's allocations" in worker.log_text()


def test_wrong_token_is_refused_with_a_clear_error(worker):
    r = worker.run(PRELUDE + """
done(init=name(d.cuInit(0)), again=name(d.cuDeviceGetCount()))
""", token="not-the-token")
    assert r.result == {"init": "CUDA_ERROR_NOT_PERMITTED", "again": "CUDA_ERROR_NOT_PERMITTED"}
    assert "refused the session: the session token is not valid" in r.stderr
    assert "wrong session token" in worker.log_text()
    # the worker goes on serving good sessions
    assert worker.run(PRELUDE + "done(init=name(d.cuInit(0)))").result == {"init": "CUDA_SUCCESS"}


def test_no_worker_address_means_no_device(worker):
    r = worker.run(PRELUDE + "done(init=name(d.cuInit(0)))", address="unix:///nonexistent/socket")
    assert r.result == {"init": "CUDA_ERROR_NO_DEVICE"}
    assert "cannot reach the worker" in r.stderr


def test_unsupported_function_is_named_once(worker):
    r = worker.run(PRELUDE + """
setup()
a = name(d.cuMemAllocManaged(64, 1))
b = name(d.cuMemAllocManaged(64, 1))
done(a=a, b=b)
""")
    assert r.result == {"a": "CUDA_ERROR_NOT_SUPPORTED", "b": "CUDA_ERROR_NOT_SUPPORTED"}
    assert r.stderr.count("gpulab: cuMemAllocManaged refused: a gpulab vGPU does not support this function") == 1


def test_tcp_transport(make_worker):
    w = make_worker(tcp=True)
    r = w.run(PRELUDE + """
setup()
p = ok(d.cuMemAlloc(1 << 20))
src = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
ok(d.cuMemcpyHtoD(p, src, src.nbytes))
back = np.zeros_like(src); ok(d.cuMemcpyDtoH(back, p, src.nbytes))
done(same=bool((back == src).all()))
""", address=w.tcp)
    assert r.result == {"same": True}


def test_disconnect_frees_the_session(worker):
    worker.run(PRELUDE + """
setup()
for _ in range(3):
    ok(d.cuMemAlloc(1 << 20))
done()
""")
    deadline = time.time() + 10
    while "freed 3145728 bytes in 3 allocations" not in worker.log_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "freed 3145728 bytes in 3 allocations" in worker.log_text()


def test_dead_worker_fails_the_next_call_quickly(worker):
    client = subprocess.Popen([sys.executable, "-c", PRELUDE + """
setup()
p = ok(d.cuMemAlloc(16))
print("ready", flush=True)
sys.stdin.readline()
import time
t = time.monotonic()
err = name(d.cuCtxSynchronize())
again = name(d.cuMemAlloc(16))
done(err=err, again=again, seconds=time.monotonic() - t)
"""], env=worker.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert client.stdout.readline().strip() == "ready"
    os.killpg(worker.proc.pid, 9)  # the daemon and its executors
    worker.proc.wait()
    client.stdin.write("go\n")
    client.stdin.flush()
    out, err = client.communicate(timeout=30)
    import json

    res = json.loads(out.strip().splitlines()[-1])
    assert res["err"] == "CUDA_ERROR_DEVICE_UNAVAILABLE" and res["again"] == "CUDA_ERROR_DEVICE_UNAVAILABLE"
    assert res["seconds"] < 5
    assert "connection to the worker lost" in err


def test_cuda_core_program_unmodified(worker):
    r = worker.run("""
import json
import numpy as np
from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch
dev = Device()
dev.set_current()
src = r'''
extern "C" __global__ void vec_add(const float* a, const float* b, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}'''
prog = Program(src, code_type="c++", options=ProgramOptions(arch=f"compute_{dev.arch}"))
kernel = prog.compile("ptx").get_kernel("vec_add")
stream = dev.create_stream()
n = 5000
rng = np.random.default_rng(0)
a = rng.random(n, dtype=np.float32); b = rng.random(n, dtype=np.float32)
bufs = [dev.allocate(a.nbytes, stream=stream) for _ in range(3)]
import ctypes
from cuda.core import LegacyPinnedMemoryResource
pinned = LegacyPinnedMemoryResource()

def host_view(buf):
    return np.frombuffer((ctypes.c_char * buf.size).from_address(int(buf.handle)), np.float32)

ha, hb, hout = (pinned.allocate(a.nbytes) for _ in range(3))
host_view(ha)[:] = a
host_view(hb)[:] = b
bufs[0].copy_from(ha, stream=stream)
bufs[1].copy_from(hb, stream=stream)
e1 = dev.create_event(options={"timing_enabled": True})
stream.record(e1)
launch(stream, LaunchConfig(grid=(n + 255) // 256, block=256), kernel, bufs[0], bufs[1], bufs[2], np.int32(n))
e2 = dev.create_event(options={"timing_enabled": True})
stream.record(e2)
bufs[2].copy_to(hout, stream=stream)
stream.sync()
out = host_view(hout).copy()
elapsed = e2 - e1
print(json.dumps({"name": dev.name, "match": bool(np.allclose(out, a + b)), "elapsed": elapsed}))
""", env_extra={"PYTHONWARNINGS": "default"})
    res = r.result
    # success prints nothing at all: no gpulab line, no library warning (the emulated driver version
    # is as new as the installed NVRTC, so cuda.core does not warn of an old driver)
    assert r.stderr == ""
    assert "emulated" in res["name"]
    assert res["match"]
    assert res["elapsed"] >= 0


def test_gpulab_run_and_shim_path(worker):
    path = subprocess.run([sys.executable, "-m", "gpulab.cli", "shim-path"], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout.strip()
    assert os.path.exists(os.path.join(path, "libcuda.so.1"))
    env = dict(os.environ, GPULAB_WORKER=worker.unix, GPULAB_TOKEN=worker.token)
    p = subprocess.run([sys.executable, "-m", "gpulab.cli", "run", "--", sys.executable, "-c",
                        "from cuda.bindings import driver as d; d.cuInit(0); print(d.cuDeviceGetName(64, 0)[1])"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "emulated" in p.stdout, p.stderr


@pytest.mark.parametrize("frame", [
    b"\xff" * 16,                                                  # absurd length
    (8).to_bytes(8, "little") + (17).to_bytes(4, "little") + b"\1\0\0\0" + b"x" * 8,  # wrong payload size
    (4).to_bytes(8, "little") + (9999).to_bytes(4, "little") + b"\1\0\0\0" + b"abcd",  # unknown opcode
    (10).to_bytes(8, "little") + (3).to_bytes(4, "little") + b"\0\0\0\0" + b"0123456789",  # short launch
])
def test_malformed_frames_close_only_that_session(worker, frame):
    import socket
    import struct

    from gpu_worker.api.protocol import HELLO, OP_HELLO, PROTOCOL_VERSION, REP_HEADER, REQ_HEADER

    s = socket.socket(socket.AF_UNIX)
    s.connect(worker.unix[len("unix://"):])
    tok = worker.token.encode()
    hello = HELLO.pack(PROTOCOL_VERSION, os.getpid(), len(tok))
    s.sendall(REQ_HEADER.pack(HELLO.size + len(tok), OP_HELLO, 1) + hello + tok)
    plen, res, _ = REP_HEADER.unpack(s.recv(REP_HEADER.size, socket.MSG_WAITALL))
    s.recv(plen, socket.MSG_WAITALL)
    assert res == 0
    s.sendall(frame)
    s.settimeout(10)
    got = s.recv(64)
    if got:  # a well-framed request with an unknown opcode gets an error reply, then the session goes on
        assert struct.unpack_from("<Qi", got)[1] == 801
    s.close()
    assert worker.run(PRELUDE + "setup(); done(n=ok(d.cuDeviceGetCount()))").result == {"n": 1}


def test_cubin_and_fatbin_images_travel_whole(worker):
    """The shim sizes ELF cubins and fatbins itself; the worker sees exactly the image."""
    r = worker.run(PRELUDE + f"""
import ctypes, struct
sys.path.insert(0, {str(ROOT / "tests" / "data")!r})
from build_ptx import compile_cubin
setup()
cubin = compile_cubin(open({str(PTX_FILE.with_suffix(".cu"))!r}, "rb").read(), "sm_90")
trailing = cubin + b"TRAILING-GARBAGE-NOT-PART-OF-THE-IMAGE"
r1 = name(d.cuModuleLoadData(trailing))
body = bytes(range(256)) * 4
fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body + b"garbage"
r2 = name(d.cuModuleLoadData(fatbin))
keep = ctypes.create_string_buffer(fatbin, len(fatbin))
wrapper = ctypes.create_string_buffer(struct.pack("<IIQQ", 0x466243B1, 1, ctypes.addressof(keep), 0), 24)
r3 = name(d.cuModuleLoadFatBinary(ctypes.addressof(wrapper)))
done(r=[r1, r2, r3], cubin=len(cubin), fatbin=16 + len(body))
""")
    res = r.result
    assert res["r"] == ["CUDA_ERROR_NOT_SUPPORTED"] * 3
    log = worker.log_text()
    assert f"got a {res['cubin']}-byte cubin" in log
    assert log.count(f"got a {res['fatbin']}-byte fatbin") == 2
