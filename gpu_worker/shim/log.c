/* gpulab shim: what the shim tells the person running the program, on stderr.
 *
 * In a notebook, stderr is the cell's output: a student whose call fails reads there why
 * (the worker's reason, or the shim's own), so every line must be worth reading. Hence:
 *   - a reason is printed once; the same reason again within GL_SAY_REPEAT_S seconds is only
 *     counted, and mentioned with its count when it comes back later (a loop that fails
 *     10,000 times prints one line, a cell run again a minute later shows it again);
 *   - what only a developer needs (e.g. libraries probing optional entry points, which fail
 *     on every healthy run) goes to gl_debug, printed only with GPULAB_DEBUG=1;
 *   - GPULAB_QUIET=1 silences everything but debug lines. The program always gets the exact
 *     CUresult whatever is printed. */
#include "gl_shim.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define GL_SAY_SLOTS 64
#define GL_SAY_REPEAT_S 10

static int env_flag(const char *name, int *cache)
{
    int v = __atomic_load_n(cache, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *s = getenv(name);
        v = s && *s && strcmp(s, "0") != 0;
        __atomic_store_n(cache, v, __ATOMIC_RELAXED);
    }
    return v;
}

static int quiet(void) { static int c = -1; return env_flag("GPULAB_QUIET", &c); }
static int debug(void) { static int c = -1; return env_flag("GPULAB_DEBUG", &c); }

/* One line on stderr; a reason from the worker never breaks the line or the terminal. */
static void emit(const char *prefix, const char *text, size_t n, const char *suffix)
{
    char line[1200];
    size_t k = 0;
    for (size_t i = 0; i < n && k < sizeof line - 1; i++)
        line[k++] = ((unsigned char)text[i] < 0x20 || text[i] == 0x7f) ? ' ' : text[i];
    line[k] = 0;
    fprintf(stderr, "%s%s%s\n", prefix, line, suffix);
    fflush(stderr);
}

static void emit_formatted(const char *prefix, const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    emit(prefix, line, strlen(line), "");
}

void gl_log(const char *fmt, ...)
{
    if (quiet()) return;
    va_list ap;
    va_start(ap, fmt);
    emit_formatted("gpulab: ", fmt, ap);
    va_end(ap);
}

void gl_debug(const char *fmt, ...)
{
    if (!debug()) return;
    va_list ap;
    va_start(ap, fmt);
    emit_formatted("gpulab debug: ", fmt, ap);
    va_end(ap);
}

/* --------------------------------------------------------------- reasons, deduplicated */
static struct { uint64_t hash; double last; unsigned long repeats; } said[GL_SAY_SLOTS];
static pthread_mutex_t said_mu = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* fork(): another thread of the parent may have held the lock */
void gl_log_reset_after_fork(void) { pthread_mutex_init(&said_mu, NULL); }

void gl_say(const char *text, size_t n)
{
    if (n == 0) return;
    gl_debug("reason: %.*s", (int)n, text);
    if (quiet()) return;
    uint64_t h = 1469598103934665603ull;  /* FNV-1a: identical reasons, identical slot */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)text[i]) * 1099511628211ull;
    h |= 1;  /* 0 marks a free slot */
    double t = now_s();
    unsigned long repeats = 0;
    pthread_mutex_lock(&said_mu);
    int slot = -1, spare = -1;  /* spare: a free slot, else the one shown longest ago */
    for (int i = 0; i < GL_SAY_SLOTS; i++) {
        if (said[i].hash == h) { slot = i; break; }
        if (spare < 0 || (said[spare].hash != 0 && (said[i].hash == 0 || said[i].last < said[spare].last)))
            spare = i;
    }
    if (slot >= 0 && t - said[slot].last < GL_SAY_REPEAT_S) {
        said[slot].repeats++;
        pthread_mutex_unlock(&said_mu);
        return;
    }
    if (slot < 0) {
        slot = spare;
        said[slot].hash = h;
        said[slot].repeats = 0;
    }
    repeats = said[slot].repeats;
    said[slot].repeats = 0;
    said[slot].last = t;
    pthread_mutex_unlock(&said_mu);
    char suffix[64] = "";
    if (repeats)
        snprintf(suffix, sizeof suffix, " (and %lu more time%s since it was last shown)", repeats,
                 repeats == 1 ? "" : "s");
    emit("gpulab: ", text, n, suffix);
}

void gl_sayf(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    gl_say(line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* ------------------------------------------------------------ what the shim itself refuses */
CUresult gl_unsupported(const char *name, int *once)
{
    if (!__atomic_exchange_n(once, 1, __ATOMIC_RELAXED))
        gl_sayf("%s refused: a gpulab vGPU does not support this function (CUDA_ERROR_NOT_SUPPORTED)", name);
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult gl_probed(const char *name)
{
    gl_debug("%s: not offered by a gpulab vGPU (CUDA_ERROR_NOT_SUPPORTED; libraries probe it and go on)", name);
    return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult gl_unsupported_arg(const char *fn, const char *what)
{
    gl_sayf("%s refused: %s is not supported on a gpulab vGPU (CUDA_ERROR_NOT_SUPPORTED)", fn, what);
    return CUDA_ERROR_NOT_SUPPORTED;
}
