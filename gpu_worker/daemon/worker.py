"""The worker daemon: accept sessions, admit their token against a grant, fork one executor each.

One process per session isolates faults: a sticky CUDA error, a crash or a protocol
violation ends that session only.  The daemon itself never touches the GPU, so it can
fork safely; each executor initialises CUDA for itself, seeing only its vGPU's GPUs.
All executors of one vGPU share its ledger (vgpus.py, ledger.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import errno
import fcntl
import hmac
import importlib
import importlib.util
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import struct
import sys
import time

from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from ..api import errors as E
from .executor import Executor, FrameReader
from ..api.protocol import HELLO, MAX_FRAME, OP_HELLO, PROTOCOL_VERSION, REP_HEADER, REQ_HEADER, ProtocolError
from ..api.wire import OP_NATIVE_HELLO
from ..client.env import gpu_visible
from ..client.tokens import token_hash
from .ledger import Slot
from .native import DriverCheckpointer, EmulatedCheckpointer, NativeLink, NativeProcesses
from .pacing import QOS_RANK, Pacer
from .session import Session
from .tiers import TierStore
from .vgpus import VGPURegistry, safe_name
from ..backends.base import Backend
from ..client.limits import LimitError, Size, token_limits
from ..client.units import format_size

log = logging.getLogger("gpulab.worker")

# idle seconds before the policy moves a vGPU's memory, per QoS level (0: never); configured levels replace these
WARM_AFTER = {"low": 600.0, "medium": 1800.0, "high": 0.0}
COLD_AFTER = {"low": 3600.0, "medium": 7200.0, "high": 0.0}
SPOOL_LOCK = ".lock"  # in the worker's spool subdirectory: who holds it (flock), never emptied


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
    emulated_memory = Size(16 << 30, help="Memory size each emulated GPU reports (a size, e.g. '16G')."
                           ).tag(config=True)
    emulated_gpus = Int(1, help="GPUs the emulated backend emulates (each a test double with its own uuid and "
                               "memory), so that placement on one GPU of a multi-GPU worker can be tested "
                               "without one.").tag(config=True)
    emulated_context_overhead = Size(None, allow_none=True,
                                     help="Device memory the emulated backend charges for each process's CUDA "
                                          "context (a size; empty: none; on a real GPU it is measured with NVML)."
                                     ).tag(config=True)
    context_overhead_estimate = Size(512 << 20, help="On a real GPU: device memory charged to a vGPU for a new "
                                                    "process's CUDA context until NVML has measured one on this "
                                                    "worker (then the largest measured is charged up front and "
                                                    "each process's own measurement replaces it).").tag(config=True)
    pacing = Bool(True, help="Pace each vGPU's kernel launches to its compute share (docs/vgpu.md, *Compute "
                             "shares*); off: kernel time is still measured, nothing waits (for benchmarks)."
                  ).tag(config=True)
    control = Unicode("", help="host:port of the control API (vGPUs, usage, call trace, revoke, /metrics; "
                              "docs/vgpu.md).  Default: the TCP listener's host with a free port, else "
                              "127.0.0.1 with a free port.  'off': none.").tag(config=True)
    admin_token = Unicode("", help="Credential of the control API that sees every vGPU (Prometheus, the "
                                   "pool, `gpulab vgpu` as admin).  Default: $GPULAB_WORKER_ADMIN_TOKEN, else a "
                                   "random one kept in worker-<name>.admin-token in the state directory."
                          ).tag(config=True)
    pool_url = Unicode("", help="URL of the GPU pool's worker listener to register with (its "
                       "GPUPool.worker_bind_url, not the hub's service URL; empty: standalone worker)."
                       ).tag(config=True)
    pool_token = Unicode("", help="The pool's shared enrolment secret (default: $GPULAB_POOL_TOKEN). It only "
                         "enrols this worker's name once; the credential the pool then issues to this worker "
                         "is kept in pool_credential_file and used from then on.").tag(config=True)
    pool_credential_file = Unicode("", help="Private file where this worker keeps the credential the pool "
                                   "issued to it (it must survive restarts: a name already enrolled takes only "
                                   "its own credential). Default: worker-<name>.credential in "
                                   "$GPULAB_STATE_DIR, else $XDG_STATE_HOME/gpulab, else "
                                   "~/.local/state/gpulab.").tag(config=True)
    name = Unicode("", help="Name of this worker in the pool (default: host name and port).").tag(config=True)
    advertise = Unicode("", help="Address clients use to reach this worker, tcp://host:port (default: the TCP "
                                 "listening address).").tag(config=True)
    node = Unicode("", help="Node (host) this worker runs on; local vGPUs are placed on the user's node."
                   ).tag(config=True)
    pod = Unicode(help="Name of the Kubernetes pod this worker runs in, sent to the pool at registration so that "
                       "its pod watch marks this worker lost at once when the pod is deleted or fails (default: "
                       "$GPULAB_POD_NAME, which deploy/kubernetes/worker.yaml sets from the downward API; empty "
                       "outside a pod).").tag(config=True)
    heartbeat_interval = Float(5.0, help="Seconds between heartbeats to the pool (a change of a session's VRAM "
                                         "use is sent sooner, at most twice a second).").tag(config=True)
    max_frame = Int(MAX_FRAME, help="Largest request frame accepted (bulk copy data excepted); a "
                                            "larger one closes the session.").tag(config=True)
    handshake_timeout = Float(10.0, help="Seconds a new connection has to send its HELLO (protocol version and "
                                         "session token); a slower one is closed.  Until its token is checked a "
                                         "connection costs the daemon a socket and at most 4 KiB, never a process."
                              ).tag(config=True)
    max_handshakes = Int(64, help="Connections that may be in their handshake (not yet authenticated) at once; "
                                  "a new one past this closes the oldest (one log line per burst), so idle "
                                  "connections cannot keep a real client, which sends its HELLO at once, out."
                         ).tag(config=True)
    max_sessions_per_token = Int(64, help="Sessions (client processes, one executor each) one vGPU may hold "
                                          "open on this worker at once; another is refused with "
                                          "CUDA_ERROR_DEVICE_UNAVAILABLE and a reason.  0: up to 256 (the "
                                          "most a vGPU's ledger holds).").tag(config=True)
    max_handles = Int(65536, help="Handles (contexts, streams, events, modules, functions) one session may hold "
                                  "at once; creating another fails with CUDA_ERROR_OUT_OF_MEMORY and a reason.  "
                                  "Each costs the executor a few hundred bytes.  0: no limit.").tag(config=True)
    max_modules = Int(1024, help="Loaded modules and libraries one session may hold at once (each keeps its "
                                 "image); loading another fails with CUDA_ERROR_OUT_OF_MEMORY and a reason.  "
                                 "0: no limit.").tag(config=True)
    max_module_bytes = Size(1 << 30, allow_none=True,
                            help="Bytes of module and library images one session may hold loaded at once (a size, "
                                 "e.g. '1G'); loading past it fails with CUDA_ERROR_OUT_OF_MEMORY and a reason.  "
                                 "None: no limit.").tag(config=True)
    warm_after = Dict(default_value=dict(WARM_AFTER),
                      help="Seconds a vGPU may be idle (no call that needs its device memory) before its memory "
                           "moves to the worker's host RAM (the warm tier), per QoS level (low, medium, high); "
                           "0: never by idleness.  A level left out keeps its default ({'low': 600, 'medium': "
                           "1800, 'high': 0}), so {'low': 60} changes low only.  docs/vgpu.md, *VRAM tiers*."
                      ).tag(config=True)
    cold_after = Dict(default_value=dict(COLD_AFTER),
                      help="Seconds a vGPU may be idle before its memory moves to files in spool_dir (the cold "
                           "tier), per QoS level; 0: never by idleness.  A level left out keeps its default "
                           "({'low': 3600, 'medium': 7200, 'high': 0}).").tag(config=True)
    warm_budget = Size(None, allow_none=True,
                       help="Host RAM the warm tier may hold over all vGPUs (a size, e.g. '64G'), native "
                            "processes' checkpoints included; an offload past it goes cold, and a native "
                            "process (its checkpoint has no cold tier) is not frozen.  0: no warm tier.  Empty: "
                            "half of this machine's memory."
                       ).tag(config=True)
    spool_dir = Unicode("", help="Directory under which the cold tier's files go: the worker works in its own "
                                 "subdirectory gpulab-<name> (mode 0700), locked while it runs (a second worker "
                                 "of the same name there refuses to start) and emptied at start; nothing else in "
                                 "spool_dir is touched.  Default: spool in the worker's state directory."
                        ).tag(config=True)
    native_time_every = Int(64, min=1, max=1 << 20,
                            help="A native process of a vGPU that is not paced (its share is its GPUs' whole time) "
                                 "times one kernel launch in each run of this many, at a random place in the run, "
                                 "and counts it for the run: its kernel time (share_measured, the usage report's "
                                 "weighted GPU-hours) is an estimate at a cost of well under a microsecond a "
                                 "launch. 1: every launch, exact, at a few microseconds each. Paced vGPUs time "
                                 "every launch.").tag(config=True)
    eviction_wait = Float(10.0, help="Seconds an allocation or restore that finds its GPU full waits for other "
                                     "vGPUs to move to host memory; then it fails with "
                                     "CUDA_ERROR_OUT_OF_MEMORY and the reason.").tag(config=True)
    wrong_token_burst = Int(10, help="Wrong session tokens one source (an IP address; a local user for the Unix "
                                     "socket) may present within wrong_token_window.  After that its connections "
                                     "are refused unchecked (no tokens file read, no pool look-up) until the "
                                     "window ends.  The log has one line per source and window.").tag(config=True)
    wrong_token_window = Float(10.0, help="Seconds over which wrong_token_burst counts wrong tokens per source."
                               ).tag(config=True)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.listeners: list[socket.socket] = []
        self.children: set[int] = set()  # executor pids
        self.registry: VGPURegistry | None = None
        self.control_server = None
        self.pending: dict[socket.socket, _Handshake] = {}
        self.checking: dict[socket.socket, _Handshake] = {}  # token look-ups under way, off the loop
        self._checked: collections.deque = collections.deque()  # (handshake, limits or exception) to finish
        self._lookups = None
        self._wake_r = self._wake_w = None
        self.wrong: dict[str, _WrongTokens] = {}
        self._dropped = 0  # connections closed over max_handshakes since the last log line
        self._dropped_logged = float("-inf")
        self.sessions = 0
        self._stop = False
        self.pool_link = None
        self.tiering = None
        self.native = None  # native-mode processes attached to the vGPUs (native.py)
        self._spool_lock: int | None = None  # fd of the spool's lock file, held (flock) for the worker's lifetime
        self.evict_links: dict[int, _EvictLink] = {}  # executor pid -> the daemon's end of its eviction link
        self._next_tick = 0.0

    # ------------------------------------------------------------------ set-up
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "cuda" if gpu_visible() else "emulated"

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
            # every user's server on the node connects here (each as its own Unix user); the token decides
            os.chmod(self.unix_socket, 0o666)
            s.listen(128)
            self.listeners.append(s)
            addrs.append(f"unix://{self.unix_socket}")
        if not self.listeners:
            raise ValueError("the worker needs --tcp and/or --unix-socket")
        self.addrs = addrs
        self.open_registry()
        # revocation (SIGUSR1) and tier requests (SIGUSR2) reach executors as signals: ignored until an
        # executor installs its handlers, so that one signalled between its fork and that moment does not die
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        # from here SIGINT/SIGTERM end the accept loop quietly, which then stops the sessions
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())
        return addrs

    def worker_name(self) -> str:
        """This worker's name in the pool and in its state files."""
        if self.name:
            return self.name
        tcp = next((a for a in self.addrs if a.startswith("tcp://")), "")
        if self.advertise or tcp:
            where = (self.advertise or tcp).rsplit(":", 1)[-1]
        else:  # a Unix socket only: its file name, as a name may appear in paths and URLs
            where = os.path.splitext(os.path.basename(self.unix_socket))[0]
        return safe_name(f"{socket.gethostname()}-{where}")[:128]

    def open_registry(self) -> None:
        """This worker's GPUs and the vGPUs its configuration grants (a bad grant stops start-up)."""
        from .gpus import describe_gpus

        gpus = describe_gpus(self.kind, self.worker_name(), self.emulated_memory, self.emulated_gpus)
        if not gpus:
            raise ValueError("this worker has no GPU to serve")
        self.registry = VGPURegistry(gpus, self.kind, slots=min(self.max_sessions_per_token or 256, 256),
                                     context_overhead=self.emulated_context_overhead or 0,
                                     overhead_estimate=self.context_overhead_estimate,
                                     warm_budget=self.resolved_warm_budget(), spool=self.open_spool())
        from .tiering import Tiering

        self.tiering = Tiering(self.registry, warm_after=self.warm_after, cold_after=self.cold_after,
                               eviction_wait=self.eviction_wait)
        self.native = NativeProcesses(self.registry, EmulatedCheckpointer(self.registry) if self.kind == "emulated"
                                      else DriverCheckpointer())
        self.native.tiering = self.tiering  # a native process whose GPU is full asks for room as executors do
        self.native.time_every = self.native_time_every
        static = dict(self.tokens)
        if self.token:
            static.setdefault(self.token, {})
        try:
            self.registry.set_static([self.static_grant(t, limits, "c.GPUWorker.tokens")
                                      for t, limits in static.items()])
        except LimitError as exc:
            raise ValueError(str(exc)) from None

    def resolved_warm_budget(self) -> int:
        """The warm tier's host-RAM budget: as configured, else half of this machine's memory."""
        if self.warm_budget is not None:
            return self.warm_budget
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def open_spool(self) -> str:
        """The cold tier's directory, <spool_dir>/gpulab-<name>: this worker's own, locked for its lifetime and
        emptied at start (what a previous run left there belonged to processes that ended with it, and nobody
        can restore it now).  Nothing else in spool_dir is ever deleted."""
        from ..client.env import default_state_dir

        base = self.spool_dir or os.path.join(default_state_dir(), "spool")
        os.makedirs(base, mode=0o700, exist_ok=True)
        path = os.path.join(base, f"gpulab-{self.worker_name()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if os.path.islink(path) or not os.path.isdir(path):
                raise ValueError(f"{path} (the cold tier's directory of this worker) exists and is not a "
                                 f"directory: remove it, or give another --spool-dir") from None
        info = os.stat(path)
        if info.st_uid != os.getuid():
            raise ValueError(f"{path} (the cold tier's directory of this worker) belongs to another user "
                             f"(uid {info.st_uid}): give another --spool-dir")
        os.chmod(path, 0o700)
        self._spool_lock = self._lock_spool(path)
        files = size = 0
        for entry in os.listdir(path):
            if entry == SPOOL_LOCK:
                continue
            full = os.path.join(path, entry)
            tree = os.path.isdir(full) and not os.path.islink(full)
            found = ([os.path.join(root, n) for root, _dirs, names in os.walk(full) for n in names] if tree
                     else [full])
            for f in found:
                try:
                    size += os.lstat(f).st_size
                    files += 1
                except OSError:
                    pass
            if tree:
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)
        if files:
            log.warning("removed %d cold-tier files (%s) a previous run of this worker left in %s: their "
                        "processes ended with it", files, format_size(size), path)
        return path

    def _lock_spool(self, path: str) -> int:
        """An exclusive flock on the spool's lock file, held while the worker (or an executor it forked) lives;
        ValueError naming the other worker when one holds it."""
        lock = os.path.join(path, SPOOL_LOCK)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another worker"
            os.close(fd)
            raise ValueError(f"the spool directory {path} is in use by {holder}: two workers cannot share it "
                             f"(each deletes what it finds there); give this one another --spool-dir or --name"
                             ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"worker {self.worker_name()} (pid {os.getpid()}, host {socket.gethostname()})\n".encode(), 0)
        return fd

    @default("pod")
    def _pod(self):
        return os.environ.get("GPULAB_POD_NAME", "")

    @validate("warm_after", "cold_after")
    def _check_tier_times(self, proposal):
        """Idle times are checked at start-up, once: a QoS level we do not know or a negative time stops it; the
        levels not given keep their defaults."""
        name = proposal["trait"].name
        out = dict(WARM_AFTER if name == "warm_after" else COLD_AFTER)  # a level left out keeps its default
        for qos, seconds in proposal["value"].items():
            if qos not in QOS_RANK:
                raise TraitError(f"c.GPUWorker.{name}: {qos!r} is not a QoS level (low, medium, high)")
            try:
                seconds = float(seconds)
            except (TypeError, ValueError):
                raise TraitError(f"c.GPUWorker.{name}[{qos!r}]: {seconds!r} is not a number of seconds") from None
            if seconds < 0:
                raise TraitError(f"c.GPUWorker.{name}[{qos!r}]: {seconds} is negative (0 means never)")
            out[qos] = seconds
        return out

    # ------------------------------------------------------------------ tokens
    @validate("tokens")
    def _check_tokens(self, proposal):
        """Limits in the config are checked at start-up: a bad one stops the worker, not a session."""
        try:
            return {str(t): token_limits(v, f"c.GPUWorker.tokens[token {token_hash(str(t))[:8]}]")
                    for t, v in proposal["value"].items()}
        except LimitError as exc:
            raise TraitError(str(exc)) from None

    def static_grant(self, token: str, limits: dict, where: str) -> dict:
        """A grant from this worker's own configuration: its limits, and its GPUs as uuids or indices
        (default: the first GPU).  LimitError names the setting when one does not fit this worker."""
        h = token_hash(token)
        where = f"{where}[token {h[:8]}]"
        gpus = self.registry.gpus()
        chosen = []
        for g in limits.get("gpus") or [0]:
            if isinstance(g, int) and not isinstance(g, bool) and 0 <= g < len(gpus):
                chosen.append(gpus[g]["uuid"])
            elif isinstance(g, str) and any(x["uuid"] == g for x in gpus):
                chosen.append(g)
            else:
                raise LimitError(f"{where}.gpus: {g!r} is not a GPU of this worker (an index below {len(gpus)} or a "
                                 "uuid)")
        burst = limits.get("burst")
        if burst is not None and not isinstance(burst, bool):
            raise LimitError(f"{where}.burst: {burst!r} is not true or false")
        qos = limits.get("qos", "medium")
        if qos not in ("low", "medium", "high"):
            raise LimitError(f"{where}.qos: {qos!r} is not low, medium or high")
        grant = {"token_hash": h, "id": f"t-{h[:8]}", "user": "", "profile": "worker configuration",
                 "qos": qos, "burst": burst, "gpus": chosen, "vram": limits.get("vram") or self.vram_quota,
                 "compute": limits.get("compute", 100)}
        try:
            return self.registry.check_grant(grant, where)
        except ValueError as exc:
            raise LimitError(str(exc)) from None

    def grant_for(self, token: str):
        """The grant of a valid token, or None; a Refusal for a vGPU that ended.

        A tokens-file entry is checked when the file is read for a session; a bad one raises LimitError
        (that token is refused with the reason), so the executor only ever gets integers."""
        table = dict(self.tokens)
        if self.token:
            table.setdefault(self.token, {})
        source = "c.GPUWorker.tokens"
        file_read = False
        if self.tokens_file:
            try:
                with open(self.tokens_file) as f:
                    entries = json.load(f)
                if not isinstance(entries, dict):
                    raise ValueError("it is not a JSON object of {token: limits}")
                table.update(entries)
                file_read = True
            except (OSError, ValueError) as exc:
                log.error("cannot read tokens file %s: %s", self.tokens_file, exc)
        found = False
        for known, limits in table.items():  # every entry compared: the time says nothing of a match
            if hmac.compare_digest(str(known).encode(), token.encode()):
                found = True
                if self.tokens_file and known not in self.tokens and known != self.token:
                    source = f"tokens file {self.tokens_file}"
                try:
                    grant = self.static_grant(token, token_limits(limits, source), source)
                except LimitError as exc:
                    log.error("refusing a session: %s", exc)
                    raise
                self.registry.set_static([grant])
        if not found and file_read:  # removed from the tokens file: its vGPU ends
            self.registry.withdraw_static(token)
        if not token:
            return None
        try:
            return self.registry.admit(token)
        except OSError as exc:  # not a wrong token: one this worker cannot check right now
            log.error("cannot ask the GPU pool about a session token: %s", exc)
            raise E.Refusal(E.DEVICE_UNAVAILABLE, "this worker cannot reach the GPU pool to check a vGPU placed in "
                                                  "the last moments; try again shortly") from None

    def start_control(self) -> str:
        """The control API (docs/vgpu.md) in a thread; its URL and admin token go into the state
        directory for `gpulab vgpu` on this host."""
        if self.control == "off":
            return ""
        from .control import ControlServer, publish, state_files
        from ..client.env import default_state_dir

        name = self.worker_name()
        state = default_state_dir()
        token = self.admin_token or os.environ.get("GPULAB_WORKER_ADMIN_TOKEN", "")
        _, token_file = state_files(state, name)
        if not token:
            try:
                with open(token_file) as f:
                    token = f.read().strip()
            except FileNotFoundError:
                token = secrets.token_urlsafe(32)
        bind = self.control
        if not bind:
            tcp = next((a for a in self.addrs if a.startswith("tcp://")), "")
            bind = f"{tcp[len('tcp://'):].rsplit(':', 1)[0] if tcp else '127.0.0.1'}:0"
        self.control_server = ControlServer(self.registry, token, bind)
        url = self.control_server.start()
        host = url.split("//", 1)[1].rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", "::", ""):  # listening everywhere: others reach it by a name
            reach = (self.advertise.split("//", 1)[-1].rsplit(":", 1)[0] if self.advertise else "") \
                or socket.getfqdn()
            url = f"http://{reach}:{url.rsplit(':', 1)[1]}"
        publish(state, name, url, token)
        log.info("control API at %s (admin token in %s)", url, token_file)
        return url

    def connect_pool(self, addrs: list[str], control_url: str = "") -> None:
        """Register with the pool and keep beating (a daemon thread)."""
        if not self.pool_url:
            return
        from .pool_link import PoolLink

        tcp = next((a for a in addrs if a.startswith("tcp://")), "")
        address = self.advertise or tcp or addrs[0]
        token = self.pool_token or os.environ.get("GPULAB_POOL_TOKEN", "")
        self.pool_link = PoolLink(self.pool_url, token, self.worker_name(), address, self.node, self.kind,
                                  self.registry.gpus(), self.heartbeat_interval,
                                  credential_file=self.pool_credential_file, registry=self.registry,
                                  control_url=control_url, pod=self.pod, unix_socket=self._native_socket())
        self.pool_link.start()

    def _native_socket(self) -> str:
        """The Unix socket the pool may hand the servers of local vGPUs for native mode: none where this node
        has no native build of the shim (not x86-64), so that its local vGPUs are forwarded instead of loading
        the real driver unaccounted."""
        from ..shim import native_dir

        if not self.unix_socket:
            return ""
        try:
            built = (native_dir() / "libcuda.so.1").exists()
        except FileNotFoundError:
            built = False
        if not built:
            log.warning("native mode is off on this node (no native build of the shim, which is x86-64 only): "
                        "its local vGPUs are forwarded")
        return self.unix_socket if built else ""

    # ------------------------------------------------------------ accept loop
    def stop(self) -> None:
        """End the accept loop (safe in a signal handler); serve_forever then stops the sessions."""
        self._stop = True

    def serve_forever(self) -> None:
        """Accept, run each handshake in this process, fork an executor only for a good token.

        A connection costs a process only once it has proved its token: before that it is a
        non-blocking socket with a deadline, read as its bytes arrive (at most one HELLO)."""
        sel = selectors.DefaultSelector()
        for s in self.listeners:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, None)
        # a token the daemon does not know costs a look-up in the pool: run in threads, so that a
        # slow pool delays only that handshake, never the accept loop
        self._lookups = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="gpulab-token")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._stop:
            for key, _ in sel.select(timeout=self._next_wakeup()):
                if key.data is None:
                    self._accept(sel, key.fileobj)
                elif key.data == "wake":
                    self._finish_lookups(sel)
                elif isinstance(key.data, _EvictLink):
                    self._evict_request(sel, key.data)
                elif isinstance(key.data, NativeLink):
                    if not self.native.readable(key.data):
                        sel.unregister(key.fileobj)
                else:
                    self._handshake_bytes(sel, key.data)
            self._expire_handshakes(sel)
            self.reap(sel)
            now = time.monotonic()
            if now >= self._next_tick:  # the idle policy (idle vGPUs move to host memory), the vGPUs' utilization
                self._next_tick = now + TIER_TICK
                try:
                    self.tiering.tick()
                except Exception:
                    log.exception("the VRAM tier policy failed (it runs again in %.3g s)", TIER_TICK)
                try:
                    self.registry.publish_utilization()
                except Exception:
                    log.exception("the vGPUs' utilization was not published (it is tried again in %.3g s)",
                                  TIER_TICK)
        for hs in list(self.pending.values()):
            self._drop(sel, hs)
        self._lookups.shutdown(wait=False, cancel_futures=True)
        for conn in list(self.checking):
            conn.close()
        if self.native is not None:
            self.native.close_all()
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reap()
        if self.control_server is not None:
            self.control_server.stop()

    def reap(self, sel=None) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)
                self.registry.reap(pid)
                link = self.evict_links.pop(pid, None)
                if link is not None:
                    if sel is not None:
                        try:
                            sel.unregister(link.sock)
                        except (KeyError, ValueError):
                            pass
                    link.sock.close()

    def _evict_request(self, sel, link: "_EvictLink") -> None:
        """An executor found its GPU full: other vGPUs move to host memory (tiering.py answers from a thread
        of its own, as it may wait for them) and the executor gets what was freed or why nothing could be."""
        try:
            msg = link.sock.recv(4096)
        except OSError:
            msg = b""
        if not msg:  # the executor ended; reap() closes the link
            try:
                sel.unregister(link.sock)
            except (KeyError, ValueError):
                pass
            return
        self.tiering.request(link.vgpu, link.pid, msg, link.sock.send)

    # ------------------------------------------------------- handshake (daemon)
    def _next_wakeup(self) -> float:
        if not self.pending:
            return 0.5
        first = min(hs.deadline for hs in self.pending.values())
        return min(0.5, max(first - time.monotonic(), 0.0))

    def _accept(self, sel, listener) -> None:
        for _ in range(64):  # a bounded batch: the handshakes under way get their turn too
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if len(self.pending) >= self.max_handshakes:
                # the oldest makes room: a real client sends its HELLO at once, so idle connections
                # cannot keep it out, only a flood faster than its round trip could
                self._drop(sel, next(iter(self.pending.values())))
                self._dropped += 1
                now = time.monotonic()
                if now - self._dropped_logged >= self.handshake_timeout:
                    log.warning("closed %d connection(s) still in their handshake to make room for new ones "
                                "(GPUWorker.max_handshakes is %d)", self._dropped, self.max_handshakes)
                    self._dropped, self._dropped_logged = 0, now
            conn.setblocking(False)
            hs = _Handshake(conn, _source_of(conn), time.monotonic() + self.handshake_timeout)
            self.pending[conn] = hs
            sel.register(conn, selectors.EVENT_READ, hs)

    def _drop(self, sel, hs: "_Handshake") -> None:
        self.pending.pop(hs.conn, None)
        try:
            sel.unregister(hs.conn)
        except (KeyError, ValueError):
            pass
        try:
            hs.conn.recv(65536)  # unread bytes would make the close a reset, hiding the reason from the client
        except OSError:
            pass
        hs.conn.close()

    def _expire_handshakes(self, sel) -> None:
        now = time.monotonic()
        late = [hs for hs in self.pending.values() if hs.deadline <= now]
        for hs in late:
            self._drop(sel, hs)
        if late:
            log.warning("closed %d connection(s) that sent no complete HELLO within %.3g s "
                        "(GPUWorker.handshake_timeout)", len(late), self.handshake_timeout)

    def _handshake_bytes(self, sel, hs: "_Handshake") -> None:
        """Read what has arrived of the HELLO, never past it (what follows is the executor's)."""
        need = REQ_HEADER.size if len(hs.data) < REQ_HEADER.size else REQ_HEADER.size + hs.plen
        try:
            got = hs.conn.recv(need - len(hs.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = b""
        if not got:
            self._drop(sel, hs)
            return
        hs.data += got
        if len(hs.data) == REQ_HEADER.size:
            plen, op, flags = REQ_HEADER.unpack(hs.data)
            if op not in (OP_HELLO, OP_NATIVE_HELLO) or plen < HELLO.size or plen > 4096:
                log.warning("connection from %s: first frame is not a hello; closing", hs.source)
                self._drop(sel, hs)
                return
            hs.plen, hs.op, hs.flags = plen, op, flags
            return
        if len(hs.data) < REQ_HEADER.size + hs.plen:
            return
        self.pending.pop(hs.conn)
        sel.unregister(hs.conn)
        if not self._admit(hs):
            hs.conn.close()

    def _admit(self, hs: "_Handshake") -> bool:
        """Check the HELLO, then look the token up in a thread; False: refused (the caller closes)."""
        conn = hs.conn
        version, pid, tlen = HELLO.unpack_from(hs.data, REQ_HEADER.size)
        if tlen != hs.plen - HELLO.size:
            log.warning("connection from %s: malformed hello; closing", hs.source)
            return False
        hs.token = bytes(hs.data[REQ_HEADER.size + HELLO.size:]).decode("utf-8", "replace")
        hs.pid = pid
        if version != PROTOCOL_VERSION:
            _refuse(conn, E.NOT_SUPPORTED, f"the shim speaks gpulab protocol version {version}, this worker "
                                           f"{PROTOCOL_VERSION}: use the same gpulab release on both sides")
            return False
        wait = self._throttled(hs.source)
        if wait:
            _refuse(conn, E.NOT_PERMITTED, f"too many wrong session tokens came from {hs.source}; this worker "
                                           f"checks none from there for {wait:.0f} s")
            return False
        if len(self.checking) >= self.max_handshakes:
            _refuse(conn, E.DEVICE_UNAVAILABLE, "the worker is busy checking other sessions' tokens; try again")
            return False
        self.checking[conn] = hs
        self._lookups.submit(self._look_up, hs)
        return True

    def _look_up(self, hs: "_Handshake") -> None:
        """(a thread) The token's limits, handed back to the loop."""
        try:
            result = self.grant_for(hs.token)
        except Exception as exc:  # LimitError, Refusal, or a bug: the loop refuses the session either way
            result = exc
        self._checked.append((hs, result))
        try:
            self._wake_w.send(b"!")
        except BlockingIOError:
            pass  # the loop has wake-ups queued already

    def _finish_lookups(self, sel) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._checked:
            hs, result = self._checked.popleft()
            self.checking.pop(hs.conn, None)
            try:
                kept = self._open(hs, result, sel)
            finally:
                if not kept:
                    hs.conn.close()  # the executor has its own copy

    def _open(self, hs: "_Handshake", grant, sel) -> bool:
        """Fork the session's executor for a granted token (attach a native-mode process), or refuse with a
        reason; True when the daemon keeps the connection (a native process's)."""
        conn, limits = hs.conn, grant
        label = f"session {self.sessions + 1} (client pid {hs.pid})"
        if isinstance(limits, E.Refusal):
            _refuse(conn, limits.code, limits.why)
            return False
        if isinstance(limits, LimitError):
            _refuse(conn, E.NOT_PERMITTED, f"this worker's limits for the session token are not valid "
                                           f"({limits}); tell your hub admin")
            return False
        if isinstance(limits, Exception):
            log.error("%s: checking its token failed: %r", label, limits)
            _refuse(conn, E.NOT_PERMITTED, "the worker could not check the session token (an internal error; "
                                           "its log has the details)")
            return False
        if limits is None:
            self._wrong_token(hs.source, label)
            _refuse(conn, E.NOT_PERMITTED, "the session token is not valid for this worker")
            return False
        if hs.op == OP_NATIVE_HELLO:
            return self._open_native(hs, grant, sel, f"session {self.sessions + 1}")
        self._fork_executor(hs, grant, sel, label)
        return False

    def _open_native(self, hs: "_Handshake", grant, sel, label: str) -> bool:
        try:
            link = self.native.open(hs.conn, grant, hs.flags, label, self.max_sessions_per_token)
        except E.Refusal as exc:
            log.warning("%s: native attach refused: %s", label, exc.why)
            _refuse(hs.conn, exc.code, exc.why)
            return False
        except OSError as exc:
            log.warning("%s: native attach failed: %s", label, exc)
            return False
        if link is None:
            return False
        self.sessions += 1
        sel.register(hs.conn, selectors.EVENT_READ, link)
        return True

    def _fork_executor(self, hs: "_Handshake", grant, sel, label: str) -> None:
        conn = hs.conn
        try:
            vgpu, slot = self.registry.open_slot(grant, hs.pid, self.max_sessions_per_token)
        except E.Refusal as exc:
            log.warning("%s: refused: %s", label, exc.why)
            _refuse(conn, exc.code, exc.why)
            return
        label = f"session {self.sessions + 1} of vGPU {vgpu.id} (client pid {hs.pid})"
        self.sessions += 1
        daemon = os.getpid()
        try:
            row = self.registry.claim_row()
        except E.Refusal as exc:
            self.registry.cancel(vgpu, slot)
            _refuse(conn, exc.code, exc.why)
            return
        # the executor asks the daemon here to move other vGPUs off its GPU when the GPU is full
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child = os.fork()
        except OSError as exc:
            self.registry.cancel(vgpu, slot)
            self.registry.tierboard.release(row)
            ours.close()
            theirs.close()
            log.error("%s: cannot fork an executor: %s", label, exc)
            _refuse(conn, E.DEVICE_UNAVAILABLE, "the worker cannot start a process for this session now; try again")
            return
        if child == 0:
            try:
                _die_with(daemon)
                for s in self.listeners:
                    s.close()
                for other in [*self.pending, *self.checking]:
                    other.close()  # else a timed-out client would wait for this executor's end
                for link in self.evict_links.values():
                    link.sock.close()
                for native in self.native.links.values():
                    native.conn.close()
                ours.close()
                sel.close()
                self._wake_r.close()
                self._wake_w.close()
                conn.setblocking(True)
                code = self.run_session(conn, label, grant, vgpu, slot, row, theirs)
            except BaseException:  # never return into the daemon's loop in a child
                log.exception("%s: executor failed", label)
                code = 3
            os._exit(code)
        theirs.close()
        self.children.add(child)
        self.registry.bind(vgpu, slot, child, row)
        link = self.evict_links[child] = _EvictLink(ours, vgpu, child)
        sel.register(ours, selectors.EVENT_READ, link)

    def _throttled(self, source: str) -> float:
        """Seconds left of a source's refusal, 0 when its tokens are checked."""
        rec = self.wrong.get(source)
        if rec is None:
            return 0
        left = rec.start + self.wrong_token_window - time.monotonic()
        if left <= 0 or rec.count < self.wrong_token_burst:
            return 0
        rec.unchecked += 1
        return left

    def _wrong_token(self, source: str, label: str) -> None:
        """Count a wrong token; log the first of each window per source, with what the last window had."""
        now = time.monotonic()
        rec = self.wrong.get(source)
        if rec is not None and now - rec.start < self.wrong_token_window:
            rec.count += 1
            return
        before = ""
        if rec is not None and (rec.count > 1 or rec.unchecked):
            before = (f" (before: {rec.count - 1} more wrong tokens and {rec.unchecked} connections refused "
                      f"unchecked in {self.wrong_token_window:.3g} s)")
        if len(self.wrong) > 4096:  # forget sources whose window has ended
            self.wrong = {s: r for s, r in self.wrong.items() if now - r.start < self.wrong_token_window}
        self.wrong[source] = _WrongTokens(now)
        log.warning("%s: wrong session token from %s%s; further ones from there in the next %.3g s are counted, "
                    "not logged", label, source, before, self.wrong_token_window)

    # ------------------------------------------------------- one session (child)
    def run_session(self, conn: socket.socket, label: str, grant: dict, vgpu, slot: int, row: int | None = None,
                    evict_sock: socket.socket | None = None) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            backend = self.make_backend(grant["gpus"])
            msg = f"{backend.name} backend".encode()
            conn.sendall(REP_HEADER.pack(len(msg), 0, 0) + msg)
            ledger = vgpu.ledger
            own = Slot(ledger, slot)
            board = self.registry.tierboard
            index = {g["uuid"]: g["index"] for g in self.registry.gpus()}
            tiers = TierStore(backend, own, board, row, [index[u] for u in grant["gpus"]],
                              self.registry.spool_of(vgpu, os.getpid()), evict_sock, self.eviction_wait)
            session = Session(backend, label=label, slot=own, device_quota=grant.get("vram"),
                              max_handles=self.max_handles, max_modules=self.max_modules,
                              max_module_bytes=self.max_module_bytes or 0,
                              pacer=Pacer(own, backend, vgpu.board, vgpu.row, enforce=self.pacing,
                                          gpus=len(grant["gpus"])), tiers=tiers)
            log.info("%s: opened (%s on %s, quota %s)", label, backend.name, ",".join(grant["gpus"]), ledger.quota)
            executor = Executor(FrameReader(conn), session, self.max_frame)
            executor.watch_signals()
            if ledger.revoked:  # revoked between the admission and now
                executor.revoked = executor.signalled = True
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
                # the signal handlers only set flags from here on: nothing acts on them during the close
                if session.pacer is not None and not session.ended:
                    session.pacer.publish()
                session.close()
                executor.settle()
                executor.publish()
            return 0
        except OSError as exc:
            log.warning("%s: closed while opening: %s", label, exc)
            return 2

    def make_backend(self, gpus: list[str]) -> Backend:
        """The backend of one session: it sees its vGPU's GPUs only, as devices 0..n-1."""
        if self.kind == "emulated":
            from ..backends.emulated import EmulatedBackend

            mine = [g for u in gpus for g in self.registry.gpus() if g["uuid"] == u]
            locks = {u: self.registry.device_locks[u] for u in gpus}
            return EmulatedBackend(total_memory=self.emulated_memory, gpus=mine, device_locks=locks)
        from ..backends.cuda import CudaBackend

        return CudaBackend(visible=gpus)


def _import_kernels(name: str) -> None:
    """Import a kernel module by dotted name or by the path of a .py file."""
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"gpulab_kernels_{abs(hash(name))}", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)


TIER_TICK = 1.0  # seconds between two looks of the idle policy at the vGPUs


class _EvictLink:
    """The daemon's end of one executor's eviction link."""

    __slots__ = ("sock", "vgpu", "pid")

    def __init__(self, sock: socket.socket, vgpu, pid: int):
        self.sock, self.vgpu, self.pid = sock, vgpu, pid


class _Handshake:
    """A connection in its handshake: all the daemon holds for it before the token is checked."""

    __slots__ = ("conn", "source", "deadline", "data", "plen", "op", "flags", "token", "pid")

    def __init__(self, conn: socket.socket, source: str, deadline: float):
        self.conn, self.source, self.deadline = conn, source, deadline
        self.data = b""
        self.plen = self.op = self.flags = 0
        self.token = ""
        self.pid = 0


class _WrongTokens:
    """Wrong tokens from one source in the current window."""

    __slots__ = ("start", "count", "unchecked")

    def __init__(self, start: float):
        self.start, self.count, self.unchecked = start, 1, 0


def _source_of(conn: socket.socket) -> str:
    """Whom to count wrong tokens against: the peer's IP address, or its user on the Unix socket."""
    try:
        if conn.family == socket.AF_UNIX:
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"local uid {uid}"
        return conn.getpeername()[0]
    except (OSError, AttributeError):
        return "unknown"


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with(daemon: int) -> None:
    """Make this executor end when the daemon does, however the daemon ends.

    An executor that outlived its daemon would go on holding GPU memory that the pool, having
    marked the worker lost, places again.  The kernel sends the signal when the parent dies;
    the pid check covers a daemon that died before the request was made."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != daemon:
        os._exit(1)


def _refuse(conn, code: int, message: str) -> None:
    """Refuse a session: the whole payload is the reason (so any shim version can print it)."""
    data = message.encode()
    try:
        conn.sendall(REP_HEADER.pack(len(data), code, len(data)) + data)
    except OSError:
        pass

