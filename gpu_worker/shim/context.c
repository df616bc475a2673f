/* gpulab shim: the per-thread current context, and the handle ids the shim mints.
 *
 * The current context lives here, never on the worker: gl_begin tells the worker when the
 * calling thread's context differs from the one it last saw. Handles (streams, events,
 * modules, ...) are ids minted here so that creating one needs no round trip. */
#include "gl_shim.h"

static __thread uintptr_t tls_ctx[32];
static __thread int tls_depth;

uintptr_t gl_ctx_current(void) { return tls_depth ? tls_ctx[tls_depth - 1] : 0; }

void gl_ctx_set_current(CUcontext c)
{
    if (tls_depth == 0) tls_ctx[tls_depth++] = (uintptr_t)c;
    else tls_ctx[tls_depth - 1] = (uintptr_t)c;
}

/* fork(): only the forking thread lives on in the child, and its contexts were the parent's. */
void gl_ctx_reset_after_fork(void) { tls_depth = 0; }

void gl_ctx_forget(CUcontext c)
{
    for (int i = 0; i < tls_depth; i++)
        if (tls_ctx[i] == (uintptr_t)c) tls_ctx[i] = 0;
}

GL_EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    *pctx = (CUcontext)gl_ctx_current();
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuCtxSetCurrent(CUcontext c)
{
    gl_ctx_set_current(c);
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuCtxPushCurrent_v2(CUcontext c)
{
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    if (tls_depth == (int)(sizeof tls_ctx / sizeof tls_ctx[0])) return CUDA_ERROR_OUT_OF_MEMORY;
    tls_ctx[tls_depth++] = (uintptr_t)c;
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    if (tls_depth == 0 || tls_ctx[tls_depth - 1] == 0) return CUDA_ERROR_INVALID_CONTEXT;
    uintptr_t c = tls_ctx[--tls_depth];
    if (pctx) *pctx = (CUcontext)c;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ handles */
static uintptr_t next_handle = 0x10000;

uintptr_t gl_mint_handle(void) { return __atomic_fetch_add(&next_handle, 1, __ATOMIC_RELAXED); }
