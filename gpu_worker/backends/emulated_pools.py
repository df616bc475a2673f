"""Memory pools and stream-ordered allocation on the emulated backend (a test double).

A pool keeps device memory **reserved** for its allocations, as the driver's pools do, and the reserve
is what the device (and, through the session, the vGPU's quota) is charged.  The rule is exact and
simple, one figure per pool:

- an allocation of ``n`` bytes takes ``physical_size(n)`` bytes of the pool; when the pool's free
  reserve (reserved - used) is smaller, the reserve grows by the difference (refused with
  CUDA_ERROR_OUT_OF_MEMORY past the pool's ``maxSize`` or the device's memory);
- a free (cuMemFreeAsync, or cuMemFree) gives the bytes back to the pool, not to the device: the reserve
  stays, for the pool's next allocations;
- at a synchronizing point (context, stream or event synchronize) every pool gives back what it holds
  above ``max(used, release threshold)`` (CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, 0 by default, so a pool
  keeps nothing unused past a synchronize unless told to);
- cuMemPoolTrimTo(keep) gives back what it holds above ``max(used, keep)`` at once;
- cuMemPoolDestroy gives back the free reserve at once; the allocations still out keep their bytes
  until each is freed, as on a GPU (a default pool cannot be destroyed).

Every call completes before it returns (nothing is queued on the emulated device), so the stream
arguments order nothing; an allocation on a stream being captured into a graph is refused (graph memory
nodes are not emulated).  EmulatedBackend mixes this class in; its synchronizing calls call
_release_pools, and its _place/_unplace put the bytes at a device address.
"""
from __future__ import annotations

from ..api import errors as E
from ..api.errors import CudaError, Refusal
from ..client.units import format_size
from ..api.protocol import MEMPOOL_PROPS, pool_attribute_bytes, pool_attribute_value

# CUmemPool_attribute values (their value types: gpu_worker.api.table.MEMPOOL_ATTR_SIZES)
REUSE_ATTRS = (1, 2, 3)  # REUSE_FOLLOW_EVENT_DEPENDENCIES, REUSE_ALLOW_OPPORTUNISTIC, REUSE_ALLOW_INTERNAL_DEPENDENCIES
RELEASE_THRESHOLD, RESERVED_MEM_CURRENT, RESERVED_MEM_HIGH, USED_MEM_CURRENT, USED_MEM_HIGH = 4, 5, 6, 7, 8
ALLOCATION_TYPE, EXPORT_HANDLE_TYPES, LOCATION_ID, LOCATION_TYPE, MAX_POOL_SIZE = 9, 10, 11, 12, 13
HW_DECOMPRESS_ENABLED, LOCALITY_DOMAIN_ID = 14, 15
ALLOCATION_PINNED, LOCATION_DEVICE = 1, 1  # CUmemAllocationType, CUmemLocationType


class _Pool:
    """One pool: its device, its settings and its two figures (bytes reserved, bytes in allocations)."""

    def __init__(self, device: int, default: bool, max_size: int = 0):
        self.device = device
        self.default = default
        self.max_size = max_size
        self.reserved = self.used = 0
        self.reserved_high = self.used_high = 0
        self.threshold = 0
        self.reuse = {a: 1 for a in REUSE_ATTRS}  # enabled by default, as on a GPU
        self.destroyed = False


class MemoryPools:
    """Memory pools for EmulatedBackend (see the module's docstring for the reserve rule)."""

    def _pools_init(self) -> None:
        self.default_pools: dict[int, _Pool] = {}
        self.current_pools: dict[int, _Pool] = {}
        self.pools: list[_Pool] = []  # live pools, and destroyed ones with allocations still out
        self.pooled: dict[int, tuple[_Pool, int]] = {}  # allocation -> its pool, the bytes it takes of it

    def cuDeviceGetDefaultMemPool(self, dev):
        self._dev(dev)
        pool = self.default_pools.get(dev)
        if pool is None:
            pool = self.default_pools[dev] = _Pool(dev, default=True)
            self.pools.append(pool)
        return (pool,)

    def cuDeviceGetMemPool(self, dev):
        return (self.current_pools.get(dev) or self.cuDeviceGetDefaultMemPool(dev)[0],)

    def cuDeviceSetMemPool(self, dev, pool):
        self._dev(dev)
        if pool.device != dev:
            raise CudaError(E.INVALID_VALUE, f"the pool is on device {pool.device}, not {dev}")
        self.current_pools[dev] = pool

    def cuMemPoolCreate(self, props):
        alloc_type, handle_types, loc_type, loc_id, _win32, max_size, usage, _rdma = \
            MEMPOOL_PROPS.unpack(props)
        if alloc_type != ALLOCATION_PINNED or loc_type != LOCATION_DEVICE or not 0 <= loc_id < len(self.devices):
            raise CudaError(E.INVALID_VALUE, f"pool properties: allocation type {alloc_type}, location type "
                                             f"{loc_type}, id {loc_id}")
        if handle_types or usage:
            raise CudaError(E.NOT_SUPPORTED, "exportable or decompression pools are not emulated")
        pool = _Pool(loc_id, default=False, max_size=max_size)
        self.pools.append(pool)
        return (pool,)

    def cuMemPoolDestroy(self, pool):
        if pool.default:
            raise CudaError(E.INVALID_VALUE, "a device's default pool cannot be destroyed")
        pool.destroyed = True
        self._shrink(pool, pool.used)
        for dev, current in list(self.current_pools.items()):
            if current is pool:  # the device's current pool is its default one again
                del self.current_pools[dev]
        self._forget_if_done(pool)

    def cuMemPoolTrimTo(self, pool, keep):
        self._shrink(pool, max(pool.used, min(pool.reserved, keep)))

    def cuMemPoolGetAttribute(self, pool, attr):
        values = {RELEASE_THRESHOLD: pool.threshold, RESERVED_MEM_CURRENT: pool.reserved,
                  RESERVED_MEM_HIGH: pool.reserved_high, USED_MEM_CURRENT: pool.used, USED_MEM_HIGH: pool.used_high,
                  ALLOCATION_TYPE: ALLOCATION_PINNED, EXPORT_HANDLE_TYPES: 0, LOCATION_ID: pool.device,
                  LOCATION_TYPE: LOCATION_DEVICE, MAX_POOL_SIZE: pool.max_size, HW_DECOMPRESS_ENABLED: 0,
                  LOCALITY_DOMAIN_ID: -1, **pool.reuse}
        if attr not in values:
            raise CudaError(E.INVALID_VALUE, f"unknown memory pool attribute {attr}")
        return (pool_attribute_bytes(attr, values[attr]),)

    def cuMemPoolSetAttribute(self, pool, attr, data):
        value = pool_attribute_value(attr, data)
        if attr in REUSE_ATTRS:
            pool.reuse[attr] = value
        elif attr == RELEASE_THRESHOLD:
            pool.threshold = value  # acted on at the next synchronizing point, as the driver does
        elif attr in (RESERVED_MEM_HIGH, USED_MEM_HIGH) and value == 0:  # a reset to the current figure
            if attr == RESERVED_MEM_HIGH:
                pool.reserved_high = pool.reserved
            else:
                pool.used_high = pool.used
        else:
            raise CudaError(E.INVALID_VALUE, f"memory pool attribute {attr} cannot be set to {value}")

    # ------------------------------------------------------- hooks of the session
    def pool_alloc(self, pool, n: int, stream) -> int:
        self._ctx()
        if n == 0:
            raise CudaError(E.INVALID_VALUE, "a stream-ordered allocation of 0 bytes")
        if pool.destroyed:
            raise CudaError(E.INVALID_VALUE, "the pool was destroyed")
        self._refuse_in_capture(stream, "a stream-ordered allocation cannot be captured on the emulated device "
                                        "(a test double: graph memory nodes are not emulated)")
        take = self.physical_size(n)
        grow = max(0, take - (pool.reserved - pool.used))
        if grow:
            if pool.max_size and pool.reserved + grow > pool.max_size:
                raise Refusal(E.OUT_OF_MEMORY, f"the pool's maxSize is {format_size(pool.max_size)}, "
                                               f"{format_size(pool.reserved)} of it reserved, "
                                               f"{format_size(grow)} more wanted")
            device = self.devices[pool.device]
            if device.used + grow > device.memory:
                raise CudaError(E.OUT_OF_MEMORY, "emulated device memory exhausted")
            device.used += grow
            pool.reserved += grow
            pool.reserved_high = max(pool.reserved_high, pool.reserved)
        pool.used += take
        pool.used_high = max(pool.used_high, pool.used)
        ptr = self._place(n, pool.device)
        self.pooled[ptr] = (pool, take)
        return ptr

    def pool_free(self, ptr: int, stream) -> None:
        entry = self.pooled.pop(ptr, None)
        if entry is None:
            raise CudaError(E.INVALID_VALUE, f"{ptr:#x} is not a stream-ordered allocation")
        pool, take = entry
        self._unplace(ptr)
        pool.used -= take
        if pool.destroyed:  # nothing is kept for a pool that is gone
            self._shrink(pool, pool.used)
            self._forget_if_done(pool)

    def pool_reserved(self, pool) -> int:
        return pool.reserved

    def _release_pools(self) -> None:
        """A synchronizing point: each pool gives back what it holds above its release threshold."""
        for pool in self.pools:
            self._shrink(pool, max(pool.used, pool.threshold))

    def _shrink(self, pool: _Pool, keep: int) -> None:
        if pool.reserved > keep:
            self.devices[pool.device].used -= pool.reserved - keep
            pool.reserved = keep

    def _forget_if_done(self, pool: _Pool) -> None:
        if pool.destroyed and pool.used == 0 and pool in self.pools:
            self.pools.remove(pool)
