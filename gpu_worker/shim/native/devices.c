/* gpulab native mode: cuInit, and the vGPU's GPUs as the only devices, numbered 0..n-1.
 *
 * cuInit attaches this process to its vGPU's ledger first (a refused token or a full vGPU is cuInit's
 * error, with the worker's sentence), then initializes the real driver and finds each of the vGPU's GPUs
 * among the real devices by UUID. cuDeviceGetCount and cuDeviceGet answer from that list, so a
 * program (and cudart above it) sees ordinals 0..n-1 in the vGPU's order, whatever the node has.
 *
 * Before the real cuInit, CUDA_VISIBLE_DEVICES is set to the vGPU's GPUs (their UUIDs, in its order), as the
 * worker does for its executors: the driver then enumerates only them, so a device's CUdevice value is its
 * ordinal here too, and the calls that take ordinals (a pool's location, peer access, lookups by PCI bus id)
 * agree with what cuDeviceGet answered; child processes inherit the same view. */
#include "gl_native.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_GPUS GL_VGPU_GPUS

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int mapped = -1;  /* -1: not yet; else how many of the vGPU's GPUs were found */
static CUdevice devices[MAX_GPUS];
static CUresult init_error;

typedef CUresult (*init_t)(unsigned);
typedef CUresult (*count_t)(int *);
typedef CUresult (*get_t)(CUdevice *, int);
typedef CUresult (*uuid_t_)(unsigned char *, CUdevice);

static void uuid_text(const unsigned char *u, char *out, size_t n)
{
    snprintf(out, n, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2],
             u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

/* Each vGPU GPU's real device, in the vGPU's order; the CUresult and a sentence when one is missing. */
static CUresult map_devices(void)
{
    char want[MAX_GPUS][64];
    int n = gl_vgpu_gpus(want, MAX_GPUS), real = 0;
    CUresult r = GL_REAL(count_t, "cuDeviceGetCount")(&real);
    if (r != CUDA_SUCCESS) return r;
    uuid_t_ get_uuid = GL_REAL(uuid_t_, "cuDeviceGetUuid_v2");
    for (int k = 0; k < n; k++) {
        int found = 0;
        for (int i = 0; i < real && !found; i++) {
            CUdevice d;
            unsigned char u[16];
            char text[64];
            if (GL_REAL(get_t, "cuDeviceGet")(&d, i) != CUDA_SUCCESS) continue;
            if (get_uuid(u, d) != CUDA_SUCCESS && GL_REAL(uuid_t_, "cuDeviceGetUuid")(u, d) != CUDA_SUCCESS) continue;
            uuid_text(u, text, sizeof text);
            if (strcasecmp(text, want[k]) == 0) {
                devices[k] = d;
                found = 1;
            }
        }
        if (!found) {
            gl_sayf("cuInit refused: this vGPU's GPU %s is not among the %d device(s) this process can see (the "
                    "container's devices or CUDA_VISIBLE_DEVICES hide it) (CUDA_ERROR_NO_DEVICE)", want[k], real);
            return CUDA_ERROR_NO_DEVICE;
        }
    }
    mapped = n;
    return CUDA_SUCCESS;
}

/* Once, before the real cuInit reads it. (mu held) */
static void show_only_the_vgpus_gpus(void)
{
    static int done;
    char want[MAX_GPUS][64], list[MAX_GPUS * 65] = "";
    if (done) return;
    done = 1;
    int n = gl_vgpu_gpus(want, MAX_GPUS);
    for (int k = 0; k < n; k++) {
        if (k) strcat(list, ",");
        strncat(list, want[k], 63);
    }
    const char *before = getenv("CUDA_VISIBLE_DEVICES");
    if (before && strcmp(before, list))
        gl_debug("native: CUDA_VISIBLE_DEVICES=%s replaced by this vGPU's GPUs, %s", before, list);
    if (n) setenv("CUDA_VISIBLE_DEVICES", list, 1);
}

GL_EXPORT CUresult cuInit(unsigned flags)
{
    CUresult r = gl_attach();
    if (r != CUDA_SUCCESS) return r;
    gl_thaw_if_frozen();  /* a repeated cuInit of a frozen process */
    pthread_mutex_lock(&mu);
    show_only_the_vgpus_gpus();
    pthread_mutex_unlock(&mu);
    r = GL_REAL(init_t, "cuInit")(flags);
    if (r != CUDA_SUCCESS) return r;
    pthread_mutex_lock(&mu);
    if (mapped < 0 && init_error == CUDA_SUCCESS) init_error = map_devices();
    r = init_error;
    pthread_mutex_unlock(&mu);
    return r;
}

int gl_vgpu_device_count(void) { return mapped < 0 ? 0 : mapped; }

int gl_vgpu_ordinal(CUdevice d)
{
    for (int k = 0; k < mapped; k++)
        if (devices[k] == d) return k;
    return 0;
}

GL_EXPORT CUresult cuDeviceGetCount(int *count)
{
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    if (mapped < 0) return init_error ? init_error : CUDA_ERROR_NOT_INITIALIZED;
    *count = mapped;
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (mapped < 0) return init_error ? init_error : CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= mapped) return CUDA_ERROR_INVALID_DEVICE;
    *device = devices[ordinal];
    return CUDA_SUCCESS;
}

CUresult gl_entry_check(void)
{
    gl_thaw_if_frozen();
    CUresult r = gl_attached_status();
    if (r != CUDA_SUCCESS) return r;
    const char *why = gl_revoked();
    if (why) {
        gl_sayf("%s (CUDA_ERROR_DEVICE_UNAVAILABLE)", why);
        return CUDA_ERROR_DEVICE_UNAVAILABLE;
    }
    gl_touch();
    return CUDA_SUCCESS;
}
