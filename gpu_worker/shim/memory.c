/* gpulab shim: device allocations as the shim sees them, the unified-address copies
 * (cuMemcpy, cuMemcpyAsync) and page-locked host memory, which stays in this process.
 *
 * The worker's device addresses live in another process, so to tell a device pointer from a
 * host pointer the shim keeps the spans of the allocations it has seen succeed. */
#include "gl_shim.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct { CUdeviceptr base; size_t size; } span_t;
static span_t *spans;
static size_t nspans, capspans;
static pthread_mutex_t spans_mu = PTHREAD_MUTEX_INITIALIZER;

void gl_track_alloc(CUdeviceptr p, size_t n)
{
    pthread_mutex_lock(&spans_mu);
    if (nspans == capspans) {
        size_t cap = capspans ? capspans * 2 : 64;
        span_t *ns = realloc(spans, cap * sizeof *ns);
        if (!ns) { pthread_mutex_unlock(&spans_mu); return; }
        spans = ns; capspans = cap;
    }
    size_t i = nspans;
    while (i > 0 && spans[i - 1].base > p) { spans[i] = spans[i - 1]; i--; }
    spans[i].base = p; spans[i].size = n;
    nspans++;
    pthread_mutex_unlock(&spans_mu);
}

void gl_untrack_alloc(CUdeviceptr p)
{
    pthread_mutex_lock(&spans_mu);
    for (size_t i = 0; i < nspans; i++) {
        if (spans[i].base == p) {
            memmove(&spans[i], &spans[i + 1], (nspans - i - 1) * sizeof *spans);
            nspans--;
            break;
        }
    }
    pthread_mutex_unlock(&spans_mu);
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
