/* A test double of a GPU node's libnvidia-ml.so.1, for the NVML stand-in's tests on machines without a GPU.
 *
 * It shows the GPUs named in GPULAB_NVML_DOUBLE_GPUS (comma-separated UUIDs), each with
 * GPULAB_NVML_DOUBLE_MEMORY bytes of which a tenth is used and 1 MiB reserved, named "gpulab NVML double",
 * running the compute processes of GPULAB_NVML_DOUBLE_PROCESSES ("pid:bytes,pid:bytes", read at each call), with
 * a utilization sample for each; the card is 97 % busy (memory controller 41 %).
 * Only what the tests call is here; every other name is absent, as in an NVML too old to have it. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX 8

typedef struct { unsigned long long total, free, used; } mem_v1;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } mem_v2;
typedef struct { char uuid[80]; char bus[32]; char serial[32]; } gpu;

static gpu gpus[MAX];
static int count = -1;
static unsigned long long memory;

EXPORT int nvmlInit_v2(void)
{
    if (count >= 0) return 0;
    const char *list = getenv("GPULAB_NVML_DOUBLE_GPUS");
    const char *mem = getenv("GPULAB_NVML_DOUBLE_MEMORY");
    memory = mem ? strtoull(mem, NULL, 10) : 0;
    count = 0;
    while (list && *list && count < MAX) {
        size_t n = strcspn(list, ",");
        snprintf(gpus[count].uuid, sizeof gpus[count].uuid, "%.*s", (int)n, list);
        snprintf(gpus[count].bus, sizeof gpus[count].bus, "00000000:%02X:00.0", 0x10 + count);
        snprintf(gpus[count].serial, sizeof gpus[count].serial, "DOUBLE%04d", count);
        count++;
        list += n + (list[n] == ',');
    }
    return 0;
}

EXPORT int nvmlInit(void) { return nvmlInit_v2(); }
EXPORT int nvmlInitWithFlags(unsigned flags) { (void)flags; return nvmlInit_v2(); }
EXPORT int nvmlShutdown(void) { return 0; }

EXPORT int nvmlDeviceGetCount_v2(unsigned *n)
{
    if (count < 0) return 1;
    *n = (unsigned)count;
    return 0;
}

EXPORT int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **h)
{
    if (count < 0) return 1;
    if (i >= (unsigned)count) return 2;
    *h = &gpus[i];
    return 0;
}

static int find(const char *key, size_t field, void **h)
{
    if (count < 0) return 1;
    for (int i = 0; i < count; i++)
        if (!strcasecmp((const char *)&gpus[i] + field, key)) {
            *h = &gpus[i];
            return 0;
        }
    return 6;
}

EXPORT int nvmlDeviceGetHandleByUUID(const char *u, void **h) { return find(u, offsetof(gpu, uuid), h); }
EXPORT int nvmlDeviceGetHandleByPciBusId_v2(const char *b, void **h) { return find(b, offsetof(gpu, bus), h); }
EXPORT int nvmlDeviceGetHandleBySerial(const char *s, void **h) { return find(s, offsetof(gpu, serial), h); }

EXPORT int nvmlDeviceGetUUID(void *h, char *out, unsigned len)
{
    snprintf(out, len, "%s", ((gpu *)h)->uuid);
    return 0;
}

EXPORT int nvmlDeviceGetName(void *h, char *out, unsigned len)
{
    (void)h;
    snprintf(out, len, "gpulab NVML double");
    return 0;
}

/* the whole card's figures: busy with other users' work */
EXPORT int nvmlDeviceGetUtilizationRates(void *h, unsigned rates[2])
{
    (void)h;
    rates[0] = 97;
    rates[1] = 41;
    return 0;
}

EXPORT int nvmlDeviceGetMemoryInfo(void *h, mem_v1 *m)
{
    (void)h;
    m->total = memory;
    m->used = memory / 10;
    m->free = memory - m->used;
    return 0;
}

EXPORT int nvmlDeviceGetMemoryInfo_v2(void *h, mem_v2 *m)
{
    (void)h;
    m->total = memory;
    m->reserved = 1 << 20;
    m->used = memory / 10;
    m->free = memory - m->used - m->reserved;
    return 0;
}

typedef struct { unsigned pid; unsigned long long used; unsigned gpu_instance, compute_instance; } process_info;

/* NVML's rules: *n in, the room in p; out, the entries, or those needed with NVML_ERROR_INSUFFICIENT_SIZE (7). */
static int processes(unsigned *n, process_info *p)
{
    const char *list = getenv("GPULAB_NVML_DOUBLE_PROCESSES");
    process_info all[64];
    unsigned k = 0;
    while (list && *list && k < 64) {
        char *end;
        all[k].pid = (unsigned)strtoul(list, &end, 10);
        all[k].used = *end == ':' ? strtoull(end + 1, &end, 10) : 0;
        all[k].gpu_instance = all[k].compute_instance = 0xFFFFFFFFu;
        k++;
        list = *end == ',' ? end + 1 : end + strlen(end);
    }
    if (*n < k) {
        *n = k;
        return 7;
    }
    if (k) memcpy(p, all, k * sizeof *all);
    *n = k;
    return 0;
}

EXPORT int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned *n, process_info *p)
{
    (void)h;
    return processes(n, p);
}

/* nvml.h's nvmlProcessDetail_v1_t and nvmlProcessDetailList_v1_t, declared here on their own (not shared with
 * the stand-in, so that a layout mistake there shows) */
typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; unsigned long long cc; } process_detail;
typedef struct { unsigned version, mode, entries; process_detail *procs; } process_detail_list;

EXPORT int nvmlDeviceGetRunningProcessDetailList(void *h, process_detail_list *list)
{
    (void)h;
    process_info all[64];
    unsigned n = 64;
    processes(&n, all);
    if (list->entries < n) {
        list->entries = n;
        return 7;
    }
    for (unsigned i = 0; i < n; i++) {
        list->procs[i].pid = all[i].pid;
        list->procs[i].used = all[i].used;
        list->procs[i].gi = list->procs[i].ci = 0xFFFFFFFFu;
        list->procs[i].cc = 0;
    }
    list->entries = n;
    return 0;
}

/* nvml.h's nvmlProcessUtilizationSample_t: one per process of the list above, sampled at 1000 + its place (µs),
 * SM utilization = its MiB % 100, the other figures fixed; only samples newer than ``last`` (none: error 6) */
typedef struct { unsigned pid; unsigned long long ts; unsigned sm, mem, enc, dec; } utilization_sample;

static unsigned samples(utilization_sample *out, unsigned long long last)
{
    process_info all[64];
    unsigned n = 64, k = 0;
    processes(&n, all);
    for (unsigned i = 0; i < n; i++) {
        if (1000 + i <= last) continue;
        out[k].pid = all[i].pid;
        out[k].ts = 1000 + i;
        out[k].sm = (unsigned)((all[i].used >> 20) % 100);
        out[k].mem = 7, out[k].enc = out[k].dec = 0;
        k++;
    }
    return k;
}

EXPORT int nvmlDeviceGetProcessUtilization(void *h, utilization_sample *p, unsigned *n, unsigned long long last)
{
    (void)h;
    utilization_sample all[64];
    unsigned k = samples(all, last);
    if (!k) return 6;
    if (!p || *n < k) {
        *n = k;
        return 7;
    }
    memcpy(p, all, k * sizeof *all);
    *n = k;
    return 0;
}

/* nvml.h's nvmlProcessUtilizationInfo_v1_t (the pid after the time stamp) and nvmlProcessesUtilizationInfo_v1_t */
typedef struct { unsigned long long ts; unsigned pid, sm, mem, enc, dec, jpg, ofa; } utilization_info;
typedef struct { unsigned version, count; unsigned long long last; utilization_info *procs; } utilization_infos;

EXPORT int nvmlDeviceGetProcessesUtilizationInfo(void *h, utilization_infos *infos)
{
    (void)h;
    utilization_sample all[64];
    unsigned k = samples(all, infos->last);
    if (!k) return 6;
    if (!infos->procs || infos->count < k) {
        infos->count = k;
        return 7;
    }
    for (unsigned i = 0; i < k; i++) {
        utilization_info e = { all[i].ts, all[i].pid, all[i].sm, all[i].mem, 0, 0, 0, 0 };
        infos->procs[i] = e;
    }
    infos->count = k;
    return 0;
}
