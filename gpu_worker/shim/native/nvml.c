/* gpulab native mode: the libnvidia-ml.so.1 stand-in beside the native libcuda.so.1.
 *
 * NVML is passed through (real.c built with GL_NVML) except where it would contradict CUDA inside the
 * session: the devices are only the vGPU's GPUs, numbered in the vGPU's order as CUDA numbers them, and
 * a device's memory is the vGPU's: its quota as the total, what all its processes hold as used (read from
 * the vGPU's ledger, the figures the CUDA side charges, never sampled). So nvidia-smi, pynvml and the
 * memory probes of frameworks agree with cuMemGetInfo. The processes on a device are only the vGPU's, so
 * the list agrees with the memory used and a session does not see other users' programs; for the same reason
 * a device's utilization is how busy the vGPU's own kernels kept it. The stand-in attaches to the ledger
 * read-only (no slot, nothing charged) at nvmlInit. */
#include "gl_native.h"

#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;

enum { NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2, NVML_ERROR_NO_PERMISSION = 4,
       NVML_ERROR_NOT_FOUND = 6, NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_FUNCTION_NOT_FOUND = 13,
       NVML_ERROR_MEMORY = 20 };

#define MAX_GPUS 8

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int mapped = -1;  /* how many of the vGPU's GPUs were found; -1 before nvmlInit */
static nvmlDevice_t handles[MAX_GPUS];
static char uuids[MAX_GPUS][64];

typedef nvmlReturn_t (*init_t)(void);
typedef nvmlReturn_t (*init_flags_t)(unsigned);
typedef nvmlReturn_t (*by_uuid_t)(const char *, nvmlDevice_t *);
typedef nvmlReturn_t (*mem_t)(nvmlDevice_t, void *);

/* After the real nvmlInit: the vGPU's GPUs among the real devices. */
static nvmlReturn_t find_devices(void)
{
    pthread_mutex_lock(&mu);
    nvmlReturn_t r = NVML_SUCCESS;
    if (mapped < 0) {
        if (gl_observe() != CUDA_SUCCESS) {
            r = NVML_ERROR_NO_PERMISSION;  /* no vGPU to show; the sentence why is on stderr already */
        } else {
            int n = gl_vgpu_gpus(uuids, MAX_GPUS);
            for (int i = 0; i < n && r == NVML_SUCCESS; i++) {
                r = GL_REAL(by_uuid_t, "nvmlDeviceGetHandleByUUID")(uuids[i], &handles[i]);
                if (r != NVML_SUCCESS)
                    gl_sayf("nvmlInit: this vGPU's GPU %s is not among the devices NVML sees here (NVML error %d)",
                            uuids[i], r);
            }
            if (r == NVML_SUCCESS) mapped = n;
        }
    }
    pthread_mutex_unlock(&mu);
    if (r != NVML_SUCCESS) GL_REAL(init_t, "nvmlShutdown")();  /* the real nvmlInit's count stays balanced */
    return r;
}

GL_EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    nvmlReturn_t r = GL_REAL(init_t, "nvmlInit_v2")();
    return r == NVML_SUCCESS ? find_devices() : r;
}

GL_EXPORT nvmlReturn_t nvmlInit(void)
{
    nvmlReturn_t r = GL_REAL(init_t, "nvmlInit")();
    return r == NVML_SUCCESS ? find_devices() : r;
}

GL_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned flags)
{
    nvmlReturn_t r = GL_REAL(init_flags_t, "nvmlInitWithFlags")(flags);
    return r == NVML_SUCCESS ? find_devices() : r;
}

static int ordinal_of(nvmlDevice_t h)
{
    for (int i = 0; i < mapped; i++)
        if (handles[i] == h) return i;
    return -1;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count)
{
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (mapped < 0) return NVML_ERROR_UNINITIALIZED;
    *count = (unsigned)mapped;
    return NVML_SUCCESS;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned *count) { return nvmlDeviceGetCount_v2(count); }

GL_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *device)
{
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    if (mapped < 0) return NVML_ERROR_UNINITIALIZED;
    if (index >= (unsigned)mapped) return NVML_ERROR_INVALID_ARGUMENT;  /* what NVML answers past its count */
    *device = handles[index];
    return NVML_SUCCESS;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    if (mapped < 0) return NVML_ERROR_UNINITIALIZED;
    for (int i = 0; i < mapped; i++)
        if (!strcasecmp(uuids[i], uuid)) {
            *device = handles[i];
            return NVML_SUCCESS;
        }
    return NVML_ERROR_NOT_FOUND;  /* a GPU of the node that is not this vGPU's */
}

/* Lookups by other keys find a GPU of the node; only this vGPU's are answered. */
typedef nvmlReturn_t (*by_key_t)(const char *, nvmlDevice_t *);

static nvmlReturn_t only_ours(const char *real_name, const char *key, nvmlDevice_t *device)
{
    if (!key || !device) return NVML_ERROR_INVALID_ARGUMENT;
    if (mapped < 0) return NVML_ERROR_UNINITIALIZED;
    nvmlDevice_t found;
    nvmlReturn_t r = GL_REAL(by_key_t, real_name)(key, &found);
    if (r != NVML_SUCCESS) return r;
    if (ordinal_of(found) < 0) return NVML_ERROR_NOT_FOUND;
    *device = found;
    return NVML_SUCCESS;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *bus_id, nvmlDevice_t *device)
{
    return only_ours("nvmlDeviceGetHandleByPciBusId_v2", bus_id, device);
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *bus_id, nvmlDevice_t *device)
{
    return only_ours("nvmlDeviceGetHandleByPciBusId", bus_id, device);
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetHandleBySerial(const char *serial, nvmlDevice_t *device)
{
    return only_ours("nvmlDeviceGetHandleBySerial", serial, device);
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned *index)
{
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    int i = ordinal_of(device);
    if (i < 0) return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned)i;
    return NVML_SUCCESS;
}

/* The vGPU's figures: (total, used) when it has a quota. */
static int vgpu_memory(unsigned long long *total, unsigned long long *used)
{
    unsigned long long quota = gl_quota();
    if (!quota) return 0;
    *total = quota;
    *used = gl_vgpu_charged();
    if (*used > quota) *used = quota;
    return 1;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    nvmlReturn_t r = GL_REAL(mem_t, "nvmlDeviceGetMemoryInfo")(device, memory);
    unsigned long long total, used;
    if (r == NVML_SUCCESS && memory && ordinal_of(device) >= 0 && vgpu_memory(&total, &used)) {
        memory->total = total;
        memory->used = used;
        memory->free = total - used < memory->free ? total - used : memory->free;
    }
    return r;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    nvmlReturn_t r = GL_REAL(mem_t, "nvmlDeviceGetMemoryInfo_v2")(device, memory);
    unsigned long long total, used;
    if (r == NVML_SUCCESS && memory && ordinal_of(device) >= 0 && vgpu_memory(&total, &used)) {
        memory->total = total;
        memory->reserved = 0;  /* the driver's reservation is the card's, outside every vGPU */
        memory->used = used;
        memory->free = total - used < memory->free ? total - used : memory->free;
    }
    return r;
}

/* ------------------------------------------------------------------- how busy a device is */
/* nvmlUtilization_t. The GPU's figure is the vGPU's: the time its kernels (native and forwarded processes) took over
 * the worker's last look, about a second, spread over its GPUs; NVML's own would show the other users' work on
 * the card. The memory controller's figure has no per-vGPU counterpart and stays the card's. */
typedef struct { unsigned gpu, memory; } utilization_rates;
typedef nvmlReturn_t (*rates_t)(nvmlDevice_t, utilization_rates *);

GL_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, utilization_rates *rates)
{
    rates_t real = (rates_t)gl_real("nvmlDeviceGetUtilizationRates");
    if (!real) return NVML_ERROR_FUNCTION_NOT_FOUND;
    nvmlReturn_t r = real(device, rates);
    double busy = gl_vgpu_utilization();
    if (r == NVML_SUCCESS && rates && ordinal_of(device) >= 0 && busy >= 0) {
        double each = busy / (mapped > 0 ? mapped : 1);
        rates->gpu = each >= 100 ? 100u : (unsigned)(each + 0.5);
    }
    return r;
}

/* ------------------------------------------------------------------- the processes on a device */
/* NVML's lists of processes and of their utilization samples, less the entries of processes that are not the
 * vGPU's.  Each list's call is adapted to one form, ``fetch``: fill ``buf`` (room for ``*n`` entries; none at first)
 * and set ``*n`` to the entries written, or to those needed with NVML_ERROR_INSUFFICIENT_SIZE. */
typedef nvmlReturn_t (*fetch_t)(const void *call, void *buf, unsigned *n);

/* The vGPU's entries of a list (``size`` bytes each, the pid ``pid_at`` bytes in), handed out by NVML's rules:
 * ``*count`` in, the room in ``out``; out, the entries, or those needed with NVML_ERROR_INSUFFICIENT_SIZE.  With
 * ``none_not_found`` (the samples), none of the vGPU's is NVML_ERROR_NOT_FOUND, as NVML says for no sample. */
static nvmlReturn_t our_entries(fetch_t fetch, const void *call, size_t size, size_t pid_at, void *out,
                                unsigned *count, int none_not_found)
{
    unsigned char *all = NULL;
    unsigned n = 0;
    nvmlReturn_t r = fetch(call, NULL, &n);  /* how many there are */
    for (int tries = 0; tries < 4 && r == NVML_ERROR_INSUFFICIENT_SIZE; tries++) {  /* it may grow meanwhile */
        free(all);
        n += 8;
        if (!(all = calloc(n, size))) return NVML_ERROR_MEMORY;
        r = fetch(call, all, &n);
    }
    if (r != NVML_SUCCESS) {
        free(all);
        return r;
    }
    unsigned kept = 0;
    for (unsigned i = 0; all && i < n; i++) {  /* in order and in place */
        unsigned pid;
        memcpy(&pid, all + i * size + pid_at, sizeof pid);
        if (gl_vgpu_has_pid(pid)) memmove(all + kept++ * size, all + i * size, size);
    }
    if (!kept && none_not_found) r = NVML_ERROR_NOT_FOUND;
    else if (*count < kept || (kept && !out)) r = NVML_ERROR_INSUFFICIENT_SIZE;
    else if (kept) memcpy(out, all, kept * size);
    if (r != NVML_ERROR_NOT_FOUND) *count = kept;
    free(all);
    return r;
}

/* nvmlProcessInfo_t (v2 and v3 alike) */
typedef struct { unsigned pid; unsigned long long used; unsigned gpu_instance, compute_instance; } process_info;
typedef nvmlReturn_t (*processes_t)(nvmlDevice_t, unsigned *, process_info *);
typedef struct { processes_t real; nvmlDevice_t device; } processes_call;

static nvmlReturn_t fetch_processes(const void *call, void *buf, unsigned *n)
{
    const processes_call *c = call;
    return c->real(c->device, n, buf);
}

static nvmlReturn_t our_processes(const char *real_name, nvmlDevice_t device, unsigned *count, process_info *infos)
{
    processes_t real = (processes_t)gl_real(real_name);
    if (!real) return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (ordinal_of(device) < 0) return real(device, count, infos);
    processes_call call = { real, device };
    return our_entries(fetch_processes, &call, sizeof *infos, 0, infos, count, 0);
}

/* each version of each list, by the name it has in the real library (the same layout: nvmlProcessInfo_t) */
#define PROCESSES(name, real_name)                                                       \
    GL_EXPORT nvmlReturn_t name(nvmlDevice_t d, unsigned *n, process_info *p)            \
    {                                                                                    \
        return our_processes(real_name, d, n, p);                                        \
    }

PROCESSES(nvmlDeviceGetComputeRunningProcesses_v3, "nvmlDeviceGetComputeRunningProcesses_v3")
PROCESSES(nvmlDeviceGetComputeRunningProcesses_v2, "nvmlDeviceGetComputeRunningProcesses_v2")
PROCESSES(nvmlDeviceGetGraphicsRunningProcesses_v3, "nvmlDeviceGetGraphicsRunningProcesses_v3")
PROCESSES(nvmlDeviceGetGraphicsRunningProcesses_v2, "nvmlDeviceGetGraphicsRunningProcesses_v2")
PROCESSES(nvmlDeviceGetMPSComputeRunningProcesses_v3, "nvmlDeviceGetMPSComputeRunningProcesses_v3")
PROCESSES(nvmlDeviceGetMPSComputeRunningProcesses_v2, "nvmlDeviceGetMPSComputeRunningProcesses_v2")

/* The newer form of the same lists (nvmlProcessDetailList_v1_t of nvmlProcessDetail_v1_t), by version 1 only: a
 * later layout is passed through as NVML gives it rather than misread. */
typedef struct {
    unsigned pid;
    unsigned long long used;
    unsigned gpu_instance, compute_instance;
    unsigned long long used_cc_protected;
} process_detail;
typedef struct { unsigned version, mode, entries; process_detail *procs; } process_detail_list;
typedef nvmlReturn_t (*detail_list_t)(nvmlDevice_t, process_detail_list *);
typedef struct { detail_list_t real; nvmlDevice_t device; const process_detail_list *asked; } detail_list_call;
#define DETAIL_LIST_V1 ((unsigned)sizeof(process_detail_list) | (1u << 24))

static nvmlReturn_t fetch_details(const void *call, void *buf, unsigned *n)
{
    const detail_list_call *c = call;
    process_detail_list list = { c->asked->version, c->asked->mode, *n, buf };
    nvmlReturn_t r = c->real(c->device, &list);
    *n = list.entries;
    return r;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetRunningProcessDetailList(nvmlDevice_t device, process_detail_list *list)
{
    detail_list_t real = (detail_list_t)gl_real("nvmlDeviceGetRunningProcessDetailList");
    if (!real) return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!list) return NVML_ERROR_INVALID_ARGUMENT;
    if (ordinal_of(device) < 0 || list->version != DETAIL_LIST_V1) return real(device, list);
    detail_list_call call = { real, device, list };
    return our_entries(fetch_details, &call, sizeof *list->procs, 0, list->procs, &list->entries, 0);
}

/* ------------------------------------------------------------------- per-process utilization samples */
/* nvmlProcessUtilizationSample_t: the pid first */
typedef struct { unsigned pid; unsigned long long time_stamp; unsigned sm, mem, enc, dec; } utilization_sample;
typedef nvmlReturn_t (*samples_t)(nvmlDevice_t, utilization_sample *, unsigned *, unsigned long long);
typedef struct { samples_t real; nvmlDevice_t device; unsigned long long last_seen; } samples_call;

static nvmlReturn_t fetch_samples(const void *call, void *buf, unsigned *n)
{
    const samples_call *c = call;
    return c->real(c->device, buf, n, c->last_seen);
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device, utilization_sample *samples,
                                                       unsigned *count, unsigned long long last_seen)
{
    samples_t real = (samples_t)gl_real("nvmlDeviceGetProcessUtilization");
    if (!real) return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (ordinal_of(device) < 0) return real(device, samples, count, last_seen);
    samples_call call = { real, device, last_seen };
    return our_entries(fetch_samples, &call, sizeof *samples, 0, samples, count, 1);
}

/* nvmlProcessUtilizationInfo_v1_t (the pid after the time stamp) in nvmlProcessesUtilizationInfo_v1_t, by version 1
 * only: a later layout is passed through as NVML gives it rather than misread. */
typedef struct {
    unsigned long long time_stamp;
    unsigned pid, sm, mem, enc, dec, jpg, ofa;
} utilization_info;
typedef struct { unsigned version, count; unsigned long long last_seen; utilization_info *procs; } utilization_infos;
typedef nvmlReturn_t (*infos_t)(nvmlDevice_t, utilization_infos *);
typedef struct { infos_t real; nvmlDevice_t device; const utilization_infos *asked; } infos_call;
#define UTILIZATION_INFOS_V1 ((unsigned)sizeof(utilization_infos) | (1u << 24))

static nvmlReturn_t fetch_infos(const void *call, void *buf, unsigned *n)
{
    const infos_call *c = call;
    utilization_infos infos = { c->asked->version, *n, c->asked->last_seen, buf };
    nvmlReturn_t r = c->real(c->device, &infos);
    *n = infos.count;
    return r;
}

GL_EXPORT nvmlReturn_t nvmlDeviceGetProcessesUtilizationInfo(nvmlDevice_t device, utilization_infos *infos)
{
    infos_t real = (infos_t)gl_real("nvmlDeviceGetProcessesUtilizationInfo");
    if (!real) return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!infos) return NVML_ERROR_INVALID_ARGUMENT;
    if (ordinal_of(device) < 0 || infos->version != UTILIZATION_INFOS_V1) return real(device, infos);
    infos_call call = { real, device, infos };
    return our_entries(fetch_infos, &call, sizeof *infos->procs, offsetof(utilization_info, pid), infos->procs,
                       &infos->count, 1);
}
