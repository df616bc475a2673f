"""The worker's side of the GPU pool: enrol, register, send heartbeats, receive grants.

The shared worker secret only enrols: the first registration of this worker's name answers a
credential of its own, which the link keeps in a private file and uses for everything after
(re-registering, heartbeats, grant look-ups), so that no holder of the shared secret can
take this worker's name over.  A pool that no longer knows the credential (a new database, an
admin released the name) refuses it; the link then enrols again.

Grants, not look-ups: every heartbeat's reply lists the vGPUs the pool grants this worker (and
those it revoked, with why); the link hands them to the worker's registry (vgpus.py), which admits
their sessions without asking the pool and ends every vGPU no longer granted.  Only a token placed
since the last heartbeat makes the registry ask the pool (``grant_for``).  The last grants are
kept in a private file next to the credential, so a worker restarted while the pool is down
still admits the sessions of the vGPUs it holds.

Each heartbeat carries what every vGPU holds (its processes, VRAM used and context overhead, its
counters, its kernel and throttled time and measured share, its last calls) and the GPUs' facts,
and under "ended" every vGPU this worker ended by itself (an admin's or the session's own
revocation through the control API), with why: the pool
then ends that allocation too, so that its memory is free for placement and the user reads why.
The link looks at the vGPUs twice a second and beats at once when a figure changed or a vGPU
ended, so the pool follows allocations and frees closely without being written to when nothing
moves.

Heartbeats go as messages on one WebSocket to the pool (``api/workers/<name>/heartbeats``), kept open
between beats: a message costs the pool about half of what an HTTP request costs it besides the
heartbeat's own work, which counts with a thousand workers. A pool without that route (older) gets
``POST api/workers/<name>/heartbeat`` for the rest of the link's life, as does a beat too large for
one message.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request

from tornado import httpclient, ioloop, iostream, websocket

from ..client.env import default_state_dir

log = logging.getLogger("gpulab.worker")

WATCH_PERIOD = 0.5  # seconds between looks at the vGPUs; also the least gap between two heartbeats
LAST_CALLS = 5      # trace records per vGPU in a heartbeat (the dashboard's "last calls")
MAX_PROCESSES = 4096  # processes one heartbeat reports over all vGPUs: the pool refuses more
MAX_ENDED = 4096      # ended vGPUs one heartbeat reports: the pool refuses more
MAX_REASON = 1024     # characters of an ended vGPU's reason: what the pool keeps of a message
TIMEOUT = 5.0         # seconds for one call to the pool, over HTTP or the socket
SOCKET_MESSAGE = 4 << 20  # bytes of one socket message the pool reads (worker_api.MAX_SOCKET_MESSAGE)
NO_SOCKET = (404, 405, 501)  # an upgrade answered so: the pool serves no heartbeat socket (it is older)
FORGOTTEN = (4403, 4404)     # the socket closed so: the pool no longer knows the credential, or the worker


def default_credential_file(worker_name: str) -> str:
    """Where a worker keeps its pool credential: state that must survive reboots, one file per name
    (not per pool URL, which may change while the pool stays the same) in $GPULAB_STATE_DIR, else
    $XDG_STATE_HOME/gpulab, else ~/.local/state/gpulab."""
    return os.path.join(default_state_dir(), f"worker-{worker_name}.credential")


class PoolRefused(Exception):
    """The pool refused this worker, with its sentence."""


class _Forgotten(Exception):
    """The pool refused the heartbeat socket's credential or no longer knows the worker: register again."""


class _NoSocket(Exception):
    """The pool serves no heartbeat socket: it is older than the link."""


class PoolLink:
    """Registration and heartbeats of one worker; ``registry`` (a VGPURegistry) gives the heartbeat's
    figures and receives the grants; ``control_url`` (http://host:port) is where its control API
    listens, which the pool hands the sessions' servers ("" for none); ``pod`` is the name of the
    Kubernetes pod it runs in ("" outside one), by which the pool's pod watch knows this worker;
    ``unix_socket`` is the path of its Unix socket ("" for none), which the pool hands the servers of
    local vGPUs on this node: their native libcuda.so.1 reaches this worker there."""

    def __init__(self, url: str, token: str, name: str, address: str, node: str, backend: str, gpus: list[dict],
                 interval: float = 5.0, credential_file: str = "", registry=None, control_url: str = "",
                 pod: str = "", unix_socket: str = ""):
        self.url = url.rstrip("/")
        self.token = token  # the enrolment secret
        self.credential_file = credential_file or default_credential_file(name)
        self.grants_file = os.path.join(os.path.dirname(self.credential_file) or ".", f"worker-{name}.grants")
        self.credential = self._load_credential()
        self.name = name
        self.info = {"name": name, "address": address, "node": node or socket.gethostname(), "backend": backend,
                     "control": control_url, "gpus": gpus}
        if pod:  # in a pod only; the pool then finds this worker by it when the pod is deleted or fails
            self.info["pod"] = pod
        if unix_socket:  # absolute: the servers of its local vGPUs dial it from other working directories
            self.info["unix_socket"] = os.path.abspath(unix_socket)
        self.interval = interval
        self.registry = registry
        self._saved = None  # the grants last written to grants_file
        self._stop = threading.Event()
        # the figures the last heartbeat carried, when it went, and whether the pool failed to answer
        self._sent, self._beat_at, self._failing = None, float("-inf"), False
        # the heartbeat socket: its event loop (made at the first beat), the connection kept between beats,
        # whether the pool serves none (HTTP for the rest of the link's life), one beat at a time
        self._loop: ioloop.IOLoop | None = None
        self._socket: websocket.WebSocketClientConnection | None = None
        self._http_only = False
        self._socket_lock = threading.Lock()
        if registry is not None:
            self._restore_grants()
            registry.set_lookup(self.grant_for)

    def _load_credential(self) -> str:
        try:
            with open(self.credential_file) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    def _write_private(self, path: str, text: str) -> None:
        """Private to the worker's user, written whole (a crash never leaves half a file)."""
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def _save_credential(self, credential: str) -> None:
        self._write_private(self.credential_file, credential + "\n")
        self.credential = credential

    def _restore_grants(self) -> None:
        """The grants of the last reply before this daemon started, so its vGPUs' sessions are admitted
        while the pool cannot be reached; the first heartbeat's reply replaces them."""
        try:
            with open(self.grants_file) as f:
                saved = json.load(f)
            grants, revoked = saved["grants"], saved["revoked"]
            if not isinstance(grants, list) or not isinstance(revoked, dict):
                raise TypeError("it is not {\"grants\": [...], \"revoked\": {...}}")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read the saved grants in %s: %s (waiting for the pool's)", self.grants_file, exc)
            return
        grants, revoked = _well_formed(grants, revoked, f"the saved grants in {self.grants_file}")
        self.registry.apply_grants(grants, revoked)
        self._saved = saved
        log.info("restored %d grant(s) from %s", len(grants), self.grants_file)

    def _apply(self, reply) -> None:
        """A heartbeat's reply: the registry takes the grants; the file keeps them for a restart."""
        if not (isinstance(reply, dict) and isinstance(reply.get("grants"), list)
                and isinstance(reply.get("revoked"), dict)):
            log.error("the GPU pool's heartbeat reply has no grants: %.200r", reply)
            return
        grants, revoked = _well_formed(reply["grants"], reply["revoked"], "the GPU pool's heartbeat reply")
        saved = {"grants": grants, "revoked": revoked}
        self.registry.apply_grants(grants, revoked)
        if saved != self._saved:
            try:
                self._write_private(self.grants_file, json.dumps(saved))
                self._saved = saved
            except OSError as exc:
                log.error("cannot save the grants in %s: %s", self.grants_file, exc)

    def _request(self, method: str, path: str, body=None, timeout: float = TIMEOUT, token: str | None = None):
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

    def vgpu_figures(self) -> list[dict]:
        """The vGPUs, active and ended, as the registry describes them (docs/architecture.md,
        *Worker-side registry*)."""
        if self.registry is None:
            return []
        return self.registry.vgpus()

    def heartbeat_body(self, vgpus: list[dict]) -> dict:
        """The heartbeat: every active vGPU (the whole truth), every ended one with its reason, and the
        GPUs' facts; without a registry only that this worker lives.

        "ended" lists every revoked vGPU the registry still keeps, whoever ended it: the pool ends
        the active allocations among them and ignores the rest, so it needs no memory of what was
        sent before."""
        if self.registry is None:
            return {"pid": os.getpid()}
        body: dict = {"pid": os.getpid(), "vgpus": {}, "ended": {}, "gpus": self.registry.gpu_facts()}
        for v in [v for v in vgpus if v["state"] != "active"][:MAX_ENDED]:
            body["ended"][v["token_hash"]] = (v["reason"] or "this vGPU was ended by its worker")[:MAX_REASON]
        room = MAX_PROCESSES
        for v in [v for v in vgpus if v["state"] == "active"]:
            processes = sorted(v["processes"], key=lambda p: -p["used"])[:room]
            room -= len(processes)
            body["vgpus"][v["token_hash"]] = {
                "id": v["id"], "used": v["used"], "overhead": v["overhead"],
                "processes": [{k: p[k] for k in ("pid", "client_pid", "used", "overhead", "calls")}
                              for p in processes],
                **{k: v[k] for k in ("calls", "launches", "bytes_in", "bytes_out")},
                # compute shares (docs/vgpu.md): cumulative seconds, the share measured lately, waiting now
                **{k: v.get(k) for k in ("kernel_time", "throttled_time", "share_measured", "queue_depth")},
                # VRAM tiers: where its memory is now (hot, warm, cold, mixed, none) and bytes per tier
                "tier": v.get("tier"), "tiers": v.get("tiers"),
                "errors": sum(v["errors"].values()),
                "last_calls": self.registry.trace(v["id"], since=0, limit=1 << 30)[0][-LAST_CALLS:]}
        return body

    def heartbeat(self, body: dict | None = None):
        """Tell the pool this worker lives and what its vGPUs hold (``body``: as heartbeat_body, built
        now when None); the reply's grants go to the registry.  The reply, or None."""
        if body is None:
            body = self.heartbeat_body(self.vgpu_figures())
        try:
            reply = self._beat(body)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):  # the pool forgot us (new database, name released): again
                self.register()
                return None
            raise
        except _Forgotten as exc:  # the same, said by the socket
            log.info("the GPU pool refused this worker's heartbeat socket (%s): registering again", exc)
            self.register()
            return None
        if self.registry is not None:
            self._apply(reply)
        return reply

    def _beat(self, body: dict):
        """One heartbeat's reply: over the socket, else (an older pool, a beat too large for a message)
        by POST.  OSError when the pool cannot be reached or does not answer in time; PoolRefused with
        the pool's sentence when it refuses the body (400)."""
        payload = json.dumps(body)
        if not self._http_only and len(payload.encode()) <= SOCKET_MESSAGE:
            try:
                return self._over_socket(payload)
            except _NoSocket as exc:
                self._http_only = True
                log.info("the GPU pool at %s serves no heartbeat socket (%s, an older pool): heartbeats go by "
                         "HTTP POST from now on", self.url, exc)
        return self._request("POST", f"/api/workers/{self.name}/heartbeat", body)

    def _over_socket(self, payload: str) -> dict:
        """Send one heartbeat on the socket (connected first where none is open) and wait for its reply,
        on the link's own event loop, within TIMEOUT.  A failed beat drops the socket: the next one
        connects again."""
        with self._socket_lock:
            if self._loop is None:
                self._loop = ioloop.IOLoop(make_current=False)
            try:
                reply = self._loop.run_sync(lambda: self._exchange(payload), timeout=TIMEOUT)
            except asyncio.TimeoutError:  # not an OSError before Python 3.11
                self._loop.run_sync(self._hang_up)
                raise TimeoutError(f"the GPU pool did not answer a heartbeat within {TIMEOUT:g} s") from None
            except BaseException:
                self._loop.run_sync(self._hang_up)
                raise
        status = reply.get("status") if isinstance(reply, dict) else None
        if status == 400:
            raise PoolRefused(f"400: {reply.get('message')}")
        if status != 200:
            raise PoolRefused(f"the GPU pool answered a heartbeat with {str(reply)[:200]}")
        return {k: v for k, v in reply.items() if k != "status"}

    async def _exchange(self, payload: str) -> dict:
        """One message and its reply.  A socket kept from an earlier beat may have been closed by the pool
        meanwhile (a restart): then once more on a new one."""
        for kept in ([True, False] if self._socket is not None else [False]):
            if not kept:
                self._socket = await self._connect()
            try:
                await self._socket.write_message(payload)
                answer = await self._socket.read_message()
            except (websocket.WebSocketClosedError, iostream.StreamClosedError):
                answer = None
            if answer is not None:
                return json.loads(answer)
            closed, self._socket = self._socket, None
            if closed.close_code in FORGOTTEN:
                raise _Forgotten(f"{closed.close_code}: {closed.close_reason}")
        raise ConnectionError(f"the GPU pool closed the heartbeat socket ({closed.close_code or 'no code'}"
                              f"{': ' + closed.close_reason if closed.close_reason else ''})")

    async def _connect(self) -> websocket.WebSocketClientConnection:
        """The heartbeat socket, authenticated at the upgrade: ws(s):// where the pool is http(s)://."""
        url = "ws" + self.url[len("http"):] if self.url.startswith("http") else self.url
        request = httpclient.HTTPRequest(f"{url}/api/workers/{self.name}/heartbeats",
                                         headers={"Authorization": f"token {self.credential}"},
                                         connect_timeout=TIMEOUT, request_timeout=TIMEOUT)
        try:
            return await websocket.websocket_connect(request)
        except httpclient.HTTPClientError as exc:
            if exc.code == 403:
                raise _Forgotten(_sentence(exc)) from None
            if exc.code in NO_SOCKET:
                raise _NoSocket(f"{exc.code} {exc.message}") from None
            # 599: no answer in time or the connection broke; another code: something between answered it
            raise ConnectionError(f"the heartbeat socket was not opened: {_sentence(exc)}") from None
        except websocket.WebSocketError as exc:  # e.g. a 200 answer to the upgrade: not the pool's
            raise ConnectionError(f"the heartbeat socket was not opened: {exc}") from None

    async def _hang_up(self) -> None:
        """Close the socket, waiting a moment for the pool's side of the close."""
        ws, self._socket = self._socket, None
        if ws is None:
            return
        ws.close()
        try:
            while await asyncio.wait_for(ws.read_message(), 1.0) is not None:
                pass
        except asyncio.TimeoutError:
            pass

    def grant_for(self, hashed: str) -> dict | None:
        """The pool's grant for a token hash this worker holds no grant for (placed since the last
        heartbeat), or None; OSError when the pool cannot be asked."""
        if not self.credential:
            return None
        try:
            return self._request("POST", f"/api/workers/{self.name}/grants", {"token_hash": hashed})
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):
                return None
            raise

    def run(self) -> None:
        """Register, then beat until stopped (a thread of the daemon).

        The first heartbeat goes right after registering, so the pool hears at once what this
        worker's vGPUs hold (after a restart: nothing, as the old daemon's executors died with it)
        and this worker learns its grants."""
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
            except Exception:  # e.g. an answer without a credential: a dead link thread would never say
                log.exception("cannot register with the GPU pool at %s (retrying)", self.url)
                self._stop.wait(max(self.interval, 2.0))
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self._watch(now)
            except Exception:  # a bug, or a reply nobody foresaw: without beats the pool marks us lost
                log.exception("heartbeat to the GPU pool failed")
                self._failing = True
            self._stop.wait(max(min(self.interval, WATCH_PERIOD) - (time.monotonic() - now), 0.01))
        self._close_socket()  # a beat that raced stop() may have opened it again

    def _watch(self, now: float) -> None:
        """One look at the vGPUs; a heartbeat when the interval is up or a figure moved."""
        try:
            vgpus = self.vgpu_figures()
        except OSError as exc:
            log.error("cannot read the vGPUs' figures: %s", exc)
            vgpus = []
        # what moves between beats: memory, processes and ends (counters alone wait for the interval)
        figures = {v["token_hash"]: (v["used"], v["overhead"], len(v["processes"]))
                   if v["state"] == "active" else v["state"] for v in vgpus}
        changed = figures != self._sent and not self._failing  # an unreachable pool: at the interval only
        if now - self._beat_at >= self.interval or (changed and now - self._beat_at >= WATCH_PERIOD):
            self._beat_at = now
            try:
                self.heartbeat(self.heartbeat_body(vgpus))
                self._sent, self._failing = figures, False
            except (OSError, PoolRefused) as exc:
                log.warning("heartbeat to the GPU pool failed: %s", _reason(exc))
                self._failing = True

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="gpulab-pool-link", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """End the beats and close the heartbeat socket (after the beat under way, if any)."""
        self._stop.set()
        self._close_socket()

    def _close_socket(self) -> None:
        """Close the heartbeat socket and its event loop; a later beat makes them again."""
        with self._socket_lock:
            if self._loop is not None:
                self._loop.run_sync(self._hang_up)
                self._loop.close(all_fds=True)
                self._loop = None


def _well_formed(grants: list, revoked: dict, where: str) -> tuple[list[dict], dict[str, str]]:
    """The grants that are objects and the revocations that are {token hash: reason} strings; the
    rest is logged and left out (the registry checks each grant's fields itself)."""
    good = [g for g in grants if isinstance(g, dict)]
    if len(good) < len(grants):
        log.error("%s holds %d grant(s) that are not objects: ignored", where, len(grants) - len(good))
    ended = {h: why for h, why in revoked.items() if isinstance(h, str) and isinstance(why, str)}
    if len(ended) < len(revoked):
        log.error("%s holds %d revocation(s) whose reason is not a string: ignored", where, len(revoked) - len(ended))
    return good, ended


def _sentence(exc: httpclient.HTTPClientError) -> str:
    """The pool's sentence from an answer to the socket's upgrade, else its status."""
    try:
        return f"{exc.code}: {json.loads(exc.response.body)['message']}"
    except (AttributeError, ValueError, KeyError, TypeError):
        return f"{exc.code} {exc.message}"


def _reason(exc: Exception) -> str:
    """The pool's sentence from an error answer, else the error itself."""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            return f"{exc.code}: {json.loads(exc.read())['message']}"
        except (ValueError, KeyError, TypeError, OSError):
            return f"{exc.code} {exc.reason}"
    return str(exc)
