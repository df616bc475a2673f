/* gpulab shim: kernel launches. Parameters are packed by value from the layout (offset and
 * size of each parameter) the worker reports once per function and the shim caches, so that
 * a launch is pipelined without a round trip. */
#include "gl_shim.h"

#include <stdlib.h>

/* A layout is immutable once published: it is filled first, then its pointer is stored into
 * the table with release order, so that a thread that finds it sees it whole. */
typedef struct { uintptr_t fn; uint32_t count; uint64_t total; uint64_t *off; uint64_t *size; } layout_t;
#define LAYOUT_SLOTS 4096
static layout_t *layouts[LAYOUT_SLOTS];
static __thread layout_t *spill;  /* table crowded: this thread's private copy for one launch */

static void free_layout(layout_t *l)
{
    if (!l) return;
    free(l->off); free(l->size); free(l);
}

static CUresult get_layout(uintptr_t fn, layout_t **out)
{
    size_t h = (fn * 0x9E3779B97F4A7C15ull) >> 52;
    for (size_t i = 0; i < 16; i++) {
        layout_t *l = __atomic_load_n(&layouts[(h + i) % LAYOUT_SLOTS], __ATOMIC_ACQUIRE);
        if (!l) break;
        if (l->fn == fn) { *out = l; return CUDA_SUCCESS; }
    }
    gl_msg m;
    CUresult r = gl_begin(&m, GL_OP_PARAM_LAYOUT, 1);
    if (r != CUDA_SUCCESS) return r;
    gl_put_u64(&m, fn);
    r = gl_call(&m, NULL, 0);
    if (r != CUDA_SUCCESS) { gl_end(&m); return r; }
    uint32_t count = 0;
    gl_get(&m, &count, 4);
    layout_t *tmp = calloc(1, sizeof *tmp);
    if (tmp) {
        tmp->fn = fn;
        tmp->count = count;
        tmp->off = calloc((size_t)count + 1, 8);
        tmp->size = calloc((size_t)count + 1, 8);
    }
    if (!tmp || !tmp->off || !tmp->size) {
        gl_end(&m);
        free_layout(tmp);
        gl_sayf("out of host memory for a kernel's parameter layout (CUDA_ERROR_OUT_OF_MEMORY)");
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    for (uint32_t i = 0; i < count && !m.bad; i++) {
        gl_get(&m, &tmp->off[i], 8);
        gl_get(&m, &tmp->size[i], 8);
        if (tmp->off[i] + tmp->size[i] > tmp->total) tmp->total = tmp->off[i] + tmp->size[i];
    }
    r = gl_reply_status(&m);
    gl_end(&m);
    if (r != CUDA_SUCCESS) { free_layout(tmp); return r; }
    for (size_t i = 0; i < 16; i++) {
        layout_t **slot = &layouts[(h + i) % LAYOUT_SLOTS];
        layout_t *expected = NULL;
        if (__atomic_compare_exchange_n(slot, &expected, tmp, 0, __ATOMIC_RELEASE, __ATOMIC_ACQUIRE)) {
            *out = tmp;
            return CUDA_SUCCESS;
        }
        if (expected->fn == fn) {  /* another thread published it meanwhile */
            free_layout(tmp);
            *out = expected;
            return CUDA_SUCCESS;
        }
    }
    free_layout(spill);
    spill = tmp;
    *out = spill;
    return CUDA_SUCCESS;
}

/* fork(): function ids are per session; the child's session starts with none. The parent's
 * entries are dropped, not freed (another thread of the parent may have been reading one). */
void gl_launch_reset_after_fork(void)
{
    memset(layouts, 0, sizeof layouts);
}

#define CU_LAUNCH_PARAM_END ((void *)0x00)
#define CU_LAUNCH_PARAM_BUFFER_POINTER ((void *)0x01)
#define CU_LAUNCH_PARAM_BUFFER_SIZE ((void *)0x02)

static CUresult launch(uintptr_t f, const unsigned int dims[7], CUstream s, const void *attrs, unsigned int nattrs,
                       void **kernelParams, void **extra)
{
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    const void *buf = NULL;
    size_t buflen = 0;
    layout_t *l = NULL;
    if (kernelParams && extra) return CUDA_ERROR_INVALID_VALUE;
    if (extra) {
        for (size_t i = 0; extra[i] != CU_LAUNCH_PARAM_END; i += 2) {
            if (extra[i] == CU_LAUNCH_PARAM_BUFFER_POINTER) buf = extra[i + 1];
            else if (extra[i] == CU_LAUNCH_PARAM_BUFFER_SIZE) buflen = *(size_t *)extra[i + 1];
            else return CUDA_ERROR_INVALID_VALUE;
        }
        if (!buf && buflen) return CUDA_ERROR_INVALID_VALUE;
    } else {
        CUresult r = get_layout(f, &l);
        if (r != CUDA_SUCCESS) return r;
        if (l->count && !kernelParams) return CUDA_ERROR_INVALID_VALUE;
        buflen = l->total;
    }
    gl_msg m;
    CUresult r = gl_begin(&m, GL_OP_LAUNCH, 0);
    if (r != CUDA_SUCCESS) return r;
    gl_put_u64(&m, f);
    for (int i = 0; i < 7; i++) gl_put_I(&m, dims[i]);
    gl_put_u64(&m, (unsigned long long)(uintptr_t)s);
    gl_put_I(&m, nattrs);
    if (nattrs) gl_put(&m, attrs, (size_t)nattrs * GL_LAUNCH_ATTR_SIZE);
    gl_put_u64(&m, buflen);
    if (buf) {
        gl_put(&m, buf, buflen);
    } else {
        char *dst = gl_put_space(&m, buflen);
        if (!dst) {
            r = gl_post(&m, 0);  /* drops the frame, says why */
            gl_end(&m);
            return r;
        }
        memset(dst, 0, buflen);
        for (uint32_t i = 0; i < l->count; i++) memcpy(dst + l->off[i], kernelParams[i], l->size[i]);
    }
    r = gl_post(&m, 0);
    gl_end(&m);
    return r;
}

GL_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                                  unsigned int by, unsigned int bz, unsigned int shmem, CUstream s,
                                  void **kernelParams, void **extra)
{
    const unsigned int dims[7] = { gx, gy, gz, bx, by, bz, shmem };
    return launch((uintptr_t)f, dims, s, NULL, 0, kernelParams, extra);
}

typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    CUstream hStream;
    const void *attrs;
    unsigned int numAttrs;
} gl_launch_config;

GL_EXPORT CUresult cuLaunchKernelEx(const gl_launch_config *cfg, CUfunction f, void **kernelParams, void **extra)
{
    if (!cfg) return CUDA_ERROR_INVALID_VALUE;
    const unsigned int dims[7] = { cfg->gridDimX, cfg->gridDimY, cfg->gridDimZ, cfg->blockDimX, cfg->blockDimY,
                                   cfg->blockDimZ, cfg->sharedMemBytes };
    if (cfg->numAttrs && !cfg->attrs) return CUDA_ERROR_INVALID_VALUE;
    return launch((uintptr_t)f, dims, cfg->hStream, cfg->attrs, cfg->numAttrs, kernelParams, extra);
}
