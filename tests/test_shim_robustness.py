"""The shim under conditions a well-behaved single-threaded program never meets: fork(),
module globals in unified copies, host mappings at device addresses, many threads launching
a kernel whose layout is not cached yet.

Real worker processes on the emulated backend and real cuda.bindings programs through the shim."""
from __future__ import annotations

from workertools import PRELUDE, PTX_FILE, SLEEP_PRELUDE

GLOBAL_PTX = r"""
.version 8.0
.target sm_90
.address_size 64
.visible .global .align 4 .b8 table[64];
.visible .global .u32 counter;
"""


def test_a_forked_child_sets_cuda_up_again_and_works(worker):
    """A child of fork() opens a session of its own: it neither shares nor corrupts its parent's."""
    r = worker.run(PRELUDE + """
import os
setup()
p = ok(d.cuMemAlloc(64))
ok(d.cuMemcpyHtoD(p, np.full(64, 9, np.uint8), 64))
pid = os.fork()
if pid == 0:
    try:
        # a new session: set up as any program does, then allocate and copy both ways
        setup()
        q = ok(d.cuMemAlloc(256))
        src = np.arange(256, dtype=np.uint8)
        ok(d.cuMemcpyHtoD(q, src, 256))
        back = np.zeros(256, np.uint8)
        ok(d.cuMemcpyDtoH(back, q, 256))
        # unified copies know the child's allocation, not the parent's
        ok(d.cuMemcpy(int(back.ctypes.data), q, 256))
        good = bool((back == src).all()) and name(d.cuMemsetD8(p, 0, 64)) == "CUDA_ERROR_INVALID_VALUE"
        os._exit(0 if good else 3)
    except BaseException as exc:
        print(exc, file=sys.stderr)
        os._exit(4)
_, status = os.waitpid(pid, 0)
back = np.zeros(64, np.uint8); ok(d.cuMemcpyDtoH(back, p, 64))
done(child=os.waitstatus_to_exitcode(status), intact=bool((back == 9).all()))
""")
    assert r.result == {"child": 0, "intact": True}, r.stderr


def test_a_unified_copy_to_a_module_global_goes_to_the_device(worker):
    r = worker.run(PRELUDE + f"""
setup()
mod = ok(d.cuModuleLoadData({GLOBAL_PTX!r}.encode() + b"\\0"))
g, size = ok(d.cuModuleGetGlobal(mod, b"table"))
c, csize = ok(d.cuModuleGetGlobal(mod, b"counter"))
src = np.arange(64, dtype=np.uint8) + 1
ok(d.cuMemcpy(int(g), int(src.ctypes.data), 64))            # host -> global, by unified address
back = np.zeros(64, np.uint8)
ok(d.cuMemcpyDtoH(back, g, 64))
again = np.zeros(64, np.uint8)
ok(d.cuMemcpy(int(again.ctypes.data), int(g), 64))          # global -> host
missing = name(d.cuModuleGetGlobal(mod, b"nope"))
ok(d.cuModuleUnload(mod))
after_unload = name(d.cuMemcpyHtoD(g, src, 64))  # the driver freed the global with its module
done(size=int(size), csize=int(csize), back=back.tolist(), again=again.tolist(), missing=missing,
     after_unload=after_unload)
""")
    res = r.result
    assert res["size"] == 64 and res["csize"] == 4
    assert res["back"] == list(range(1, 65)) == res["again"]
    assert res["missing"] == "CUDA_ERROR_NOT_FOUND"
    assert res["after_unload"] == "CUDA_ERROR_INVALID_VALUE"
    assert "is not in this vGPU's allocations" in r.stderr, r.stderr


def test_no_host_mapping_can_take_a_device_address(worker):
    """The shim reserves the pages of device allocations: a host mmap there is refused while the
    allocation lives and allowed once it is freed."""
    r = worker.run(PRELUDE + """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
PROT_RW, MAP_PRIVATE_ANON, MAP_FIXED_NOREPLACE = 3, 0x22, 0x100000
def try_map(addr):
    page = addr & ~4095
    got = libc.mmap(page, 4096, PROT_RW, MAP_PRIVATE_ANON | MAP_FIXED_NOREPLACE, -1, 0)
    if got == page:
        libc.munmap(ctypes.c_void_p(page), 4096)
        return "mapped"
    return errno.errorcode.get(ctypes.get_errno(), "?")
setup()
p = ok(d.cuMemAlloc(10000))
q = ok(d.cuMemAlloc(100))             # may share a page with p
while_alive = [try_map(int(p)), try_map(int(p) + 8192), try_map(int(q))]
ok(d.cuMemFree(p))
after_one = try_map(int(p))           # p's first page is not q's
ok(d.cuMemFree(q))
done(alive=while_alive, after_one=after_one, after_all=[try_map(int(p) + 8192), try_map(int(q))])
""")
    res = r.result
    assert res["alive"] == ["EEXIST"] * 3
    assert res["after_one"] == "mapped" and res["after_all"] == ["mapped", "mapped"]


def test_threads_launching_a_new_kernel_at_once_all_get_its_whole_layout(worker):
    """The first launches of a function race to fetch its parameter layout; none may see a half-filled one."""
    r = worker.run(PRELUDE + f"""
import threading
setup()
mod = ok(d.cuModuleLoadData(open({str(PTX_FILE)!r}, "rb").read() + b"\\0"))
n = 256
errors = []
def run(i):
    try:
        ok(d.cuCtxSetCurrent(ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(0))))))
        fn = ok(d.cuModuleGetFunction(mod, b"vec_add"))
        a, b, c = (ok(d.cuMemAlloc(n * 4)) for _ in range(3))
        x = np.full(n, i, np.float32)
        ok(d.cuMemcpyHtoD(a, x, n * 4)); ok(d.cuMemcpyHtoD(b, x, n * 4))
        vals = [np.array([int(a)], np.uint64), np.array([int(b)], np.uint64), np.array([int(c)], np.uint64),
                np.array([n], np.int32)]
        args = np.array([v.ctypes.data for v in vals], np.uint64)
        ok(d.cuLaunchKernel(fn, 1, 1, 1, n, 1, 1, 0, 0, args.ctypes.data, 0))
        out = np.zeros(n, np.float32)
        ok(d.cuMemcpyDtoH(out, c, n * 4))
        if not (out == 2 * i).all():
            errors.append(i)
    except BaseException as exc:
        errors.append(repr(exc))
ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
for t in ts: t.start()
for t in ts: t.join()
done(errors=errors)
""")
    assert r.result == {"errors": []}, r.stderr




def test_fork_does_not_wait_for_a_thread_in_a_long_call(worker):
    """A thread synchronizes on a 4 s kernel (holding the connection); fork() returns at once and the
    child works."""
    r = worker.run(SLEEP_PRELUDE + f"""
import os, threading, time
setup()
launch_sleep(4000)
waiter = threading.Thread(target=lambda: ok(d.cuCtxSynchronize()))
waiter.start()
time.sleep(0.5)
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        setup()
        q = ok(d.cuMemAlloc(16))
        ok(d.cuMemcpyHtoD(q, np.full(16, 5, np.uint8), 16))
        back = np.zeros(16, np.uint8)
        ok(d.cuMemcpyDtoH(back, q, 16))
        os._exit(0 if (back == 5).all() else 3)
    except BaseException as exc:
        print(exc, file=sys.stderr)
        os._exit(4)
forked = time.monotonic() - t0
_, status = os.waitpid(pid, 0)
waiter.join()
done(forked=forked, child=os.waitstatus_to_exitcode(status))
""")
    assert r.result["child"] == 0, r.stderr
    assert r.result["forked"] < 1
