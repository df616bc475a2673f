"""The worker's side of the GPU pool: enrol, register, send heartbeats, ask about session tokens.

The shared worker secret only enrols: the first registration of this worker's name answers a
credential of its own, which the link keeps in a private file and uses for everything after
(re-registering, heartbeats, session look-ups), so that no holder of the shared secret can
take this worker's name over.  A pool that no longer knows the credential (a new database, an
admin released the name) refuses it; the link then enrols again.

Tokens are issued by the pool when it places a vGPU here; the worker asks the pool about
a token it does not know when a session presents it, so a token works the moment the pool
has issued it and stops working the moment the allocation is released.

Each heartbeat carries the VRAM in use of every session whose executor is alive, read from
the executors' counters (usage.py) at that moment.  The link looks at them twice a second and
beats at once when a figure changed, so the dashboard follows allocations and frees closely
without the pool being written to when nothing moves.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

from .usage import read_usage

log = logging.getLogger("gpulab.worker")

WATCH_PERIOD = 0.5  # seconds between looks at the usage counters; also the least gap between two heartbeats


def describe_gpus(kind: str, worker_name: str, emulated_memory: int) -> list[dict]:
    """The GPUs this worker serves, as the pool records them."""
    if kind == "emulated":
        from ..backends.emulated import DEVICE_NAME

        return [{"uuid": "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"gpulab-emulated-{worker_name}")),
                 "index": 0, "model": DEVICE_NAME, "memory": emulated_memory, "capability": "9.0", "emulated": True}]
    import pynvml  # nvidia-ml-py: facts without creating a CUDA context in the daemon

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append({"uuid": _text(pynvml.nvmlDeviceGetUUID(h)), "index": i, "model": _text(name),
                         "memory": int(pynvml.nvmlDeviceGetMemoryInfo(h).total), "capability": f"{major}.{minor}",
                         "emulated": False})
        return gpus
    finally:
        pynvml.nvmlShutdown()


def default_credential_file(worker_name: str) -> str:
    """Where a worker keeps its pool credential: state that must survive reboots, one file per name
    (not per pool URL, which may change while the pool stays the same) in $GPULAB_STATE_DIR, else
    $XDG_STATE_HOME/gpulab, else ~/.local/state/gpulab."""
    state = os.environ.get("GPULAB_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"), "gpulab")
    return os.path.join(state, f"worker-{worker_name}.credential")


class PoolRefused(Exception):
    """The pool refused this worker, with its sentence."""


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class PoolLink:
    def __init__(self, url: str, token: str, name: str, address: str, node: str, backend: str, gpus: list[dict],
                 interval: float = 5.0, usage_dir: str = "", credential_file: str = ""):
        self.url = url.rstrip("/")
        self.token = token  # the enrolment secret
        self.credential_file = credential_file or default_credential_file(name)
        self.credential = self._load_credential()
        self.name = name
        self.info = {"name": name, "address": address, "node": node or socket.gethostname(), "backend": backend,
                     "gpus": gpus}
        self.interval = interval
        self.usage_dir = usage_dir
        self._stop = threading.Event()

    def _load_credential(self) -> str:
        try:
            with open(self.credential_file) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    def _save_credential(self, credential: str) -> None:
        """Private to the worker's user, written whole (a crash never leaves half a credential)."""
        os.makedirs(os.path.dirname(self.credential_file) or ".", mode=0o700, exist_ok=True)
        tmp = f"{self.credential_file}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(credential + "\n")
        os.replace(tmp, self.credential_file)
        self.credential = credential

    def _request(self, method: str, path: str, body=None, timeout: float = 5.0, token: str | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"token {token or self.credential}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def register(self) -> None:
        """Register with this worker's credential; without one, or when the pool no longer knows
        it, enrol with the shared secret.  PoolRefused says why the pool will not have us."""
        if self.credential:
            try:
                self._request("POST", "/api/workers", self.info)
                log.info("registered with the GPU pool at %s as %s", self.url, self.name)
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 403:
                    raise PoolRefused(_reason(exc)) from None
                log.warning("the GPU pool does not accept this worker's credential (%s): enrolling again",
                            _reason(exc))
        try:
            answer = self._request("POST", "/api/workers", self.info, token=self.token)
        except urllib.error.HTTPError as exc:
            raise PoolRefused(_reason(exc)) from None
        self._save_credential(answer["credential"])
        log.info("enrolled with the GPU pool at %s as %s (credential in %s)", self.url, self.name,
                 self.credential_file)

    def heartbeat(self, usage: dict | None) -> None:
        """Tell the pool this worker lives and what its sessions hold (None: not known, leave the figures)."""
        body: dict = {"pid": os.getpid()}
        if usage is not None:
            body["sessions"] = usage
        try:
            self._request("POST", f"/api/workers/{self.name}/heartbeat", body)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):  # the pool forgot us (new database, name released): again
                self.register()
            else:
                raise

    def session_usage(self) -> dict:
        """VRAM in use per session, keyed by token hash, over every live executor of this worker."""
        return read_usage(self.usage_dir) if self.usage_dir else {}

    def session_limits(self, token: str):
        """Limits of a session token the pool issued for this worker, or None."""
        if not self.credential:
            return None
        try:
            return self._request("POST", f"/api/workers/{self.name}/sessions", {"token": token})
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):
                return None
            raise

    def run(self) -> None:
        """Register, then beat until stopped (a thread of the daemon).

        The first heartbeat goes right after registering, so the pool hears at once what this
        worker's sessions hold (after a restart: nothing, as the old daemon's executors died with it)."""
        while not self._stop.is_set():
            try:
                self.register()
                break
            except PoolRefused as exc:  # e.g. the name is taken: an admin may release it
                log.error("the GPU pool at %s refuses worker %s: %s (retrying)", self.url, self.name, exc)
                self._stop.wait(max(self.interval, 2.0))
            except OSError as exc:
                log.warning("cannot register with the GPU pool at %s: %s (retrying)", self.url, exc)
                self._stop.wait(min(self.interval, 2.0))
        sent, beat_at, failing = None, float("-inf"), False
        while not self._stop.is_set():
            try:
                usage = self.session_usage()
            except OSError as exc:
                log.error("cannot read the sessions' VRAM use in %s: %s", self.usage_dir, exc)
                usage = None
            now = time.monotonic()
            changed = usage != sent and not failing  # an unreachable pool is retried at the interval only
            if now - beat_at >= self.interval or (changed and now - beat_at >= WATCH_PERIOD):
                beat_at = now
                try:
                    self.heartbeat(usage)
                    sent, failing = usage, False
                except (OSError, PoolRefused) as exc:
                    log.warning("heartbeat to the GPU pool failed: %s", _reason(exc))
                    failing = True
            self._stop.wait(max(min(self.interval, WATCH_PERIOD) - (time.monotonic() - now), 0.01))

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="gpulab-pool-link", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()


def _reason(exc: Exception) -> str:
    """The pool's sentence from an error answer, else the error itself."""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            return f"{exc.code}: {json.loads(exc.read())['message']}"
        except (ValueError, KeyError, TypeError, OSError):
            return f"{exc.code} {exc.reason}"
    return str(exc)
