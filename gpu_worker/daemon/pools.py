"""Memory pools and stream-ordered allocation on a vGPU: the quota is charged what the pools hold reserved.

A pool keeps device memory reserved for its allocations after they are freed, as the driver's pools do,
so what a pool costs the GPU is its reserve, not the sum of its live allocations.  The vGPU's quota
(ledger.py, ``Slot.charge``, under the vGPU's lock, like cuMemAlloc) and the GPU's capacity on the tier
board (tiers.py, ``TierStore.hold``) are charged exactly that:

- an allocation of ``n`` bytes takes ``physical_size(n)`` of its pool (what cuMemAlloc of ``n`` is
  charged); the pool's reserve grows by what its free reserve lacks, and that growth is charged *before*
  the backend allocates: past the quota the call is refused with CUDA_ERROR_OUT_OF_MEMORY and the same
  reason as cuMemAlloc's.  A driver that reserves more than that (a GPU's pools grow by their own chunks)
  has the rest charged after, and an allocation whose rest does not fit is freed and refused;
- a free gives the bytes back to the pool, which keeps them: the charge stays;
- the pools give memory back, and the charge drops to what the backend (the driver) then reports as
  reserved, at trim (cuMemPoolTrimTo), destroy (the reserve down to the allocations still out, each
  released as it is freed), and after a synchronizing call (context, stream, event synchronize), where
  the driver releases what a pool holds above its release threshold (CU_MEMPOOL_ATTR_RELEASE_THRESHOLD).

Pools are client-minted ids like streams; a device's default pool has the fixed id DEFAULT_POOL_BASE +
device, so that asking twice gives the same handle.  An unknown pool id is CUDA_ERROR_INVALID_VALUE, the
code the driver documents for its pool functions.  Pool memory stays on the GPU: the VRAM tiers move only
cuMemAlloc allocations (which is why the device attribute MEMORY_POOLS_SUPPORTED still reads 0: a library
that chooses, such as cuda.core, keeps allocating memory the hypervisor can move).

Session mixes this class in; the generated dispatch finds the driver functions here by name.
"""
from __future__ import annotations

from ..api import errors as E
from ..api.errors import CudaError, Refusal
from ..api.protocol import MEMPOOL_PROPS
from ..client.units import format_size

DEFAULT_POOL_BASE = 0x200  # the default pool of device d is 0x200 + d (primary contexts: 0x100 + d)
SYNCHRONIZING = ("cuCtxSynchronize", "cuCtxSynchronize_v2", "cuStreamSynchronize", "cuEventSynchronize")
ALLOCATION_PINNED, LOCATION_DEVICE = 1, 1  # CUmemAllocationType, CUmemLocationType


class _Book:
    """What the vGPU knows of one pool: the bytes charged for its reserve and those in live allocations."""

    __slots__ = ("pool", "ordinal", "charged", "in_use", "destroyed")

    def __init__(self, pool, ordinal: int):
        self.pool = pool
        self.ordinal = ordinal
        self.charged = 0
        self.in_use = 0
        self.destroyed = False


class PoolAccounting:
    """The pool functions of Session (see the module's docstring)."""

    def _pools_init(self) -> None:
        self.books: dict[tuple, _Book] = {}  # pool's key -> its book
        self.pooled: dict[int, tuple[_Book, int]] = {}  # allocation -> its pool's book, the bytes it takes

    def _book(self, pool, ordinal: int | None = None) -> _Book:
        book = self.books.get(handle_key(pool))
        if book is None:
            if ordinal is None:
                ordinal = self.backend.current_device()
            book = self.books[handle_key(pool)] = _Book(pool, ordinal)
        return book

    # ------------------------------------------------------------------ handles
    def cuDeviceGetDefaultMemPool(self, dev: int):
        (pool,) = self.backend.cuDeviceGetDefaultMemPool(dev)
        self.handles[DEFAULT_POOL_BASE + dev] = ("mempool", pool)
        self._book(pool, dev)
        return (DEFAULT_POOL_BASE + dev,)

    def cuDeviceGetMemPool(self, dev: int):
        (pool,) = self.backend.cuDeviceGetMemPool(dev)
        self.cuDeviceGetDefaultMemPool(dev)  # known by its fixed id before it is looked for
        self._book(pool, dev)
        return (self.id_of("mempool", pool),)

    def cuMemPoolCreate(self, props):
        alloc_type, handle_types, loc_type, loc_id, *_rest = MEMPOOL_PROPS.unpack(props)
        offers = "a gpulab vGPU offers pools of device memory that stay in this process"
        if alloc_type not in (0, ALLOCATION_PINNED):
            raise Refusal(E.NOT_SUPPORTED, f"{offers}, not of allocation type {alloc_type} (managed memory)")
        if loc_type not in (0, LOCATION_DEVICE):
            raise Refusal(E.NOT_SUPPORTED, f"{offers}, not at location type {loc_type} (host memory)")
        if handle_types:
            raise Refusal(E.NOT_SUPPORTED, f"{offers}: a pool exportable to other processes (handle types "
                                           f"{handle_types:#x}) is not one")
        (pool,) = self.backend.cuMemPoolCreate(props)
        self._book(pool, loc_id)
        return (pool,)

    def cuMemPoolDestroy(self, pool) -> None:
        self.backend.cuMemPoolDestroy(pool)
        book = self._book(pool)
        book.destroyed = True
        self._release(book, book.in_use)  # its allocations still out keep their bytes until freed
        self._forget_book(book)

    def cuMemPoolTrimTo(self, pool, keep: int) -> None:
        self.backend.cuMemPoolTrimTo(pool, keep)
        self._settle(self._book(pool))

    # ------------------------------------------------------------- allocations
    def cuMemAllocAsync(self, bytesize: int, stream):
        ordinal = self.backend.current_device()  # the device's current pool, as the driver takes it
        (pool,) = self.backend.cuDeviceGetMemPool(ordinal)
        return self._pool_alloc(self._book(pool, ordinal), bytesize, stream, "cuMemAllocAsync")

    def cuMemAllocFromPoolAsync(self, bytesize: int, pool, stream):
        return self._pool_alloc(self._book(pool), bytesize, stream, "cuMemAllocFromPoolAsync")

    def _pool_alloc(self, book: _Book, n: int, stream, name: str):
        if n == 0:
            raise CudaError(E.INVALID_VALUE, f"{name} of 0 bytes")
        take = self.backend.physical_size(n)
        call = f"{name}({format_size(n)})"
        self.call_bytes = n
        grow = max(0, take - (book.charged - book.in_use))  # what the pool's free reserve lacks
        self._charge_pool(book, grow, call)
        try:
            ptr = self.backend.pool_alloc(book.pool, n, stream)
        except BaseException as exc:
            self._release(book, book.charged - grow)
            if isinstance(exc, Refusal):  # the backend's own reason (the pool's maxSize, a capture)
                raise
            raise self._device_full(exc, call) from None
        self.pooled[ptr] = (book, take)
        self._add_span(ptr, n, owned=False)
        book.in_use += take
        rest = self.backend.pool_reserved(book.pool) - book.charged  # a driver may reserve by bigger chunks
        if rest > 0:
            try:
                self._charge_pool(book, rest, call)
            except Refusal:
                self._pool_free(ptr, stream)
                self.backend.cuMemPoolTrimTo(book.pool, book.charged)
                self._settle(book)
                raise
        return (ptr,)

    def cuMemFreeAsync(self, dptr: int, stream) -> None:
        if dptr in self.pooled:
            self._pool_free(dptr, stream)
        else:  # memory of cuMemAlloc: freed in order, as every frame runs in order on the worker
            self._free_owned(dptr, "cuMemFreeAsync")

    def _pool_free(self, ptr: int, stream) -> None:
        book, take = self.pooled[ptr]
        self.backend.pool_free(ptr, stream)
        del self.pooled[ptr]
        self._drop_span(ptr)
        book.in_use -= take
        if book.destroyed:  # nothing is kept for a pool that is gone
            self._release(book, book.in_use)
            self._forget_book(book)

    # ------------------------------------------------------------ the charge
    def _charge_pool(self, book: _Book, n: int, call: str) -> None:
        """The pool's reserve grows by ``n``: charged to the quota and held on the GPU, or refused."""
        if n <= 0:
            return
        free = self.slot.charge(n)
        if free is not None:
            raise self._over_quota(free, call)
        try:
            self.tiers.hold(book.ordinal, n)
        except BaseException as exc:
            self.slot.uncharge(n)
            raise self._device_full(exc, call) from None
        book.charged += n

    def _release(self, book: _Book, target: int) -> None:
        """The pool holds ``target`` bytes now: what it gave back leaves the quota and the GPU's count."""
        n = book.charged - max(target, 0)
        if n > 0:
            self.slot.uncharge(n)
            self.tiers.let_go(book.ordinal, n)
            book.charged -= n

    def _settle(self, book: _Book) -> None:
        """After a call that may have let a pool give memory back: the charge follows the backend's figure
        (it only falls here: a reserve grows at an allocation, charged there)."""
        if not book.destroyed:
            self._release(book, self.backend.pool_reserved(book.pool))

    def _forget_book(self, book: _Book) -> None:
        if book.destroyed and book.in_use == 0:
            self.books.pop(handle_key(book.pool), None)

    def _then_settle_pools(self, handler):
        """A synchronizing call: the pools may have released what they hold above their thresholds."""
        def run(p):
            out = handler(p)
            if self.books:
                for book in list(self.books.values()):
                    self._settle(book)
            return out
        return run

    def _free_pooled_all(self) -> None:
        """The session ends: every stream-ordered allocation goes (the charges go with the slot's)."""
        for ptr in list(self.pooled):
            try:
                self.backend.pool_free(ptr, None)
            except CudaError:
                pass
            self._drop_span(ptr)
        self.pooled.clear()
        self.books.clear()


def handle_key(obj):
    """A backend object as a dict key: driver handles compare by value, emulated objects by identity."""
    try:
        return ("int", int(obj))
    except TypeError:
        return ("id", id(obj))
