"""The worker daemon: accept sessions, check their token, fork one executor each.

One process per session isolates faults: a sticky CUDA error, a crash or a protocol
violation ends that session only.  The daemon itself never touches the GPU, so it can
fork safely; each executor initialises CUDA for itself.
"""
from __future__ import annotations

import errno
import hmac
import importlib
import importlib.util
import json
import logging
import os
import selectors
import signal
import socket
import struct

from traitlets import Dict, Enum, Float, Int, List, TraitError, Unicode, validate
from traitlets.config import Configurable

from ..api import errors as E
from .executor import Executor, FrameReader
from ..api.protocol import DEFAULT_MAX_FRAME, HELLO, OP_HELLO, PROTOCOL_VERSION, REP_HEADER, REQ_HEADER, ProtocolError
from ..client.tokens import token_hash
from .session import Session
from .usage import UsageCounter, default_dir, prepare_dir
from ..backends.base import Backend
from ..client.limits import LimitError, Size, token_limits

log = logging.getLogger("gpulab.worker")


class GPUWorker(Configurable):
    """Configuration and accept loop of a gpulab worker."""

    tcp = Unicode("", help="Listen on this host:port for TCP sessions (port 0 picks a free one; the address "
                           "is printed). Empty: no TCP.").tag(config=True)
    unix_socket = Unicode("", help="Listen on this Unix socket path (empty: none).").tag(config=True)
    backend = Enum(["auto", "cuda", "emulated"], "auto",
                   help="Device backend: 'cuda' runs real driver calls with cuda-python; 'emulated' is a test "
                        "double with no GPU; 'auto' picks cuda when a GPU is visible.").tag(config=True)
    token = Unicode("", help="A session token accepted by this worker (with the default quota). `gpulab worker` "
                             "takes $GPULAB_TOKEN when neither this nor tokens_file is set.").tag(config=True)
    tokens = Dict(help="Session tokens and their limits: {token: {'vram': '8G'}} (a size, see "
                       "docs/configuration.md; {} or None: the default quota).").tag(config=True)
    tokens_file = Unicode("", help="JSON file of tokens and limits like `tokens`, re-read at every new "
                                   "session so that a pool can issue tokens while the worker runs.").tag(config=True)
    vram_quota = Size(None, allow_none=True, help="Default VRAM quota of a session, a size such as '8G' or "
                      "'512M' (docs/configuration.md); empty: the whole device.").tag(config=True)
    emulated_kernels = List(Unicode(), help="Python modules (dotted names or .py paths) to import that register "
                                            "host implementations of kernels for the emulated backend.").tag(config=True)
    emulated_memory = Size(16 << 30, help="Memory size the emulated device reports (a size, e.g. '16G')."
                           ).tag(config=True)
    pool_url = Unicode("", help="URL of the GPU pool service to register with (empty: standalone worker)."
                       ).tag(config=True)
    pool_token = Unicode("", help="The pool's shared enrolment secret (default: $GPULAB_POOL_TOKEN). It only "
                         "enrols this worker's name once; the credential the pool then issues to this worker "
                         "is kept in pool_credential_file and used from then on.").tag(config=True)
    pool_credential_file = Unicode("", help="Private file where this worker keeps the credential the pool "
                                   "issued to it (it must survive restarts: a name already enrolled takes only "
                                   "its own credential). Default: worker-<name>-<hash of pool URL and name>"
                                   ".credential in $GPULAB_STATE_DIR, else $XDG_STATE_HOME/gpulab, else "
                                   "~/.local/state/gpulab.").tag(config=True)
    name = Unicode("", help="Name of this worker in the pool (default: host name and port).").tag(config=True)
    advertise = Unicode("", help="Address clients use to reach this worker, tcp://host:port (default: the TCP "
                                 "listening address).").tag(config=True)
    node = Unicode("", help="Node (host) this worker runs on; local vGPUs are placed on the user's node."
                   ).tag(config=True)
    heartbeat_interval = Float(5.0, help="Seconds between heartbeats to the pool (a change of a session's VRAM "
                                         "use is sent sooner, at most twice a second).").tag(config=True)
    usage_dir = Unicode("", help="Private directory where each executor publishes its session's VRAM in use for "
                                 "the heartbeat.  It must stay the same across restarts of the daemon, so that a "
                                 "new daemon reports the sessions whose executors outlived the old one.  Default: "
                                 "gpulab-usage-<uid>-<name>-<hash of pool URL and name> in $XDG_RUNTIME_DIR, "
                                 "else /dev/shm, else the temporary directory.").tag(config=True)
    max_frame = Int(DEFAULT_MAX_FRAME, help="Largest request frame accepted (bulk copy data excepted); a "
                                            "larger one closes the session.").tag(config=True)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.listeners: list[socket.socket] = []
        self.children: set[int] = set()
        self.sessions = 0
        self._stop = False
        self.pool_link = None

    # ------------------------------------------------------------------ set-up
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "cuda" if _gpu_visible() else "emulated"

    def prepare(self) -> None:
        """Import what sessions need once, before forking (the executor starts fast)."""
        self.kind = self.resolved_backend()
        if self.kind == "emulated":
            from ..backends import emulated

            emulated._attributes()  # once here rather than in every session
            for mod in self.emulated_kernels:
                _import_kernels(mod)
        else:
            from ..backends import cuda  # noqa: F401 - imported before forking: sessions start faster

    def listen(self) -> list[str]:
        addrs = []
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            s = socket.create_server((host or "127.0.0.1", int(port)), reuse_port=False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.listeners.append(s)
            h, p = s.getsockname()[:2]
            addrs.append(f"tcp://{h}:{p}")
        if self.unix_socket:
            try:
                os.unlink(self.unix_socket)
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.unix_socket)
            s.listen(128)
            self.listeners.append(s)
            addrs.append(f"unix://{self.unix_socket}")
        if not self.listeners:
            raise ValueError("the worker needs --tcp and/or --unix-socket")
        return addrs

    # ------------------------------------------------------------------ tokens
    @validate("tokens")
    def _check_tokens(self, proposal):
        """Limits in the config are checked at start-up: a bad one stops the worker, not a session."""
        try:
            return {str(t): token_limits(v, f"c.GPUWorker.tokens[token {token_hash(str(t))[:8]}]")
                    for t, v in proposal["value"].items()}
        except LimitError as exc:
            raise TraitError(str(exc)) from None

    def limits_for(self, token: str):
        """The limits of a valid token (``vram`` in bytes when set), or None.

        A tokens-file entry is checked when the file is read for a session; a bad one raises LimitError
        (that token is refused with the reason), so the executor only ever gets integers."""
        table = dict(self.tokens)
        if self.token:
            table.setdefault(self.token, {})
        source = "c.GPUWorker.tokens"
        if self.tokens_file:
            try:
                with open(self.tokens_file) as f:
                    entries = json.load(f)
                if not isinstance(entries, dict):
                    raise ValueError("it is not a JSON object of {token: limits}")
                table.update(entries)
            except (OSError, ValueError) as exc:
                log.error("cannot read tokens file %s: %s", self.tokens_file, exc)
        for known, limits in table.items():
            if hmac.compare_digest(str(known).encode(), token.encode()):
                if self.tokens_file and known not in self.tokens and known != self.token:
                    source = f"tokens file {self.tokens_file}"
                try:
                    return token_limits(limits, f"{source}, token {token_hash(token)[:8]}")
                except LimitError as exc:
                    log.error("refusing a session: %s", exc)
                    raise
        if self.pool_link is not None and token:
            try:
                limits = self.pool_link.session_limits(token)
            except OSError as exc:
                log.error("cannot ask the GPU pool about a session token: %s", exc)
                return None
            return None if limits is None else token_limits(limits, "the GPU pool's limits")
        return None

    def connect_pool(self, addrs: list[str]) -> None:
        """Register with the pool and keep beating (a daemon thread)."""
        if not self.pool_url:
            return
        from .pool_link import PoolLink, describe_gpus

        tcp = next((a for a in addrs if a.startswith("tcp://")), "")
        address = self.advertise or tcp or addrs[0]
        name = self.name or f"{socket.gethostname()}-{address.rsplit(':', 1)[-1]}"
        # named after the worker, not this process: a restarted daemon finds the surviving executors
        self.usage_dir = prepare_dir(self.usage_dir or default_dir(name, self.pool_url))
        gpus = describe_gpus(self.kind, name, self.emulated_memory)
        token = self.pool_token or os.environ.get("GPULAB_POOL_TOKEN", "")
        self.pool_link = PoolLink(self.pool_url, token, name, address, self.node, self.kind, gpus,
                                  self.heartbeat_interval, usage_dir=self.usage_dir,
                                  credential_file=self.pool_credential_file)
        self.pool_link.start()

    # ------------------------------------------------------------ accept loop
    def stop(self) -> None:
        """End the accept loop (safe in a signal handler); serve_forever then stops the sessions."""
        self._stop = True

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.listeners:
            sel.register(s, selectors.EVENT_READ)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stop", True))
        while not self._stop:
            for key, _ in sel.select(timeout=0.5):
                try:
                    conn, _ = key.fileobj.accept()
                except OSError:
                    continue
                self.sessions += 1
                pid = os.fork()
                if pid == 0:
                    for s in self.listeners:
                        s.close()
                    os._exit(self.run_session(conn, self.sessions))
                conn.close()
                self.children.add(pid)
            self.reap()
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reap()

    def reap(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    # ------------------------------------------------------- one session (child)
    def run_session(self, conn: socket.socket, number: int) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        label = f"session {number}"
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = FrameReader(conn)
        try:
            plen, op, _flags = REQ_HEADER.unpack(reader.read(REQ_HEADER.size))
            if op != OP_HELLO or plen < HELLO.size or plen > 4096:
                log.warning("%s: first frame is not a hello; closing", label)
                return 2
            version, pid, tlen = HELLO.unpack(reader.read(HELLO.size))
            if tlen != plen - HELLO.size:
                log.warning("%s: malformed hello; closing", label)
                return 2
            token = bytes(reader.read(tlen)).decode("utf-8", "replace")
            label = f"session {number} (client pid {pid})"
            if version != PROTOCOL_VERSION:
                return _refuse(conn, E.NOT_SUPPORTED, f"the shim speaks gpulab protocol version {version}, this worker "
                                                      f"{PROTOCOL_VERSION}: use the same gpulab release on both sides")
            try:
                limits = self.limits_for(token)
            except LimitError as exc:
                return _refuse(conn, E.NOT_PERMITTED, f"this worker's limits for the session token are not valid "
                                                      f"({exc}); tell your hub admin")
            if limits is None:
                log.warning("%s: wrong session token", label)
                return _refuse(conn, E.NOT_PERMITTED, "the session token is not valid for this worker")
            quota = limits.get("vram") or self.vram_quota  # integers: checked where they entered
            backend = self.make_backend()
            msg = f"{backend.name} backend".encode()
            conn.sendall(REP_HEADER.pack(len(msg), 0, 0) + msg)
            session = Session(backend, quota=quota, label=label, usage=self.usage_counter(token, label))
            log.info("%s: opened (%s, quota %s)", label, backend.name, quota)
            executor = Executor(reader, session, self.max_frame)
            try:
                executor.serve()
            except EOFError:
                log.info("%s: client closed after %d calls", label, executor.calls)
            except ProtocolError as exc:
                log.error("%s: protocol error, closing the session: %s", label, exc)
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                    log.error("%s: socket error: %s", label, exc)
            finally:
                session.close()
            return 0
        except (EOFError, OSError, struct.error) as exc:
            log.warning("%s: closed during the handshake: %s", label, exc)
            return 2

    def usage_counter(self, token: str, label: str) -> UsageCounter | None:
        """This executor's published VRAM use, when there is a pool to report it to."""
        if self.pool_link is None:
            return None
        try:
            return UsageCounter(self.usage_dir, token_hash(token))
        except OSError as exc:
            log.error("%s: cannot publish VRAM use in %s: %s", label, self.usage_dir, exc)
            return None

    def make_backend(self) -> Backend:
        if self.kind == "emulated":
            from ..backends.emulated import EmulatedBackend

            return EmulatedBackend(total_memory=self.emulated_memory)
        from ..backends.cuda import CudaBackend

        return CudaBackend()


def _import_kernels(name: str) -> None:
    """Import a kernel module by dotted name or by the path of a .py file."""
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"gpulab_kernels_{abs(hash(name))}", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)


def _refuse(conn, code: int, message: str) -> int:
    """Refuse a session: the whole payload is the reason (so any shim version can print it)."""
    data = message.encode()
    try:
        conn.sendall(REP_HEADER.pack(len(data), code, len(data)) + data)
    except OSError:
        pass
    return 1


def _gpu_visible() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0"))
