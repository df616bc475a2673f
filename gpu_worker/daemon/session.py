"""One client session on the worker: the hypervisor between the wire and a backend.

The session owns what must hold whatever the backend: the handle table (ids minted by
the shim mapped to backend objects), its slot in the vGPU's ledger (the quota is the
vGPU's, shared with the other processes presenting the same token: ledger.py) and the list
of the session's own allocations (every device pointer in a copy, memset or free is checked
against it), the current context, and the hand-written paths (bulk copies, launches).
Where each allocation is (GPU, host RAM, disk) is the tier store's (tiers.py): the session
allocates and frees through it.  Memory pools and their stream-ordered allocations, charged by the
pools' reserves, are pools.py's (mixed in).
"""
from __future__ import annotations

import bisect
import logging
import struct
from time import monotonic as _monotonic

from ..api import errors as E
from ..api.errors import CudaError, Refusal
from ..client.units import format_size
from ..backends.base import Backend
from .dispatch_generated import IN_STRUCTS, OPS
from .ledger import Ledger, Slot
from .pools import SYNCHRONIZING, PoolAccounting, handle_key as _key
from .tiers import TierStore
from ..api.protocol import LAUNCH, LAUNCH_ATTR_SIZE, OP_LAUNCH, OP_PARAM_LAYOUT, OP_SET_CONTEXT, ProtocolError

log = logging.getLogger("gpulab.worker")

PRIMARY_CTX_BASE = 0x100  # primary context ids are fixed per device: retaining twice gives the same handle
DEFAULT_STREAMS = (0, 1, 2)  # NULL, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
U64 = struct.Struct("<Q")


def _hidden_attributes() -> frozenset:
    from cuda.bindings import driver

    names = ["MEMORY_POOLS_SUPPORTED", "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED", "MANAGED_MEMORY",
             "CONCURRENT_MANAGED_ACCESS", "CAN_MAP_HOST_MEMORY", "HOST_REGISTER_SUPPORTED",
             "PAGEABLE_MEMORY_ACCESS", "CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM"]
    return frozenset(int(getattr(driver.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_" + n)) for n in names)


HIDDEN_ATTRIBUTES = _hidden_attributes()
LAYOUT_ENTRY = struct.Struct("<QQ")
MODULE_KINDS = ("module", "library")  # each holds a loaded image: counted against max_modules too
ENDING = ("cuCtxDestroy", "cuModuleUnload", "cuLibraryUnload", "cuStreamDestroy", "cuEventDestroy",
          "cuGraphDestroy", "cuGraphExecDestroy", "cuMemPoolDestroy")


def _handle_ops() -> tuple[dict, frozenset, frozenset, frozenset]:
    """Opcodes that mint a handle (-> its kind), opcodes that end the handle they name first,
    minting opcodes whose new handle belongs to the one they name second (a module's function),
    and those that load an image, read from the API table, which owns these facts."""
    from ..api import table as T
    from ..api.codegen import wire_in

    mints, ends, derived, images = {}, set(), set(), set()
    for f in T.FORWARDED:
        fixed, _var = wire_in(f)
        mint = next((p for p in fixed if p.rule == "mint"), None)  # not always first: cuStreamEndCapture
        if mint is not None:
            mints[T.opcode(f)] = mint.type[2:]
        if fixed and fixed[0].rule == "mint":
            if len(fixed) > 1 and fixed[1].rule == "in" and fixed[1].type[2:] in ("module", "library", "kernel"):
                derived.add(T.opcode(f))
            if any(p.rule == "image" for p in f.params):
                images.add(T.opcode(f))
        if f.name in ENDING:
            ends.add(T.opcode(f))
    return mints, frozenset(ends), frozenset(derived), frozenset(images)


MINTS, ENDS, DERIVED, IMAGES = _handle_ops()
# what the driver answers for a handle it does not know, where that is not CUDA_ERROR_INVALID_HANDLE
UNKNOWN_HANDLE = {"ctx": E.INVALID_CONTEXT, "mempool": E.INVALID_VALUE}
PAIR = struct.Struct("<QQ")  # the minted id, then the handle it comes from


class Session(PoolAccounting):
    def __init__(self, backend: Backend, quota: int | None = None, label: str = "",
                 slot: Slot | None = None, max_handles: int = 0, max_modules: int = 0,
                 max_module_bytes: int = 0, device_quota: int | None = None, pacer=None, tiers=None):
        self.backend = backend
        # tiers.TierStore: this process's allocations on the GPU, in host RAM or on disk (a session of its
        # own gets a store without a board, a daemon or a cold tier)
        self.tiers = tiers if tiers is not None else TierStore(backend, slot)
        self.pacer = pacer  # pacing.Pacer: launches wait here while the vGPU is over its compute share
        if slot is None:  # a session of its own (tests, tools): a private one-process ledger
            ledger = Ledger(1, quota)
            slot = Slot(ledger, ledger.claim())
        self.slot = slot
        # what one device of the vGPU reports as its memory (the ledger's quota covers all its devices)
        self.device_quota = device_quota if device_quota is not None else slot.ledger.quota
        self.launches = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.call_bytes = 0  # bytes the current call moved or allocated, for the call trace
        self.ended = ""      # why the vGPU was revoked, once it has been
        # a client mints ids for free, each costs the worker memory: a cap per session (0: none)
        self.max_handles = max_handles
        self.max_modules = max_modules
        self.modules = 0
        self.max_module_bytes = max_module_bytes
        self.module_bytes = 0
        self.image_sizes: dict[int, int] = {}  # module/library id -> bytes of the image it was loaded from
        self.derived: dict[int, list[int]] = {}  # module/library/kernel id -> ids taken from it
        self.module_globals: dict[int, list[int]] = {}  # module id -> bases of its globals' spans
        self.label = label
        self.handles: dict[int, tuple[str, object]] = {}
        self.starts: list[int] = []          # sorted allocation bases
        self.sizes: dict[int, int] = {}      # base -> size (owned allocations count to the quota)
        self.owned: set[int] = set()
        self.charged: dict[int, int] = {}    # base -> bytes its allocation charges the quota
        self.current_ctx = 0
        self._pools_init()  # memory pools and their allocations (pools.py)

    @property
    def used(self) -> int:
        """Bytes this process's allocations charge to the vGPU."""
        return self.slot.used

    @property
    def quota(self) -> int | None:
        return self.slot.ledger.quota

    # ------------------------------------------------------------------ dispatch
    def impl(self, name: str):
        """The session's override of a driver function if it has one, else the backend's."""
        own = getattr(self, name, None)
        return own if own is not None else getattr(self.backend, name)

    def handlers(self) -> dict:
        """opcode -> (name, mode, handler(payload) -> reply payload)."""
        table = {}
        for op, (name, mode, factory) in OPS.items():
            if factory is not None:
                table[op] = (name, mode, factory(self))
            else:
                table[op] = (name, mode, getattr(self, "special_" + name))
        for op, kind in MINTS.items():
            name, mode, handler = table[op]
            table[op] = (name, mode, self._room_first(kind, handler, op in DERIVED, op in IMAGES))
        for op in ENDS:
            name, mode, handler = table[op]
            table[op] = (name, mode, self._then_forget(handler))
        for op, (name, mode, handler) in list(table.items()):
            if name in SYNCHRONIZING:
                table[op] = (name, mode, self._then_settle_pools(handler))
        table[OP_SET_CONTEXT] = ("set_context", "async", self.set_context)
        table[OP_LAUNCH] = ("launch", "async", self.launch)
        table[OP_PARAM_LAYOUT] = ("param_layout", "sync", self.param_layout)
        return table

    # ------------------------------------------------------------------- handles
    def resolve(self, kind: str, hid: int):
        if kind == "stream" and hid in DEFAULT_STREAMS:
            return None
        if kind == "ctx" and hid == 0:
            return None
        entry = self.handles.get(hid)
        if entry is None:
            raise CudaError(UNKNOWN_HANDLE.get(kind, E.INVALID_HANDLE), f"unknown {kind} handle {hid:#x}")
        got, obj = entry
        if got == kind:
            return obj
        if kind == "function" and got == "kernel":
            return self.backend.kernel_function(obj)
        raise CudaError(UNKNOWN_HANDLE.get(kind, E.INVALID_HANDLE), f"handle {hid:#x} is a {got}, not a {kind}")

    def bind(self, kind: str, hid: int, obj) -> None:
        if hid in self.handles or hid < 0x1000:
            raise CudaError(E.INVALID_HANDLE, f"handle id {hid:#x} reused")
        self.handles[hid] = (kind, obj)
        if kind in MODULE_KINDS:
            self.modules += 1

    def check_room(self, kind: str) -> None:
        """Refuse a new handle past the session's caps, before the backend creates anything."""
        if self.max_handles and len(self.handles) >= self.max_handles:
            raise Refusal(E.OUT_OF_MEMORY, f"this vGPU already holds {len(self.handles)} handles (contexts, "
                                           "streams, events, modules, functions), the most one session may have "
                                           "on this worker: destroy the ones the program no longer uses")
        if kind in MODULE_KINDS and self.max_modules and self.modules >= self.max_modules:
            raise Refusal(E.OUT_OF_MEMORY, f"this vGPU already holds {self.modules} loaded modules and "
                                           "libraries, the most one session may have on this worker: unload the "
                                           "ones the program no longer uses")

    def _room_first(self, kind: str, handler, derived: bool, image: bool):
        def run(p):
            self.check_room(kind)
            if image and self.max_module_bytes and self.module_bytes + len(p) > self.max_module_bytes:
                raise Refusal(E.OUT_OF_MEMORY, f"this vGPU's loaded modules already take "
                                               f"{format_size(self.module_bytes)}; another "
                                               f"{format_size(len(p))} would pass the "
                                               f"{format_size(self.max_module_bytes)} one session may load on "
                                               "this worker: unload the modules the program no longer uses")
            out = handler(p)
            if derived:  # forgotten with its source, or unloading could never make room
                hid, source = PAIR.unpack_from(p)
                self.derived.setdefault(source, []).append(hid)
            if image:
                (hid,) = U64.unpack_from(p)
                self.image_sizes[hid] = len(p)
                self.module_bytes += len(p)
            return out
        return run

    def _then_forget(self, handler):
        """A destroyed handle's id no longer counts (nor resolves)."""
        def run(p):
            out = handler(p)
            (hid,) = U64.unpack_from(p)  # the handler checked the payload's size
            self.forget(hid)
            return out
        return run

    def forget(self, hid: int) -> None:
        """Drop a handle and what was taken from it (an unloaded module's functions)."""
        entry = self.handles.pop(hid, None)
        if entry is not None and entry[0] in MODULE_KINDS:
            self.modules -= 1
        self.module_bytes -= self.image_sizes.pop(hid, 0)
        for child in self.derived.pop(hid, ()):
            self.forget(child)
        for base in self.module_globals.pop(hid, ()):  # the driver freed them with the module
            self._drop_span(base)

    def id_of(self, kind: str, obj) -> int:
        """The id the client knows for a backend object (driver handles compare by value)."""
        key = _key(obj)
        for hid, (k, o) in self.handles.items():
            if k == kind and _key(o) == key:
                return hid
        raise CudaError(E.INVALID_HANDLE, f"no {kind} handle for {obj!r}")

    def set_context(self, p) -> bytes:
        (hid,) = _unpack_exact(U64, p, "set_context")
        self.current_ctx = hid
        self.backend.set_current(self.resolve("ctx", hid))
        return b""

    # -------------------------------------------------------- memory: the quota
    def _add_span(self, base: int, size: int, owned: bool) -> None:
        bisect.insort(self.starts, base)
        self.sizes[base] = size
        if owned:
            self.owned.add(base)

    def _drop_span(self, base: int) -> None:
        self.sizes.pop(base)
        self.starts.remove(base)
        self.owned.discard(base)

    def _span_of(self, ptr: int) -> int | None:
        """The base of the span (allocation or module global) that holds ``ptr``, or None."""
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i >= 0 and ptr < self.starts[i] + self.sizes[self.starts[i]]:
            return self.starts[i]
        return None

    def check_span(self, ptr: int, n: int) -> None:
        """Refuse any device range not inside one of this session's allocations."""
        if n == 0:
            return
        base = self._span_of(ptr)
        if base is None:
            raise Refusal(E.INVALID_VALUE, f"device address {ptr:#x} is not in this vGPU's allocations")
        end = base + self.sizes[base]
        if ptr + n > end:  # an overrun, the usual off-by-some: say by how much
            raise Refusal(E.INVALID_VALUE, f"{format_size(n)} at {ptr:#x} run {ptr + n - end} bytes past the end "
                                           f"of its {format_size(self.sizes[base])} allocation at {base:#x}")

    def cuMemAlloc(self, bytesize: int):
        if bytesize == 0:
            raise CudaError(E.INVALID_VALUE, "cuMemAlloc of 0 bytes")
        charged = self.backend.physical_size(bytesize)  # what the GPU spends on it is what the quota counts
        call = f"cuMemAlloc({format_size(bytesize)})"
        self.call_bytes = bytesize
        free = self.slot.charge(charged)
        if free is not None:
            raise self._over_quota(free, call)
        try:
            # room on the GPU, other vGPUs moved off it if it is full, then the memory
            ptr = self.tiers.allocate(bytesize, charged)
        except BaseException as exc:
            self.slot.uncharge(charged)
            raise self._device_full(exc, call) from None
        self._add_span(ptr, bytesize, owned=True)
        self.charged[ptr] = charged
        return (ptr,)

    def _over_quota(self, free: int, call: str) -> Refusal:
        """An allocation (``call``) that would pass the vGPU's quota, ``free`` bytes being left."""
        others = self.slot.vgpu_charged() - self.used - self.slot.overhead
        also = f" ({format_size(others)} of it held by its other processes)" if others > 0 else ""
        return Refusal(E.OUT_OF_MEMORY, f"this vGPU's quota is {format_size(self.quota)}{also}, "
                                        f"{format_size(free)} free", call=call)

    def _device_full(self, exc: BaseException, call: str) -> BaseException:
        """What to raise for ``exc``, raised while getting device memory for ``call`` within the quota: an
        OUT_OF_MEMORY means the shared GPU is full (oversubscribed), said so; anything else as it is."""
        if not isinstance(exc, CudaError) or exc.code != E.OUT_OF_MEMORY:
            return exc
        if isinstance(exc, Refusal):  # the tier store says which GPU, its figures and why, once
            return Refusal(E.OUT_OF_MEMORY, f"{exc.why}; try again later", call=call)
        quota = self.quota
        free = f", {format_size(quota - self.slot.vgpu_charged())} of this vGPU's quota free" if quota else ""
        return Refusal(E.OUT_OF_MEMORY, f"the GPU this vGPU runs on is out of memory (other vGPUs share "
                                        f"it){free}; try again later", call=call)

    def cuMemFree(self, dptr: int) -> None:
        if dptr in self.pooled:  # a stream-ordered allocation, freed at once as the driver allows
            self._pool_free(dptr, None)
        else:
            self._free_owned(dptr, "cuMemFree")

    def _free_owned(self, dptr: int, name: str) -> None:
        if dptr not in self.owned:
            base = self._span_of(dptr)
            if base in self.owned or base in self.pooled:
                raise Refusal(E.INVALID_VALUE, f"{dptr:#x} is inside the allocation at {base:#x}, not "
                                               "its start", call=f"{name}({dptr:#x})")
            raise Refusal(E.INVALID_VALUE, "the address is not in this vGPU's allocations",
                          call=f"{name}({dptr:#x})")
        self.backend.mem_free(dptr)
        self.tiers.free(dptr)  # an offloaded allocation's host copy or file goes, without a restore
        self._drop_span(dptr)
        self.slot.uncharge(self.charged.pop(dptr))

    def cuMemGetInfo(self):
        """Truthful: never more free memory than the vGPU's quota leaves (over all its processes)
        nor more than its GPU has."""
        free, total = self.backend.cuMemGetInfo()
        quota = self.quota
        if quota is None:
            return (free, total)
        total = min(self.device_quota, total)
        return (max(min(quota - self.slot.vgpu_charged(), free, total), 0), total)

    def cuDeviceTotalMem(self, dev: int):
        (total,) = self.backend.cuDeviceTotalMem(dev)
        return (total,) if self.device_quota is None else (min(self.device_quota, total),)

    def cuMemGetAddressRange(self, dptr: int):
        base = self._span_of(dptr)
        if base is not None:
            return (base, self.sizes[base])
        raise CudaError(E.NOT_FOUND, f"{dptr:#x} is not in an allocation of this session")

    def cuModuleGetGlobal(self, hmod, name: str):
        ptr, size = self.backend.cuModuleGetGlobal(hmod, name)
        if ptr not in self.sizes:
            self._add_span(ptr, size, owned=False)
            # copies to it are allowed only while its module is loaded
            self.module_globals.setdefault(self.id_of("module", hmod), []).append(ptr)
        return ptr, size

    def cuDeviceGetAttribute(self, attrib: int, dev: int):
        """A vGPU offers no memory the hypervisor cannot see: no VMM, managed or mapped host memory.  Memory
        pools are served (pools.py) to programs that call them, but reported unsupported so that libraries that
        choose (cuda.core) allocate with cuMemAlloc, whose memory the VRAM tiers can move."""
        if attrib in HIDDEN_ATTRIBUTES:
            self.backend.cuDeviceGetAttribute(attrib, dev)  # still validates the device
            return (0,)
        return self.backend.cuDeviceGetAttribute(attrib, dev)

    # ------------------------------------------------------------------ contexts
    def cuDevicePrimaryCtxRetain(self, dev: int):
        (obj,) = self.backend.cuDevicePrimaryCtxRetain(dev)
        hid = PRIMARY_CTX_BASE + dev
        self.handles[hid] = ("ctx", obj)
        return (hid,)

    def cuStreamGetCtx(self, stream):
        return (self.id_of("ctx", self.backend.stream_context(stream)),)

    def cuFuncGetModule(self, func):
        return (self.id_of("module", self.backend.function_module(func)),)

    # ----------------------------------------------------- hand-written data paths
    def special_cuMemcpyHtoD(self, p, reader):
        return self._htod(p, reader, "cuMemcpyHtoD", synchronous=True)

    def special_cuMemcpyHtoDAsync(self, p, reader):
        return self._htod(p, reader, "cuMemcpyHtoDAsync", synchronous=False)

    def _htod(self, p, reader, name, synchronous):
        """Bulk data goes from the socket straight into the destination buffer."""
        fields = IN_STRUCTS[name].unpack_from(p)
        dst, count = fields[0], fields[1]
        stream = self.resolve("stream", fields[2]) if len(fields) > 2 else None
        (n,) = U64.unpack_from(p, IN_STRUCTS[name].size)
        if n != count:
            raise ProtocolError(f"{name}: {n} bulk bytes for a copy of {count}")
        self.check_span(dst, count)
        self.bytes_in += count
        self.call_bytes = count
        view, commit = self.backend.write_target(dst, count, stream)
        reader.read_into(view)
        commit(synchronous)
        return b""

    def special_cuMemcpyDtoH(self, p):
        src, count = _dtoh(p, "cuMemcpyDtoH")
        self.check_span(src, count)
        self.bytes_out += count
        self.call_bytes = count
        return self.backend.read_source(src, count, None)

    def special_cuMemcpyDtoHAsync(self, p):
        src, count, sid = _dtoh(p, "cuMemcpyDtoHAsync")
        stream = self.resolve("stream", sid)
        self.check_span(src, count)
        self.bytes_out += count
        self.call_bytes = count
        return self.backend.read_source(src, count, stream)

    def launch(self, p) -> bytes:
        if len(p) < LAUNCH.size + 8:
            raise ProtocolError("launch: short frame")
        fid, gx, gy, gz, bx, by, bz, shmem, sid, nattrs = LAUNCH.unpack_from(p)
        off = LAUNCH.size + nattrs * LAUNCH_ATTR_SIZE
        if len(p) < off + 8:
            raise ProtocolError("launch: attributes overrun the frame")
        attrs = bytes(p[LAUNCH.size:off])
        (plen,) = U64.unpack_from(p, off)
        if plen != len(p) - off - 8:
            raise ProtocolError("launch: parameter buffer does not fit the frame")
        func = self.resolve("function", fid)
        stream = self.resolve("stream", sid)
        self.launches += 1
        pacer = self.pacer
        if pacer is not None and _monotonic() >= pacer.next_check:  # the common case costs a clock read
            pacer.admit()
        self.backend.launch(func, (gx, gy, gz), (bx, by, bz), shmem, stream, p[off + 8:], attrs, nattrs)
        return b""

    # --------------------------------------------------------------- graphs
    def cuGraphLaunch(self, graph_exec, stream) -> None:
        self.graph_launch(graph_exec, stream)

    def graph_launch(self, graph_exec, stream) -> None:
        """Every graph launch passes here, and only here: one launch whose kernel time is the graph's
        whole (a graph's kernels are not seen one by one).  Kernel launches into a stream being captured
        reach launch() above but do not run: the backend records them into the graph."""
        self.launches += 1
        pacer = self.pacer
        if pacer is not None and _monotonic() >= pacer.next_check:  # paced like a kernel, its time as a whole
            pacer.admit()
        self.backend.graph_launch(graph_exec, stream)

    def param_layout(self, p) -> bytes:
        (fid,) = _unpack_exact(U64, p, "param_layout")
        layout = self.backend.param_layout(self.resolve("function", fid))
        return struct.pack("<I", len(layout)) + b"".join(LAYOUT_ENTRY.pack(o, s) for o, s in layout)

    def free_all(self) -> None:
        """Free every allocation the session still holds (in whichever tier) and give the device back."""
        freed = sum(self.sizes[b] for b in self.owned) + sum(self.sizes[b] for b in self.pooled)
        count = len(self.owned) + len(self.pooled)
        self._free_pooled_all()
        for base in list(self.owned):
            try:
                self.backend.mem_free(base)
            except CudaError:
                pass
            self._drop_span(base)
        self.charged.clear()
        self.tiers.close()  # host copies, cold files and the spool directory go too
        self.slot.uncharge(self.slot.used)
        if count:
            log.info("%s: freed %d bytes in %d allocations", self.label, freed, count)
        self.backend.close()

    def end(self, reason: str) -> None:
        """The vGPU was revoked: its memory goes now, every later call is refused with ``reason``."""
        if not self.ended:
            self.ended = reason
            self.free_all()

    def close(self) -> None:
        """The client went away."""
        if not self.ended:
            self.free_all()



def _dtoh(p, name):
    st = IN_STRUCTS[name]
    if len(p) != st.size:
        raise ProtocolError(f"{name}: payload of {len(p)} bytes, expected {st.size}")
    return st.unpack_from(p)


def _unpack_exact(st, p, what):
    if len(p) != st.size:
        raise ProtocolError(f"{what}: payload of {len(p)} bytes, expected {st.size}")
    return st.unpack_from(p)
