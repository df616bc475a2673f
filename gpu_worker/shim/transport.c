/* gpulab shim: the connection to the worker. Connecting and the HELLO handshake, framing,
 * the send buffer that pipelines calls without a reply, reading replies, and what a forked
 * child and process exit need. The wire format is docs/protocol.md.
 *
 * Liveness: every wait on the socket (connect, send, receive) has a deadline. The worker sends
 * keepalives while a call runs long, so the deadline is "nothing at all arrived for the limit"
 * (GPULAB_TIMEOUT seconds, default 10): a long kernel never times out, a hung or stopped worker
 * does, and the program gets an error with a reason instead of waiting forever.
 *
 * Ending: a worker that stops ends the session with a last frame saying why (REPLY_ENDED). The shim
 * reads it where a reply would come, or, when a send fails because the worker closed the socket, finds
 * it still unread there; the person reads the worker's sentence, not only "connection lost", and every
 * call returns the worker's code. A revoked vGPU sends no such frame: the session stays open and each
 * later call gets an ordinary reply, CUDA_ERROR_DEVICE_UNAVAILABLE with the revocation's reason. */
#define _GNU_SOURCE
#include "gl_shim.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
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
    int oom;                /* the frame being built did not fit in host memory */
    unsigned char early[GL_REP_HEADER_SIZE];  /* a reply header that arrived while we were sending */
    int have_early;
    const char *addr;       /* GPULAB_WORKER, for messages */
    volatile int exiting;   /* process exit: waits are short, nothing blocks the exit */
    int ended;              /* the worker ended the session and said why (REPLY_ENDED) */
} C = { PTHREAD_MUTEX_INITIALIZER, -1, 0, CUDA_SUCCESS, 0, NULL, 0, 0, NULL, 0, 0, 0, 0, 0, {0}, 0, "", 0 };

/* The liveness limit in milliseconds (GPULAB_TIMEOUT, seconds; 0 = wait forever). */
static int timeout_ms(void)
{
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v >= 0) return C.exiting && (v == 0 || v > 1000) ? 1000 : v;
    const char *s = getenv("GPULAB_TIMEOUT");
    v = GL_DEFAULT_TIMEOUT_MS;
    if (s && *s) {
        char *end;
        double sec = strtod(s, &end);
        if (end == s || *end || sec < 0 || sec > 86400) {
            gl_log("GPULAB_TIMEOUT=%s is not a number of seconds from 0 to 86400: using %u s", s,
                   GL_DEFAULT_TIMEOUT_MS / 1000);
        } else if (sec == 0) {
            v = 0;
        } else {
            v = (int)(sec * 1000);
            /* shorter than the worker's keepalive period would fail long calls that are fine */
            if (v < (int)GL_MIN_TIMEOUT_MS) {
                gl_log("GPULAB_TIMEOUT=%s is below the minimum of %u s: using %u s", s, GL_MIN_TIMEOUT_MS / 1000,
                       GL_MIN_TIMEOUT_MS / 1000);
                v = GL_MIN_TIMEOUT_MS;
            }
        }
    }
    __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    return C.exiting && (v == 0 || v > 1000) ? 1000 : v;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void mark_dead(CUresult err, const char *why)
{
    if (C.state != -1)
        gl_sayf("connection to the worker lost (%s): CUDA calls now return %d", why, err);
    C.state = -1;
    C.dead_error = err;
    if (C.fd >= 0) close(C.fd);
    C.fd = -1;
    C.slen = 0;
    C.have_early = 0;
}

/* Wait until fd is ready for `events` or the deadline (ms since boot, 0: none) passes.
 * Returns the poll revents, or 0 with errno = ETIMEDOUT. */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        int ms = -1;
        if (deadline) {
            long long left = deadline - now_ms();
            if (left <= 0) { errno = ETIMEDOUT; return 0; }
            ms = left > 1000000 ? 1000000 : (int)left;
        }
        struct pollfd pf = { fd, events, 0 };
        int r = poll(&pf, 1, ms);
        if (r > 0) return pf.revents;
        if (r < 0 && errno != EINTR) return POLLERR;
    }
}

static long long deadline_from_now(void)
{
    int t = timeout_ms();
    return t ? now_ms() + t : 0;
}

static int is_keepalive(const unsigned char *h)
{
    uint32_t w;
    memcpy(&w, h + 12, 4);
    return (w & GL_REPLY_KEEPALIVE) != 0;
}

static int is_ended(const unsigned char *h)
{
    uint32_t w;
    memcpy(&w, h + 12, 4);
    return (w & GL_REPLY_ENDED) != 0;
}

/* A REPLY_ENDED header as docs/protocol.md has it: the CUresult and a sentence of at most MAX_REASON
 * bytes, whose length the header's word also gives. Its payload length goes to *plen. */
static int ended_frame_ok(const unsigned char *h, uint64_t *plen)
{
    uint32_t w;
    memcpy(plen, h, 8);
    memcpy(&w, h + 12, 4);
    return *plen >= 4 && *plen <= 4 + GL_MAX_REASON && (w & ~GL_REPLY_ENDED) == *plen - 4;
}

/* The worker ended the session: every call from now on returns its code, and the person reads its
 * sentence instead of "connection lost". */
static void end_session(const unsigned char *payload, size_t n)
{
    uint32_t code;
    memcpy(&code, payload, 4);
    if (code == CUDA_SUCCESS) code = CUDA_ERROR_DEVICE_UNAVAILABLE;  /* an ended session never succeeds */
    if (n > 4) {
        gl_say((const char *)payload + 4, n - 4);
        C.state = -1;  /* said: mark_dead need not say more */
    }
    C.ended = 1;
    mark_dead((CUresult)code, "the worker ended the session");
}

/* recv n bytes; the deadline restarts whenever bytes arrive (a keepalive is 16 of them). */
static int read_all(void *p, size_t n)
{
    char *c = p;
    long long deadline = deadline_from_now();
    while (n > 0) {
        int ev = wait_fd(C.fd, POLLIN, deadline);
        if (ev == 0) return -1;
        ssize_t r = recv(C.fd, c, n, MSG_DONTWAIT);
        if (r == 0) { errno = ECONNRESET; return -1; }
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        c += r; n -= (size_t)r;
        deadline = deadline_from_now();
    }
    return 0;
}

/* A REPLY_ENDED header just read: its payload follows, whole (the worker sends the frame at once).
 * Returns -1 either way: the session is over. */
static int take_ended(const unsigned char *h)
{
    uint64_t plen;
    unsigned char payload[4 + GL_MAX_REASON];
    if (!ended_frame_ok(h, &plen)) { errno = EPROTO; return -1; }
    if (read_all(payload, (size_t)plen) != 0) return -1;
    end_session(payload, (size_t)plen);
    return -1;
}

/* A send failed, most often because the worker closed the socket; a worker that ended the session
 * wrote why before closing, and those bytes may still wait unread: look, without waiting, past any
 * keepalives. (Only between frames: nothing is half read while sending.) 1 when the session was ended
 * so; errno is kept for the caller otherwise. */
static int take_pending_ended(void)
{
    unsigned char buf[GL_REP_HEADER_SIZE + 4 + GL_MAX_REASON];
    int saved = errno;
    /* an early header holds the stream's next frame: the bytes in the socket are its payload */
    while (C.fd >= 0 && !C.have_early) {
        ssize_t got = recv(C.fd, buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
        uint64_t plen;
        if (got < (ssize_t)GL_REP_HEADER_SIZE) break;
        if (is_keepalive(buf)) {
            if (recv(C.fd, buf, GL_REP_HEADER_SIZE, MSG_DONTWAIT) != (ssize_t)GL_REP_HEADER_SIZE) break;
            continue;
        }
        if (!is_ended(buf) || !ended_frame_ok(buf, &plen) || (uint64_t)got < GL_REP_HEADER_SIZE + plen) break;
        gl_debug("the worker ended the session before this call was sent (its last frame waited unread)");
        end_session(buf + GL_REP_HEADER_SIZE, (size_t)plen);
        return 1;
    }
    errno = saved;
    return 0;
}

/* While we send, the worker may send keepalives (it runs an earlier long call and is not
 * reading): take them as signs of life, and keep anything else for the reply reader, unless the
 * worker ended the session. */
static int drain_while_sending(long long *deadline)
{
    unsigned char h[GL_REP_HEADER_SIZE];
    if (read_all(h, sizeof h) != 0) return -1;
    if (is_keepalive(h)) { *deadline = deadline_from_now(); return 0; }
    if (is_ended(h)) {
        gl_debug("the worker ended the session while a request was being sent");
        return take_ended(h);
    }
    memcpy(C.early, h, sizeof h);
    C.have_early = 1;
    return 0;
}

static int write_all_iov(struct iovec *iov, int n)
{
    long long deadline = deadline_from_now();
    while (n > 0) {
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = iov;
        mh.msg_iovlen = (size_t)n;
        ssize_t w = sendmsg(C.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            int ev = wait_fd(C.fd, C.have_early ? POLLOUT : POLLOUT | POLLIN, deadline);
            if (ev == 0) return -1;
            if ((ev & POLLIN) && !(ev & POLLOUT) && drain_while_sending(&deadline) != 0) return -1;
            continue;
        }
        deadline = deadline_from_now();
        while (n > 0 && (size_t)w >= iov->iov_len) { w -= (ssize_t)iov->iov_len; iov++; n--; }
        if (n > 0) { iov->iov_base = (char *)iov->iov_base + w; iov->iov_len -= (size_t)w; }
    }
    return 0;
}

/* The next reply header, skipping keepalives; -1 when the worker ended the session instead. */
static int read_reply_header(unsigned char *rep)
{
    for (;;) {
        if (C.have_early) {
            memcpy(rep, C.early, GL_REP_HEADER_SIZE);
            C.have_early = 0;
        } else if (read_all(rep, GL_REP_HEADER_SIZE) != 0) {
            return -1;
        }
        if (is_keepalive(rep)) {
            uint64_t plen;
            memcpy(&plen, rep, 8);
            if (plen) { errno = EPROTO; return -1; }
            continue;
        }
        if (!is_ended(rep)) return 0;
        gl_debug("the worker ended the session instead of replying");
        return take_ended(rep);
    }
}

/* Why the connection failed, in words: none when the worker ended the session (it said why), a
 * silent worker gets its own sentence, anything else the generic one. */
static void lost(CUresult err, const char *what)
{
    if (C.ended) return;
    if (errno == ETIMEDOUT && C.state != -1) {
        const char *name = NULL;
        if (cuGetErrorName(err, &name) != CUDA_SUCCESS) name = "an error";
        gl_sayf("%s: the worker at %s has not answered for %g s (GPULAB_TIMEOUT): it is hung, stopped or "
                "unreachable; CUDA calls now return %s", what, C.addr, timeout_ms() / 1000.0, name);
        C.state = -1;  /* said: mark_dead need not say it again */
    }
    mark_dead(err, strerror(errno));
}

/* A request could not be sent: the worker's own words if it ended the session, else why it failed. */
static CUresult send_failed(void)
{
    if (!take_pending_ended()) lost(CUDA_ERROR_DEVICE_UNAVAILABLE, "sending to the worker");
    return C.dead_error;
}

static int reserve(size_t extra)
{
    if (C.slen + extra <= C.scap) return 0;
    size_t cap = C.scap ? C.scap : 65536;
    while (cap < C.slen + extra) {
        if (cap > ((size_t)-1) / 2) { C.oom = 1; return -1; }
        cap *= 2;
    }
    char *nb = realloc(C.sbuf, cap);
    if (!nb) { C.oom = 1; return -1; }
    C.sbuf = nb; C.scap = cap;
    return 0;
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
    const char *addr = getenv(GL_ENV_PREFIX "WORKER");
    const char *token = getenv(GL_ENV_PREFIX "TOKEN");
    C.addr = addr ? addr : "";
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
    /* non-blocking for good: every wait on this socket goes through poll with a deadline */
    int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int crc = fd < 0 ? -1 : connect(fd, (struct sockaddr *)&sa, salen);
    long long connect_deadline = deadline_from_now();
    /* a Unix socket whose listen queue is full answers EAGAIN at once: the worker is busy, try again */
    while (crc != 0 && fd >= 0 && errno == EAGAIN && (!connect_deadline || now_ms() < connect_deadline)) {
        struct timespec pause = { 0, 20 * 1000 * 1000 };
        nanosleep(&pause, NULL);
        crc = connect(fd, (struct sockaddr *)&sa, salen);
    }
    if (crc != 0 && fd >= 0 && errno == EAGAIN) errno = ETIMEDOUT;
    if (crc != 0 && fd >= 0 && errno == EINPROGRESS) {
        int ev = wait_fd(fd, POLLOUT, deadline_from_now()), err = 0;
        socklen_t el = sizeof err;
        if (ev == 0) errno = ETIMEDOUT;
        else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0) crc = 0;
        else errno = err ? err : ECONNREFUSED;
    }
    if (crc != 0 && errno == ETIMEDOUT) {
        gl_log("cannot reach the worker at %s: no connection within %g s (GPULAB_TIMEOUT)", addr,
               timeout_ms() / 1000.0);
        if (fd >= 0) close(fd);
        mark_dead(CUDA_ERROR_NO_DEVICE, "connect timed out");
        return C.dead_error;
    }
    if (crc != 0) {
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
        if (errno == ETIMEDOUT) {
            lost(CUDA_ERROR_NO_DEVICE, "opening the session");
            return C.dead_error;
        }
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
    m->start = C.slen;
    if (reserve(GL_REQ_HEADER_SIZE) != 0) return;
    put_header(C.slen, 0, op, want_reply ? GL_FLAG_REPLY : 0);
    C.slen += GL_REQ_HEADER_SIZE;
}

/* fork(): the child must not use the parent's session (its handles and memory belong to the
 * parent), nor inherit a lock another thread held. It starts unconnected, like a fresh process.
 * fork() does not take the connection lock first: a thread of the parent may hold it for the
 * whole of a long call. So the child trusts nothing that thread may have been changing: it
 * re-initialises the lock and leaves the buffers (possibly mid-realloc) to the parent. */
static void atfork_child(void)
{
    pthread_mutex_init(&C.mu, NULL);
    C.sbuf = NULL; C.slen = C.scap = 0;
    C.rbuf = NULL; C.rlen = C.rcap = 0;
    if (C.fd >= 0) close(C.fd);
    C.fd = -1;
    C.state = 0;
    C.dead_error = CUDA_SUCCESS;
    C.oom = 0;
    C.have_early = 0;
    C.ended = 0;
    C.server_ctx_known = 0;
    /* the parent's contexts, allocations and layouts name its session, not the child's */
    gl_ctx_reset_after_fork();
    gl_memory_reset_after_fork();
    gl_launch_reset_after_fork();
    gl_log_reset_after_fork();
}

__attribute__((constructor)) static void gl_init(void)
{
    pthread_atfork(NULL, NULL, atfork_child);
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
    /* room for SET_CONTEXT and this header now, so that neither can fail half-written */
    if (reserve(2 * GL_REQ_HEADER_SIZE + 8) != 0) {
        C.oom = 0;
        pthread_mutex_unlock(&C.mu);
        gl_sayf("out of host memory for a request to the worker (CUDA_ERROR_OUT_OF_MEMORY)");
        return CUDA_ERROR_OUT_OF_MEMORY;
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
    if (C.oom || reserve(n) != 0) return;
    memcpy(C.sbuf + C.slen, p, n);
    C.slen += n;
}
/* NULL when host memory ran out; gl_post / gl_call then fail the call. */
void *gl_put_space(gl_msg *m, size_t n)
{
    (void)m;
    if (C.oom || reserve(n) != 0) return NULL;
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

/* A frame that did not fit in host memory is dropped whole; the call fails cleanly. */
static int dropped_for_oom(gl_msg *m)
{
    if (!C.oom) return 0;
    C.oom = 0;
    C.slen = m->start;
    gl_sayf("out of host memory for a request to the worker (CUDA_ERROR_OUT_OF_MEMORY)");
    return 1;
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
    if (dropped_for_oom(m)) return CUDA_ERROR_OUT_OF_MEMORY;
    seal(m);
    if (send_now || m->bulk_len || C.slen >= GL_PIPELINE_FLUSH) {
        if (flush_with(m->bulk, m->bulk_len) != 0) return send_failed();
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
    if (dropped_for_oom(m)) return CUDA_ERROR_OUT_OF_MEMORY;
    seal(m);
    if (flush_with(m->bulk, m->bulk_len) != 0) return send_failed();
    unsigned char rep[GL_REP_HEADER_SIZE];
    if (read_reply_header(rep) != 0) {
        lost(CUDA_ERROR_DEVICE_UNAVAILABLE, "waiting for the worker's reply");
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
            lost(CUDA_ERROR_DEVICE_UNAVAILABLE, "receiving the worker's reply");
            return C.dead_error;
        }
        return res;
    }
    if (plen > GL_MAX_REPLY) {
        mark_dead(CUDA_ERROR_DEVICE_UNAVAILABLE, "oversized reply");
        return C.dead_error;
    }
    if (ensure_rbuf(plen) != 0) {
        /* the reply is still in the socket: the stream cannot stay in step without it */
        mark_dead(CUDA_ERROR_OUT_OF_MEMORY, "out of host memory for the worker's reply");
        return C.dead_error;
    }
    if (plen && read_all(C.rbuf, plen) != 0) {
        lost(CUDA_ERROR_DEVICE_UNAVAILABLE, "receiving the worker's reply");
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

/* Exit sends what is still buffered, but never waits on a round trip: another thread may be
 * blocked in one (holding the lock) on a worker that does not answer. */
__attribute__((destructor)) static void gl_flush_at_exit(void)
{
    C.exiting = 1;
    if (pthread_mutex_trylock(&C.mu) != 0) return;
    /* a worker that ended the session still has its say; nothing else is worth a line at exit */
    if (C.state == 1 && C.pid == getpid() && C.slen && flush_with(NULL, 0) != 0) take_pending_ended();
    pthread_mutex_unlock(&C.mu);
}
