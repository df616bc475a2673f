"""GPUSpawner: a JupyterHub spawner mix-in that gives a user's server a vGPU from the pool.

The form lists ``gpu_profiles`` (KubeSpawner's ``profile_list`` schema plus a ``gpu``
key) with live availability from the pool.  On start the chosen profile is validated
again (the REST API bypasses the form), a vGPU is allocated and the server gets the
worker address, its session token, the limits and the shim on ``LD_LIBRARY_PATH``; on
stop (and when the idle culler stops it) the vGPU is released.
"""
from __future__ import annotations

import html
import inspect
import json
import os

from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner, SpawnException
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Callable, Dict, List, Unicode, Union, default
from traitlets.config import Configurable

from gpu_worker.client import parse_size, shim_dir

GPU_KEYS = {"vram", "compute", "count", "mode", "qos"}


class GPUSpawner(Configurable):
    """Mix in before a JupyterHub spawner class (see the ready-made classes below); config: `c.GPUSpawner.*`."""

    gpu_profiles = Union([List(Dict()), Callable()], default_value=[], help="""
        Profiles offered in the spawn form, in KubeSpawner's `profile_list` schema: each a dict with
        `display_name`, `slug`, `description`, `default` and `profile_options` (`{name: {display_name,
        choices: {key: {display_name, default, gpu: {...}}}}}`), plus:

        - `gpu`: `{vram: "8G", compute: 25 (percent of a GPU), count: 1, mode: "local"|"remote"|"any",
          qos: "low"|"medium"|"high"}`; absent or null for a profile without GPU;
        - `groups`: hub groups whose members see the profile (absent: everybody).

        May be a callable `f(spawner) -> list` (or a coroutine) to choose profiles per user.
        Options are validated again on every start.""").tag(config=True)
    pool_url = Unicode(help="URL of the GPU pool API, e.g. http://127.0.0.1:8765/services/gpulab-pool/ "
                       "(default: $GPULAB_POOL_URL).").tag(config=True)
    pool_token = Unicode(help="Secret for the pool's allocation API (default: $GPULAB_POOL_API_TOKEN)."
                         ).tag(config=True)
    shim_path = Unicode(help="Directory of the gpulab libcuda.so.1 as the user's server sees it "
                        "(default: this installation's `gpulab shim-path`).").tag(config=True)
    gpu_node = Unicode(help="Node the user's server runs on, for local vGPUs (default: $GPULAB_NODE or this "
                       "host's name).").tag(config=True)
    gpu_allocation = Dict(help="The current vGPU allocation (kept in the spawner state).")

    @default("pool_url")
    def _pool_url_default(self):
        return os.environ.get("GPULAB_POOL_URL", "")

    @default("pool_token")
    def _pool_token_default(self):
        return os.environ.get("GPULAB_POOL_API_TOKEN", "")

    @default("shim_path")
    def _shim_path_default(self):
        return str(shim_dir())

    @default("gpu_node")
    def _gpu_node_default(self):
        import socket

        return os.environ.get("GPULAB_NODE") or socket.gethostname()

    @default("options_form")
    def _options_form_default(self):
        return self.render_options_form

    @default("apply_user_options")
    def _apply_user_options_default(self):
        return _check_user_options

    # --------------------------------------------------------------- profiles
    async def visible_profiles(self) -> list[dict]:
        profiles = self.gpu_profiles
        if callable(profiles):
            profiles = profiles(self)
            if inspect.isawaitable(profiles):
                profiles = await profiles
        groups = {g.name for g in getattr(self.user, "groups", [])}
        return [p for p in profiles if not p.get("groups") or groups & set(p["groups"])]

    def resolve(self, profiles: list[dict], options: dict) -> tuple[dict, dict | None]:
        """The profile and GPU request named by ``options``; SpawnException(400) if invalid."""
        if not profiles:
            raise SpawnException("No profile is available to you.", reason="no-profile", status_code=400)
        slug = options.get("profile")
        if slug is None:
            profile = next((p for p in profiles if p.get("default")), profiles[0])
        else:
            profile = next((p for p in profiles if profile_slug(p) == slug), None)
            if profile is None:
                raise SpawnException(f"Unknown profile {slug!r}: choose one of "
                                     f"{', '.join(profile_slug(p) for p in profiles)}.",
                                     reason="invalid-profile", status_code=400)
        gpu = dict(profile["gpu"]) if profile.get("gpu") else None
        for name, opt in (profile.get("profile_options") or {}).items():
            choices = opt.get("choices", {})
            key = options.get(name)
            if key is None:
                key = next((k for k, c in choices.items() if c.get("default")), next(iter(choices), None))
            if key not in choices:
                raise SpawnException(f"Invalid choice {key!r} for {opt.get('display_name', name)}.",
                                     reason="invalid-option", status_code=400)
            override = choices[key].get("gpu") or {}
            if override:
                gpu = {**(gpu or {}), **override}
        if gpu is not None:
            unknown = set(gpu) - GPU_KEYS
            if unknown:
                raise SpawnException(f"Unknown GPU setting(s) {sorted(unknown)} in profile "
                                     f"{profile_slug(profile)!r}.", reason="invalid-profile", status_code=400)
            try:
                gpu["vram"] = parse_size(gpu["vram"])
            except (KeyError, ValueError):
                raise SpawnException(f"Profile {profile_slug(profile)!r} has no valid GPU memory size.",
                                     reason="invalid-profile", status_code=400) from None
        return profile, gpu

    # ------------------------------------------------------------------- pool
    async def pool_call(self, method: str, path: str, body=None):
        if not self.pool_url:
            raise SpawnException("gpulab is not configured with a GPU pool URL.", reason="gpu-pool",
                                 status_code=503)
        req = HTTPRequest(self.pool_url.rstrip("/") + "/" + path, method=method,
                          headers={"Authorization": f"token {self.pool_token}", "Content-Type": "application/json"},
                          body=json.dumps(body) if body is not None else None, request_timeout=20)
        try:
            resp = await AsyncHTTPClient().fetch(req)
        except HTTPClientError as exc:
            detail = ""
            if exc.response is not None and exc.response.body:
                try:
                    detail = json.loads(exc.response.body).get("message", "")
                except ValueError:
                    detail = exc.response.body.decode(errors="replace")[:200]
            raise PoolError(exc.code, detail or str(exc)) from None
        except OSError as exc:
            raise PoolError(503, f"the GPU pool is unreachable ({exc})") from None
        return json.loads(resp.body) if resp.body else None

    async def allocate_gpu(self, profile: dict, gpu: dict) -> dict:
        spec = {**gpu, "user": self.user.name, "server_name": self.name, "profile": profile_slug(profile),
                "node": self.gpu_node}
        try:
            return await self.pool_call("POST", "api/allocations", spec)
        except PoolError as exc:
            if exc.code == 503:
                raise SpawnException(f"No GPU is free for “{profile.get('display_name', '')}”: {exc.message}",
                                     reason="gpu-capacity", status_code=503) from None
            raise SpawnException(f"The GPU pool refused the request: {exc.message}", reason="gpu-pool",
                                 status_code=400 if exc.code == 400 else 503) from None

    async def release_gpu(self) -> None:
        alloc = self.gpu_allocation
        if not alloc:
            return
        try:
            await self.pool_call("DELETE", f"api/allocations/{alloc['id']}")
        except PoolError as exc:
            if exc.code != 404:
                self.log.error("could not release vGPU allocation %s: %s", alloc["id"], exc.message)
                return
        self.log.info("released vGPU allocation %s of %s", alloc["id"], self.user.name)
        self.gpu_allocation = {}

    # ------------------------------------------------------------- lifecycle
    async def start(self):
        profile, gpu = self.resolve(await self.visible_profiles(), self.user_options or {})
        await self.release_gpu()  # a stale allocation from an earlier run
        if gpu is not None:
            self.gpu_allocation = await self.allocate_gpu(profile, gpu)
            self.apply_gpu_placement(self.gpu_allocation)
        try:
            return await super().start()
        except BaseException:
            await self.release_gpu()
            raise

    def apply_gpu_placement(self, alloc: dict) -> None:
        """Hook for spawners that place the server themselves (Kubernetes: node of a local vGPU)."""

    async def stop(self, now=False):
        try:
            await super().stop(now=now)
        finally:
            await self.release_gpu()

    async def poll(self):
        """A server that died on its own gives its vGPU back too."""
        status = await super().poll()
        if status is not None and self.gpu_allocation and not self._spawn_pending:
            await self.release_gpu()
        return status

    def get_env(self):
        env = super().get_env()
        alloc = self.gpu_allocation
        if alloc:
            env.update({"GPULAB_WORKER": alloc["address"], "GPULAB_TOKEN": alloc["token"],
                        "GPULAB_VRAM": str(alloc["vram"]), "GPULAB_COMPUTE": str(alloc["compute"]),
                        "GPULAB_ALLOCATION": str(alloc["id"]),
                        "LD_LIBRARY_PATH": ":".join(p for p in (self.shim_path, env.get("LD_LIBRARY_PATH")) if p)})
        return env

    def get_state(self):
        state = super().get_state()
        if self.gpu_allocation:
            state["gpu_allocation"] = self.gpu_allocation
        return state

    def load_state(self, state):
        super().load_state(state)
        self.gpu_allocation = state.get("gpu_allocation", {})

    def clear_state(self):
        """Keeps an unreleased allocation: LocalProcessSpawner clears state inside stop() and poll(),
        before the vGPU is given back; release_gpu() forgets it once the pool has it back."""
        super().clear_state()

    # ------------------------------------------------------------------ form
    async def render_options_form(self, spawner=None) -> str:
        profiles = await self.visible_profiles()
        gpu_profiles = [(p, self.resolve([p], {})[1]) for p in profiles]
        specs = [{**g, "node": self.gpu_node} for _, g in gpu_profiles if g]
        notice = ""
        try:
            avail = await self.pool_call("POST", "api/availability", {"requests": specs}) if specs else []
            lost = await self.pool_call("GET", f"api/allocations?user={self.user.name}&status=lost")
            if lost:
                notice = f'<div class="alert alert-warning gpulab-lost">{html.escape(lost[-1]["message"])}</div>'
            if any(g["emulated"] for g in await self.pool_call("GET", "api/gpus")):
                notice += ('<div class="alert alert-info gpulab-emulated">The GPUs of this hub are EMULATED: a test '
                           'double without a real GPU, where only registered kernels run.</div>')
        except PoolError as exc:
            avail = [{"fits": False, "slots": 0, "reason": exc.message}] * len(specs)
        it = iter(avail)
        items = []
        for i, (p, gpu) in enumerate(gpu_profiles):
            items.append(render_profile(p, gpu, next(it) if gpu else None, checked=p.get("default") or (
                i == 0 and not any(q.get("default") for q in profiles))))
        style = "<style>.gpulab-profile{margin-bottom:1em}.gpulab-full{color:#b00}.gpulab-free{color:#070}</style>"
        return style + notice + '<div class="gpulab-profiles">' + "".join(items) + "</div>"

    def options_from_form(self, formdata):
        slug = (formdata.get("profile") or [None])[0]
        options = {"profile": slug} if slug else {}
        prefix = f"profile-option-{slug}--"
        for key, values in formdata.items():
            if key.startswith(prefix) and values:
                options[key[len(prefix):]] = values[0]
        return options


async def _check_user_options(spawner: GPUSpawner, user_options: dict) -> None:
    """JupyterHub's early hook: refuse a bad profile before anything starts (start() checks again)."""
    spawner.resolve(await spawner.visible_profiles(), user_options or {})


class PoolError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def profile_slug(p: dict) -> str:
    return p.get("slug") or p["display_name"].lower().replace(" ", "-")


def describe_gpu(gpu: dict | None) -> str:
    if not gpu:
        return "no GPU"
    parts = [f"{gpu['vram'] / 2**30:g} GiB VRAM", f"{gpu.get('compute', 100)}% compute"]
    if gpu.get("count", 1) > 1:
        parts.insert(0, f"{gpu['count']} vGPUs")
    parts.append({"local": "on this node", "remote": "remote"}.get(gpu.get("mode", "any"), "local or remote"))
    return ", ".join(parts)


def render_profile(p: dict, gpu: dict | None, avail: dict | None, checked: bool) -> str:
    slug = html.escape(profile_slug(p))
    if avail is None:
        status = ""
    elif avail["fits"]:
        status = f'<span class="gpulab-avail gpulab-free">{avail["slots"]} available now</span>'
    else:
        status = f'<span class="gpulab-avail gpulab-full">Full: {html.escape(avail["reason"])}</span>'
    status = f" — {status}" if status else ""
    options = []
    for name, opt in (p.get("profile_options") or {}).items():
        choices = "".join(
            f'<option value="{html.escape(k)}"{" selected" if c.get("default") else ""}>'
            f'{html.escape(c.get("display_name", k))}</option>' for k, c in opt.get("choices", {}).items())
        options.append(f'<label>{html.escape(opt.get("display_name", name))} '
                       f'<select name="profile-option-{slug}--{html.escape(name)}">{choices}</select></label>')
    return (f'<div class="gpulab-profile" data-slug="{slug}"><label>'
            f'<input type="radio" name="profile" value="{slug}"{" checked" if checked else ""}> '
            f'<strong>{html.escape(p["display_name"])}</strong></label> '
            f'— <span class="gpulab-gpu">{html.escape(describe_gpu(gpu))}</span>{status}'
            f'<p>{html.escape(p.get("description", ""))}</p>{"".join(options)}</div>')


class GPUSimpleLocalProcessSpawner(GPUSpawner, SimpleLocalProcessSpawner):
    """The embedded default: servers run as the hub's user, each with a vGPU."""


class GPULocalProcessSpawner(GPUSpawner, LocalProcessSpawner):
    """Servers run as system users, each with a vGPU."""
