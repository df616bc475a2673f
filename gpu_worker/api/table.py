"""The forwarded CUDA driver API, described once.

Both the C stubs of the shim (``gpu_worker/shim/gl_generated.c``) and the worker's
Python dispatch (``gpu_worker/daemon/dispatch_generated.py``) are generated from this table by
``python -m gpu_worker.api.codegen``.  Each entry names the driver function as programs ask
for it through ``cuGetProcAddress`` (``name``), the versioned symbol whose ABI we
implement (``abi``) and the CUDA version that introduced that ABI (``since``), and its
parameters with a direction/size rule each.

Wire types (little endian): ``i32 u32 u64 f32 size dptr`` and ``h:<kind>`` (a handle id
minted by the shim, 8 bytes).  Parameter rules:

``In``       scalar passed by value.
``Out``      pointer to a scalar the worker fills (sent back in the reply).
``Mint``     pointer to a handle the shim mints locally; the id travels to the worker.
``CStr``     NUL-terminated string.
``OutStr``   ``char*`` buffer whose length is another (int) parameter.
``OutBytes`` fixed-size struct the worker fills (e.g. a 16-byte CUuuid).
``OutVar``   buffer whose size depends on another parameter; the worker sends the bytes.
``Image``    a module image (PTX text, cubin ELF or fatbin); its size is found by the shim.
``HostIn``   host memory read by the call, size from another parameter (bulk data).
``HostOut``  host memory written by the call, size from another parameter (bulk data).
``InBytes``  pointer to a fixed-size struct the call reads (e.g. CUmemPoolProps); its size is the
             ``LAYOUTS`` entry named by ``arg``, and it travels as raw bytes among the fixed fields.
``Null``     a pointer parameter we accept only as NULL (anything else: NOT_SUPPORTED).
``Ignored``  a parameter that does not travel (JIT option arrays and the like).
``DPtr``     a device pointer; ``span`` is an expression for the byte range it must
             cover inside one of the session's own allocations (checked on the worker).

The ``WIRE`` and ``LAYOUTS`` section holds the numbers both ends must agree on (protocol version,
opcodes, header layouts, flags, limits); codegen writes them into ``gpu_worker/shim/gl_wire.h``
and ``gpu_worker/api/wire.py``.

Modes: ``sync`` waits for the reply; ``async`` is pipelined (no reply; an error is
latched and returned by the next synchronizing call); ``syncpoint`` is a synchronizing
call that returns a latched error; ``send_now`` sends an ``async`` call at once instead of
buffering it (still without a reply).  ``c_after`` is C code run by the stub after success
(used to track allocations in the shim); ``c_failed`` after a failure.  ``server`` = ``"special"`` marks functions whose
worker side is hand-written in :mod:`gpu_worker.daemon.session` (bulk data paths, launches).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Param:
    rule: str
    name: str
    type: str = ""
    arg: str = ""  # length parameter, span expression or max size

    @property
    def is_handle(self) -> bool:
        return self.type.startswith("h:")


def In(name, type):  # noqa: N802 - table vocabulary
    return Param("in", name, type)


def Out(name, type):  # noqa: N802
    return Param("out", name, type)


def Mint(name, kind):  # noqa: N802
    return Param("mint", name, "h:" + kind)


def CStr(name):  # noqa: N802
    return Param("cstr", name)


def OutStr(name, length):  # noqa: N802
    return Param("outstr", name, arg=length)


def OutBytes(name, size):  # noqa: N802
    return Param("outbytes", name, arg=str(size))


def InBytes(name, layout):  # noqa: N802
    return Param("inbytes", name, arg=layout)


def OutVar(name, maxsize):  # noqa: N802
    return Param("outvar", name, arg=str(maxsize))


def Image(name):  # noqa: N802
    return Param("image", name)


def HostIn(name, size):  # noqa: N802
    return Param("hostin", name, arg=size)


def HostOut(name, size):  # noqa: N802
    return Param("hostout", name, arg=size)


def Null(name):  # noqa: N802
    return Param("null", name)


def Ignored(name, ctype="void*"):  # noqa: N802
    return Param("ignored", name, ctype)


def DPtr(name, span="1"):  # noqa: N802
    return Param("dptr", name, "dptr", span)


@dataclass(frozen=True)
class Func:
    name: str
    params: list
    abi: str = ""
    since: int = 2000
    mode: str = "sync"
    server: str = "generic"
    c_after: str = ""
    c_failed: str = ""  # C code run by the stub after a failure (a minted handle the call did not make)
    extra_names: tuple = field(default_factory=tuple)
    send_now: bool = False  # async, yet sent at once (no reply awaited): the worker must see it promptly

    @property
    def symbol(self) -> str:
        return self.abi or self.name


def F(name, params, **kw):  # noqa: N802
    return Func(name, list(params), **kw)


# --- WIRE: the numbers both ends must agree on -----------------------------------------
# Declared here once; codegen writes them into gpu_worker/shim/gl_wire.h (as GL_<name>) and
# gpu_worker/api/wire.py (as <name>), which gpu_worker/api/protocol.py re-exports.
@dataclass(frozen=True)
class Const:
    name: str
    value: int
    doc: str


@dataclass(frozen=True)
class Layout:
    """A fixed frame part as a Python struct format (little endian, no padding); C gets its size."""
    name: str
    format: str
    doc: str


WIRE = [
    Const("PROTOCOL_VERSION", 4, "sent in HELLO; a worker refuses any other version (2: replies carry reasons, "
                                 "3: keepalives, 4: ended frames)"),
    Const("OP_HELLO", 1, "opens the session: version, client pid, token"),
    Const("OP_SET_CONTEXT", 2, "the calling thread's current context id (never replied)"),
    Const("OP_LAUNCH", 3, "a kernel launch with its parameter buffer (never replied)"),
    Const("OP_PARAM_LAYOUT", 4, "offset and size of each parameter of a function"),
    Const("OP_NATIVE_HELLO", 5, "opens a native-mode process's attachment to its vGPU's ledger (same payload as "
                                "HELLO, Unix socket only): the reply's payload is key=value lines and carries the "
                                "ledger's file descriptor (SCM_RIGHTS)"),
    Const("OP_NATIVE_THAW", 6, "a native process found itself frozen (warm tier): the worker restores it; replied "
                               "once it may run"),
    Const("OP_NATIVE_ROOM", 7, "a native process's driver found its GPU full: the payload is JSON {device (the "
                               "vGPU's ordinal), need (bytes), wait (seconds)}; the worker moves other vGPUs off "
                               "that GPU (eviction) and replies 0 with the bytes freed as decimal text, or "
                               "OUT_OF_MEMORY with why nothing could move"),
    Const("NATIVE_OBSERVE", 2, "request flags bit of OP_NATIVE_HELLO: read the ledger only (the NVML stand-in): no "
                               "slot, nothing charged"),
    Const("FIRST_OPCODE", 16, "opcode of FORWARDED[0]; FORWARDED[i] is FIRST_OPCODE + i"),
    Const("FLAG_REPLY", 1, "request flags bit: the shim waits for a reply"),
    Const("LAUNCH_ATTR_SIZE", 72, "bytes of one CUlaunchAttribute, sent as the driver lays it out"),
    Const("MAX_FRAME", 256 << 20, "default largest request the worker accepts (bulk copy data excepted)"),
    Const("MAX_REPLY", 64 << 20, "largest reply payload the shim buffers (bulk copy data excepted)"),
    Const("PIPELINE_FLUSH", 64 << 10, "the shim sends pipelined frames once this many bytes are pending"),
    Const("MAX_REASON", 1024, "longest reason (UTF-8 bytes) a reply carries for a refused call"),
    Const("REPLY_KEEPALIVE", 1 << 31, "reply header's reason-length word: not a reply but a keepalive (no payload, "
                                      "result 0): the worker is alive and still running a call"),
    Const("REPLY_ENDED", 1 << 30, "reply header's reason-length word: the worker ended this session: the payload is "
                                  "the CUresult (u32) and a UTF-8 sentence (at most MAX_REASON bytes, its length in "
                                  "the word's low bits, the CUresult also in the header); no reply follows"),
    Const("KEEPALIVE_AFTER_MS", 1000, "the worker sends keepalives once a call has run this long"),
    Const("KEEPALIVE_EVERY_MS", 2000, "and then this often until the call ends"),
    Const("DEFAULT_TIMEOUT_MS", 10000, "the shim gives up on a silent worker after this long (GPULAB_TIMEOUT)"),
    Const("MIN_TIMEOUT_MS", 3000, "the shortest liveness limit the shim accepts: above KEEPALIVE_AFTER + EVERY"),
]

LAYOUTS = [
    Layout("REQ_HEADER", "<QII", "u64 payload length, u32 opcode, u32 flags"),
    Layout("REP_HEADER", "<QiI", "u64 payload length, i32 CUresult, u32 reason length (the payload's last bytes)"),
    Layout("HELLO", "<IIQ", "u32 protocol version, u32 client pid, u64 token length (token follows)"),
    Layout("LAUNCH", "<Q7IQI", "u64 function id, u32 grid x,y,z, block x,y,z, shared bytes, u64 stream id, "
                               "u32 attribute count (attributes, then u64 length + parameter buffer follow)"),
    # CUmemPoolProps: allocType, handleTypes, location (type, id), win32SecurityAttributes, maxSize, usage,
    # gpuDirectRDMACapable, reserved (88 bytes, as CUDA 12 and 13 lay it out)
    Layout("MEMPOOL_PROPS", "<IIiiQQHB53x", "cuMemPoolCreate's CUmemPoolProps as the program laid it out"),
]


def wire_value(name: str) -> int:
    return next(c.value for c in WIRE if c.name == name)


# The opcode of a function is its index in FORWARDED plus FIRST_OPCODE: append new
# entries at the end so that older shims and workers keep understanding each other.
FIRST_OPCODE = wire_value("FIRST_OPCODE")

FORWARDED = [
    # --- initialisation and device queries -------------------------------------------
    F("cuInit", [In("Flags", "u32")]),
    F("cuDriverGetVersion", [Out("driverVersion", "i32")]),
    F("cuDeviceGet", [Out("device", "i32"), In("ordinal", "i32")]),
    F("cuDeviceGetCount", [Out("count", "i32")]),
    F("cuDeviceGetName", [OutStr("name", "len"), In("len", "i32"), In("dev", "i32")]),
    F("cuDeviceGetUuid", [OutBytes("uuid", 16), In("dev", "i32")], abi="cuDeviceGetUuid_v2", since=11040),
    F("cuDeviceTotalMem", [Out("bytes", "size"), In("dev", "i32")], abi="cuDeviceTotalMem_v2", since=3020),
    F("cuDeviceGetAttribute", [Out("pi", "i32"), In("attrib", "i32"), In("dev", "i32")]),
    F("cuDeviceComputeCapability", [Out("major", "i32"), Out("minor", "i32"), In("dev", "i32")]),
    F("cuDeviceGetPCIBusId", [OutStr("pciBusId", "len"), In("len", "i32"), In("dev", "i32")], since=4010),
    F("cuDeviceCanAccessPeer", [Out("canAccessPeer", "i32"), In("dev", "i32"), In("peerDev", "i32")], since=4000),
    # --- contexts (the current context itself is tracked in the shim) ----------------
    F("cuDevicePrimaryCtxRetain", [Out("pctx", "h:ctx"), In("dev", "i32")], since=7000),
    F("cuDevicePrimaryCtxRelease", [In("dev", "i32")], abi="cuDevicePrimaryCtxRelease_v2", since=11000),
    F("cuDevicePrimaryCtxReset", [In("dev", "i32")], abi="cuDevicePrimaryCtxReset_v2", since=11000),
    F("cuDevicePrimaryCtxGetState", [In("dev", "i32"), Out("flags", "u32"), Out("active", "i32")], since=7000),
    F("cuDevicePrimaryCtxSetFlags", [In("dev", "i32"), In("flags", "u32")],
      abi="cuDevicePrimaryCtxSetFlags_v2", since=11000),
    F("cuCtxCreate", [Mint("pctx", "ctx"), Null("ctxCreateParams"), In("flags", "u32"), In("dev", "i32")],
      abi="cuCtxCreate_v4", since=12050, c_after="gl_ctx_set_current((CUcontext)*pctx)"),
    F("cuCtxDestroy", [In("ctx", "h:ctx")], abi="cuCtxDestroy_v2", since=4000, c_after="gl_ctx_forget(ctx)"),
    F("cuCtxGetDevice", [Out("device", "i32")]),
    F("cuCtxGetDevice_v2", [Out("device", "i32"), In("ctx", "h:ctx")], since=13000),
    F("cuCtxSynchronize", [], mode="syncpoint"),
    F("cuCtxSynchronize_v2", [In("ctx", "h:ctx")], since=13000, mode="syncpoint"),
    F("cuCtxGetApiVersion", [In("ctx", "h:ctx"), Out("version", "u32")], since=3020),
    F("cuCtxGetFlags", [Out("flags", "u32")], since=7000),
    F("cuCtxGetId", [In("ctx", "h:ctx"), Out("ctxId", "u64")], since=12000),
    F("cuCtxGetLimit", [Out("pvalue", "size"), In("limit", "i32")], since=3010),
    F("cuCtxSetLimit", [In("limit", "i32"), In("value", "size")], since=3010),
    F("cuCtxGetStreamPriorityRange", [Out("leastPriority", "i32"), Out("greatestPriority", "i32")], since=5050),
    F("cuCtxGetCacheConfig", [Out("pconfig", "i32")], since=3020),
    F("cuCtxSetCacheConfig", [In("config", "i32")], since=3020),
    # --- memory ---------------------------------------------------------------------
    F("cuMemAlloc", [Out("dptr", "dptr"), In("bytesize", "size")], abi="cuMemAlloc_v2", since=3020,
      c_after="r = gl_track_new_alloc(*dptr, bytesize)"),
    # a free is pipelined but sent at once: the vGPU's usage figure (dashboard, quota) drops within
    # milliseconds, not at the program's next synchronizing call, which may be minutes away
    F("cuMemFree", [In("dptr", "dptr")], abi="cuMemFree_v2", since=3020, mode="async", send_now=True,
      c_after="gl_untrack_alloc(dptr)"),
    F("cuMemGetInfo", [Out("free", "size"), Out("total", "size")], abi="cuMemGetInfo_v2", since=3020),
    F("cuMemGetAddressRange", [Out("pbase", "dptr"), Out("psize", "size"), In("dptr", "dptr")],
      abi="cuMemGetAddressRange_v2", since=3020),
    F("cuMemcpyHtoD", [DPtr("dstDevice", "ByteCount"), HostIn("srcHost", "ByteCount"), In("ByteCount", "size")],
      abi="cuMemcpyHtoD_v2", since=3020, mode="syncpoint", server="special"),
    F("cuMemcpyDtoH", [HostOut("dstHost", "ByteCount"), DPtr("srcDevice", "ByteCount"), In("ByteCount", "size")],
      abi="cuMemcpyDtoH_v2", since=3020, mode="syncpoint", server="special"),
    F("cuMemcpyDtoD", [DPtr("dstDevice", "ByteCount"), DPtr("srcDevice", "ByteCount"), In("ByteCount", "size")],
      abi="cuMemcpyDtoD_v2", since=3020, mode="syncpoint"),
    F("cuMemcpyHtoDAsync", [DPtr("dstDevice", "ByteCount"), HostIn("srcHost", "ByteCount"),
                            In("ByteCount", "size"), In("hStream", "h:stream")],
      abi="cuMemcpyHtoDAsync_v2", since=3020, mode="async", server="special"),
    F("cuMemcpyDtoHAsync", [HostOut("dstHost", "ByteCount"), DPtr("srcDevice", "ByteCount"),
                            In("ByteCount", "size"), In("hStream", "h:stream")],
      abi="cuMemcpyDtoHAsync_v2", since=3020, mode="syncpoint", server="special"),
    F("cuMemcpyDtoDAsync", [DPtr("dstDevice", "ByteCount"), DPtr("srcDevice", "ByteCount"),
                            In("ByteCount", "size"), In("hStream", "h:stream")],
      abi="cuMemcpyDtoDAsync_v2", since=3020, mode="async"),
    F("cuMemsetD8", [DPtr("dstDevice", "N"), In("uc", "u32"), In("N", "size")],
      abi="cuMemsetD8_v2", since=3020, mode="syncpoint"),
    F("cuMemsetD16", [DPtr("dstDevice", "N*2"), In("us", "u32"), In("N", "size")],
      abi="cuMemsetD16_v2", since=3020, mode="syncpoint"),
    F("cuMemsetD32", [DPtr("dstDevice", "N*4"), In("ui", "u32"), In("N", "size")],
      abi="cuMemsetD32_v2", since=3020, mode="syncpoint"),
    F("cuMemsetD8Async", [DPtr("dstDevice", "N"), In("uc", "u32"), In("N", "size"), In("hStream", "h:stream")],
      since=3020, mode="async"),
    F("cuMemsetD16Async", [DPtr("dstDevice", "N*2"), In("us", "u32"), In("N", "size"), In("hStream", "h:stream")],
      since=3020, mode="async"),
    F("cuMemsetD32Async", [DPtr("dstDevice", "N*4"), In("ui", "u32"), In("N", "size"), In("hStream", "h:stream")],
      since=3020, mode="async"),
    F("cuPointerGetAttribute", [OutVar("data", 16), In("attribute", "i32"), In("ptr", "dptr")], since=4000),
    # --- modules, libraries, functions, kernels -------------------------------------
    F("cuModuleLoadData", [Mint("module", "module"), Image("image")]),
    F("cuModuleLoadDataEx", [Mint("module", "module"), Image("image"), Ignored("numOptions", "unsigned int"),
                             Ignored("options", "int*"), Ignored("optionValues", "void**")], since=2010),
    F("cuModuleLoadFatBinary", [Mint("module", "module"), Image("fatCubin")]),
    F("cuModuleUnload", [In("hmod", "h:module")], mode="async"),
    F("cuModuleGetFunction", [Mint("hfunc", "function"), In("hmod", "h:module"), CStr("name")]),
    # a global is device memory: tracked so that a unified cuMemcpy to it goes to the worker
    F("cuModuleGetGlobal", [Out("dptr", "dptr"), Out("bytes", "size"), In("hmod", "h:module"), CStr("name")],
      abi="cuModuleGetGlobal_v2", since=3020, c_after="r = gl_track_global(*dptr, *bytes)"),
    F("cuModuleGetLoadingMode", [Out("mode", "i32")], since=11070),
    F("cuLibraryLoadData", [Mint("library", "library"), Image("code"), Ignored("jitOptions", "int*"),
                            Ignored("jitOptionsValues", "void**"), Ignored("numJitOptions", "unsigned int"),
                            Ignored("libraryOptions", "int*"), Ignored("libraryOptionValues", "void**"),
                            Ignored("numLibraryOptions", "unsigned int")], since=12000),
    F("cuLibraryUnload", [In("library", "h:library")], since=12000, mode="async"),
    F("cuLibraryGetKernel", [Mint("pKernel", "kernel"), In("library", "h:library"), CStr("name")], since=12000),
    F("cuLibraryGetModule", [Mint("pMod", "module"), In("library", "h:library")], since=12000),
    F("cuKernelGetFunction", [Mint("pFunc", "function"), In("kernel", "h:kernel")], since=12000),
    F("cuKernelGetAttribute", [Out("pi", "i32"), In("attrib", "i32"), In("kernel", "h:kernel"), In("dev", "i32")],
      since=12000),
    F("cuKernelSetAttribute", [In("attrib", "i32"), In("val", "i32"), In("kernel", "h:kernel"), In("dev", "i32")],
      since=12000),
    F("cuKernelGetParamInfo", [In("kernel", "h:kernel"), In("paramIndex", "size"), Out("paramOffset", "size"),
                               Out("paramSize", "size")], since=12040),
    F("cuFuncGetAttribute", [Out("pi", "i32"), In("attrib", "i32"), In("hfunc", "h:function")], since=2020),
    F("cuFuncSetAttribute", [In("hfunc", "h:function"), In("attrib", "i32"), In("value", "i32")], since=9000),
    F("cuFuncSetCacheConfig", [In("hfunc", "h:function"), In("config", "i32")], since=3000),
    F("cuFuncGetParamInfo", [In("func", "h:function"), In("paramIndex", "size"), Out("paramOffset", "size"),
                             Out("paramSize", "size")], since=12040),
    F("cuFuncGetModule", [Out("hmod", "h:module"), In("hfunc", "h:function")], since=11000),
    F("cuOccupancyMaxActiveBlocksPerMultiprocessor",
      [Out("numBlocks", "i32"), In("func", "h:function"), In("blockSize", "i32"), In("dynamicSMemSize", "size")],
      since=6050),
    F("cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags",
      [Out("numBlocks", "i32"), In("func", "h:function"), In("blockSize", "i32"), In("dynamicSMemSize", "size"),
       In("flags", "u32")], since=7000),
    F("cuOccupancyMaxPotentialBlockSize",
      [Out("minGridSize", "i32"), Out("blockSize", "i32"), In("func", "h:function"),
       Null("blockSizeToDynamicSMemSize"), In("dynamicSMemSize", "size"), In("blockSizeLimit", "i32")],
      since=6050),
    F("cuOccupancyAvailableDynamicSMemPerBlock",
      [Out("dynamicSmemSize", "size"), In("func", "h:function"), In("numBlocks", "i32"), In("blockSize", "i32")],
      since=11000),
    # --- streams and events ---------------------------------------------------------
    F("cuStreamCreate", [Mint("phStream", "stream"), In("Flags", "u32")], mode="async"),
    F("cuStreamCreateWithPriority", [Mint("phStream", "stream"), In("flags", "u32"), In("priority", "i32")],
      since=5050, mode="async"),
    F("cuStreamDestroy", [In("hStream", "h:stream")], abi="cuStreamDestroy_v2", since=4000, mode="async"),
    F("cuStreamSynchronize", [In("hStream", "h:stream")], mode="syncpoint"),
    F("cuStreamQuery", [In("hStream", "h:stream")], mode="syncpoint"),
    F("cuStreamWaitEvent", [In("hStream", "h:stream"), In("hEvent", "h:event"), In("Flags", "u32")],
      since=3020, mode="async"),
    F("cuStreamGetPriority", [In("hStream", "h:stream"), Out("priority", "i32")], since=5050),
    F("cuStreamGetFlags", [In("hStream", "h:stream"), Out("flags", "u32")], since=5050),
    F("cuStreamGetId", [In("hStream", "h:stream"), Out("streamId", "u64")], since=12000),
    F("cuStreamGetCtx", [In("hStream", "h:stream"), Out("pctx", "h:ctx")], since=9020),
    F("cuEventCreate", [Mint("phEvent", "event"), In("Flags", "u32")], mode="async"),
    F("cuEventDestroy", [In("hEvent", "h:event")], abi="cuEventDestroy_v2", since=4000, mode="async"),
    F("cuEventRecord", [In("hEvent", "h:event"), In("hStream", "h:stream")], mode="async"),
    F("cuEventRecordWithFlags", [In("hEvent", "h:event"), In("hStream", "h:stream"), In("flags", "u32")],
      since=11010, mode="async"),
    F("cuEventSynchronize", [In("hEvent", "h:event")], mode="syncpoint"),
    F("cuEventQuery", [In("hEvent", "h:event")], mode="syncpoint"),
    F("cuEventElapsedTime", [Out("pMilliseconds", "f32"), In("hStart", "h:event"), In("hEnd", "h:event")],
      abi="cuEventElapsedTime_v2", since=12080, extra_names=("cuEventElapsedTime@2000",)),
    # --- graphs: stream capture and graph launch -------------------------------------
    # Graphs and graph execs are client-minted ids like streams. Capture begins and ends with a round trip
    # (rare calls whose errors a program checks at once); the launches in between stay pipelined, and the
    # worker records them into the graph (the driver does on a GPU; the emulated backend itself).
    F("cuStreamBeginCapture", [In("hStream", "h:stream"), In("mode", "i32")],
      abi="cuStreamBeginCapture_v2", since=10010),
    F("cuStreamEndCapture", [In("hStream", "h:stream"), Mint("phGraph", "graph")], since=10000,
      c_failed="*phGraph = NULL"),
    F("cuStreamIsCapturing", [In("hStream", "h:stream"), Out("captureStatus", "i32")], since=10000),
    # CUDA 12 renamed cuGraphInstantiateWithFlags to cuGraphInstantiate (same ABI)
    F("cuGraphInstantiate", [Mint("phGraphExec", "graph_exec"), In("hGraph", "h:graph"), In("flags", "u64")],
      abi="cuGraphInstantiateWithFlags", since=12000, extra_names=("cuGraphInstantiateWithFlags@11040",),
      c_failed="*phGraphExec = NULL"),
    F("cuGraphLaunch", [In("hGraphExec", "h:graph_exec"), In("hStream", "h:stream")], since=10000, mode="async"),
    F("cuGraphExecDestroy", [In("hGraphExec", "h:graph_exec")], since=10000, mode="async"),
    F("cuGraphDestroy", [In("hGraph", "h:graph")], since=10000, mode="async"),
    # --- stream-ordered allocation and memory pools ------------------------------------
    # Pools are client-minted ids like streams; a device's default pool has a fixed id (the session's
    # DEFAULT_POOL_BASE + device).  An allocation returns the worker's address (a round trip, as cuMemAlloc)
    # and is tracked in the shim; a free is pipelined but sent at once, as cuMemFree.  The vGPU's quota is
    # charged what the pools hold reserved (docs/protocol.md, *Memory pools*).  The per-thread-stream
    # (_ptsz) variants share these stubs, as every other function's do (cuGetProcAddress ignores the flag).
    F("cuDeviceGetDefaultMemPool", [Out("pool_out", "h:mempool"), In("dev", "i32")], since=11020),
    F("cuDeviceGetMemPool", [Out("pool", "h:mempool"), In("dev", "i32")], since=11020),
    F("cuDeviceSetMemPool", [In("dev", "i32"), In("pool", "h:mempool")], since=11020),
    F("cuMemPoolCreate", [Mint("pool", "mempool"), InBytes("poolProps", "MEMPOOL_PROPS")], since=11020,
      c_failed="*pool = NULL"),
    F("cuMemPoolDestroy", [In("pool", "h:mempool")], since=11020),
    F("cuMemAllocAsync", [Out("dptr", "dptr"), In("bytesize", "size"), In("hStream", "h:stream")], since=11020,
      c_after="r = gl_track_new_alloc(*dptr, bytesize)"),
    F("cuMemAllocFromPoolAsync", [Out("dptr", "dptr"), In("bytesize", "size"), In("pool", "h:mempool"),
                                  In("hStream", "h:stream")], since=11020,
      c_after="r = gl_track_new_alloc(*dptr, bytesize)"),
    F("cuMemFreeAsync", [In("dptr", "dptr"), In("hStream", "h:stream")], since=11020, mode="async", send_now=True,
      c_after="gl_untrack_alloc(dptr)"),
    F("cuMemPoolTrimTo", [In("pool", "h:mempool"), In("minBytesToKeep", "size")], since=11020),
    # the value's size depends on the attribute (int or cuuint64_t): the shim knows which, the worker checks
    F("cuMemPoolSetAttribute", [In("pool", "h:mempool"), In("attr", "i32"),
                                HostIn("value", "gl_mempool_attr_size(attr)")], since=11020),
    F("cuMemPoolGetAttribute", [In("pool", "h:mempool"), In("attr", "i32"), OutVar("value", 8)], since=11020),
]

# The value of a memory pool attribute (cuMemPoolSetAttribute, cuMemPoolGetAttribute) is an int or a
# cuuint64_t, by attribute: CUmemPool_attribute -> its bytes.  The shim sends exactly these (codegen writes
# gl_mempool_attr_size); the worker reads and writes them (gpu_worker.api.protocol.pool_attribute_*).
MEMPOOL_ATTR_SIZES = {
    1: 4, 2: 4, 3: 4,           # REUSE_FOLLOW_EVENT_DEPENDENCIES, REUSE_ALLOW_OPPORTUNISTIC, ..._INTERNAL_DEPENDENCIES
    4: 8,                       # RELEASE_THRESHOLD
    5: 8, 6: 8, 7: 8, 8: 8,     # RESERVED_MEM_CURRENT, RESERVED_MEM_HIGH, USED_MEM_CURRENT, USED_MEM_HIGH
    9: 4, 10: 4, 11: 4, 12: 4,  # ALLOCATION_TYPE, EXPORT_HANDLE_TYPES, LOCATION_ID, LOCATION_TYPE
    13: 8, 14: 4, 15: 4,        # MAX_POOL_SIZE, HW_DECOMPRESS_ENABLED, LOCALITY_DOMAIN_ID
}

# Functions the shim answers itself, without a round trip (hand-written in shim/*.c):
# name -> (abi symbol, since).
LOCAL = {
    "cuGetProcAddress": ("cuGetProcAddress_v2", 12000),
    "cuGetErrorString": ("cuGetErrorString", 6000),
    "cuGetErrorName": ("cuGetErrorName", 6000),
    "cuCtxGetCurrent": ("cuCtxGetCurrent", 4000),
    "cuCtxSetCurrent": ("cuCtxSetCurrent", 4000),
    "cuCtxPushCurrent": ("cuCtxPushCurrent_v2", 4000),
    "cuCtxPopCurrent": ("cuCtxPopCurrent_v2", 4000),
    "cuMemAllocHost": ("cuMemAllocHost_v2", 3020),
    "cuMemHostAlloc": ("cuMemHostAlloc", 2020),
    "cuMemFreeHost": ("cuMemFreeHost", 2000),
    "cuMemHostRegister": ("cuMemHostRegister_v2", 6050),
    "cuMemHostUnregister": ("cuMemHostUnregister", 4000),
    "cuMemcpy": ("cuMemcpy", 4000),
    "cuMemcpyAsync": ("cuMemcpyAsync", 4000),
    "cuLaunchKernel": ("cuLaunchKernel", 4000),
    "cuLaunchKernelEx": ("cuLaunchKernelEx", 11060),
}
# Older entry points that the hand-written shim also exports under their plain name.
LOCAL_PLAIN = ("cuGetProcAddress",)

# Entry points a vGPU does not offer but that libraries call on every healthy run to probe for
# optional features (cuda.core asks cuGetExportTable for private driver interfaces and goes on
# without them): their CUDA_ERROR_NOT_SUPPORTED goes to the shim's debug log, never to the
# person running the program. Every other missing entry point is named once on stderr.
PROBED = ("cuGetExportTable",)


def opcode(func: Func) -> int:
    return FIRST_OPCODE + FORWARDED.index(func)


def by_name() -> dict:
    return {f.name: f for f in FORWARDED}


# Calls that need the vGPU's device memory on the GPU: before one of these, a process whose
# allocations were moved to host RAM or disk (VRAM tiering, docs/vgpu.md) gets them back first.
# Every other forwarded call (queries, handle creation, cuMemAlloc, cuMemFree) runs as it is.
# Kernel launches (OP_LAUNCH) touch memory too; the executor adds that opcode.
TOUCHING = frozenset(
    [f.name for f in FORWARDED if f.name.startswith(("cuMemcpy", "cuMemset"))]
    + ["cuGraphLaunch", "cuCtxSynchronize", "cuCtxSynchronize_v2", "cuStreamSynchronize", "cuStreamQuery",
       "cuStreamWaitEvent", "cuEventSynchronize", "cuEventQuery", "cuEventRecord", "cuEventRecordWithFlags"])
