/* gpulab native mode: this process's place in its vGPU's ledger on the node's worker.
 *
 * At cuInit the shim connects to the worker's Unix socket (GPULAB_WORKER, GPULAB_TOKEN) and sends a
 * native hello. The worker checks the token as for a forwarded session, claims a slot of the vGPU's
 * ledger for this process (its context charged up front) and answers with key=value lines and the
 * ledger's memfd (SCM_RIGHTS), and the memfd of its GPU's board where the vGPU has a row (pacing.py: each
 * vGPU of the GPU's share, QoS and when it last wanted to launch, for bursting). The layout's offsets come
 * in that answer: gpu_worker/daemon/ledger.py and pacing.py own them. The socket stays open while the
 * process lives: when it closes, the worker frees the slot.
 *
 * Charging is ledger.py's Slot.charge in C: under the ledger's POSIX record lock (per process, so a
 * mutex orders this process's threads first) the live slots are summed and this slot's figure is
 * written only if the quota holds. Forwarded executors and native processes of one vGPU take the same
 * lock over the same pages, so no two of them together pass the quota.
 *
 * The socket carries two requests of the process's own: a thaw (the worker froze it) and, when the real driver
 * finds the GPU full, a request for room (the worker's eviction moves other vGPUs off it, tiering.py). */
#define _GNU_SOURCE
#include "gl_native.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../gl_wire.h"

#define LIVE 1u

static struct {
    pthread_mutex_t mu;       /* this process's threads, before the ledger's record lock */
    pthread_mutex_t once_mu;
    pthread_mutex_t sock_mu;  /* one request at a time on the worker's socket */
    int done;                 /* gl_attach ran in this process */
    CUresult status;
    int sock, memfd, board_fd;
    unsigned char *map, *board;
    size_t map_size, board_size;
    size_t board_rows, board_entry, board_row, b_qos, b_burst, b_waiting, b_share, b_wanted; /* pacing.py's layout */
    double busy_within;       /* pacing.py's BUSY_WITHIN */
    size_t slot, slots, header, slot_off, slot_size;
    size_t used_off, overhead_off, kernel_off, tier_off, pace_off, calls_off, launches_off;
    size_t quota_off, revoked_off, reason_off, reason_len_off, frozen_off, touch_off, pid_off;
    size_t on_gpu_off, on_gpus; /* this process's bytes on each of the vGPU's GPUs: where, for how many GPUs */
    size_t utilization_off;     /* the daemon's figure of how busy the vGPU kept its GPUs (0: a worker without it) */
    double depth, check_every;  /* pacing.py's DEPTH and CHECK_EVERY, from the worker */
    double eviction_wait;       /* the worker's: seconds it may take to make room on a full GPU (0: it does not) */
    unsigned time_every;        /* the worker's native_time_every: an unpaced process times one launch in this many */
    int gpus;
    char uuids[8][64];
    unsigned long long used; /* this process's bytes (mirrors its slot) */
    unsigned long long on_gpu[GL_VGPU_GPUS];  /* of them, on each of the vGPU's GPUs (mirrors its slot) */
} A = { .mu = PTHREAD_MUTEX_INITIALIZER, .once_mu = PTHREAD_MUTEX_INITIALIZER, .sock_mu = PTHREAD_MUTEX_INITIALIZER,
        .status = CUDA_ERROR_NOT_INITIALIZED, .sock = -1, .memfd = -1, .board_fd = -1 };

/* The byte every exported entry point reads before it jumps (exports): a static zero until attached, then the
 * "frozen" byte of this process's slot, which the worker sets when it freezes the process and clears when
 * it has restored it. The byte after it is the shim's: why this process cannot be frozen (gl_unfreezable). */
static unsigned char not_frozen;
volatile unsigned char *gl_frozen_at = &not_frozen;

static unsigned long long u64_at(size_t off) { unsigned long long v; memcpy(&v, A.map + off, 8); return v; }
static unsigned u32_at(size_t off) { unsigned v; memcpy(&v, A.map + off, 4); return v; }
static double f64_at(size_t off) { double v; memcpy(&v, A.map + off, 8); return v; }
static void put_u64(size_t off, unsigned long long v) { memcpy(A.map + off, &v, 8); }
static void put_f64(size_t off, double v) { memcpy(A.map + off, &v, 8); }
static void put_u32(size_t off, unsigned v) { memcpy(A.map + off, &v, 4); }

static int io_all(int fd, void *buf, size_t n, int writing)
{
    char *p = buf;
    while (n) {
        ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* The reply's header, with the memfds the worker attached to its first byte (up to two; -1 for those not sent). */
static int recv_header(int fd, unsigned char *hdr, int memfds[2])
{
    char ctl[CMSG_SPACE(2 * sizeof(int))];
    struct iovec iov = { hdr, GL_REP_HEADER_SIZE };
    struct msghdr mh = { 0 };
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl;
    mh.msg_controllen = sizeof ctl;
    ssize_t k;
    do k = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC); while (k < 0 && errno == EINTR);
    if (k <= 0) return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            memcpy(memfds, CMSG_DATA(c), (n < 2 ? n : 2) * sizeof(int));
            for (size_t i = 2; i < n; i++) {  /* more than this shim knows of: not kept */
                int extra;
                memcpy(&extra, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                close(extra);
            }
        }
    return (size_t)k < GL_REP_HEADER_SIZE ? io_all(fd, hdr + k, GL_REP_HEADER_SIZE - (size_t)k, 0) : 0;
}

static size_t key(const char *text, const char *name)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\n%s=", name);
    const char *p = strstr(text, pat);
    return p ? strtoull(p + strlen(pat), NULL, 10) : 0;
}

static void parse_gpus(const char *text)
{
    const char *p = strstr(text, "\ngpus=");
    if (!p) return;
    p += 6;
    while (*p && *p != '\n' && A.gpus < 8) {
        size_t n = strcspn(p, ",\n");
        if (n && n < sizeof A.uuids[0]) {
            memcpy(A.uuids[A.gpus], p, n);
            A.uuids[A.gpus++][n] = 0;
        }
        p += n + (p[n] == ',');
    }
}

/* Connect and send a hello with ``op``/``flags``; the socket, or -1 with *why set. */
static int open_socket(unsigned flags, const char **why)
{
    const char *addr = getenv("GPULAB_WORKER"), *token = getenv("GPULAB_TOKEN");
    if (!addr || strncmp(addr, "unix://", 7) != 0) {
        *why = "GPULAB_WORKER is not the worker's Unix socket (unix:///path): a native-mode vGPU needs its "
               "worker on this node";
        return -1;
    }
    struct sockaddr_un un = { .sun_family = AF_UNIX };
    if (strlen(addr + 7) >= sizeof un.sun_path) { *why = "GPULAB_WORKER's path is too long"; return -1; }
    strcpy(un.sun_path, addr + 7);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&un, sizeof un) != 0) {
        *why = "the worker's Unix socket does not answer (is the worker running?)";
        if (fd >= 0) close(fd);
        return -1;
    }
    struct timeval tv = { 30, 0 };  /* a token check takes milliseconds; a hung worker is not waited for */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    size_t tlen = token ? strlen(token) : 0;
    unsigned char frame[GL_REQ_HEADER_SIZE + GL_HELLO_SIZE];
    unsigned long long plen = GL_HELLO_SIZE + tlen, tl = tlen;
    unsigned op = GL_OP_NATIVE_HELLO, version = GL_PROTOCOL_VERSION, pid = (unsigned)getpid();
    memcpy(frame, &plen, 8);
    memcpy(frame + 8, &op, 4);
    memcpy(frame + 12, &flags, 4);
    memcpy(frame + GL_REQ_HEADER_SIZE, &version, 4);
    memcpy(frame + GL_REQ_HEADER_SIZE + 4, &pid, 4);
    memcpy(frame + GL_REQ_HEADER_SIZE + 8, &tl, 8);
    if (io_all(fd, frame, sizeof frame, 1) || (tlen && io_all(fd, (void *)token, tlen, 1))) {
        *why = "the worker closed the connection during the hello";
        close(fd);
        return -1;
    }
    return fd;
}

static void close_fds(int fds[2])
{
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0) close(fds[i]);
}

/* One request on the worker's socket and its answer (the process's threads take turns): 0, or -1 when the worker
 * is gone. The answer's payload goes to ``text``, NUL-ended (what does not fit is read and dropped). No
 * time-out: the worker bounds its own waits (a thaw's for room, eviction_wait for room). */
static int exchange(unsigned op, const char *body, size_t len, int *result, char *text, size_t text_len)
{
    unsigned char frame[GL_REQ_HEADER_SIZE], hdr[GL_REP_HEADER_SIZE];
    unsigned long long plen = len;
    unsigned flags = 0;
    int fds[2] = { -1, -1 }, rc = -1;
    memcpy(frame, &plen, 8);
    memcpy(frame + 8, &op, 4);
    memcpy(frame + 12, &flags, 4);
    pthread_mutex_lock(&A.sock_mu);
    struct timeval tv = { 0, 0 };
    setsockopt(A.sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (io_all(A.sock, frame, sizeof frame, 1) == 0 && (!len || io_all(A.sock, (void *)body, len, 1) == 0) &&
        recv_header(A.sock, hdr, fds) == 0) {
        close_fds(fds);  /* none come with these answers */
        memcpy(&plen, hdr, 8);
        memcpy(result, hdr + 8, 4);
        size_t keep = plen < text_len ? (size_t)plen : text_len - 1;
        rc = io_all(A.sock, text, keep, 0);
        text[rc ? 0 : keep] = 0;
        for (unsigned long long rest = plen - keep; rc == 0 && rest;) {
            char drop[256];
            size_t k = rest < sizeof drop ? (size_t)rest : sizeof drop;
            rc = io_all(A.sock, drop, k, 0);
            rest -= k;
        }
    }
    pthread_mutex_unlock(&A.sock_mu);
    return rc;
}

/* The GPU's board (pacing.py), where a slot's owner stamps when its vGPU last wanted to launch, and from which a
 * bursting vGPU works out the share it is lent. */
static void map_board(int fd, const char *text, unsigned flags)
{
    if (fd < 0) return;
    size_t size = key(text, "board_size"), rows = key(text, "board_rows"), entry = key(text, "board_entry");
    size_t row = key(text, "board_row"), fields[] = { key(text, "board_qos_off"), key(text, "board_burst_off"),
        key(text, "board_waiting_off"), key(text, "board_share_off"), key(text, "board_wanted_off") };
    int sound = size && entry && rows * entry <= size && row < rows;
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) sound = sound && fields[i] + 8 <= entry;
    void *board = flags & GL_NATIVE_OBSERVE || !sound ? MAP_FAILED
                                                       : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (board == MAP_FAILED) {
        close(fd);
        return;
    }
    A.board = board;
    A.board_size = size;
    A.board_fd = fd;
    A.board_rows = rows;
    A.board_entry = entry;
    A.board_row = row;
    A.b_qos = fields[0];
    A.b_burst = fields[1];
    A.b_waiting = fields[2];
    A.b_share = fields[3];
    A.b_wanted = fields[4];
    A.busy_within = key(text, "board_busy_within_us") / 1e6;
}

static CUresult attach_now(unsigned flags)
{
    const char *why = NULL;
    int fd = open_socket(flags, &why);
    if (fd < 0) {
        gl_log("native mode: %s", why);
        return CUDA_ERROR_NO_DEVICE;
    }
    unsigned char hdr[GL_REP_HEADER_SIZE];
    int fds[2] = { -1, -1 };
    char text[4096];
    int got = recv_header(fd, hdr, fds), memfd = fds[0];
    if (got) {
        close_fds(fds);
        gl_log("native mode: the worker closed the connection without answering the hello");
        close(fd);
        return CUDA_ERROR_NO_DEVICE;
    }
    unsigned long long plen;
    int result;
    unsigned rlen;
    memcpy(&plen, hdr, 8);
    memcpy(&result, hdr + 8, 4);
    memcpy(&rlen, hdr + 12, 4);
    if (plen >= sizeof text - 1 || io_all(fd, text + 1, plen, 0)) {
        gl_log("native mode: the worker's answer to the hello is malformed");
        close_fds(fds);
        close(fd);
        return CUDA_ERROR_NO_DEVICE;
    }
    text[0] = '\n';
    text[plen + 1] = 0;
    if (result != CUDA_SUCCESS) {
        gl_sayf("%.*s", (int)(rlen < plen ? rlen : plen), text + 1 + (plen - (rlen < plen ? rlen : plen)));
        close_fds(fds);
        close(fd);
        return result;
    }
    A.slot = key(text, "slot");
    A.slots = key(text, "slots");
    A.header = key(text, "header");
    A.slot_size = key(text, "slot_size");
    A.slot_off = A.header + A.slot * A.slot_size;
    A.used_off = A.slot_off + key(text, "used_off");
    A.overhead_off = A.slot_off + key(text, "overhead_off");
    A.calls_off = A.slot_off + key(text, "calls_off");
    A.launches_off = A.slot_off + key(text, "launches_off");
    A.kernel_off = A.slot_off + key(text, "kernel_off");
    A.tier_off = A.slot_off + key(text, "tier_off");
    A.pace_off = key(text, "pace_off");
    A.quota_off = key(text, "quota_off");
    A.revoked_off = key(text, "revoked_off");
    A.reason_off = key(text, "reason_off");
    A.reason_len_off = key(text, "reason_len_off");
    A.frozen_off = A.slot_off + key(text, "frozen_off");
    A.touch_off = A.slot_off + key(text, "touch_off");
    A.pid_off = key(text, "pid_off");  /* within any slot: the NVML stand-in looks at every slot's */
    A.on_gpu_off = A.slot_off + key(text, "on_gpu_off");
    A.on_gpus = key(text, "on_gpus");  /* 0 (a worker without the figures): none written */
    A.utilization_off = key(text, "utilization_off");
    A.depth = key(text, "depth_us") / 1e6;
    A.check_every = key(text, "check_every_us") / 1e6;
    A.eviction_wait = key(text, "eviction_wait_ms") / 1e3;
    A.time_every = (unsigned)key(text, "time_every");
    parse_gpus(text);
    A.map_size = A.header + A.slots * A.slot_size;
    A.map = memfd < 0 || !A.slot_size ? MAP_FAILED
                                      : mmap(NULL, A.map_size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (A.map == MAP_FAILED) {
        gl_log("native mode: the worker's ledger could not be mapped (%s)", memfd < 0 ? "no descriptor came"
                                                                                      : strerror(errno));
        A.map = NULL;
        close_fds(fds);
        close(fd);
        return CUDA_ERROR_NO_DEVICE;
    }
    A.sock = fd;
    A.memfd = memfd;
    map_board(fds[1], text, flags);
    if (flags & GL_NATIVE_OBSERVE) {  /* an observer owns no slot: it only reads */
        A.slot = A.slots;
        close(fd);
        A.sock = -1;
    } else if (A.frozen_off > A.slot_off) {
        gl_frozen_at = (volatile unsigned char *)(A.map + A.frozen_off);
    }
    gl_debug("native: attached to slot %zu of the vGPU's ledger (%d GPU(s), quota %llu)", A.slot, A.gpus,
             gl_quota());
    return CUDA_SUCCESS;
}

static void after_fork_child(void)
{
    /* the child is another process: it is not this slot's owner and attaches afresh at its cuInit */
    pthread_mutex_init(&A.mu, NULL);
    pthread_mutex_init(&A.once_mu, NULL);
    pthread_mutex_init(&A.sock_mu, NULL);
    if (A.sock >= 0) close(A.sock);
    if (A.map) munmap(A.map, A.map_size);
    if (A.memfd >= 0) close(A.memfd);
    if (A.board) munmap(A.board, A.board_size);
    if (A.board_fd >= 0) close(A.board_fd);
    A.sock = A.memfd = A.board_fd = -1;
    A.map = A.board = NULL;
    gl_frozen_at = &not_frozen;
    A.done = 0;
    A.used = 0;
    memset(A.on_gpu, 0, sizeof A.on_gpu);
    A.status = CUDA_ERROR_NOT_INITIALIZED;
    gl_log_reset_after_fork();
}

/* Attach once per process: with a slot of its own (the native shim), or to read only (the NVML stand-in). */
static CUresult attach(unsigned flags)
{
    pthread_mutex_lock(&A.once_mu);
    if (!A.done) {
        static int registered;
        if (!registered) pthread_atfork(NULL, NULL, after_fork_child);
        registered = 1;
        A.status = attach_now(flags);
        A.done = 1;
    }
    CUresult r = A.status;
    pthread_mutex_unlock(&A.once_mu);
    return r;
}

CUresult gl_attach(void) { return attach(0); }
CUresult gl_observe(void) { return attach(GL_NATIVE_OBSERVE); }

CUresult gl_attached_status(void) { return A.done ? A.status : CUDA_ERROR_NOT_INITIALIZED; }

unsigned long long gl_quota(void) { return A.map ? u64_at(A.quota_off) : 0; }

/* Whether ``pid`` (as the worker sees it) is one of the vGPU's processes: a native one, or an executor. */
int gl_vgpu_has_pid(unsigned pid)
{
    if (!A.map || !A.pid_off) return 0;
    for (size_t i = 0; i < A.slots; i++) {
        size_t off = A.header + i * A.slot_size;
        if (u32_at(off) == LIVE && u32_at(off + A.pid_off) == pid) return 1;
    }
    return 0;
}

int gl_vgpu_gpus(char uuids[][64], int max)
{
    int n = A.gpus < max ? A.gpus : max;
    for (int i = 0; i < n; i++) memcpy(uuids[i], A.uuids[i], 64);
    return n;
}

const char *gl_revoked(void)
{
    static char reason[GL_MAX_REASON + 1];
    if (!A.map || !u32_at(A.revoked_off)) return NULL;
    unsigned n = u32_at(A.reason_len_off);
    if (n > GL_MAX_REASON) n = GL_MAX_REASON;
    memcpy(reason, A.map + A.reason_off, n);
    reason[n] = 0;
    return reason;
}

unsigned long long gl_vgpu_charged(void)
{
    unsigned long long total = 0;
    if (!A.map) return A.used;
    for (size_t i = 0; i < A.slots; i++) {
        size_t off = A.header + i * A.slot_size;
        if (u32_at(off) == LIVE)
            total += u64_at(off + (A.used_off - A.slot_off)) + u64_at(off + (A.overhead_off - A.slot_off));
    }
    return total;
}

static void lock_ledger(int how)
{
    struct flock fl = { .l_type = (short)how, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
    while (fcntl(A.memfd, F_SETLKW, &fl) != 0 && errno == EINTR) {}
}

/* This process's bytes on the vGPU's GPU ``gpu`` (an ordinal out of range: the first) change by ``delta``, and so
 * do its bytes in all; never below 0. (A.mu held) */
static void add_used(int gpu, long long delta)
{
    int g = gpu < 0 || gpu >= GL_VGPU_GPUS ? 0 : gpu;
    A.on_gpu[g] = delta < 0 && A.on_gpu[g] < (unsigned long long)-delta ? 0 : A.on_gpu[g] + delta;
    A.used = delta < 0 && A.used < (unsigned long long)-delta ? 0 : A.used + delta;
    if (!A.map) return;
    if ((size_t)g < A.on_gpus) put_u64(A.on_gpu_off + 8 * (size_t)g, A.on_gpu[g]);
    put_u64(A.used_off, A.used);
    put_u64(A.tier_off, A.used);  /* a native process's memory is all hot: the panel's tiers read this */
}

int gl_charge(int gpu, size_t n, size_t *room)
{
    pthread_mutex_lock(&A.mu);
    unsigned long long quota = gl_quota();
    int ok = 1;
    if (!quota) {
        add_used(gpu, (long long)n);
    } else {
        lock_ledger(F_WRLCK);
        unsigned long long charged = gl_vgpu_charged();
        if (charged + n > quota) {
            ok = 0;
            if (room) *room = charged < quota ? (size_t)(quota - charged) : 0;
        } else {
            add_used(gpu, (long long)n);
        }
        lock_ledger(F_UNLCK);
    }
    pthread_mutex_unlock(&A.mu);
    gl_thaw_if_frozen();  /* the ledger's lock may have outlasted the worker's grace period: never enter a locked driver */
    return ok;
}

void gl_force_charge(int gpu, size_t n)
{
    pthread_mutex_lock(&A.mu);
    add_used(gpu, (long long)n);
    pthread_mutex_unlock(&A.mu);
}

void gl_uncharge(int gpu, size_t n)
{
    pthread_mutex_lock(&A.mu);
    add_used(gpu, -(long long)n);
    pthread_mutex_unlock(&A.mu);
}

void gl_oom_say(const char *fn, size_t n, size_t room)
{
    unsigned long long quota = gl_quota();
    gl_sayf("%s refused: %.1f MiB asked, %.1f MiB left of this vGPU's %.1f MiB quota (its processes use the "
            "rest) (CUDA_ERROR_OUT_OF_MEMORY)", fn, n / 1048576.0, room / 1048576.0, quota / 1048576.0);
}

/* The idle clock: the wall-clock time of this process's last allocation or launch (an executor stamps each
 * call's; the worker sees none of a native process's). A coarse clock: a few nanoseconds a call. */
void gl_touch(void)
{
    struct timespec t;
    if (!A.map || A.touch_off <= A.slot_off || clock_gettime(CLOCK_REALTIME_COARSE, &t)) return;
    put_f64(A.touch_off, (double)t.tv_sec + t.tv_nsec * 1e-9);
}

/* pacing.py's GPUBoard.wanted: this vGPU wanted to launch at ``now`` (CLOCK_MONOTONIC, Python's time.monotonic),
 * so the bursting vGPUs beside it on its GPU are not lent its share meanwhile. */
void gl_board_wanted(double now)
{
    unsigned long long bits;  /* one 8-byte store: a reader never sees half a stamp */
    memcpy(&bits, &now, 8);
    if (A.board)
        __atomic_store_n((unsigned long long *)(A.board + A.board_row * A.board_entry + A.b_wanted), bits,
                         __ATOMIC_RELAXED);
}

/* pacing.py's GPUBoard.waiting: this vGPU wants more kernel time than it gets (it borrows before lower QoS). */
void gl_board_waiting(int flag)
{
    if (A.board)
        __atomic_store_n((unsigned *)(A.board + A.board_row * A.board_entry + A.b_waiting), (unsigned)!!flag,
                         __ATOMIC_RELAXED);
}

static unsigned board_u32(size_t row, size_t off)
{
    return __atomic_load_n((unsigned *)(A.board + row * A.board_entry + off), __ATOMIC_RELAXED);
}

static double board_f64(size_t row, size_t off)
{
    unsigned long long bits = __atomic_load_n((unsigned long long *)(A.board + row * A.board_entry + off),
                                              __ATOMIC_RELAXED);
    double v;
    memcpy(&v, &bits, 8);
    return v;
}

/* pacing.py's GPUBoard.lent: the share lent to this vGPU at ``now``: the share of the GPU's vGPUs that wanted no
 * kernel time lately, split among the busy bursting vGPUs of its QoS; nothing while a busy bursting vGPU of
 * higher QoS still waits for more. */
double gl_board_lent(double now)
{
    if (!A.board) return 0.0;
    size_t me = A.board_row;
    double busy = board_f64(me, A.b_share);
    unsigned top = board_u32(me, A.b_qos), peers = 1;
    for (size_t i = 0; i < A.board_rows; i++) {
        if (i == me || !board_u32(i, 0) || now - board_f64(i, A.b_wanted) > A.busy_within) continue;
        busy += board_f64(i, A.b_share);
        if (board_u32(i, A.b_burst)) {
            unsigned qos = board_u32(i, A.b_qos);
            if (qos > top && board_u32(i, A.b_waiting)) return 0.0;  /* a higher QoS borrows first */
            peers += qos == top;
        }
    }
    return busy < 1.0 ? (1.0 - busy) / peers : 0.0;
}

void gl_count_launch(void)
{
    if (A.map) __atomic_fetch_add((unsigned long long *)(A.map + A.launches_off), 1, __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------------------ pacing (launch.c) */
/* ledger.py's PACE: share (GPUs, f64), burst (u32), QoS (u32), tokens, last refill, the vGPU's kernel time at
 * the last debit (f64 each), the kernel time of ended processes (f64) */
double gl_share(void) { return A.map ? f64_at(A.pace_off) : 0.0; }
int gl_burst(void) { return A.map ? (int)u32_at(A.pace_off + 8) : 0; }

int gl_vgpu_gpu_count(void) { return A.gpus ? A.gpus : 1; }
unsigned gl_time_every(void) { return A.time_every ? A.time_every : 1; }
double gl_pace_depth(void) { return A.depth; }
double gl_pace_check_every(void) { return A.check_every; }

static double kernel_total(void)
{
    double total = f64_at(A.pace_off + 40);
    for (size_t i = 0; i < A.slots; i++) {
        size_t off = A.header + i * A.slot_size;
        if (u32_at(off) == LIVE) total += f64_at(off + (A.kernel_off - A.slot_off));
    }
    return total;
}

void gl_publish_kernel_time(double kernel_time, double throttled, int waiting)
{
    if (!A.map) return;
    put_f64(A.kernel_off, kernel_time);
    put_f64(A.kernel_off + 8, throttled);
    put_u32(A.kernel_off + 16, (unsigned)waiting);
}

double gl_vgpu_utilization(void)
{
    return A.map && A.utilization_off ? f64_at(A.utilization_off) : -1.0;
}

/* pacing.py's Pacer._settle: refill the vGPU's bucket for the time passed (at ``rate``, up to ``share`` times
 * DEPTH seconds), debit the kernel time all its processes used since the last debit; the tokens left. */
GL_EXPORT double gpulab_native_settle(double now, double share, double rate, double depth)
{
    if (!A.map) return 0.0;
    lock_ledger(F_WRLCK);
    double tokens = f64_at(A.pace_off + 16), last = f64_at(A.pace_off + 24), seen = f64_at(A.pace_off + 32);
    double total = kernel_total();
    if (last == 0.0) {  /* a new bucket starts full */
        tokens = share * depth;
        last = now;
        seen = total;
    }
    double cap = (rate > share ? rate : share) * depth, passed = now - last > 0 ? now - last : 0.0;
    tokens = tokens + rate * passed;
    if (tokens > cap) tokens = cap;
    tokens -= total - seen > 0 ? total - seen : 0.0;
    put_f64(A.pace_off + 16, tokens);
    put_f64(A.pace_off + 24, now);
    put_f64(A.pace_off + 32, total);
    lock_ledger(F_UNLCK);
    return tokens;
}

void gl_reset_bucket(void)
{
    if (A.map && f64_at(A.pace_off + 24) != 0.0) {
        put_f64(A.pace_off + 16, 0.0);
        put_f64(A.pace_off + 24, 0.0);
        put_f64(A.pace_off + 32, 0.0);
    }
}

/* ------------------------------------------------------------------------ the warm tier (exports) */
void gl_unfreezable(unsigned char why)
{
    if (A.map && A.frozen_off > A.slot_off)
        __atomic_fetch_or(A.map + A.frozen_off + 1, why, __ATOMIC_RELAXED);
}

/* The worker froze this process, or is about to (the driver's checkpoint: its device memory goes to host
 * memory, its CUDA calls are locked). The worker sets the word, waits a grace period, then locks and
 * checkpoints; a call in between or after asks for a thaw: the worker stops the freeze, or reserves the
 * memory, restores and unlocks, clears the word and answers. Then the call goes on. */
void gl_thaw_if_frozen(void)
{
    if (!*gl_frozen_at || A.sock < 0) return;
    pthread_mutex_lock(&A.mu);
    if (*gl_frozen_at) {
        char text[GL_MAX_REASON + 64];
        int result = CUDA_SUCCESS;
        if (exchange(GL_OP_NATIVE_THAW, NULL, 0, &result, text, sizeof text) != 0)
            gl_log("native mode: the worker did not answer a thaw request; going on");
        else if (result != CUDA_SUCCESS)
            gl_sayf("%s", text);
        *gl_frozen_at = 0;  /* the worker cleared it, or is gone: either way the call goes on */
    }
    pthread_mutex_unlock(&A.mu);
}

/* ------------------------------------------------------------------------ a full GPU (memory.c) */
double gl_eviction_wait(void) { return A.sock < 0 ? 0.0 : A.eviction_wait; }
unsigned long long gl_process_used(void) { return A.used; }

/* Ask the worker to move other vGPUs off the vGPU's GPU ``ordinal`` until ``n`` bytes fit, within ``wait``
 * seconds (tiering.py's eviction, as for an executor): the bytes it freed, or 0 and its sentence in ``why``. */
unsigned long long gl_ask_room(int ordinal, size_t n, double wait, char *why, size_t why_len)
{
    char body[160];
    int len = snprintf(body, sizeof body, "{\"device\": %d, \"need\": %zu, \"wait\": %.3f}", ordinal, n, wait);
    int result = CUDA_ERROR_UNKNOWN;
    if (A.sock < 0 || exchange(GL_OP_NATIVE_ROOM, body, (size_t)len, &result, why, why_len) != 0) {
        snprintf(why, why_len, "the worker did not answer the request for room");
        return 0;
    }
    return result == CUDA_SUCCESS ? strtoull(why, NULL, 10) : 0;
}
