/* gpulab shim: what the shim tells the person running the program, on stderr. */
#include "gl_shim.h"

#include <stdarg.h>
#include <stdio.h>

void gl_log(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "gpulab: %s\n", line);
    fflush(stderr);
}

CUresult gl_unsupported(const char *name, int *once)
{
    if (!__atomic_exchange_n(once, 1, __ATOMIC_RELAXED))
        gl_log("%s is not forwarded by the gpulab shim: returning CUDA_ERROR_NOT_SUPPORTED", name);
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult gl_unsupported_arg(const char *fn, const char *arg)
{
    gl_log("%s: a non-NULL %s is not supported by the gpulab shim: returning CUDA_ERROR_NOT_SUPPORTED", fn, arg);
    return CUDA_ERROR_NOT_SUPPORTED;
}
