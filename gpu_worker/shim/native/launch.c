/* gpulab native mode: launches, for the vGPU's compute share.
 *
 * The rule is pacing.py's, enforced here in-process: the vGPU's token bucket (in its ledger, shared by
 * all its processes, native and forwarded) fills at the share (plus, for a vGPU that may burst, the share
 * its GPU's board says is spare and lent to it) and is debited with the kernel time its processes
 * measured; a process that finds it empty sleeps before its next launch. A native process
 * measures its own kernels with a pair of events around each launch, read back without waiting at
 * later launches, and publishes the sum in its slot, where the other processes' debits find it.
 *
 * When the share is the whole GPU (or more) nothing is paced, and the bucket is looked at once per CHECK_EVERY;
 * the vGPU's kernel time is then estimated: one launch in each run of N (the worker's native_time_every, at a
 * random place in the run, so that a loop's period cannot bias it) is timed and counted N times. A stream
 * being captured into a graph is never given events (they would become nodes). */
#define _GNU_SOURCE
#include "gl_native.h"

#include <pthread.h>
#include <time.h>
#include <unistd.h>

#define PENDING 256

typedef CUresult (*event_create_t)(CUevent *, unsigned);
typedef CUresult (*event_record_t)(CUevent, CUstream);
typedef CUresult (*event_query_t)(CUevent);
typedef CUresult (*event_sync_t)(CUevent);
typedef CUresult (*event_elapsed_t)(float *, CUevent, CUevent);
typedef CUresult (*event_destroy_t)(CUevent);
typedef CUresult (*capturing_t)(CUstream, int *);

static struct {
    pthread_mutex_t mu;
    double next_check, kernel_time, throttled;
    int paced;
    int sampling;          /* not paced, attached: launches are timed one in gl_time_every() */
    CUevent start[PENDING], end[PENDING];
    double weight[PENDING];  /* the launches each timed one stands for */
    unsigned head, count;
    unsigned left, pick;     /* launches left in the current run, and which of them is timed */
    unsigned long long rng;
} P = { .mu = PTHREAD_MUTEX_INITIALIZER };

static __thread double launch_weight = 1.0;  /* gl_pace_before's for the launch gl_pace_after records */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

typedef CUresult (*capture_mode_t)(int *);
#define CU_STREAM_CAPTURE_MODE_RELAXED 2

static CUresult elapsed(float *ms, CUevent a, CUevent b)
{
    static event_elapsed_t fn;
    if (!fn) {  /* cuda.h 13 maps the name to _v2; an older driver has only the first */
        fn = GL_REAL(event_elapsed_t, "cuEventElapsedTime_v2");
        float probe;
        if (fn(&probe, NULL, NULL) == CUDA_ERROR_NOT_FOUND) fn = GL_REAL(event_elapsed_t, "cuEventElapsedTime");
    }
    return fn(ms, a, b);
}

/* Event queries are "unsafe" while any thread captures a graph in the default (global) mode: they would
 * invalidate the capture. Ours never touch a captured stream, so this thread asks for relaxed mode meanwhile. */
static void collect_events(int wait);

static void collect(int wait)
{
    if (!P.count) return;
    int mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    capture_mode_t exchange = GL_REAL(capture_mode_t, "cuThreadExchangeStreamCaptureMode");
    int swapped = exchange(&mode) == CUDA_SUCCESS;
    collect_events(wait);
    if (swapped) exchange(&mode);
}

/* Kernel time of the launches whose end event has passed, oldest first; ``wait``: the oldest at least. (mu held) */
static void collect_events(int wait)
{
    while (P.count) {
        unsigned i = P.head;
        CUresult q = wait ? GL_REAL(event_sync_t, "cuEventSynchronize")(P.end[i])
                          : GL_REAL(event_query_t, "cuEventQuery")(P.end[i]);
        if (q == CUDA_ERROR_NOT_READY) break;
        float ms = 0;
        if (q == CUDA_SUCCESS && elapsed(&ms, P.start[i], P.end[i]) == CUDA_SUCCESS)
            P.kernel_time += ms / 1000.0 * P.weight[i];
        GL_REAL(event_destroy_t, "cuEventDestroy_v2")(P.start[i]);
        GL_REAL(event_destroy_t, "cuEventDestroy_v2")(P.end[i]);
        P.head = (P.head + 1) % PENDING;
        P.count--;
        wait = 0;
    }
}

/* pacing.py's Pacer.admit: wait while the vGPU is over its share. (mu held) */
static void admit(void)
{
    double now = now_s();
    if (now < P.next_check) return;
    P.next_check = now + gl_pace_check_every();
    gl_board_wanted(now);
    collect(0);
    double share = gl_share();
    if (share >= gl_vgpu_gpu_count() || share <= 0.0) {
        P.paced = 0;
        P.sampling = share > 0.0;
        gl_publish_kernel_time(P.kernel_time, P.throttled, 0);
        gl_reset_bucket();  /* a bucket from a smaller share starts afresh if one comes back */
        return;
    }
    P.paced = 1;
    P.sampling = 0;
    int waiting = 0, burst = gl_burst();
    for (;;) {
        gl_publish_kernel_time(P.kernel_time, P.throttled, waiting);
        double rate = share + (burst ? gl_board_lent(now) : 0.0);  /* the spare share of an idle GPU, lent */
        double tokens = gpulab_native_settle(now, share, rate, gl_pace_depth());
        if (tokens >= 0) break;
        if (!waiting) gl_board_waiting(1);
        waiting = 1;
        double pause = -tokens / share;
        pause = pause < 0.001 ? 0.001 : pause > 0.02 ? 0.02 : pause;
        struct timespec ts = { 0, (long)(pause * 1e9) };
        nanosleep(&ts, NULL);
        double later = now_s();
        P.throttled += later - now;
        now = later;
        gl_board_wanted(now);
        collect(0);
    }
    if (waiting) gl_board_waiting(0);
    gl_publish_kernel_time(P.kernel_time, P.throttled, 0);
}

static CUstream record_stream(CUstream s, int per_thread)
{
    return per_thread && !s ? CU_STREAM_PER_THREAD : s;
}

int gl_capture_status(CUstream s, int per_thread)
{
    int status = 0;
    return GL_REAL(capturing_t, per_thread ? "cuStreamIsCapturing_ptsz" : "cuStreamIsCapturing")(s, &status) ==
                   CUDA_SUCCESS
               ? status
               : -1;
}

/* Whether a launch on ``rs`` is recorded into a graph rather than run (or the driver cannot say). */
static int capturing(CUstream rs, int per_thread) { return gl_capture_status(rs, per_thread) != 0; }

/* Whether this launch is the timed one of its run of ``n`` (a random place in each run). (mu held) */
static int sampled(unsigned n)
{
    if (n <= 1) return 1;
    if (!P.left) {
        if (!P.rng)  /* any nonzero seed, different per process */
            P.rng = (unsigned long long)(now_s() * 1e6) ^ ((unsigned long long)getpid() << 32) ^ 0x9e3779b97f4a7c15ull;
        P.rng ^= P.rng << 13;  /* xorshift64 */
        P.rng ^= P.rng >> 7;
        P.rng ^= P.rng << 17;
        P.left = n;
        P.pick = (unsigned)(P.rng % n);
    }
    return --P.left == P.pick;
}

void gl_pace_before(CUstream s, int per_thread, CUevent *start)
{
    *start = NULL;
    gl_count_launch();
    CUstream rs = record_stream(s, per_thread);
    /* a captured launch is paced when its graph is launched; looked at first only while this process is
     * paced, so that a vGPU with whole GPUs pays no extra driver call per launch */
    int looked = __atomic_load_n(&P.paced, __ATOMIC_RELAXED);
    if (looked && capturing(rs, per_thread)) return;
    pthread_mutex_lock(&P.mu);
    admit();
    int timed = P.paced;
    double weight = 1.0;
    if (!timed && P.sampling) {
        unsigned n = gl_time_every();
        timed = sampled(n);
        weight = n;
    }
    pthread_mutex_unlock(&P.mu);
    gl_thaw_if_frozen();  /* the wait may have outlasted the worker's grace period: never enter a locked driver */
    if (!timed || (!looked && capturing(rs, per_thread))) return;
    CUevent e;
    if (GL_REAL(event_create_t, "cuEventCreate")(&e, 0) != CUDA_SUCCESS) return;
    if (GL_REAL(event_record_t, per_thread ? "cuEventRecord_ptsz" : "cuEventRecord")(e, rs) != CUDA_SUCCESS) {
        GL_REAL(event_destroy_t, "cuEventDestroy_v2")(e);
        return;
    }
    *start = e;
    launch_weight = weight;
}

void gl_pace_after(CUstream s, int per_thread, CUevent start)
{
    if (!start) return;
    CUevent e;
    if (GL_REAL(event_create_t, "cuEventCreate")(&e, 0) != CUDA_SUCCESS ||
        GL_REAL(event_record_t, per_thread ? "cuEventRecord_ptsz" : "cuEventRecord")(e, record_stream(s, per_thread))
            != CUDA_SUCCESS) {
        GL_REAL(event_destroy_t, "cuEventDestroy_v2")(start);
        return;
    }
    pthread_mutex_lock(&P.mu);
    if (P.count == PENDING) collect(1);  /* the oldest must end before one more is timed */
    unsigned i = (P.head + P.count) % PENDING;
    P.start[i] = start;
    P.end[i] = e;
    P.weight[i] = launch_weight;
    P.count++;
    pthread_mutex_unlock(&P.mu);
}

/* ------------------------------------------------------------------- the hooked launches */
typedef CUresult (*launch_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void **, void **);
typedef CUresult (*coop_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           CUstream, void **);
typedef struct { unsigned grid[3], block[3], shared; CUstream stream; void *attrs; unsigned nattrs; } launch_config;
typedef CUresult (*launch_ex_t)(const launch_config *, CUfunction, void **, void **);
typedef CUresult (*graph_launch_t)(CUgraphExec, CUstream);

#define PACED(stream, per_thread, call)                                                              \
    do {                                                                                             \
        CUresult r_ = gl_entry_check();                                                              \
        if (r_ != CUDA_SUCCESS) return r_;                                                           \
        CUevent start_;                                                                              \
        gl_pace_before((stream), (per_thread), &start_);                                             \
        r_ = (call);                                                                                 \
        if (r_ == CUDA_SUCCESS) gl_pace_after((stream), (per_thread), start_);                       \
        else if (start_) GL_REAL(event_destroy_t, "cuEventDestroy_v2")(start_);                      \
        return r_;                                                                                   \
    } while (0)

#define LAUNCH_KERNEL(name, real_name, per_thread)                                                            \
    GL_EXPORT CUresult name(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,     \
                            unsigned bz, unsigned shared, CUstream s, void **params, void **extra)             \
    {                                                                                                         \
        PACED(s, per_thread, GL_REAL(launch_t, real_name)(f, gx, gy, gz, bx, by, bz, shared, s, params, extra)); \
    }

LAUNCH_KERNEL(cuLaunchKernel, "cuLaunchKernel", 0)
LAUNCH_KERNEL(cuLaunchKernel_ptsz, "cuLaunchKernel_ptsz", 1)

#define LAUNCH_COOPERATIVE(name, real_name, per_thread)                                                       \
    GL_EXPORT CUresult name(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,     \
                            unsigned bz, unsigned shared, CUstream s, void **params)                           \
    {                                                                                                         \
        PACED(s, per_thread, GL_REAL(coop_t, real_name)(f, gx, gy, gz, bx, by, bz, shared, s, params));         \
    }

LAUNCH_COOPERATIVE(cuLaunchCooperativeKernel, "cuLaunchCooperativeKernel", 0)
LAUNCH_COOPERATIVE(cuLaunchCooperativeKernel_ptsz, "cuLaunchCooperativeKernel_ptsz", 1)

#define LAUNCH_EX(name, real_name, per_thread)                                                                \
    GL_EXPORT CUresult name(const launch_config *c, CUfunction f, void **params, void **extra)                \
    {                                                                                                         \
        if (!c) {                                                                                             \
            CUresult r_ = gl_entry_check();                                                                   \
            return r_ != CUDA_SUCCESS ? r_ : GL_REAL(launch_ex_t, real_name)(c, f, params, extra);           \
        }                                                                                                     \
        PACED(c->stream, per_thread, GL_REAL(launch_ex_t, real_name)(c, f, params, extra));                   \
    }

LAUNCH_EX(cuLaunchKernelEx, "cuLaunchKernelEx", 0)
LAUNCH_EX(cuLaunchKernelEx_ptsz, "cuLaunchKernelEx_ptsz", 1)

/* A graph's memory nodes reserve memory at its launch: charged before it (refused past the quota), trued up after;
 * where the driver finds the GPU full, the worker is asked for room as for an allocation. */
#define GRAPH_LAUNCH(name, real_name, per_thread)                                                             \
    GL_EXPORT CUresult name(CUgraphExec g, CUstream s)                                                        \
    {                                                                                                         \
        CUresult r_ = gl_entry_check();                                                                       \
        if (r_ != CUDA_SUCCESS) return r_;                                                                    \
        size_t bytes_[GL_VGPU_GPUS];                                                                          \
        r_ = gl_charge_graph_launch(g, bytes_);                                                               \
        if (r_ != CUDA_SUCCESS) return r_;                                                                    \
        CUevent start_;                                                                                       \
        gl_pace_before(s, per_thread, &start_);                                                               \
        r_ = GL_REAL(graph_launch_t, real_name)(g, s);                                                        \
        double deadline_ = 0;                                                                                 \
        for (int round_ = 0; r_ == CUDA_ERROR_OUT_OF_MEMORY && gl_graph_room_made(bytes_, round_, &deadline_);\
             round_++)                                                                                        \
            r_ = GL_REAL(graph_launch_t, real_name)(g, s);                                                    \
        if (r_ == CUDA_SUCCESS) gl_pace_after(s, per_thread, start_);                                         \
        else if (start_) GL_REAL(event_destroy_t, "cuEventDestroy_v2")(start_);                              \
        gl_graph_launched(bytes_);                                                                            \
        return r_;                                                                                            \
    }

GRAPH_LAUNCH(cuGraphLaunch, "cuGraphLaunch", 0)
GRAPH_LAUNCH(cuGraphLaunch_ptsz, "cuGraphLaunch_ptsz", 1)
