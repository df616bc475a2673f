/* gpulab native mode: the libnvidia-ml.so.1 stand-in beside the native libcuda.so.1.
 *
 * NVML is passed through (real.c built with GL_NVML) except where it would contradict CUDA inside the
 * session: the devices are only the vGPU's GPUs, numbered in the vGPU's order as CUDA numbers them, and
 * a device's memory is the vGPU's: its quota as the total, what all its processes hold as used (read from
 * the vGPU's ledger, the figures the CUDA side charges, never sampled). So nvidia-smi, pynvml and the
 * memory probes of frameworks agree with cuMemGetInfo. The processes on a device are only the vGPU's, so
 * the list agrees with the memory used and a session does not see other users' programs. The stand-in
 * attaches to the ledger read-only (no slot, nothing charged) at nvmlInit. */
#include "gl_native.h"

#include <pthread.h>
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

/* ------------------------------------------------------------------- the processes on a device */
/* nvmlProcessInfo_t (v2 and v3 alike) */
typedef struct { unsigned pid; unsigned long long used; unsigned gpu_instance, compute_instance; } process_info;
typedef nvmlReturn_t (*processes_t)(nvmlDevice_t, unsigned *, process_info *);

/* Keeps, in order and in place, the entries of ``all`` (``n`` of ``size`` bytes, each starting with its pid) that are
 * the vGPU's processes: how many. */
static unsigned keep_ours(void *all, unsigned n, size_t size)
{
    unsigned kept = 0;
    for (unsigned i = 0; i < n; i++) {
        unsigned char *e = (unsigned char *)all + i * size;
        unsigned pid;
        memcpy(&pid, e, sizeof pid);
        if (gl_vgpu_has_pid(pid)) memmove((unsigned char *)all + kept++ * size, e, size);
    }
    return kept;
}

/* NVML's list for the device, less the processes that are not the vGPU's; NVML's rules for the count (in: room
 * in ``infos``; out: the entries, or those needed with NVML_ERROR_INSUFFICIENT_SIZE). */
static nvmlReturn_t our_processes(const char *real_name, nvmlDevice_t device, unsigned *count, process_info *infos)
{
    processes_t real = (processes_t)gl_real(real_name);
    if (!real) return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (ordinal_of(device) < 0) return real(device, count, infos);
    process_info *all = NULL;
    unsigned n = 0;
    nvmlReturn_t r = NVML_ERROR_INSUFFICIENT_SIZE;
    for (int tries = 0; tries < 4 && r == NVML_ERROR_INSUFFICIENT_SIZE; tries++) {  /* it may grow meanwhile */
        r = real(device, &n, all);  /* n: the room in all (none at first) */
        if (r == NVML_ERROR_INSUFFICIENT_SIZE) {
            free(all);
            n += 8;
            if (!(all = calloc(n, sizeof *all))) return NVML_ERROR_MEMORY;
        }
    }
    if (r != NVML_SUCCESS) {
        free(all);
        return r;
    }
    unsigned kept = all ? keep_ours(all, n, sizeof *all) : 0;
    if (*count < kept || (kept && !infos)) {
        *count = kept;
        free(all);
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (kept) memcpy(infos, all, kept * sizeof *all);
    *count = kept;
    free(all);
    return NVML_SUCCESS;
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
#define DETAIL_LIST_V1 ((unsigned)sizeof(process_detail_list) | (1u << 24))

GL_EXPORT nvmlReturn_t nvmlDeviceGetRunningProcessDetailList(nvmlDevice_t device, process_detail_list *list)
{
    detail_list_t real = (detail_list_t)gl_real("nvmlDeviceGetRunningProcessDetailList");
    if (!real) return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!list) return NVML_ERROR_INVALID_ARGUMENT;
    if (ordinal_of(device) < 0 || list->version != DETAIL_LIST_V1) return real(device, list);
    process_detail_list mine = { list->version, list->mode, 0, NULL };
    nvmlReturn_t r = NVML_ERROR_INSUFFICIENT_SIZE;
    for (int tries = 0; tries < 4 && r == NVML_ERROR_INSUFFICIENT_SIZE; tries++) {  /* it may grow meanwhile */
        r = real(device, &mine);
        if (r == NVML_ERROR_INSUFFICIENT_SIZE) {
            free(mine.procs);
            mine.entries += 8;
            if (!(mine.procs = calloc(mine.entries, sizeof *mine.procs))) return NVML_ERROR_MEMORY;
        }
    }
    if (r != NVML_SUCCESS) {
        free(mine.procs);
        return r;
    }
    unsigned kept = mine.procs ? keep_ours(mine.procs, mine.entries, sizeof *mine.procs) : 0;
    if (list->entries < kept || (kept && !list->procs)) {
        list->entries = kept;
        free(mine.procs);
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (kept) memcpy(list->procs, mine.procs, kept * sizeof *mine.procs);
    list->entries = kept;
    free(mine.procs);
    return NVML_SUCCESS;
}
