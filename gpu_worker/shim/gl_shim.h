/* gpulab shim: a libcuda.so.1 stand-in that forwards the CUDA driver API to a gpulab worker.
 * This is the internal header shared by its files, one job each:
 *
 *   transport.c    connection, HELLO, framing, send buffer, replies, fork and exit
 *   memory.c       allocations seen by the shim, unified cuMemcpy, page-locked host memory
 *   context.c      per-thread current context, client-minted handle ids
 *   launch.c       kernel parameter layouts and launches
 *   images.c       module image sizes (PTX, cubin, fatbin)
 *   procaddress.c  cuGetProcAddress, CUresult names
 *   log.c          what the shim says on stderr
 *   gl_generated.c every forwarded stub and the tables (generated from gpu_worker/api/table.py)
 *
 * Built without CUDA headers: the few driver types we need are declared here with the
 * driver's ABI (handles are pointers, CUdeviceptr is 64-bit, CUresult is an int).
 * The wire format is described in docs/protocol.md.
 */
#ifndef GL_SHIM_H
#define GL_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "gl_wire.h"  /* generated: opcodes, header sizes, flags, limits */

#define GL_EXPORT __attribute__((visibility("default")))

/* Where the worker's address and the session token come from. The CI double of a GPU node's driver
 * (build.py's build_driver_double: native mode's "real" library when no GPU is there) is this shim
 * built with GL_ENV_PREFIX "GPULAB_DRIVER_", so it and the native shim above it can hold two sessions. */
#ifndef GL_ENV_PREFIX
#define GL_ENV_PREFIX "GPULAB_"
#endif

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext, *CUstream, *CUevent, *CUmodule, *CUfunction, *CUlibrary, *CUkernel, *CUgraph,
    *CUgraphExec, *CUmemoryPool;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEVICE_UNAVAILABLE = 46,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_PERMITTED = 800,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

/* One request being built; the connection lock is held from gl_begin to gl_end. */
typedef struct {
    size_t start;      /* offset of this frame's header in the send buffer */
    size_t rpos;       /* read position in the reply payload */
    int bad;           /* the reply was shorter than expected */
    const void *bulk;  /* zero-copy trailing data (user memory), sent with writev */
    size_t bulk_len;
} gl_msg;

typedef struct { const char *name; int since; void *fn; } gl_proc;
typedef struct { int code; const char *name; const char *text; } gl_errname;

extern const gl_proc gl_procs[];
extern const size_t gl_nprocs;
extern const gl_errname gl_errnames[];
extern const size_t gl_nerrnames;

CUresult gl_begin(gl_msg *m, unsigned op, int want_reply);
void gl_put(gl_msg *m, const void *p, size_t n);
void *gl_put_space(gl_msg *m, size_t n);  /* n bytes of the request to fill in place */
void gl_put_i(gl_msg *m, int v);
void gl_put_I(gl_msg *m, unsigned int v);
void gl_put_Q(gl_msg *m, unsigned long long v);
void gl_put_f(gl_msg *m, float v);
void gl_put_u64(gl_msg *m, unsigned long long v);
void gl_put_bulk(gl_msg *m, const void *p, size_t n);
CUresult gl_post(gl_msg *m, int send_now);
CUresult gl_call(gl_msg *m, void *bulk_out, size_t bulk_n);
void gl_get(gl_msg *m, void *out, size_t n);
void gl_get_str(gl_msg *m, char *out, int len);
void gl_get_var(gl_msg *m, void *out, size_t max);
CUresult gl_reply_status(gl_msg *m);
void gl_end(gl_msg *m);
void gl_abort(gl_msg *m);

/* log.c: gl_log for the shim's own news (connection), gl_say for a refused call's reason
 * (deduplicated), gl_debug for developers only (GPULAB_DEBUG=1); GPULAB_QUIET=1 silences all but debug. */
void gl_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void gl_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void gl_say(const char *text, size_t n);
void gl_sayf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
CUresult gl_unsupported(const char *name, int *once);  /* a function a vGPU does not offer: said once */
CUresult gl_probed(const char *name);                  /* one that libraries probe: debug log only */
CUresult gl_unsupported_arg(const char *fn, const char *what);
void gl_log_reset_after_fork(void);
/* context.c */
uintptr_t gl_mint_handle(void);
uintptr_t gl_ctx_current(void);
void gl_ctx_set_current(CUcontext c);
void gl_ctx_forget(CUcontext c);
void gl_ctx_reset_after_fork(void);
/* images.c */
const void *gl_image_data(const void *image, size_t *size);
/* memory.c */
CUresult gl_track_new_alloc(CUdeviceptr p, size_t n);  /* cuMemAlloc: tracked, or freed and OUT_OF_MEMORY */
CUresult gl_track_global(CUdeviceptr p, size_t n);     /* cuModuleGetGlobal */
void gl_untrack_alloc(CUdeviceptr p);
void gl_memory_reset_after_fork(void);
/* launch.c */
void gl_launch_reset_after_fork(void);
/* gl_generated.c, from table.MEMPOOL_ATTR_SIZES: bytes of a CUmemPool_attribute's value (0: unknown) */
size_t gl_mempool_attr_size(int attr);

/* Entry points that the hand-written code calls (generated, and procaddress.c's cuGetErrorName). */
CUresult cuGetErrorName(CUresult e, const char **p);
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n);
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n);
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s);
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s);
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
CUresult cuStreamSynchronize(CUstream s);
CUresult cuMemFree_v2(CUdeviceptr p);

#endif
