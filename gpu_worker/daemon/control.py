"""The worker's control API: its vGPUs, their usage and call traces, revocation, /metrics (HTTP, JSON).

Who sees what: the worker's admin token sees and does everything; a vGPU's session token sees and
does only its own vGPU, and any other vGPU's id answers 404 as an unknown one does, so ids cannot
be probed; no credential or a wrong one answers 403.  The credential comes as ``Authorization:
token <t>`` (``Bearer <t>`` too, which is what Prometheus's ``authorization`` setting sends).

    GET  /api/vgpus?trace=K             {"vgpus": [vGPU, ...]}; with trace, each with "trace": its K newest
                                        call records, oldest first (a panel's refresh in one request)
    GET  /api/vgpus/<id>                vGPU
    GET  /api/vgpus/<id>/trace?since=N&wait=S&limit=L&last=K
                                        {"records": [...], "next": N'}: records newer than N, oldest
                                        first; with wait, held up to S seconds (at most MAX_WAIT) until
                                        one exists.  Pass "next" back as since to follow.  With last, only
                                        the K newest of them (still oldest first): a panel's "recent calls".
    POST /api/vgpus/<id>/revoke         {"reason": "..."} -> the vGPU, now revoked
    POST /api/vgpus/<id>/offload        {"to": "warm"|"cold"} -> the vGPU with "done": true once its processes
                                        moved its memory and nothing is left hot (cold: nor warm); 202 with
                                        "done": false if they have not acted within TIER_WAIT; 507 (every
                                        failure CUDA_ERROR_OUT_OF_MEMORY) or 409 (another failure, or memory
                                        left behind) with "done": false and "message" naming the CUresult
    POST /api/vgpus/<id>/restore        -> the vGPU once its memory is back on the GPU (nothing warm or
                                        cold); 202, 507 and 409 likewise
    POST /api/vgpus/<id>/idle           {"since": epoch seconds (default now)} -> the vGPU: an idle hint
                                        starts its idle clock (tiering.py)
    GET  /api/gpus                      {"gpus": [GPU with its facts, ...]} (a session: its vGPU's GPUs)
    GET  /metrics                       Prometheus text (admin token only; metrics.py)

The server is the standard library's ThreadingHTTPServer in a daemon thread: the worker's accept
loop stays its own, a held long-poll costs one thread, and `gpulab vgpu` (gpulab/vgpu_cli.py) needs
nothing but urllib to talk to it.

Threads are bounded so that nobody can lock the admin and Prometheus out: at most MAX_CONNECTIONS
connections are served at once, and ADMIN_RESERVE more may connect beyond them but are answered
only for the admin token (anyone else there gets 503); a connection must send its request (line,
headers and body) within HEADER_TIMEOUT of being ready for it, so an idle one, authenticated or
not, gives its thread back within seconds; and one credential holds at most MAX_POLLS trace
long-polls at once (429 beyond).  The worker publishes where it listens and its admin token in its
state directory (`publish`), for `gpulab vgpu` on the same host.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("gpulab.worker.control")

MAX_BODY = 64 << 10  # a revoke reason is a sentence; the other posted bodies are smaller
MAX_REASON = 1000  # characters of a revoke reason kept
MAX_WAIT = 30.0  # seconds a trace long-poll may be held
MAX_LIMIT = 1024  # trace records per answer
POLL = 0.05  # seconds between looks at the trace while a long-poll waits
HEADER_TIMEOUT = 5.0  # seconds a connection has to send a whole request (line, headers, body), idle ones too
WRITE_TIMEOUT = 60.0  # seconds one send of an answer may stall on a caller that does not read it
MAX_CONNECTIONS = 64  # connections served at once (a thread each)
ADMIN_RESERVE = 4  # connections beyond MAX_CONNECTIONS answered for the admin token only; more are closed
MAX_POLLS = 4  # trace long-polls one credential may hold at once
TIER_WAIT = 30.0  # seconds an offload or restore waits for the vGPU's processes to act
TIER_POLL = 0.02  # seconds between two looks at whether they have

_VGPU = re.compile(r"/api/vgpus/([^/]+)(/trace|/revoke|/offload|/restore|/idle)?")
_POSTED = ("/revoke", "/offload", "/restore", "/idle")
_TIERS = {"warm": 1, "cold": 2}


class APIError(Exception):
    """An answer other than 200: its status and the sentence for the person who reads it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _forbidden() -> APIError:
    return APIError(403, "this needs a credential: the worker's admin token or a vGPU's session token, sent as "
                         "'Authorization: token <token>'")


def _not_found(vgpu_id: str) -> APIError:
    return APIError(404, f"there is no vGPU {vgpu_id} on this worker")


class ControlServer:
    """The control API over a VGPURegistry (gpu_worker/daemon/vgpus.py), on `bind` (host:port, port
    0 picks a free one).  `start()` returns its URL; `stop()` ends it."""

    def __init__(self, registry, admin_token: str, bind: str):
        self.registry = registry
        self.admin_token = admin_token
        self.bind = bind
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.polls: dict[str, int] = {}  # long-polls held, per credential ("admin" or a vGPU id)
        self.polls_lock = threading.Lock()

    def start(self) -> str:
        host, port = split_bind(self.bind)
        server_class = _Server6 if ":" in host else _Server
        self.httpd = server_class((host, port), _Handler)
        self.httpd.control = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), name="gpulab-control", daemon=True)
        self.thread.start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        if self.httpd is None:
            return
        self.stopping.set()  # held long-polls answer now
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
        self.httpd = None

    # ------------------------------------------------------------------ auth
    def authenticate(self, header: str) -> dict | None:
        """None for the admin; the vGPU whose session token this is; else APIError 403."""
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() not in ("token", "bearer") or not token:
            raise _forbidden()
        if self.admin_token and hmac.compare_digest(self.admin_token.encode(), token.encode()):
            return None
        vgpu = self.registry.find_token(token)
        if vgpu is None:
            raise _forbidden()
        return vgpu

    # ------------------------------------------------------------------ routes
    def handle(self, method: str, path: str, query: dict, body: bytes, caller: dict | None):
        """(content type, body bytes) of one authenticated request's 200, or (content type, body bytes,
        status) for another success; APIError otherwise."""
        if path == "/metrics" and method == "GET":
            if caller is not None:
                raise APIError(403, "the worker's metrics need its admin token (they cover every vGPU)")
            from .metrics import CONTENT_TYPE, render

            return CONTENT_TYPE, render(self.registry)
        if path == "/api/vgpus" and method == "GET":
            # a session sees its own vGPU, described a moment ago by authenticate: describing all of the
            # worker's vGPUs for each of their panels' polls would cost the worker n * n per interval
            vgpus = self.registry.vgpus() if caller is None else [caller]
            last = min(_number(query, "trace", 0, int), MAX_LIMIT)
            if last < 0:
                raise APIError(400, "trace (how many of each vGPU's newest call records to add) must not be negative")
            if last:  # a panel's figures and recent calls in one request
                vgpus = [{**v, "trace": self.registry.trace(str(v["id"]), 0, MAX_LIMIT, last)[0]} for v in vgpus]
            return _json({"vgpus": vgpus})
        if path == "/api/gpus" and method == "GET":
            return _json({"gpus": self.gpus(caller)})
        m = _VGPU.fullmatch(path)
        if not m:
            raise APIError(404, f"no such route: {method} {path}")
        vgpu_id, action = urllib.parse.unquote(m.group(1)), m.group(2)
        want = "POST" if action in _POSTED else "GET"
        if method != want:
            raise APIError(405, f"{path} answers {want}, not {method}")
        if caller is not None and str(caller["id"]) != vgpu_id:
            raise _not_found(vgpu_id)
        if action == "/trace":
            return _json(self.trace(vgpu_id, query, caller))
        if action == "/revoke":
            return _json(self.revoke(vgpu_id, body, caller))
        if action in ("/offload", "/restore"):
            return self.move(vgpu_id, action[1:], body, caller)
        if action == "/idle":
            return _json(self.idle(vgpu_id, body))
        vgpu = self.registry.get(vgpu_id)
        if vgpu is None:
            raise _not_found(vgpu_id)
        return _json(vgpu)

    def gpus(self, caller: dict | None) -> list[dict]:
        facts = self.registry.gpu_facts()
        mine = None if caller is None else set(caller.get("gpus") or [])
        return [{**g, "facts": facts.get(g["uuid"], {})} for g in self.registry.gpus()
                if mine is None or g["uuid"] in mine]

    def trace(self, vgpu_id: str, query: dict, caller: dict | None) -> dict:
        since = _number(query, "since", 0, int)
        limit = min(_number(query, "limit", 256, int), MAX_LIMIT)
        wait = min(_number(query, "wait", 0.0, float), MAX_WAIT)
        last = min(_number(query, "last", 0, int), MAX_LIMIT)
        if since < 0 or limit < 1 or wait < 0 or last < 0:
            raise APIError(400, "since, wait and last must not be negative, and limit must be at least 1")
        if self.registry.get(vgpu_id) is None:
            raise _not_found(vgpu_id)
        deadline = time.monotonic() + wait
        held = wait > 0 and self._hold_poll("admin" if caller is None else f"vgpu {caller['id']}")
        try:
            while True:
                records, nxt = self.registry.trace(vgpu_id, since, limit, last)
                if records or time.monotonic() >= deadline or self.stopping.wait(POLL):
                    return {"records": records, "next": nxt}
        finally:
            if held:
                self._release_poll(held)

    def _hold_poll(self, who: str) -> str:
        """Count one more long-poll of credential `who` (returned, for _release_poll); 429 past MAX_POLLS."""
        with self.polls_lock:
            if self.polls.get(who, 0) >= MAX_POLLS:
                raise APIError(429, f"this credential already holds {MAX_POLLS} trace long-polls, as many as it "
                                    f"may at once: wait for one to answer, or ask without wait")
            self.polls[who] = self.polls.get(who, 0) + 1
        return who

    def _release_poll(self, who: str) -> None:
        with self.polls_lock:
            self.polls[who] -= 1
            if not self.polls[who]:
                del self.polls[who]

    def revoke(self, vgpu_id: str, body: bytes, caller: dict | None) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise APIError(400, "the body must be a JSON object such as {\"reason\": \"...\"}") from None
        reason = data.get("reason", "") if isinstance(data, dict) else None
        if not isinstance(reason, str):
            raise APIError(400, "the body must be a JSON object whose \"reason\" is a string")
        reason = " ".join(reason.split())[:MAX_REASON]
        vgpu = self.registry.get(vgpu_id)
        if vgpu is None:
            raise _not_found(vgpu_id)
        if vgpu.get("state") == "revoked":
            raise APIError(409, f"vGPU {vgpu_id} is already revoked: {vgpu.get('reason') or 'no reason given'}")
        who = "an admin of its worker" if caller is None else "its own session"
        sentence = f"{who} revoked this vGPU: {reason}" if reason else f"{who} revoked this vGPU"
        if not self.registry.revoke(vgpu_id, sentence):
            raise _not_found(vgpu_id)
        log.info("vGPU %s revoked through the control API by %s%s", vgpu_id,
                 "the admin" if caller is None else "its session", f": {reason}" if reason else "")
        return self.registry.get(vgpu_id) or {"id": vgpu_id, "state": "revoked", "reason": sentence}

    def move(self, vgpu_id: str, action: str, body: bytes, caller: dict | None) -> tuple:
        """Offload or restore a vGPU's memory: ask its processes, wait up to TIER_WAIT for all to act."""
        if action == "offload":
            data = _body_object(body, "{\"to\": \"warm\"}")
            to = data.get("to")
            if to not in _TIERS:
                raise APIError(400, f"\"to\" must be \"warm\" (the worker's host RAM) or \"cold\" (files on its "
                                    f"disk), not {json.dumps(to)}")
            want = _TIERS[to]
        else:
            want, to = 0, "hot"
        self._active(vgpu_id)
        asked = self.registry.request_tier(vgpu_id, want)
        if asked is None:  # it ended meanwhile
            self._active(vgpu_id)
            raise _not_found(vgpu_id)
        seq, told = asked
        log.info("vGPU %s: %s to %s asked through the control API by %s (%d process(es) told)", vgpu_id, action, to,
                 "the admin" if caller is None else "its session", len(told))
        deadline = time.monotonic() + TIER_WAIT
        while True:
            done = self.registry.tier_done(vgpu_id, seq)
            if done is None:
                raise _not_found(vgpu_id)
            if done or time.monotonic() >= deadline or self.stopping.wait(TIER_POLL):
                break
        vgpu = self.registry.get(vgpu_id) or {"id": vgpu_id}
        if not done:
            return (*_json({**vgpu, "done": False}), 202)
        failures = self.registry.tier_failures(vgpu_id, seq)
        reasons = {pid: self.registry.native_why_not(pid) for pid in failures}
        status, sentence = self._moved(vgpu, action, to, failures, reasons)
        if status != 200:
            log.info("vGPU %s: %s to %s not done: %s", vgpu_id, action, to, sentence)
            return (*_json({**vgpu, "done": False, "message": sentence}), status)
        return (*_json({**vgpu, "done": True}), 200)

    @staticmethod
    def _moved(vgpu: dict, action: str, to: str, failures: dict[int, int],
               reasons: dict[int, str] | None = None) -> tuple[int, str]:
        """(200, "") when every process moved its memory and the vGPU's tiers show it; else the status and the
        sentence: 507 when every failure was CUDA_ERROR_OUT_OF_MEMORY (no room on the GPU, in the warm budget
        or on the spool's disk), 409 for any other failure or memory still in a tier it should have left.
        ``reasons``: why a process could not move at all (a native process using managed or IPC memory)."""
        from ..api.errors import OUT_OF_MEMORY, name_of
        from ..client.units import format_size

        words = "restore" if action == "restore" else f"offload to {to}"
        if failures:
            said = ", ".join(f"process {pid}: {name_of(code)}" + (f", because {reasons[pid]}"
                                                                   if (reasons or {}).get(pid) else "")
                             for pid, code in sorted(failures.items()))
            status = 507 if set(failures.values()) == {OUT_OF_MEMORY} else 409
            return status, (f"the {words} of vGPU {vgpu['id']} failed ({said}); the worker's log says why, and "
                            f"\"tiers\" where its memory is now")
        tiers = vgpu.get("tiers") or {}
        left = {"hot": ("warm", "cold"), "warm": ("hot",), "cold": ("hot", "warm")}[to]
        still = [(t, tiers.get(t, 0)) for t in left if tiers.get(t, 0)]
        if still:
            said = " and ".join(f"{format_size(n)} {t}" for t, n in still)
            return 409, (f"the processes of vGPU {vgpu['id']} acted on the {words}, but {said} of its memory "
                         f"did not move (a program allocated or touched memory since, or the worker has no room "
                         f"for it there)")
        return 200, ""

    def idle(self, vgpu_id: str, body: bytes) -> dict:
        """An idle hint: the vGPU's program has been idle since `since` (default now)."""
        now = time.time()
        data = _body_object(body, "{\"since\": 1700000000}")
        since = data.get("since", now)
        if isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since) or since < 0:
            raise APIError(400, f"\"since\" must be a time in epoch seconds, not {json.dumps(since)}")
        if since > now + 60:
            raise APIError(400, f"\"since\" ({since:.0f}) is in the future: this worker's clock says {now:.0f}")
        self._active(vgpu_id)
        if not self.registry.set_idle_hint(vgpu_id, min(float(since), now), now):
            raise _not_found(vgpu_id)
        return self.registry.get(vgpu_id)

    def _active(self, vgpu_id: str) -> None:
        """404 for an unknown vGPU, 409 for one that ended."""
        vgpu = self.registry.get(vgpu_id)
        if vgpu is None:
            raise _not_found(vgpu_id)
        if vgpu.get("state") != "active":
            raise APIError(409, f"vGPU {vgpu_id} is {vgpu.get('state')}: {vgpu.get('reason') or 'no reason given'}")


def _body_object(body: bytes, example: str) -> dict:
    """A request body as a JSON object (none: empty); 400 with an example otherwise."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object such as {example}")
    return data


def _json(data) -> tuple[str, bytes]:
    return "application/json", json.dumps(data).encode()


def _number(query: dict, name: str, default, kind):
    values = query.get(name)
    if not values:
        return default
    try:
        value = kind(values[-1])
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):  # nan would hold a long-poll for ever
        word = "a whole number" if kind is int else "a finite number"
        raise APIError(400, f"{name} must be {word}, not {values[-1]!r}")
    return value


def split_bind(bind: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError with a sentence otherwise."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"the control address must be host:port (port 0 picks a free one), not {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Server(ThreadingHTTPServer):
    """A thread per connection being served, within MAX_CONNECTIONS + ADMIN_RESERVE; connections that
    owe their request past its deadline are shut down by the accept loop (`service_actions`), so a
    slow sender cannot stretch HEADER_TIMEOUT a byte at a time.

    A thread that has served its connection waits for the next one instead of ending: starting a
    thread per connection was a fifth of what a panel's poll cost the worker (benchmarks/panel_polling.py).
    A new thread starts only when none waits, and a thread counts itself as waiting before it gives
    its slot back, so there are never more threads than slots."""

    daemon_threads = True
    request_queue_size = 128  # a burst of connections waits in the kernel instead of being refused there
    control: ControlServer

    def __init__(self, *args):
        super().__init__(*args)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.reserve = threading.BoundedSemaphore(ADMIN_RESERVE)
        self.admin_only: set[socket.socket] = set()  # connections in the reserve
        self.owing: dict[socket.socket, float] = {}  # connection -> when its request must have arrived
        self.owing_lock = threading.Lock()
        self.handoff: queue.SimpleQueue = queue.SimpleQueue()  # connections for the waiting threads
        self.idle_threads = 0  # threads waiting on handoff and not yet promised a connection
        self.threads = 0
        self.threads_lock = threading.Lock()

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            release = self.slots.release
        elif self.reserve.acquire(blocking=False):
            release = self.reserve.release
            self.admin_only.add(request)
        else:  # a flood costs a socket, never a thread
            self.shutdown_request(request)
            return
        with self.threads_lock:
            start = self.idle_threads == 0
            if start:
                self.threads += 1
            else:
                self.idle_threads -= 1
        self.handoff.put((request, client_address, release))
        if start:
            threading.Thread(target=self._serve_connections, name="gpulab-control-request", daemon=True).start()

    def _serve_connections(self) -> None:
        """Serve a handed-off connection, then wait for the next (None: the server closed)."""
        while (job := self.handoff.get()) is not None:
            self._connection(*job)

    def server_close(self):
        super().server_close()
        with self.threads_lock:
            waiting, self.threads = self.threads, 0
        for _ in range(waiting):  # a thread still serving ends after its connection
            self.handoff.put(None)

    def _connection(self, request, client_address, release) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.received(request)
            self.admin_only.discard(request)
            self.shutdown_request(request)
            with self.threads_lock:
                self.idle_threads += 1  # before the slot is free: the next connection finds this thread
            release()

    def awaiting(self, connection) -> None:
        """`connection` now owes a request, within HEADER_TIMEOUT."""
        with self.owing_lock:
            self.owing[connection] = time.monotonic() + HEADER_TIMEOUT

    def received(self, connection) -> None:
        with self.owing_lock:
            self.owing.pop(connection, None)

    def service_actions(self):
        now = time.monotonic()
        with self.owing_lock:
            late = [c for c, deadline in self.owing.items() if deadline <= now]
            for c in late:
                del self.owing[c]
        for c in late:
            try:
                c.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once and the connection ends
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.debug("control API connection from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: headers and body go out as two writes, and a keep-alive client (Prometheus, a
    # Jupyter server) would otherwise wait on its delayed ACK, ~40 ms a request: measured here, 44 ms
    # per kept-alive request before, 0.3 to 0.5 ms after.
    disable_nagle_algorithm = True
    timeout = WRITE_TIMEOUT  # reads are bounded by the server's deadline (HEADER_TIMEOUT) instead
    server_version = "gpulab-worker"

    def handle_one_request(self):
        self.server.awaiting(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.received(self.connection)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def _serve(self, method: str):
        control = self.server.control
        if self.connection in self.server.admin_only:
            self.close_connection = True  # a reserved slot serves one request, then is free for the next admin
        try:
            url = urllib.parse.urlsplit(self.path)
            body = self._body()
            self.server.received(self.connection)  # the request is here: its answer may take long
            caller = control.authenticate(self.headers.get("Authorization", ""))
            if caller is not None and self.connection in self.server.admin_only:
                raise APIError(503, "the worker's control API is serving as many connections as it may; "
                                    "try again in a few seconds")
            answer = control.handle(method, url.path.rstrip("/") or "/", urllib.parse.parse_qs(url.query),
                                    body, caller)
            ctype, data, status = answer if len(answer) == 3 else (*answer, 200)
        except APIError as e:
            status, ctype, data = e.status, "application/json", json.dumps({"message": e.message}).encode()
        except Exception:  # a bug of ours: the caller gets a sentence, the log the traceback
            log.exception("control API: %s %s failed", method, self.path)
            status, ctype = 500, "application/json"
            data = json.dumps({"message": "the worker failed to answer this request (see its log)"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self._unread:
            self.close_connection = True  # a body we did not read would be taken for the next request
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    _unread = False

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        if not length.isdigit():
            self._unread = True
            raise APIError(400, "Content-Length must be a whole number")
        n = int(length)
        if n > MAX_BODY:
            self._unread = True
            raise APIError(413, f"a request body may have at most {MAX_BODY} bytes")
        return self.rfile.read(n)

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("control API %s: %s", self.address_string(), format % args)


# ---------------------------------------------------------------------- published for `gpulab vgpu`


def state_files(state_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Where worker `name` publishes its control URL and its admin token (mode 0600) in `state_dir`."""
    d = Path(state_dir)
    return d / f"worker-{name}.control", d / f"worker-{name}.admin-token"


def publish(state_dir: str | os.PathLike, name: str, url: str, admin_token: str) -> None:
    """Write worker `name`'s control URL and admin token for `gpulab vgpu` on this host; both files are
    created private (0600) before anything is written into them, like all of the state directory."""
    url_file, token_file = state_files(state_dir, name)
    url_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, text in ((token_file, admin_token), (url_file, url)):
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text + "\n")
        os.replace(tmp, path)


def published(state_dir: str | os.PathLike) -> dict[str, tuple[str, Path]]:
    """{worker name: (control URL, its admin-token file)} of the workers that published in `state_dir`."""
    out = {}
    for url_file in sorted(Path(state_dir).glob("worker-*.control")):
        name = url_file.name[len("worker-"):-len(".control")]
        try:
            url = url_file.read_text().strip()
        except OSError:
            continue
        out[name] = (url, state_files(state_dir, name)[1])
    return out
