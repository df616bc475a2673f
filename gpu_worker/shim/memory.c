/* gpulab shim: device allocations as the shim sees them, the unified-address copies
 * (cuMemcpy, cuMemcpyAsync) and page-locked host memory, which stays in this process.
 *
 * The worker's device addresses live in another process, so to tell a device pointer from a
 * host pointer the shim keeps the spans of the allocations it has seen succeed (cuMemAlloc and
 * friends, and module globals from cuModuleGetGlobal).
 *
 * So that no host buffer of this process can ever sit at an address that is device memory on
 * the worker (a unified cuMemcpy could not tell them apart), the pages of every tracked span are
 * reserved here with an inaccessible mapping (PROT_NONE, MAP_FIXED_NOREPLACE), released on free.
 * If host memory already lives there, the shim says so once and goes on: the address means
 * device memory to cuMemcpy, as on a GPU with unified addressing. */
#define _GNU_SOURCE
#include "gl_shim.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

/* own_lo..own_hi: the pages this span reserved itself (a page it shares with a neighbour is
 * reserved once, by whichever came first) */
typedef struct { CUdeviceptr base; size_t size; uintptr_t own_lo, own_hi; } span_t;
static span_t *spans;
static size_t nspans, capspans;
static pthread_mutex_t spans_mu = PTHREAD_MUTEX_INITIALIZER;

static uintptr_t page_size(void)
{
    static uintptr_t ps;
    if (!ps) ps = (uintptr_t)sysconf(_SC_PAGESIZE);
    return ps;
}
static uintptr_t page_down(uintptr_t a) { return a & ~(page_size() - 1); }
static uintptr_t page_up(uintptr_t a) { return (a + page_size() - 1) & ~(page_size() - 1); }
static uintptr_t span_end(const span_t *s) { return (uintptr_t)(s->base + (s->size ? s->size : 1)); }

/* Reserve [lo, hi) unless something is mapped there; the range we got (possibly empty). */
static void reserve_pages(span_t *s, uintptr_t lo, uintptr_t hi)
{
    static int said;
    s->own_lo = s->own_hi = 0;
    if (lo >= hi) return;
    void *want = (void *)lo;
    void *got = mmap(want, hi - lo, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE,
                     -1, 0);
    if (got == want) { s->own_lo = lo; s->own_hi = hi; return; }
    int err = errno;
    if (got != MAP_FAILED) munmap(got, hi - lo);  /* a kernel without MAP_FIXED_NOREPLACE put it elsewhere */
    if (err == EEXIST && !__atomic_exchange_n(&said, 1, __ATOMIC_RELAXED))
        gl_sayf("device memory at 0x%llx (%zu bytes) shares its addresses with host memory of this process: "
                "cuMemcpy takes such addresses as device memory", (unsigned long long)s->base, s->size);
    else
        gl_debug("could not reserve the addresses of device memory at 0x%llx: %s", (unsigned long long)s->base,
                 strerror(err));
}

/* Returns 0, or -1 when host memory for the table ran out (the span is then not tracked). */
static int track_span(CUdeviceptr p, size_t n)
{
    pthread_mutex_lock(&spans_mu);
    for (size_t k = 0; k < nspans; k++)
        if (spans[k].base == p) { pthread_mutex_unlock(&spans_mu); return 0; }  /* a global asked twice */
    if (nspans == capspans) {
        size_t cap = capspans ? capspans * 2 : 64;
        span_t *ns = realloc(spans, cap * sizeof *ns);
        if (!ns) { pthread_mutex_unlock(&spans_mu); return -1; }
        spans = ns; capspans = cap;
    }
    size_t i = nspans;
    while (i > 0 && spans[i - 1].base > p) { spans[i] = spans[i - 1]; i--; }
    span_t *s = &spans[i];
    s->base = p; s->size = n;
    nspans++;
    uintptr_t lo = page_down((uintptr_t)p), hi = page_up(span_end(s));
    if (i > 0 && page_up(span_end(&spans[i - 1])) > lo) lo = page_up(span_end(&spans[i - 1]));
    if (i + 1 < nspans && page_down((uintptr_t)spans[i + 1].base) < hi) hi = page_down((uintptr_t)spans[i + 1].base);
    reserve_pages(s, lo, hi);
    pthread_mutex_unlock(&spans_mu);
    return 0;
}

CUresult gl_track_new_alloc(CUdeviceptr p, size_t n)
{
    if (track_span(p, n) == 0) return CUDA_SUCCESS;
    /* untracked device memory would pass for host memory in cuMemcpy: give it back */
    cuMemFree_v2(p);
    gl_sayf("cuMemAlloc refused: out of host memory to track the allocation (CUDA_ERROR_OUT_OF_MEMORY)");
    return CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult gl_track_global(CUdeviceptr p, size_t n)
{
    if (track_span(p, n) == 0) return CUDA_SUCCESS;
    gl_sayf("cuModuleGetGlobal refused: out of host memory to track the global (CUDA_ERROR_OUT_OF_MEMORY)");
    return CUDA_ERROR_OUT_OF_MEMORY;
}

/* Pages [lo, hi) adjoin s's own reserved pages (or s has none): s owns them from now on. */
static void give_pages(span_t *s, uintptr_t lo, uintptr_t hi)
{
    if (s->own_lo == s->own_hi) { s->own_lo = lo; s->own_hi = hi; return; }
    if (lo < s->own_lo) s->own_lo = lo;
    if (hi > s->own_hi) s->own_hi = hi;
}

void gl_untrack_alloc(CUdeviceptr p)
{
    pthread_mutex_lock(&spans_mu);
    for (size_t i = 0; i < nspans; i++) {
        if (spans[i].base == p) {
            /* release our own pages; one a neighbour still lies on becomes the neighbour's */
            uintptr_t lo = spans[i].own_lo, hi = spans[i].own_hi;
            if (lo < hi && i > 0 && page_up(span_end(&spans[i - 1])) > lo) {
                uintptr_t to = page_up(span_end(&spans[i - 1])) < hi ? page_up(span_end(&spans[i - 1])) : hi;
                give_pages(&spans[i - 1], lo, to);
                lo = to;
            }
            if (lo < hi && i + 1 < nspans && page_down((uintptr_t)spans[i + 1].base) < hi) {
                uintptr_t nb = page_down((uintptr_t)spans[i + 1].base), from = nb > lo ? nb : lo;
                give_pages(&spans[i + 1], from, hi);
                hi = from;
            }
            if (lo < hi) munmap((void *)lo, hi - lo);
            memmove(&spans[i], &spans[i + 1], (nspans - i - 1) * sizeof *spans);
            nspans--;
            break;
        }
    }
    pthread_mutex_unlock(&spans_mu);
}

/* fork(): the child's session starts empty. The parent's reservations are released so that the
 * child's own memory may use those addresses. */
void gl_memory_reset_after_fork(void)
{
    pthread_mutex_init(&spans_mu, NULL);
    for (size_t i = 0; i < nspans; i++)
        if (spans[i].own_lo < spans[i].own_hi) munmap((void *)spans[i].own_lo, spans[i].own_hi - spans[i].own_lo);
    nspans = 0;
}

static int is_device_ptr(CUdeviceptr p)
{
    int found = 0;
    pthread_mutex_lock(&spans_mu);
    size_t lo = 0, hi = nspans;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (spans[mid].base <= p) lo = mid + 1; else hi = mid;
    }
    if (lo > 0 && p < spans[lo - 1].base + spans[lo - 1].size + (spans[lo - 1].size == 0)) found = 1;
    pthread_mutex_unlock(&spans_mu);
    return found;
}

GL_EXPORT CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n)
{
    int dd = is_device_ptr(dst), sd = is_device_ptr(src);
    if (dd && sd) return cuMemcpyDtoD_v2(dst, src, n);
    if (dd) return cuMemcpyHtoD_v2(dst, (const void *)(uintptr_t)src, n);
    if (sd) return cuMemcpyDtoH_v2((void *)(uintptr_t)dst, src, n);
    memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s)
{
    int dd = is_device_ptr(dst), sd = is_device_ptr(src);
    if (dd && sd) return cuMemcpyDtoDAsync_v2(dst, src, n, s);
    if (dd) return cuMemcpyHtoDAsync_v2(dst, (const void *)(uintptr_t)src, n, s);
    if (sd) return cuMemcpyDtoHAsync_v2((void *)(uintptr_t)dst, src, n, s);
    /* host to host: ordered after the stream's earlier work, as the driver does */
    CUresult r = cuStreamSynchronize(s);
    if (r == CUDA_SUCCESS) memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    return r;
}

/* ------------------------------------------------------- page-locked host memory */
/* Host memory stays in this process; copies from it go over the wire like any other. */
#define CU_MEMHOSTALLOC_DEVICEMAP 0x02
#define CU_MEMHOSTREGISTER_DEVICEMAP 0x02

GL_EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t n)
{
    if (!pp) return CUDA_ERROR_INVALID_VALUE;
    if (posix_memalign(pp, 4096, n ? n : 1) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemHostAlloc(void **pp, size_t n, unsigned int flags)
{
    if (flags & CU_MEMHOSTALLOC_DEVICEMAP)
        return gl_unsupported_arg("cuMemHostAlloc", "the CU_MEMHOSTALLOC_DEVICEMAP flag (host memory mapped into the GPU)");
    return cuMemAllocHost_v2(pp, n);
}

GL_EXPORT CUresult cuMemFreeHost(void *p)
{
    free(p);
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned int flags)
{
    (void)n;
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    if (flags & CU_MEMHOSTREGISTER_DEVICEMAP)
        return gl_unsupported_arg("cuMemHostRegister", "the CU_MEMHOSTREGISTER_DEVICEMAP flag (host memory mapped into the GPU)");
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemHostUnregister(void *p)
{
    return p ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
