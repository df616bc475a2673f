/* gpulab shim: the connection to the worker. Connecting and the HELLO handshake, framing,
 * the send buffer that pipelines calls without a reply, reading replies, and what a forked
 * child and process exit need. The wire format is docs/protocol.md. */
#define _GNU_SOURCE
#include "gl_shim.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

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
    unsigned char hdr[GL_REQ_HEADER_SIZE + GL_HELLO_SIZE];
    uint64_t plen = GL_HELLO_SIZE + tlen;
    uint32_t op = GL_OP_HELLO, flags = GL_FLAG_REPLY, ver = GL_PROTOCOL_VERSION, pid = (uint32_t)C.pid;
    uint64_t tl = tlen;
    memcpy(hdr, &plen, 8); memcpy(hdr + 8, &op, 4); memcpy(hdr + 12, &flags, 4);
    memcpy(hdr + 16, &ver, 4); memcpy(hdr + 20, &pid, 4); memcpy(hdr + 24, &tl, 8);
    struct iovec iov[2] = { { hdr, sizeof hdr }, { (void *)(token ? token : ""), tlen } };
    unsigned char rep[GL_REP_HEADER_SIZE];
    if (write_all_iov(iov, tlen ? 2 : 1) != 0 || read_all(rep, sizeof rep) != 0) {
        gl_log("the worker at %s closed the session during the handshake", addr);
        mark_dead(CUDA_ERROR_NO_DEVICE, "handshake failed");
        return C.dead_error;
    }
    /* The whole payload is a message (a refusal's reason, or the backend's name): read the
     * start of it and drop the rest, so that any length keeps the stream in step. */
    uint64_t rlen; int32_t res;
    memcpy(&rlen, rep, 8); memcpy(&res, rep + 8, 4);
    char msg[512] = "";
    size_t keep = rlen < sizeof msg - 1 ? (size_t)rlen : sizeof msg - 1;
    int ok = read_all(msg, keep) == 0;
    msg[ok ? keep : 0] = 0;
    for (uint64_t left = rlen - keep; ok && left > 0;) {
        char sink[512];
        size_t k = left < sizeof sink ? (size_t)left : sizeof sink;
        ok = read_all(sink, k) == 0;
        left -= k;
    }
    if (res != CUDA_SUCCESS) {
        gl_log("the worker refused the session: %s", msg[0] ? msg : "no reason given");
        mark_dead(res, "session refused");
        return C.dead_error;
    }
    if (!ok) {
        gl_log("the worker at %s closed the session during the handshake", addr);
        mark_dead(CUDA_ERROR_NO_DEVICE, "handshake failed");
        return C.dead_error;
    }
    gl_debug("session opened with the worker at %s: %s", addr, msg);
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
    reserve(GL_REQ_HEADER_SIZE);
    m->start = C.slen;
    put_header(C.slen, 0, op, want_reply ? GL_FLAG_REPLY : 0);
    C.slen += GL_REQ_HEADER_SIZE;
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
    uintptr_t ctx = gl_ctx_current();
    if (!C.server_ctx_known || C.server_ctx != ctx) {
        gl_msg sc;
        frame_begin(&sc, GL_OP_SET_CONTEXT, 0);
        gl_put_u64(&sc, (unsigned long long)ctx);
        put_header(sc.start, C.slen - sc.start - GL_REQ_HEADER_SIZE, GL_OP_SET_CONTEXT, 0);
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
void *gl_put_space(gl_msg *m, size_t n)
{
    (void)m;
    reserve(n);
    C.slen += n;
    return C.sbuf + C.slen - n;
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
    uint64_t plen = C.slen - m->start - GL_REQ_HEADER_SIZE + m->bulk_len;
    memcpy(C.sbuf + m->start, &plen, 8);
}

/* A pipelined frame waits in the send buffer, unless it carries bulk data, the buffer is full, or
 * the worker must see it now (send_now: a free, so that the vGPU's usage figure is current). */
CUresult gl_post(gl_msg *m, int send_now)
{
    seal(m);
    if (send_now || m->bulk_len || C.slen >= GL_PIPELINE_FLUSH) {
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

CUresult gl_call(gl_msg *m, void *bulk_out, size_t bulk_n)
{
    seal(m);
    if (flush_with(m->bulk, m->bulk_len) != 0) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, strerror(errno));
        return C.dead_error;
    }
    unsigned char rep[GL_REP_HEADER_SIZE];
    if (read_all(rep, sizeof rep) != 0) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, strerror(errno));
        return C.dead_error;
    }
    uint64_t plen; int32_t res; uint32_t reason_len;
    memcpy(&plen, rep, 8); memcpy(&res, rep + 8, 4); memcpy(&reason_len, rep + 12, 4);
    C.rlen = 0;
    m->rpos = 0;
    if (reason_len > plen || reason_len > GL_MAX_REASON) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, "malformed reply");
        return C.dead_error;
    }
    if (bulk_out && res == CUDA_SUCCESS && reason_len == 0 && plen == bulk_n) {
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
    /* the reason closes the payload: the person reads it, the stub never sees it */
    C.rlen = plen - reason_len;
    if (reason_len) gl_say(C.rbuf + C.rlen, reason_len);
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
