/* gpulab native mode: every kind of device allocation, charged to the vGPU's ledger, and what memory a
 * program sees (cuMemGetInfo, cuDeviceTotalMem: the vGPU's quota, not the card).
 *
 * The rule: charge before the driver allocates, so two processes never pass the quota together; give
 * the charge back when the driver refuses; where the driver's own rounding is known only afterwards
 * (pitch, arrays, a pool's reservation, graphs' memory) the charge is trued up after the call.
 *
 *   cuMemAlloc, cuMemAllocManaged  the size asked (managed memory is counted whole: it may all be on the GPU)
 *   cuMemAllocPitch                the row width rounded up, trued up to pitch x height
 *   cuMemCreate                    the physical allocation's size, given back at cuMemRelease
 *   arrays, mipmapped arrays       an estimate from the descriptor; for deferred-mapping ones (the only arrays
 *                                  the driver tells the size of) trued up to its requirements
 *   stream-ordered (cuMemAllocAsync, cuMemAllocFromPoolAsync)
 *                                  per pool, what it holds: its live allocations, or what it has reserved
 *                                  when more (CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT); re-read at each of the
 *                                  pool's calls, at trims and before a refusal, given back at its destroy.
 *                                  On a capturing stream nothing: the allocation is a node of the graph,
 *                                  whose memory is charged when a launch reserves it (next line)
 *   graphs' memory nodes           at a launch, what the graph's allocation nodes (summed per device at
 *                                  instantiation, host-located ones left out) may add to each device's graph
 *                                  memory reserve, beyond its free part; trued up to the reserve after the launch
 *   on the host                    nothing: host memory (CU_MEM_LOCATION_TYPE_HOST*) is not the GPU's, be it
 *                                  cuMemCreate's or a pool's (cuMemPoolCreate, cuMemGetDefaultMemPool)
 *
 * Each charge is made on the vGPU's GPU that holds the memory (the current context's; cuMemCreate's location; a
 * pool's location, learned where the program gets the pool: cuMemPoolCreate's properties, the device or location
 * whose default or current pool it is, else the GPU current at its first allocation; a graph's allocation node's
 * device), so the worker counts it there (gl_charge).
 *
 * When the driver itself finds the GPU full (other vGPUs hold it: the pool may promise a GPU's memory more
 * than once), the worker is asked to move other vGPUs off it and the driver is called again (WITH_ROOM). */
#include "gl_native.h"

#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "../gl_wire.h"

enum kind { DEVICE = 1, VMM, ARRAY, MIPMAPPED, ASYNC };

/* an allocation: its size, and the vGPU's GPU it is charged on (gl_charge) */
typedef struct entry {
    unsigned long long key;
    size_t size;
    int kind, gpu;
    CUmemoryPool pool;
    struct entry *next;
} entry;
/* a pool: where it is (a device, and that device's vGPU ordinal; or host memory, never charged), and its charge */
typedef struct pool_rec {
    CUmemoryPool pool;
    size_t live, charged;
    CUdevice dev;
    int gpu, host;
    struct pool_rec *next;
} pool_rec;

#define BUCKETS 4096
static entry *table[BUCKETS];
static pool_rec *pools;
/* an instantiated graph: the bytes of its allocation nodes on each device (graph memory is reserved per device) */
#define GRAPH_DEVICES GL_VGPU_GPUS  /* native mode's devices are the vGPU's GPUs */
typedef struct graph_rec { CUgraphExec exec; size_t bytes[GRAPH_DEVICES]; struct graph_rec *next; } graph_rec;
static size_t graph_charged[GRAPH_DEVICES];  /* each device's graph memory reserve, as charged */
static graph_rec *graphs;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static size_t bucket(unsigned long long key, int kind) { return (size_t)((key >> 8) ^ key ^ (unsigned)kind) % BUCKETS; }

static void remember(unsigned long long key, int kind, size_t size, CUmemoryPool pool, int gpu)
{
    entry *e = malloc(sizeof *e);
    if (!e) return;  /* not tracked: its free will not give the bytes back, the process's end will */
    e->key = key;
    e->kind = kind;
    e->size = size;
    e->pool = pool;
    e->gpu = gpu;
    pthread_mutex_lock(&mu);
    size_t b = bucket(key, kind);
    e->next = table[b];
    table[b] = e;
    pthread_mutex_unlock(&mu);
}

/* The entry for ``key`` taken out of the table (its size in *size, its GPU in *gpu), 0 when not ours. */
static int forget(unsigned long long key, int kind, size_t *size, CUmemoryPool *pool, int *gpu)
{
    pthread_mutex_lock(&mu);
    entry **p = &table[bucket(key, kind)];
    while (*p && !((*p)->key == key && (*p)->kind == kind)) p = &(*p)->next;
    entry *e = *p;
    if (e) *p = e->next;
    pthread_mutex_unlock(&mu);
    if (!e) return 0;
    *size = e->size;
    if (pool) *pool = e->pool;
    if (gpu) *gpu = e->gpu;
    free(e);
    return 1;
}

/* A freed allocation's charge given back, on the GPU it was charged on; 0 when not ours. */
static int give_back(unsigned long long key, int kind)
{
    size_t n;
    int gpu;
    if (!forget(key, kind, &n, NULL, &gpu)) return 0;
    gl_uncharge(gpu, n);
    return 1;
}

static CUresult refuse(const char *fn, size_t n, size_t room)
{
    gl_oom_say(fn, n, room);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

typedef CUresult (*ctx_dev_t)(CUdevice *);
typedef CUresult (*dev_pool_t)(CUmemoryPool *, CUdevice);

static CUdevice current_device(void)
{
    CUdevice d = 0;
    return GL_REAL(ctx_dev_t, "cuCtxGetDevice")(&d) == CUDA_SUCCESS ? d : 0;
}

/* The vGPU's ordinal of the current context's GPU: where an allocation made now is charged. */
static int current_gpu(void) { return gl_vgpu_ordinal(current_device()); }

/* CUmemLocation, and the head of CUmemAllocationProp and of CUmemPoolProps: where the physical memory is */
typedef struct { int type, id; } mem_location;
typedef struct { int type, requested_handle_types; mem_location location; } alloc_prop_head;
enum { CU_MEM_LOCATION_TYPE_DEVICE = 1, CU_MEM_LOCATION_TYPE_HOST, CU_MEM_LOCATION_TYPE_HOST_NUMA,
       CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT };

/* host memory (HOST, HOST_NUMA, HOST_NUMA_CURRENT): not the GPU's, not the quota's */
static int host_located(const mem_location *where)
{
    int t = where->type;
    return t == CU_MEM_LOCATION_TYPE_HOST || t == CU_MEM_LOCATION_TYPE_HOST_NUMA ||
           t == CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT;
}

/* The device of a location: its own for a device location, else the current context's. */
static CUdevice located_device(const mem_location *where)
{
    return where->type == CU_MEM_LOCATION_TYPE_DEVICE ? where->id : current_device();
}

/* ------------------------------------------------------------------- pools (stream-ordered) */
typedef CUresult (*pool_attr_t)(CUmemoryPool, int, void *);

/* Pool ``p``'s record, made on first sight with the place given (mu held); NULL only when out of memory. */
static pool_rec *pool_at(CUmemoryPool p, CUdevice dev, int host)
{
    pool_rec *r = pools;
    while (r && r->pool != p) r = r->next;
    if (!r && (r = calloc(1, sizeof *r))) {
        r->pool = p;
        r->dev = dev;
        r->gpu = gl_vgpu_ordinal(dev);
        r->host = host;
        r->next = pools;
        pools = r;
    }
    return r;
}

/* A pool the program uses without our having seen where it is (one imported from another process): on the GPU
 * current at its first allocation. (mu held) */
static pool_rec *pool_of(CUmemoryPool p) { return pool_at(p, current_device(), 0); }

/* Where the program got pool ``p`` says where it is: a device, or host memory (``host``). ``made``: cuMemPoolCreate
 * made it just now, so a record of the same handle is of a pool gone without its destroy (its context's end):
 * its charge is given back and the place made anew. */
static void pool_is_at(CUmemoryPool p, CUdevice dev, int host, int made)
{
    pthread_mutex_lock(&mu);
    for (pool_rec **r = &pools; made && *r; r = &(*r)->next)
        if ((*r)->pool == p) {
            pool_rec *stale = *r;
            *r = stale->next;
            gl_uncharge(stale->gpu, stale->charged);
            free(stale);
            break;
        }
    pool_at(p, dev, host);
    pthread_mutex_unlock(&mu);
}

/* The pool's charge becomes what it holds now: its live bytes, or its reservation when larger. (mu held) */
static void true_up(pool_rec *r)
{
    unsigned long long reserved = 0;
    if (r->host) return;
    if (r->pool && GL_REAL(pool_attr_t, "cuMemPoolGetAttribute")(r->pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                                                                 &reserved) != CUDA_SUCCESS)
        reserved = 0;
    size_t target = reserved > r->live ? (size_t)reserved : r->live;
    if (target > r->charged) gl_force_charge(r->gpu, target - r->charged);
    else if (target < r->charged) gl_uncharge(r->gpu, r->charged - target);
    r->charged = target;
}

static void true_up_all(void)
{
    pthread_mutex_lock(&mu);
    for (pool_rec *r = pools; r; r = r->next) true_up(r);
    pthread_mutex_unlock(&mu);
}

/* Charge what an allocation of ``n`` from pool ``p`` may add beyond what the pool holds already; the pool's device in
 * *dev, and in *host whether it is in host memory (nothing charged). */
static int charge_pool(CUmemoryPool p, size_t n, size_t *room, CUdevice *dev, int *host)
{
    pthread_mutex_lock(&mu);
    pool_rec *r = pool_of(p);
    *dev = r ? r->dev : current_device();
    *host = r && r->host;
    size_t need = r && !r->host && r->live + n > r->charged ? r->live + n - r->charged : 0;
    int ok = !r ? gl_charge(current_gpu(), n, room) : !need || gl_charge(r->gpu, need, room);
    if (ok && r) {
        r->charged += need;
        r->live += n;
    }
    pthread_mutex_unlock(&mu);
    return ok;
}

static void settle_pool(CUmemoryPool p, size_t gone)
{
    pthread_mutex_lock(&mu);
    pool_rec *r = pool_of(p);
    if (r) {
        r->live = r->live > gone ? r->live - gone : 0;
        true_up(r);
    }
    pthread_mutex_unlock(&mu);
}


#define ROOM_ROUNDS 3  /* tiers.py's EVICTION_ROUNDS: asks for room before an allocation fails */

static double monotonic_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

/* The real driver found GPU ``dev`` full for ``n`` bytes: ask the worker to move other vGPUs off it, as an
 * executor does. 1: room was made, call the driver again; 0: no more (said why). The asks of one call share
 * one deadline, eviction_wait from the first (``*deadline``, 0 before it). */
static int room_made(const char *fn, CUdevice dev, size_t n, int round, double *deadline)
{
    char why[GL_MAX_REASON + 64] = "";
    int ordinal = gl_vgpu_ordinal(dev);
    double now = monotonic_now(), wait = gl_eviction_wait();
    if (!*deadline) *deadline = now + wait;
    if (wait <= 0)
        snprintf(why, sizeof why, "its worker does not move vGPUs' memory");
    else if (round >= ROOM_ROUNDS)
        snprintf(why, sizeof why, "other vGPUs' memory was moved off it %d times and it is still full", ROOM_ROUNDS);
    else if (now >= *deadline)
        snprintf(why, sizeof why, "other vGPUs did not make room within %g s", wait);
    else if (gl_ask_room(ordinal, n, *deadline - now, why, sizeof why) > 0) {
        gl_thaw_if_frozen();  /* frozen while it waited (an offload by hand): never call into a locked driver */
        return 1;
    }
    unsigned long long held = gl_process_used();  /* the bytes asked for are charged already: not "held" */
    held = held > n ? held - n : 0;
    gl_sayf("%s refused: GPU %d of this vGPU is full: the driver has no room left (%.1f MiB held by this process), "
            "%.1f MiB more wanted; %s (CUDA_ERROR_OUT_OF_MEMORY)", fn, ordinal, held / 1048576.0, n / 1048576.0, why);
    return 0;
}

/* ``call`` (a driver allocation of ``n`` bytes on ``dev``, already charged to the quota) again while the driver
 * finds the GPU full and the worker makes room on it (room_made: a few rounds, one deadline). */
#define WITH_ROOM(fn, dev, n, call)                                                                           \
    ({                                                                                                        \
        CUresult r_ = (call);                                                                                 \
        double deadline_ = 0;                                                                                 \
        for (int round_ = 0; r_ == CUDA_ERROR_OUT_OF_MEMORY && room_made(fn, dev, n, round_, &deadline_);    \
             round_++)                                                                                        \
            r_ = (call);                                                                                      \
        r_;                                                                                                   \
    })

static CUmemoryPool current_pool(void)
{
    CUdevice d;
    CUmemoryPool p = NULL;
    if (GL_REAL(ctx_dev_t, "cuCtxGetDevice")(&d) != CUDA_SUCCESS) return NULL;
    if (GL_REAL(dev_pool_t, "cuDeviceGetMemPool")(&p, d) != CUDA_SUCCESS) return NULL;
    return p;
}

typedef CUresult (*alloc_async_t)(CUdeviceptr *, size_t, CUstream);
typedef CUresult (*alloc_pool_t)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
typedef CUresult (*free_async_t)(CUdeviceptr, CUstream);

#define CU_STREAM_CAPTURE_STATUS_ACTIVE 1

static CUresult alloc_async(const char *name, alloc_async_t real_async, alloc_pool_t real_pool, CUdeviceptr *dptr,
                            size_t n, CUmemoryPool pool, CUstream s, int per_thread)
{
    CUresult r = gl_entry_check();
    if (r != CUDA_SUCCESS) return r;
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    /* a graph's memory node: no memory yet; gl_charge_graph_launch charges it when a launch reserves it */
    if (gl_capture_status(s, per_thread) == CU_STREAM_CAPTURE_STATUS_ACTIVE)  /* not when the driver cannot say */
        return real_pool ? real_pool(dptr, n, pool, s) : real_async(dptr, n, s);
    CUmemoryPool p = real_pool ? pool : current_pool();
    size_t room = 0;
    CUdevice dev;
    int host;
    if (!charge_pool(p, n, &room, &dev, &host)) {
        true_up_all();
        if (!charge_pool(p, n, &room, &dev, &host)) return refuse(name, n, room);
    }
    if (host)  /* host memory: a refusal there is not the GPU's to make room for */
        r = real_pool ? real_pool(dptr, n, pool, s) : real_async(dptr, n, s);
    else
        r = WITH_ROOM(name, dev, n, real_pool ? real_pool(dptr, n, pool, s) : real_async(dptr, n, s));
    if (r == CUDA_SUCCESS) {
        remember(*dptr, ASYNC, n, p, 0);  /* its pool has the GPU */
        settle_pool(p, 0);
    } else {
        settle_pool(p, n);
    }
    return r;
}

GL_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t n, CUstream s)
{
    return alloc_async("cuMemAllocAsync", GL_REAL(alloc_async_t, "cuMemAllocAsync"), NULL, dptr, n, NULL, s, 0);
}

GL_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t n, CUstream s)
{
    return alloc_async("cuMemAllocAsync", GL_REAL(alloc_async_t, "cuMemAllocAsync_ptsz"), NULL, dptr, n, NULL, s,
                       1);
}

GL_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t n, CUmemoryPool pool, CUstream s)
{
    return alloc_async("cuMemAllocFromPoolAsync", NULL, GL_REAL(alloc_pool_t, "cuMemAllocFromPoolAsync"), dptr, n,
                       pool, s, 0);
}

GL_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t n, CUmemoryPool pool, CUstream s)
{
    return alloc_async("cuMemAllocFromPoolAsync", NULL, GL_REAL(alloc_pool_t, "cuMemAllocFromPoolAsync_ptsz"), dptr,
                       n, pool, s, 1);
}

static CUresult free_async(free_async_t real, CUdeviceptr p, CUstream s)
{
    gl_thaw_if_frozen();
    CUresult r = real(p, s);
    size_t n;
    CUmemoryPool pool;
    if (r == CUDA_SUCCESS && forget(p, ASYNC, &n, &pool, NULL)) settle_pool(pool, n);
    return r;
}

GL_EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s)
{
    return free_async(GL_REAL(free_async_t, "cuMemFreeAsync"), p, s);
}

GL_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s)
{
    return free_async(GL_REAL(free_async_t, "cuMemFreeAsync_ptsz"), p, s);
}

typedef CUresult (*trim_t)(CUmemoryPool, size_t);
typedef CUresult (*pool_destroy_t)(CUmemoryPool);

GL_EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t keep)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(trim_t, "cuMemPoolTrimTo")(pool, keep);
    if (r == CUDA_SUCCESS) settle_pool(pool, 0);
    return r;
}

GL_EXPORT CUresult cuMemPoolDestroy(CUmemoryPool pool)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(pool_destroy_t, "cuMemPoolDestroy")(pool);
    if (r != CUDA_SUCCESS) return r;
    pthread_mutex_lock(&mu);
    for (pool_rec **p = &pools; *p; p = &(*p)->next) {
        if ((*p)->pool != pool) continue;
        pool_rec *gone = *p;
        *p = gone->next;
        /* its live allocations' entries stay until freed: nothing more to give */
        gl_uncharge(gone->gpu, gone->charged);
        free(gone);
        break;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

/* Where the program gets a pool, it learns where the pool is: cuMemPoolCreate's properties, the device (or the
 * location) whose default or current pool it is. */
typedef CUresult (*pool_create_t)(CUmemoryPool *, const void *);
typedef CUresult (*location_pool_t)(CUmemoryPool *, const mem_location *, int);

GL_EXPORT CUresult cuMemPoolCreate(CUmemoryPool *pool, const void *props)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(pool_create_t, "cuMemPoolCreate")(pool, props);
    const alloc_prop_head *head = props;
    if (r == CUDA_SUCCESS && head)
        pool_is_at(*pool, located_device(&head->location), host_located(&head->location), 1);
    return r;
}

static CUresult device_pool(const char *real_name, CUmemoryPool *pool, CUdevice dev)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(dev_pool_t, real_name)(pool, dev);
    if (r == CUDA_SUCCESS) pool_is_at(*pool, dev, 0, 0);
    return r;
}

GL_EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice dev)
{
    return device_pool("cuDeviceGetDefaultMemPool", pool, dev);
}

GL_EXPORT CUresult cuDeviceGetMemPool(CUmemoryPool *pool, CUdevice dev)
{
    return device_pool("cuDeviceGetMemPool", pool, dev);
}

static CUresult location_pool(const char *real_name, CUmemoryPool *pool, const mem_location *where, int type)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(location_pool_t, real_name)(pool, where, type);
    if (r == CUDA_SUCCESS && where) pool_is_at(*pool, located_device(where), host_located(where), 0);
    return r;
}

GL_EXPORT CUresult cuMemGetDefaultMemPool(CUmemoryPool *pool, const mem_location *where, int type)
{
    return location_pool("cuMemGetDefaultMemPool", pool, where, type);
}

GL_EXPORT CUresult cuMemGetMemPool(CUmemoryPool *pool, const mem_location *where, int type)
{
    return location_pool("cuMemGetMemPool", pool, where, type);
}

/* ------------------------------------------------------------------- synchronous allocations */
typedef CUresult (*alloc_t)(CUdeviceptr *, size_t);
typedef CUresult (*alloc_managed_t)(CUdeviceptr *, size_t, unsigned);
typedef CUresult (*alloc_pitch_t)(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
typedef CUresult (*free_t)(CUdeviceptr);

GL_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t n)
{
    CUresult r = gl_entry_check();
    size_t room = 0;
    if (r != CUDA_SUCCESS) return r;
    int gpu = current_gpu();
    if (!gl_charge(gpu, n, &room)) {
        true_up_all();
        if (!gl_charge(gpu, n, &room)) return refuse("cuMemAlloc", n, room);
    }
    r = WITH_ROOM("cuMemAlloc", current_device(), n, GL_REAL(alloc_t, "cuMemAlloc_v2")(dptr, n));
    if (r == CUDA_SUCCESS) remember(*dptr, DEVICE, n, NULL, gpu);
    else gl_uncharge(gpu, n);
    return r;
}

GL_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t n, unsigned flags)
{
    CUresult r = gl_entry_check();
    size_t room = 0;
    if (r != CUDA_SUCCESS) return r;
    int gpu = current_gpu();
    if (!gl_charge(gpu, n, &room)) return refuse("cuMemAllocManaged", n, room);
    r = GL_REAL(alloc_managed_t, "cuMemAllocManaged")(dptr, n, flags);
    if (r == CUDA_SUCCESS) gl_unfreezable(GL_UNFREEZABLE_UVM);
    if (r == CUDA_SUCCESS) remember(*dptr, DEVICE, n, NULL, gpu);
    else gl_uncharge(gpu, n);
    return r;
}

GL_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height, unsigned elem)
{
    CUresult r = gl_entry_check();
    size_t room = 0, guess = ((width + 511) / 512) * 512 * height;
    if (r != CUDA_SUCCESS) return r;
    int gpu = current_gpu();
    if (!gl_charge(gpu, guess, &room)) return refuse("cuMemAllocPitch", guess, room);
    r = WITH_ROOM("cuMemAllocPitch", current_device(), guess,
                  GL_REAL(alloc_pitch_t, "cuMemAllocPitch_v2")(dptr, pitch, width, height, elem));
    if (r != CUDA_SUCCESS) {
        gl_uncharge(gpu, guess);
        return r;
    }
    size_t real = *pitch * height;
    if (real > guess) gl_force_charge(gpu, real - guess);
    else gl_uncharge(gpu, guess - real);
    remember(*dptr, DEVICE, real, NULL, gpu);
    return r;
}

GL_EXPORT CUresult cuMemFree_v2(CUdeviceptr p)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(free_t, "cuMemFree_v2")(p);
    size_t n;
    CUmemoryPool pool;
    if (r == CUDA_SUCCESS && !give_back(p, DEVICE) && forget(p, ASYNC, &n, &pool, NULL))
        settle_pool(pool, n);  /* cuMemFree takes those too */
    return r;
}

/* ------------------------------------------------------------------- virtual memory management */
typedef CUresult (*create_t)(unsigned long long *, size_t, const void *, unsigned long long);
typedef CUresult (*release_t)(unsigned long long);


GL_EXPORT CUresult cuMemCreate(unsigned long long *handle, size_t n, const void *prop, unsigned long long flags)
{
    CUresult r = gl_entry_check();
    size_t room = 0;
    if (r != CUDA_SUCCESS) return r;
    const alloc_prop_head *head = prop;
    if (head && host_located(&head->location)) return GL_REAL(create_t, "cuMemCreate")(handle, n, prop, flags);
    CUdevice dev = head ? located_device(&head->location) : current_device();
    int gpu = gl_vgpu_ordinal(dev);
    if (!gl_charge(gpu, n, &room)) {
        true_up_all();
        if (!gl_charge(gpu, n, &room)) return refuse("cuMemCreate", n, room);
    }
    r = WITH_ROOM("cuMemCreate", dev, n, GL_REAL(create_t, "cuMemCreate")(handle, n, prop, flags));
    if (r == CUDA_SUCCESS) remember(*handle, VMM, n, NULL, gpu);
    else gl_uncharge(gpu, n);
    return r;
}

GL_EXPORT CUresult cuMemRelease(unsigned long long handle)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(release_t, "cuMemRelease")(handle);
    if (r == CUDA_SUCCESS) give_back(handle, VMM);
    return r;
}

/* ------------------------------------------------------------------- arrays */
typedef struct { size_t width, height; int format; unsigned channels; } array_desc;
typedef struct { size_t width, height, depth; int format; unsigned channels, flags; } array3d_desc;
typedef struct { size_t size, alignment; unsigned reserved[4]; } array_requirements;
typedef CUresult (*array_create_t)(CUarray *, const void *);
typedef CUresult (*mipmapped_create_t)(CUmipmappedArray *, const void *, unsigned);
typedef CUresult (*array_destroy_t)(void *);
typedef CUresult (*requirements_t)(array_requirements *, void *, CUdevice);

/* Bits per pixel of a CUarray_format (cuda.h 13.0); 0: a block-compressed format, see block_bytes. The formats
 * with the channels in their name, the YUV ones and the packed ones ignore NumChannels, as the driver wants. */
static unsigned pixel_bits(int format, unsigned channels)
{
    unsigned ch = channels ? channels : 1;
    switch (format) {
    case 0x01: case 0x08: return 8 * ch;              /* [UN]SIGNED_INT8 */
    case 0x02: case 0x09: case 0x10: return 16 * ch;  /* [UN]SIGNED_INT16, HALF */
    case 0xc0: case 0xc6: return 8;                   /* [UN|S]NORM_INT8X1 */
    case 0xc1: case 0xc7: case 0xc3: case 0xc9: case 0xa5: case 0xa2: return 16;  /* X2 of 8, X1 of 16, YUY2, NV16 */
    case 0xc5: case 0xcb: case 0xb1: return 64;       /* NORM_INT16X4, Y416 */
    case 0xb0: return 12;                             /* NV12: 8-bit 4:2:0 */
    case 0x9f: case 0xa1: case 0xb2: case 0xb4: return 24;  /* P010, P016 (16-bit 4:2:0), 8-bit 4:4:4 */
    case 0xb3: case 0xb5: return 48;                  /* 10- and 16-bit 4:4:4 in 16-bit words */
    case 0xa3: case 0xa4: case 0xa6: case 0xa7: case 0xa8: case 0xa9: case 0x50:
    case 0xc2: case 0xc8: case 0xc4: case 0xca: return 32;  /* 4:2:2 of 16-bit words, AYUV, Y410, 10-10-10-2 */
    }
    if (format >= 0x91 && format <= 0x9e) return 0;
    return 32 * ch;                                   /* [UN]SIGNED_INT32, FLOAT, and what is newer */
}

/* Bytes of a 4x4 block of a block-compressed format: BC1 and BC4 8, the others 16. */
static size_t block_bytes(int format) { return format <= 0x92 || format == 0x97 || format == 0x98 ? 8 : 16; }

static size_t dims(size_t w, size_t h, size_t d) { return w * (h ? h : 1) * (d ? d : 1); }

/* What an array of w x h x d pixels takes at the least, before the driver's alignment. */
static size_t array_bytes(size_t w, size_t h, size_t d, int format, unsigned channels)
{
    unsigned bits = pixel_bits(format, channels);
    if (!bits) return dims((w + 3) / 4, ((h ? h : 1) + 3) / 4, d) * block_bytes(format);
    return (dims(w, h, d) * bits + 7) / 8;
}

/* An array made: its charge trued up to the driver's requirement where it tells (deferred-mapping arrays
 * only: cuArrayGetMemoryRequirements refuses the others), else the estimate stays. */
static CUresult charge_array(const char *fn, void *array, int kind, size_t guess, const char *req_name, int gpu)
{
    CUdevice d;
    array_requirements req = { 0 };
    size_t n = guess;
    if (GL_REAL(ctx_dev_t, "cuCtxGetDevice")(&d) == CUDA_SUCCESS &&
        GL_REAL(requirements_t, req_name)(&req, array, d) == CUDA_SUCCESS && req.size)
        n = req.size;
    if (n > guess) gl_force_charge(gpu, n - guess);
    else gl_uncharge(gpu, guess - n);
    (void)fn;
    remember((unsigned long long)(uintptr_t)array, kind, n, NULL, gpu);
    return CUDA_SUCCESS;
}

static CUresult array_create(const char *fn, const char *real_name, CUarray *out, const void *desc, size_t guess)
{
    CUresult r = gl_entry_check();
    size_t room = 0;
    if (r != CUDA_SUCCESS) return r;
    if (!out || !desc) return CUDA_ERROR_INVALID_VALUE;
    int gpu = current_gpu();
    if (!gl_charge(gpu, guess, &room)) return refuse(fn, guess, room);
    r = WITH_ROOM(fn, current_device(), guess, GL_REAL(array_create_t, real_name)(out, desc));
    if (r != CUDA_SUCCESS) {
        gl_uncharge(gpu, guess);
        return r;
    }
    return charge_array(fn, *out, ARRAY, guess, "cuArrayGetMemoryRequirements", gpu);
}

GL_EXPORT CUresult cuArrayCreate_v2(CUarray *out, const array_desc *d)
{
    size_t guess = d ? array_bytes(d->width, d->height, 1, d->format, d->channels) : 0;
    return array_create("cuArrayCreate", "cuArrayCreate_v2", out, d, guess);
}

GL_EXPORT CUresult cuArray3DCreate_v2(CUarray *out, const array3d_desc *d)
{
    size_t guess = d ? array_bytes(d->width, d->height, d->depth, d->format, d->channels) : 0;
    return array_create("cuArray3DCreate", "cuArray3DCreate_v2", out, d, guess);
}

GL_EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *out, const array3d_desc *d, unsigned levels)
{
    CUresult r = gl_entry_check();
    size_t room = 0;
    if (r != CUDA_SUCCESS) return r;
    if (!out || !d) return CUDA_ERROR_INVALID_VALUE;
    /* each level halves every dimension: a 1D chain is under twice its first level, a 2D one (and a 3D one)
     * under 4/3 of it */
    size_t first = array_bytes(d->width, d->height, d->depth, d->format, d->channels);
    size_t guess = d->height ? first / 3 * 4 : first * 2;
    int gpu = current_gpu();
    if (!gl_charge(gpu, guess, &room)) return refuse("cuMipmappedArrayCreate", guess, room);
    r = WITH_ROOM("cuMipmappedArrayCreate", current_device(), guess,
                  GL_REAL(mipmapped_create_t, "cuMipmappedArrayCreate")(out, d, levels));
    if (r != CUDA_SUCCESS) {
        gl_uncharge(gpu, guess);
        return r;
    }
    return charge_array("cuMipmappedArrayCreate", *out, MIPMAPPED, guess, "cuMipmappedArrayGetMemoryRequirements",
                        gpu);
}

static CUresult array_destroy(const char *real_name, void *array, int kind)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(array_destroy_t, real_name)(array);
    if (r == CUDA_SUCCESS) give_back((unsigned long long)(uintptr_t)array, kind);
    return r;
}

GL_EXPORT CUresult cuArrayDestroy(CUarray a) { return array_destroy("cuArrayDestroy", a, ARRAY); }

GL_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray a)
{
    return array_destroy("cuMipmappedArrayDestroy", a, MIPMAPPED);
}

/* ------------------------------------------------------------------- graphs' memory (launch.c) */
/* A graph's allocation nodes (captured cuMemAllocAsync calls, or nodes added) reserve their memory in the device's
 * graph memory pool when a launch first needs it. Their sizes are read once, at instantiation, from the graph's
 * nodes (a child graph cannot hold memory nodes); at a launch, what they may add beyond the reserve's free part is
 * charged first (an upper bound: a graph that frees and allocates again may need less), and after it the charge
 * becomes the device's reserve (CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT). */
typedef CUresult (*graph_attr_t)(CUdevice, int, void *);
typedef CUresult (*graph_nodes_t)(CUgraph, CUgraphNode *, size_t *);
typedef CUresult (*node_type_t)(CUgraphNode, int *);
#define CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT 0
#define CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT 2
#define CU_GRAPH_NODE_TYPE_MEM_ALLOC 10

/* CUDA_MEM_ALLOC_NODE_PARAMS: the pool's properties (CUmemPoolProps, 88 bytes: its head says where the memory is),
 * the access descriptors, the size */
typedef struct {
    union { alloc_prop_head head; unsigned char bytes[88]; } pool_props;
    const void *access_descs;
    size_t access_desc_count, bytesize;
    CUdeviceptr dptr;
} alloc_node_params;
typedef CUresult (*alloc_node_params_t)(CUgraphNode, alloc_node_params *);

/* The bytes of graph ``g``'s allocation nodes on each device into ``bytes``; 0 when it has none on a GPU (host
 * memory, like a host-located cuMemCreate, is not charged). */
static int graph_alloc_bytes(CUgraph g, size_t bytes[GRAPH_DEVICES])
{
    size_t count = 0;
    int any = 0;
    graph_nodes_t nodes_of = GL_REAL(graph_nodes_t, "cuGraphGetNodes");
    if (nodes_of(g, NULL, &count) != CUDA_SUCCESS || !count) return 0;
    CUgraphNode *nodes = calloc(count, sizeof *nodes);
    if (!nodes) return 0;
    if (nodes_of(g, nodes, &count) == CUDA_SUCCESS)
        for (size_t i = 0; i < count; i++) {
            int type = 0;
            alloc_node_params params;
            if (GL_REAL(node_type_t, "cuGraphNodeGetType")(nodes[i], &type) != CUDA_SUCCESS ||
                type != CU_GRAPH_NODE_TYPE_MEM_ALLOC ||
                GL_REAL(alloc_node_params_t, "cuGraphMemAllocNodeGetParams")(nodes[i], &params) != CUDA_SUCCESS ||
                host_located(&params.pool_props.head.location))
                continue;
            CUdevice d = located_device(&params.pool_props.head.location);
            if (d < 0 || d >= GRAPH_DEVICES) continue;
            bytes[d] += params.bytesize;
            any = 1;
        }
    free(nodes);
    return any;
}

/* (mu held) the record of graph ``g``, taken out of the list when ``take`` */
static graph_rec *graph_of(CUgraphExec g, int take)
{
    for (graph_rec **p = &graphs; *p; p = &(*p)->next)
        if ((*p)->exec == g) {
            graph_rec *r = *p;
            if (take) *p = r->next;
            return r;
        }
    return NULL;
}

/* An instantiation that succeeded: the graph's allocation nodes, remembered for its launches (a record of the
 * same handle is of an executable graph gone without its destroy: dropped). */
static CUresult instantiated(CUresult r, CUgraphExec *exec, CUgraph g)
{
    if (r != CUDA_SUCCESS || !exec) return r;
    pthread_mutex_lock(&mu);
    free(graph_of(*exec, 1));
    pthread_mutex_unlock(&mu);
    graph_rec *rec = calloc(1, sizeof *rec);
    if (!rec) return r;  /* not remembered: its memory is charged after its launches only */
    if (!graph_alloc_bytes(g, rec->bytes)) {  /* nothing to charge ahead */
        free(rec);
        return r;
    }
    rec->exec = *exec;
    pthread_mutex_lock(&mu);
    rec->next = graphs;
    graphs = rec;
    pthread_mutex_unlock(&mu);
    return r;
}

typedef CUresult (*instantiate_flags_t)(CUgraphExec *, CUgraph, unsigned long long);
typedef CUresult (*instantiate_params_t)(CUgraphExec *, CUgraph, void *);
typedef CUresult (*instantiate_legacy_t)(CUgraphExec *, CUgraph, CUgraphNode *, char *, size_t);
typedef CUresult (*exec_destroy_t)(CUgraphExec);

/* cuda.h 12 and later call cuGraphInstantiate by this name */
GL_EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *exec, CUgraph g, unsigned long long flags)
{
    gl_thaw_if_frozen();
    return instantiated(GL_REAL(instantiate_flags_t, "cuGraphInstantiateWithFlags")(exec, g, flags), exec, g);
}

GL_EXPORT CUresult cuGraphInstantiateWithParams(CUgraphExec *exec, CUgraph g, void *params)
{
    gl_thaw_if_frozen();
    return instantiated(GL_REAL(instantiate_params_t, "cuGraphInstantiateWithParams")(exec, g, params), exec, g);
}

GL_EXPORT CUresult cuGraphInstantiateWithParams_ptsz(CUgraphExec *exec, CUgraph g, void *params)
{
    gl_thaw_if_frozen();
    return instantiated(GL_REAL(instantiate_params_t, "cuGraphInstantiateWithParams_ptsz")(exec, g, params), exec,
                        g);
}

/* the exported names of cuda.h 11's form (error node and log buffer) */
GL_EXPORT CUresult cuGraphInstantiate(CUgraphExec *exec, CUgraph g, CUgraphNode *error_node, char *log, size_t size)
{
    gl_thaw_if_frozen();
    return instantiated(GL_REAL(instantiate_legacy_t, "cuGraphInstantiate")(exec, g, error_node, log, size), exec,
                        g);
}

GL_EXPORT CUresult cuGraphInstantiate_v2(CUgraphExec *exec, CUgraph g, CUgraphNode *error_node, char *log,
                                         size_t size)
{
    gl_thaw_if_frozen();
    return instantiated(GL_REAL(instantiate_legacy_t, "cuGraphInstantiate_v2")(exec, g, error_node, log, size),
                        exec, g);
}

GL_EXPORT CUresult cuGraphExecDestroy(CUgraphExec g)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(exec_destroy_t, "cuGraphExecDestroy")(g);
    if (r == CUDA_SUCCESS) {
        pthread_mutex_lock(&mu);
        free(graph_of(g, 1));
        pthread_mutex_unlock(&mu);
    }
    return r;
}

/* Device ``d``'s graph memory attribute ``attr`` into *value; 0 when the driver cannot say (*value 0). */
static int graph_attr(CUdevice d, int attr, unsigned long long *value)
{
    *value = 0;
    return GL_REAL(graph_attr_t, "cuDeviceGetGraphMemAttribute")(d, attr, value) == CUDA_SUCCESS;
}

/* The bytes of executable graph ``g``'s allocation nodes on each device (none: not one we remember). */
static void graph_bytes(CUgraphExec g, size_t bytes[GRAPH_DEVICES])
{
    pthread_mutex_lock(&mu);
    graph_rec *rec = graph_of(g, 0);
    if (rec) memcpy(bytes, rec->bytes, GRAPH_DEVICES * sizeof *bytes);
    pthread_mutex_unlock(&mu);
}

/* Device ``d``'s graph memory reservation becomes its charge. */
static void true_up_graph_memory(CUdevice d)
{
    unsigned long long reserved;
    if (d < 0 || d >= GRAPH_DEVICES || !graph_attr(d, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved)) return;
    int gpu = gl_vgpu_ordinal(d);
    pthread_mutex_lock(&mu);
    if (reserved > graph_charged[d]) gl_force_charge(gpu, reserved - graph_charged[d]);
    else gl_uncharge(gpu, graph_charged[d] - reserved);
    graph_charged[d] = reserved;
    pthread_mutex_unlock(&mu);
}

/* What ``n`` bytes of graph memory on device ``d`` may add to its reserve: beyond the reserve's free part. */
static size_t graph_more(CUdevice d, size_t n)
{
    unsigned long long reserved, in_use;
    graph_attr(d, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved);
    graph_attr(d, CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT, &in_use);
    size_t spare = reserved > in_use ? (size_t)(reserved - in_use) : 0;
    return n > spare ? n - spare : 0;
}

CUresult gl_charge_graph_launch(CUgraphExec g, size_t bytes[GRAPH_DEVICES])
{
    size_t more[GRAPH_DEVICES] = { 0 };
    memset(bytes, 0, GRAPH_DEVICES * sizeof *bytes);
    graph_bytes(g, bytes);
    for (CUdevice d = 0; d < GRAPH_DEVICES; d++) {
        if (!bytes[d] || !(more[d] = graph_more(d, bytes[d]))) continue;
        int gpu = gl_vgpu_ordinal(d);
        size_t room = 0;
        if (!gl_charge(gpu, more[d], &room)) {
            true_up_all();
            if (!gl_charge(gpu, more[d], &room)) {
                for (CUdevice e = 0; e < d; e++) gl_uncharge(gl_vgpu_ordinal(e), more[e]);
                return refuse("cuGraphLaunch", more[d], room);
            }
        }
    }
    pthread_mutex_lock(&mu);
    for (CUdevice d = 0; d < GRAPH_DEVICES; d++)
        graph_charged[d] += more[d];  /* the true-up after the launch replaces it with the reserve */
    pthread_mutex_unlock(&mu);
    return CUDA_SUCCESS;
}

/* cuGraphLaunch found a GPU full: ask the worker for room for the graph's memory (``bytes``, its allocation nodes'
 * per device) on each GPU it allocates on, as an allocation does (WITH_ROOM). 1: room was made on each, launch
 * again; 0: not (said why). */
int gl_graph_room_made(const size_t bytes[GRAPH_DEVICES], int round, double *deadline)
{
    int asked = 0;
    for (CUdevice d = 0; d < GRAPH_DEVICES; d++) {
        size_t more = bytes[d] ? graph_more(d, bytes[d]) : 0;
        if (!more) continue;
        if (!room_made("cuGraphLaunch", d, more, round, deadline)) return 0;
        asked = 1;
    }
    return asked;  /* no memory node needs more: the GPU's fullness is not the graph memory's */
}

void gl_graph_launched(const size_t bytes[GRAPH_DEVICES])
{
    CUdevice current = current_device();
    for (CUdevice d = 0; d < GRAPH_DEVICES; d++)
        if (bytes[d] || d == current) true_up_graph_memory(d);
}

typedef CUresult (*graph_trim_t)(CUdevice);

GL_EXPORT CUresult cuDeviceGraphMemTrim(CUdevice d)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(graph_trim_t, "cuDeviceGraphMemTrim")(d);
    if (r == CUDA_SUCCESS) true_up_graph_memory(d);
    return r;
}

/* ------------------------------------------------------------------- what memory a program sees */
typedef CUresult (*mem_info_t)(size_t *, size_t *);
typedef CUresult (*total_mem_t)(size_t *, CUdevice);

GL_EXPORT CUresult cuMemGetInfo_v2(size_t *free_out, size_t *total_out)
{
    gl_thaw_if_frozen();
    size_t free_real = 0, total_real = 0;
    CUresult r = GL_REAL(mem_info_t, "cuMemGetInfo_v2")(&free_real, &total_real);
    if (r != CUDA_SUCCESS) return r;
    unsigned long long quota = gl_quota();
    if (quota) {
        true_up_all();
        unsigned long long used = gl_vgpu_charged();
        size_t left = used < quota ? (size_t)(quota - used) : 0;
        free_real = left < free_real ? left : free_real;  /* the card may have less free than the quota */
        total_real = (size_t)quota;
    }
    if (free_out) *free_out = free_real;
    if (total_out) *total_out = total_real;
    return r;
}

GL_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d)
{
    gl_thaw_if_frozen();
    CUresult r = GL_REAL(total_mem_t, "cuDeviceTotalMem_v2")(bytes, d);
    unsigned long long quota = gl_quota();
    if (r == CUDA_SUCCESS && bytes && quota && quota < *bytes) *bytes = (size_t)quota;
    return r;
}

/* ------------------------------------------------------------------- memory shared between processes */
/* Allowed, but such a process is never frozen: the driver's checkpoint does not move IPC memory. */
typedef CUresult (*ipc_get_t)(void *, CUdeviceptr);
typedef CUresult (*export_t)(void *, unsigned long long, int, unsigned long long);
typedef CUresult (*import_t)(unsigned long long *, void *, int);

static CUresult shared_memory(CUresult r)
{
    if (r == CUDA_SUCCESS) gl_unfreezable(GL_UNFREEZABLE_IPC);
    return r;
}

GL_EXPORT CUresult cuIpcGetMemHandle(void *handle, CUdeviceptr p)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(ipc_get_t, "cuIpcGetMemHandle")(handle, p));
}

/* the handle is a 64-byte struct passed by value: taken here as its bytes, handed on the same way */
typedef struct { char reserved[64]; } ipc_mem_handle;
typedef CUresult (*ipc_open_value_t)(CUdeviceptr *, ipc_mem_handle, unsigned);

GL_EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, ipc_mem_handle handle, unsigned flags)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(ipc_open_value_t, "cuIpcOpenMemHandle_v2")(p, handle, flags));
}

GL_EXPORT CUresult cuMemExportToShareableHandle(void *out, unsigned long long handle, int type, unsigned long long flags)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(export_t, "cuMemExportToShareableHandle")(out, handle, type, flags));
}

GL_EXPORT CUresult cuMemImportFromShareableHandle(unsigned long long *handle, void *os_handle, int type)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(import_t, "cuMemImportFromShareableHandle")(handle, os_handle, type));
}

/* a pool's allocations shared with another process, by the pool's handle or by one pointer */
typedef CUresult (*pool_export_t)(void *, CUmemoryPool, int, unsigned long long);
typedef CUresult (*pool_import_t)(CUmemoryPool *, void *, int, unsigned long long);
typedef CUresult (*pointer_export_t)(void *, CUdeviceptr);
typedef CUresult (*pointer_import_t)(CUdeviceptr *, CUmemoryPool, void *);

GL_EXPORT CUresult cuMemPoolExportToShareableHandle(void *out, CUmemoryPool pool, int type, unsigned long long flags)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(pool_export_t, "cuMemPoolExportToShareableHandle")(out, pool, type, flags));
}

GL_EXPORT CUresult cuMemPoolImportFromShareableHandle(CUmemoryPool *pool, void *os_handle, int type,
                                                      unsigned long long flags)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(pool_import_t, "cuMemPoolImportFromShareableHandle")(pool, os_handle, type, flags));
}

GL_EXPORT CUresult cuMemPoolExportPointer(void *out, CUdeviceptr p)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(pointer_export_t, "cuMemPoolExportPointer")(out, p));
}

GL_EXPORT CUresult cuMemPoolImportPointer(CUdeviceptr *p, CUmemoryPool pool, void *data)
{
    gl_thaw_if_frozen();
    return shared_memory(GL_REAL(pointer_import_t, "cuMemPoolImportPointer")(p, pool, data));
}
