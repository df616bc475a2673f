/* gpulab shim: cuGetProcAddress (how cuda-python finds every entry point) and the CUresult
 * names and strings, answered from the generated tables without a round trip. */
#include "gl_shim.h"

static const gl_errname *find_err(CUresult e)
{
    for (size_t i = 0; i < gl_nerrnames; i++)
        if (gl_errnames[i].code == e) return &gl_errnames[i];
    return NULL;
}

GL_EXPORT CUresult cuGetErrorName(CUresult e, const char **p)
{
    const gl_errname *n = find_err(e);
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    *p = n ? n->name : NULL;
    return n ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

GL_EXPORT CUresult cuGetErrorString(CUresult e, const char **p)
{
    const gl_errname *n = find_err(e);
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    *p = n ? n->text : NULL;
    return n ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

#define CU_GET_PROC_ADDRESS_SUCCESS 0
#define CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND 1
#define CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT 2

GL_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                                       int *status)
{
    (void)flags; /* per-thread default stream variants share the stubs: the worker orders per stream */
    if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
    const gl_proc *best = NULL, *any = NULL;
    for (size_t i = 0; i < gl_nprocs; i++) {
        if (strcmp(gl_procs[i].name, symbol) != 0) continue;
        any = &gl_procs[i];
        if (gl_procs[i].since <= version && (!best || gl_procs[i].since > best->since)) best = &gl_procs[i];
    }
    if (best) {
        *pfn = best->fn;
        if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
        return CUDA_SUCCESS;
    }
    *pfn = NULL;
    if (any) {
        if (status) *status = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
        return CUDA_ERROR_NOT_FOUND;
    }
    if (status) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_FOUND;
}

GL_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags)
{
    return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}
