/* gpulab shim, hand-written part: the connection to the worker, framing, the current
 * context, cuGetProcAddress, module image sizes, unified-address copies and launches.
 * Everything else is generated into gl_generated.c from gpu_worker/api_table.py.
 */
#define _GNU_SOURCE
#include "gl_shim.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

/* ------------------------------------------------------------------ logging */
static void gl_log(const char *fmt, ...)
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

/* --------------------------------------------------------------- connection */
static struct {
    pthread_mutex_t mu;
    int fd;
    int state;              /* 0 not connected, 1 connected, -1 failed for good */
    CUresult dead_error;    /* what every call returns once state == -1 */
    pid_t pid;              /* the process that owns fd (a forked child starts afresh) */
    char *sbuf; size_t slen, scap;
    char *rbuf; size_t rlen, rcap;
    uintptr_t server_ctx;   /* context the worker believes is current */
    int server_ctx_known;
} C = { PTHREAD_MUTEX_INITIALIZER, -1, 0, CUDA_SUCCESS, 0, NULL, 0, 0, NULL, 0, 0, 0, 0 };

static __thread uintptr_t tls_ctx[32];
static __thread int tls_depth;

static uintptr_t current_ctx(void) { return tls_depth ? tls_ctx[tls_depth - 1] : 0; }

static void mark_dead(CUresult err, const char *why)
{
    if (C.state != -1)
        gl_log("connection to the worker lost (%s): CUDA calls now return %d", why, err);
    C.state = -1;
    C.dead_error = err;
    if (C.fd >= 0) close(C.fd);
    C.fd = -1;
    C.slen = 0;
}

static int write_all_iov(struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = iov;
        mh.msg_iovlen = (size_t)n;
        ssize_t w = sendmsg(C.fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) { w -= (ssize_t)iov->iov_len; iov++; n--; }
        if (n > 0) { iov->iov_base = (char *)iov->iov_base + w; iov->iov_len -= (size_t)w; }
    }
    return 0;
}

static int read_all(void *p, size_t n)
{
    char *c = p;
    while (n > 0) {
        ssize_t r = recv(C.fd, c, n, 0);
        if (r == 0) { errno = ECONNRESET; return -1; }
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        c += r; n -= (size_t)r;
    }
    return 0;
}

static void reserve(size_t extra)
{
    if (C.slen + extra <= C.scap) return;
    size_t cap = C.scap ? C.scap : 65536;
    while (cap < C.slen + extra) cap *= 2;
    char *nb = realloc(C.sbuf, cap);
    if (!nb) { gl_log("out of host memory for the send buffer"); abort(); }
    C.sbuf = nb; C.scap = cap;
}

static int flush_with(const void *bulk, size_t bulk_len)
{
    struct iovec iov[2];
    int n = 0;
    if (C.slen) { iov[n].iov_base = C.sbuf; iov[n].iov_len = C.slen; n++; }
    if (bulk_len) { iov[n].iov_base = (void *)bulk; iov[n].iov_len = bulk_len; n++; }
    if (n == 0) return 0;
    int rc = write_all_iov(iov, n);
    C.slen = 0;
    return rc;
}

static int parse_tcp(const char *hostport, struct sockaddr_storage *sa, socklen_t *len)
{
    char host[256];
    const char *colon = strrchr(hostport, ':');
    if (!colon || (size_t)(colon - hostport) >= sizeof host) return -1;
    memcpy(host, hostport, (size_t)(colon - hostport));
    host[colon - hostport] = 0;
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, colon + 1, &hints, &res) != 0 || !res) return -1;
    memcpy(sa, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* Open the session: connect, send HELLO with the token, read the verdict. */
static CUresult connect_worker(void)
{
    const char *addr = getenv("GPULAB_WORKER");
    const char *token = getenv("GPULAB_TOKEN");
    if (!addr || !*addr) {
        gl_log("GPULAB_WORKER is not set (expected tcp://host:port or unix:///path)");
        mark_dead(CUDA_ERROR_NO_DEVICE, "no worker address");
        return C.dead_error;
    }
    struct sockaddr_storage sa;
    socklen_t salen = 0;
    int tcp = 0;
    memset(&sa, 0, sizeof sa);
    if (strncmp(addr, "unix://", 7) == 0) {
        struct sockaddr_un *un = (struct sockaddr_un *)&sa;
        un->sun_family = AF_UNIX;
        if (strlen(addr + 7) >= sizeof un->sun_path) goto bad_addr;
        strcpy(un->sun_path, addr + 7);
        salen = sizeof *un;
    } else if (strncmp(addr, "tcp://", 6) == 0) {
        if (parse_tcp(addr + 6, &sa, &salen) != 0) goto bad_addr;
        tcp = 1;
    } else {
        goto bad_addr;
    }
    int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, salen) != 0) {
        gl_log("cannot reach the worker at %s: %s", addr, strerror(errno));
        if (fd >= 0) close(fd);
        mark_dead(CUDA_ERROR_NO_DEVICE, "connect failed");
        return C.dead_error;
    }
    if (tcp) {
        int one = 1, idle = 5, intvl = 1, cnt = 3;
        unsigned int user_timeout = 10000;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
    }
    C.fd = fd;
    C.state = 1;
    C.pid = getpid();
    C.server_ctx_known = 0;

    /* HELLO: u32 protocol version, u32 pid, u64 token length, token */
    size_t tlen = token ? strlen(token) : 0;
    unsigned char hdr[GL_REQ_HEADER + 16];
    uint64_t plen = 16 + tlen;
    uint32_t op = GL_OP_HELLO, flags = GL_FLAG_REPLY, ver = GL_PROTOCOL_VERSION, pid = (uint32_t)C.pid;
    uint64_t tl = tlen;
    memcpy(hdr, &plen, 8); memcpy(hdr + 8, &op, 4); memcpy(hdr + 12, &flags, 4);
    memcpy(hdr + 16, &ver, 4); memcpy(hdr + 20, &pid, 4); memcpy(hdr + 24, &tl, 8);
    struct iovec iov[2] = { { hdr, sizeof hdr }, { (void *)(token ? token : ""), tlen } };
    unsigned char rep[GL_REP_HEADER];
    if (write_all_iov(iov, tlen ? 2 : 1) != 0 || read_all(rep, sizeof rep) != 0) {
        gl_log("the worker at %s closed the session during the handshake", addr);
        mark_dead(CUDA_ERROR_NO_DEVICE, "handshake failed");
        return C.dead_error;
    }
    uint64_t rlen; int32_t res;
    memcpy(&rlen, rep, 8); memcpy(&res, rep + 8, 4);
    char msg[512] = "";
    if (rlen > 0 && rlen < sizeof msg) {
        if (read_all(msg, rlen) != 0) rlen = 0;
        msg[rlen] = 0;
    }
    if (res != CUDA_SUCCESS) {
        gl_log("the worker refused the session: %s", msg[0] ? msg : "no reason given");
        mark_dead(res, "session refused");
        return C.dead_error;
    }
    return CUDA_SUCCESS;
bad_addr:
    gl_log("GPULAB_WORKER=%s is not tcp://host:port or unix:///path", addr);
    mark_dead(CUDA_ERROR_NO_DEVICE, "bad worker address");
    return C.dead_error;
}

static void put_header(size_t at, uint64_t plen, uint32_t op, uint32_t flags)
{
    memcpy(C.sbuf + at, &plen, 8);
    memcpy(C.sbuf + at + 8, &op, 4);
    memcpy(C.sbuf + at + 12, &flags, 4);
}

static void frame_begin(gl_msg *m, unsigned op, int want_reply)
{
    reserve(GL_REQ_HEADER);
    m->start = C.slen;
    put_header(C.slen, 0, op, want_reply ? GL_FLAG_REPLY : 0);
    C.slen += GL_REQ_HEADER;
}

/* fork(): the child must not use the parent's session (its handles and memory belong to the
 * parent), nor inherit a lock another thread held. It starts unconnected, like a fresh process. */
static void atfork_prepare(void) { pthread_mutex_lock(&C.mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&C.mu); }
static void atfork_child(void)
{
    if (C.fd >= 0) close(C.fd);
    C.fd = -1;
    C.state = 0;
    C.slen = 0;
    C.server_ctx_known = 0;
    pthread_mutex_unlock(&C.mu);
}

__attribute__((constructor)) static void gl_init(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

CUresult gl_begin(gl_msg *m, unsigned op, int want_reply)
{
    memset(m, 0, sizeof *m);
    pthread_mutex_lock(&C.mu);
    if (C.state == 0) connect_worker();
    if (C.state != 1) {
        CUresult e = C.dead_error;
        pthread_mutex_unlock(&C.mu);
        return e;
    }
    uintptr_t ctx = current_ctx();
    if (!C.server_ctx_known || C.server_ctx != ctx) {
        gl_msg sc;
        frame_begin(&sc, GL_OP_SET_CONTEXT, 0);
        gl_put_u64(&sc, (unsigned long long)ctx);
        put_header(sc.start, C.slen - sc.start - GL_REQ_HEADER, GL_OP_SET_CONTEXT, 0);
        C.server_ctx = ctx;
        C.server_ctx_known = 1;
    }
    frame_begin(m, op, want_reply);
    return CUDA_SUCCESS;
}

void gl_put(gl_msg *m, const void *p, size_t n)
{
    (void)m;
    reserve(n);
    memcpy(C.sbuf + C.slen, p, n);
    C.slen += n;
}
void gl_put_i(gl_msg *m, int v) { gl_put(m, &v, 4); }
void gl_put_I(gl_msg *m, unsigned int v) { gl_put(m, &v, 4); }
void gl_put_Q(gl_msg *m, unsigned long long v) { gl_put(m, &v, 8); }
void gl_put_f(gl_msg *m, float v) { gl_put(m, &v, 4); }
void gl_put_u64(gl_msg *m, unsigned long long v) { gl_put(m, &v, 8); }

void gl_put_bulk(gl_msg *m, const void *p, size_t n)
{
    gl_put_u64(m, n);
    m->bulk = p;
    m->bulk_len = n;
}

static void seal(gl_msg *m)
{
    uint64_t plen = C.slen - m->start - GL_REQ_HEADER + m->bulk_len;
    memcpy(C.sbuf + m->start, &plen, 8);
}

#define GL_PIPELINE_FLUSH 65536

CUresult gl_post(gl_msg *m)
{
    seal(m);
    if (m->bulk_len || C.slen >= GL_PIPELINE_FLUSH) {
        if (flush_with(m->bulk, m->bulk_len) != 0) {
            mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, strerror(errno));
            return C.dead_error;
        }
    }
    return CUDA_SUCCESS;
}

static int ensure_rbuf(size_t n)
{
    if (n <= C.rcap) return 0;
    char *nb = realloc(C.rbuf, n);
    if (!nb) return -1;
    C.rbuf = nb; C.rcap = n;
    return 0;
}

#define GL_MAX_REPLY (64u << 20)

CUresult gl_call(gl_msg *m, void *bulk_out, size_t bulk_n)
{
    seal(m);
    if (flush_with(m->bulk, m->bulk_len) != 0) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, strerror(errno));
        return C.dead_error;
    }
    unsigned char rep[GL_REP_HEADER];
    if (read_all(rep, sizeof rep) != 0) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, strerror(errno));
        return C.dead_error;
    }
    uint64_t plen; int32_t res;
    memcpy(&plen, rep, 8); memcpy(&res, rep + 8, 4);
    C.rlen = 0;
    m->rpos = 0;
    if (bulk_out && res == CUDA_SUCCESS && plen == bulk_n) {
        if (read_all(bulk_out, bulk_n) != 0) {
            mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, strerror(errno));
            return C.dead_error;
        }
        return res;
    }
    if (plen > GL_MAX_REPLY || ensure_rbuf(plen) != 0) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, "oversized reply");
        return C.dead_error;
    }
    if (plen && read_all(C.rbuf, plen) != 0) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, strerror(errno));
        return C.dead_error;
    }
    C.rlen = plen;
    if (bulk_out && res == CUDA_SUCCESS) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, "reply of the wrong size");
        return C.dead_error;
    }
    return res;
}

void gl_get(gl_msg *m, void *out, size_t n)
{
    if (m->rpos + n > C.rlen) { m->bad = 1; return; }
    memcpy(out, C.rbuf + m->rpos, n);
    m->rpos += n;
}

static uint64_t get_len(gl_msg *m)
{
    uint64_t n = 0;
    gl_get(m, &n, 8);
    if (m->bad || m->rpos + n > C.rlen) { m->bad = 1; return 0; }
    return n;
}

void gl_get_str(gl_msg *m, char *out, int len)
{
    uint64_t n = get_len(m);
    if (m->bad || len <= 0) return;
    if (n > (uint64_t)len - 1) n = (uint64_t)len - 1;
    memcpy(out, C.rbuf + m->rpos, n);
    out[n] = 0;
    m->rpos += n;
}

void gl_get_var(gl_msg *m, void *out, size_t max)
{
    uint64_t n = get_len(m);
    if (m->bad) return;
    memcpy(out, C.rbuf + m->rpos, n < max ? n : max);
    m->rpos += n;
}

CUresult gl_reply_status(gl_msg *m)
{
    if (!m->bad) return CUDA_SUCCESS;
    mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, "short reply");
    return C.dead_error;
}

void gl_end(gl_msg *m) { (void)m; pthread_mutex_unlock(&C.mu); }

void gl_abort(gl_msg *m)
{
    C.slen = m->start;
    pthread_mutex_unlock(&C.mu);
}

__attribute__((destructor)) static void gl_flush_at_exit(void)
{
    pthread_mutex_lock(&C.mu);
    if (C.state == 1 && C.pid == getpid() && C.slen) flush_with(NULL, 0);
    pthread_mutex_unlock(&C.mu);
}

/* ------------------------------------------------------------------ handles */
static uintptr_t next_handle = 0x10000;

uintptr_t gl_mint_handle(void) { return __atomic_fetch_add(&next_handle, 1, __ATOMIC_RELAXED); }

/* -------------------------------------------------------------- module images */
#define FATBIN_MAGIC 0xBA55ED50u
#define FATBIN_WRAPPER_MAGIC 0x466243B1u

const void *gl_image_data(const void *image, size_t *size)
{
    const unsigned char *p = image;
    uint32_t magic;
    memcpy(&magic, p, 4);
    if (magic == FATBIN_WRAPPER_MAGIC) {
        const void *inner;
        memcpy(&inner, p + 8, sizeof inner);
        return inner ? gl_image_data(inner, size) : NULL;
    }
    if (magic == FATBIN_MAGIC) {
        uint16_t hsize; uint64_t fsize;
        memcpy(&hsize, p + 6, 2);
        memcpy(&fsize, p + 8, 8);
        *size = (size_t)hsize + (size_t)fsize;
        return image;
    }
    if (p[0] == 0x7f && p[1] == 'E' && p[2] == 'L' && p[3] == 'F') {
        if (p[4] != 2) return NULL; /* only 64-bit cubins exist for current GPUs */
        uint64_t shoff, phoff; uint16_t shentsize, shnum, phentsize, phnum;
        memcpy(&phoff, p + 0x20, 8); memcpy(&shoff, p + 0x28, 8);
        memcpy(&phentsize, p + 0x36, 2); memcpy(&phnum, p + 0x38, 2);
        memcpy(&shentsize, p + 0x3A, 2); memcpy(&shnum, p + 0x3C, 2);
        uint64_t end = 0x40;
        if (shoff + (uint64_t)shnum * shentsize > end) end = shoff + (uint64_t)shnum * shentsize;
        if (phoff + (uint64_t)phnum * phentsize > end) end = phoff + (uint64_t)phnum * phentsize;
        for (uint16_t i = 0; i < shnum; i++) {
            const unsigned char *sh = p + shoff + (uint64_t)i * shentsize;
            uint32_t type; uint64_t off, sz;
            memcpy(&type, sh + 4, 4); memcpy(&off, sh + 0x18, 8); memcpy(&sz, sh + 0x20, 8);
            if (type != 8 /* SHT_NOBITS */ && off + sz > end) end = off + sz;
        }
        *size = (size_t)end;
        return image;
    }
    /* PTX: NUL-terminated text */
    *size = strlen((const char *)image);
    return *size ? image : NULL;
}

/* --------------------------------------------- device allocations seen by the shim */
/* Kept so that cuMemcpy/cuMemcpyAsync (unified addressing) can tell device pointers
 * from host pointers: the worker's addresses live in another process. */
typedef struct { CUdeviceptr base; size_t size; } span_t;
static span_t *spans;
static size_t nspans, capspans;
static pthread_mutex_t spans_mu = PTHREAD_MUTEX_INITIALIZER;

void gl_track_alloc(CUdeviceptr p, size_t n)
{
    pthread_mutex_lock(&spans_mu);
    if (nspans == capspans) {
        size_t cap = capspans ? capspans * 2 : 64;
        span_t *ns = realloc(spans, cap * sizeof *ns);
        if (!ns) { pthread_mutex_unlock(&spans_mu); return; }
        spans = ns; capspans = cap;
    }
    size_t i = nspans;
    while (i > 0 && spans[i - 1].base > p) { spans[i] = spans[i - 1]; i--; }
    spans[i].base = p; spans[i].size = n;
    nspans++;
    pthread_mutex_unlock(&spans_mu);
}

void gl_untrack_alloc(CUdeviceptr p)
{
    pthread_mutex_lock(&spans_mu);
    for (size_t i = 0; i < nspans; i++) {
        if (spans[i].base == p) {
            memmove(&spans[i], &spans[i + 1], (nspans - i - 1) * sizeof *spans);
            nspans--;
            break;
        }
    }
    pthread_mutex_unlock(&spans_mu);
}

static int is_device_ptr(CUdeviceptr p)
{
    int found = 0;
    pthread_mutex_lock(&spans_mu);
    size_t lo = 0, hi = nspans;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (spans[mid].base <= p) lo = mid + 1; else hi = mid;
    }
    if (lo > 0 && p < spans[lo - 1].base + spans[lo - 1].size + (spans[lo - 1].size == 0)) found = 1;
    pthread_mutex_unlock(&spans_mu);
    return found;
}

GL_EXPORT CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n)
{
    int dd = is_device_ptr(dst), sd = is_device_ptr(src);
    if (dd && sd) return cuMemcpyDtoD_v2(dst, src, n);
    if (dd) return cuMemcpyHtoD_v2(dst, (const void *)(uintptr_t)src, n);
    if (sd) return cuMemcpyDtoH_v2((void *)(uintptr_t)dst, src, n);
    memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s)
{
    int dd = is_device_ptr(dst), sd = is_device_ptr(src);
    if (dd && sd) return cuMemcpyDtoDAsync_v2(dst, src, n, s);
    if (dd) return cuMemcpyHtoDAsync_v2(dst, (const void *)(uintptr_t)src, n, s);
    if (sd) return cuMemcpyDtoHAsync_v2((void *)(uintptr_t)dst, src, n, s);
    /* host to host: ordered after the stream's earlier work, as the driver does */
    CUresult r = cuStreamSynchronize(s);
    if (r == CUDA_SUCCESS) memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    return r;
}

/* ------------------------------------------------------- page-locked host memory */
/* Host memory stays in this process; copies from it go over the wire like any other. */
#define CU_MEMHOSTALLOC_DEVICEMAP 0x02
#define CU_MEMHOSTREGISTER_DEVICEMAP 0x02

GL_EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t n)
{
    if (!pp) return CUDA_ERROR_INVALID_VALUE;
    if (posix_memalign(pp, 4096, n ? n : 1) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemHostAlloc(void **pp, size_t n, unsigned int flags)
{
    if (flags & CU_MEMHOSTALLOC_DEVICEMAP)
        return gl_unsupported_arg("cuMemHostAlloc", "CU_MEMHOSTALLOC_DEVICEMAP flag (host memory mapped into a remote GPU)");
    return cuMemAllocHost_v2(pp, n);
}

GL_EXPORT CUresult cuMemFreeHost(void *p)
{
    free(p);
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned int flags)
{
    (void)n;
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    if (flags & CU_MEMHOSTREGISTER_DEVICEMAP)
        return gl_unsupported_arg("cuMemHostRegister", "CU_MEMHOSTREGISTER_DEVICEMAP flag (host memory mapped into a remote GPU)");
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuMemHostUnregister(void *p)
{
    return p ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ------------------------------------------------------------ current context */
/* The current context is per thread and lives here; gl_begin tells the worker when the
 * calling thread's context differs from the one it last saw. */
void gl_ctx_set_current(CUcontext c)
{
    if (tls_depth == 0) tls_ctx[tls_depth++] = (uintptr_t)c;
    else tls_ctx[tls_depth - 1] = (uintptr_t)c;
}

void gl_ctx_forget(CUcontext c)
{
    for (int i = 0; i < tls_depth; i++)
        if (tls_ctx[i] == (uintptr_t)c) tls_ctx[i] = 0;
}

GL_EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    *pctx = (CUcontext)current_ctx();
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuCtxSetCurrent(CUcontext c)
{
    gl_ctx_set_current(c);
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuCtxPushCurrent_v2(CUcontext c)
{
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    if (tls_depth == (int)(sizeof tls_ctx / sizeof tls_ctx[0])) return CUDA_ERROR_OUT_OF_MEMORY;
    tls_ctx[tls_depth++] = (uintptr_t)c;
    return CUDA_SUCCESS;
}

GL_EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    if (tls_depth == 0 || tls_ctx[tls_depth - 1] == 0) return CUDA_ERROR_INVALID_CONTEXT;
    uintptr_t c = tls_ctx[--tls_depth];
    if (pctx) *pctx = (CUcontext)c;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ launches */
/* Kernel parameter layouts (offset and size of each parameter) come from the worker
 * once per function and are cached here, so launches can be packed by value and
 * pipelined without a round trip. */
typedef struct { uintptr_t fn; uint32_t count; uint64_t total; uint64_t *off; uint64_t *size; } layout_t;
#define LAYOUT_SLOTS 4096
static layout_t layouts[LAYOUT_SLOTS];

static CUresult get_layout(uintptr_t fn, layout_t **out)
{
    size_t h = (fn * 0x9E3779B97F4A7C15ull) >> 52;
    for (size_t i = 0; i < 16; i++) {
        layout_t *l = &layouts[(h + i) % LAYOUT_SLOTS];
        if (l->fn == fn) { *out = l; return CUDA_SUCCESS; }
        if (l->fn == 0) break;
    }
    gl_msg m;
    CUresult r = gl_begin(&m, GL_OP_PARAM_LAYOUT, 1);
    if (r != CUDA_SUCCESS) return r;
    gl_put_u64(&m, fn);
    r = gl_call(&m, NULL, 0);
    if (r != CUDA_SUCCESS) { gl_end(&m); return r; }
    uint32_t count = 0;
    gl_get(&m, &count, 4);
    layout_t tmp = { fn, count, 0, calloc(count + 1, 8), calloc(count + 1, 8) };
    for (uint32_t i = 0; i < count && !m.bad; i++) {
        gl_get(&m, &tmp.off[i], 8);
        gl_get(&m, &tmp.size[i], 8);
        if (tmp.off[i] + tmp.size[i] > tmp.total) tmp.total = tmp.off[i] + tmp.size[i];
    }
    r = gl_reply_status(&m);
    gl_end(&m);
    if (r != CUDA_SUCCESS) { free(tmp.off); free(tmp.size); return r; }
    for (size_t i = 0; i < 16; i++) {
        layout_t *l = &layouts[(h + i) % LAYOUT_SLOTS];
        if (__sync_bool_compare_and_swap(&l->fn, 0, fn)) {
            l->count = tmp.count; l->total = tmp.total; l->off = tmp.off; l->size = tmp.size;
            __sync_synchronize();
            *out = l;
            return CUDA_SUCCESS;
        }
    }
    /* table crowded: use a private copy for this launch */
    static __thread layout_t spill;
    free(spill.off); free(spill.size);
    spill = tmp;
    *out = &spill;
    return CUDA_SUCCESS;
}

#define CU_LAUNCH_PARAM_END ((void *)0x00)
#define CU_LAUNCH_PARAM_BUFFER_POINTER ((void *)0x01)
#define CU_LAUNCH_PARAM_BUFFER_SIZE ((void *)0x02)
#define GL_LAUNCH_ATTR_SIZE 72

static CUresult launch(uintptr_t f, const unsigned int dims[7], CUstream s, const void *attrs, unsigned int nattrs,
                       void **kernelParams, void **extra)
{
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    const void *buf = NULL;
    size_t buflen = 0;
    layout_t *l = NULL;
    if (kernelParams && extra) return CUDA_ERROR_INVALID_VALUE;
    if (extra) {
        for (size_t i = 0; extra[i] != CU_LAUNCH_PARAM_END; i += 2) {
            if (extra[i] == CU_LAUNCH_PARAM_BUFFER_POINTER) buf = extra[i + 1];
            else if (extra[i] == CU_LAUNCH_PARAM_BUFFER_SIZE) buflen = *(size_t *)extra[i + 1];
            else return CUDA_ERROR_INVALID_VALUE;
        }
        if (!buf && buflen) return CUDA_ERROR_INVALID_VALUE;
    } else {
        CUresult r = get_layout(f, &l);
        if (r != CUDA_SUCCESS) return r;
        if (l->count && !kernelParams) return CUDA_ERROR_INVALID_VALUE;
        buflen = l->total;
    }
    gl_msg m;
    CUresult r = gl_begin(&m, GL_OP_LAUNCH, 0);
    if (r != CUDA_SUCCESS) return r;
    gl_put_u64(&m, f);
    for (int i = 0; i < 7; i++) gl_put_I(&m, dims[i]);
    gl_put_u64(&m, (unsigned long long)(uintptr_t)s);
    gl_put_I(&m, nattrs);
    if (nattrs) gl_put(&m, attrs, (size_t)nattrs * GL_LAUNCH_ATTR_SIZE);
    gl_put_u64(&m, buflen);
    if (buf) {
        gl_put(&m, buf, buflen);
    } else {
        reserve(buflen);
        char *dst = C.sbuf + C.slen;
        memset(dst, 0, buflen);
        for (uint32_t i = 0; i < l->count; i++) memcpy(dst + l->off[i], kernelParams[i], l->size[i]);
        C.slen += buflen;
    }
    r = gl_post(&m);
    gl_end(&m);
    return r;
}

GL_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                                  unsigned int by, unsigned int bz, unsigned int shmem, CUstream s,
                                  void **kernelParams, void **extra)
{
    const unsigned int dims[7] = { gx, gy, gz, bx, by, bz, shmem };
    return launch((uintptr_t)f, dims, s, NULL, 0, kernelParams, extra);
}

typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    CUstream hStream;
    const void *attrs;
    unsigned int numAttrs;
} gl_launch_config;

GL_EXPORT CUresult cuLaunchKernelEx(const gl_launch_config *cfg, CUfunction f, void **kernelParams, void **extra)
{
    if (!cfg) return CUDA_ERROR_INVALID_VALUE;
    const unsigned int dims[7] = { cfg->gridDimX, cfg->gridDimY, cfg->gridDimZ, cfg->blockDimX, cfg->blockDimY,
                                   cfg->blockDimZ, cfg->sharedMemBytes };
    if (cfg->numAttrs && !cfg->attrs) return CUDA_ERROR_INVALID_VALUE;
    return launch((uintptr_t)f, dims, cfg->hStream, cfg->attrs, cfg->numAttrs, kernelParams, extra);
}

/* -------------------------------------------------------------- error strings */
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

/* ------------------------------------------------------------ cuGetProcAddress */
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
