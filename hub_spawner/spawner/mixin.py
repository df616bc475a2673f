"""GPUSpawner: a JupyterHub spawner mix-in that gives a user's server a vGPU from the pool.

The form lists ``gpu_profiles`` (KubeSpawner's ``profile_list`` schema plus a ``gpu``
key) with live availability from the pool.  On start the chosen profile is validated
again (the REST API bypasses the form), a vGPU is allocated and the server gets the
worker address, its session token, the limits and the shim on ``LD_LIBRARY_PATH`` (the
native build and the worker's Unix socket where the pool places a local vGPU natively); on
stop (and when the idle culler stops it) the vGPU is released.  The form is the Jinja
template ``templates/form.html``; errors are sentences for the user who reads them.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner, SpawnException
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Callable, Dict, List, Unicode, Union, default
from traitlets.config import Configurable

from gpu_worker.client import GPU_KEYS, LimitError, default_burst, gpu_settings, native_dir, shim_dir

from ..pool.scheduler import MAX_AVAILABILITY_REQUESTS

TEMPLATES = Path(__file__).parent / "templates"
# A pool failure of these kinds is "Full" on the form; the others (no worker, a lost one, the wrong
# node, a profile larger than any GPU) make the profile unavailable whatever others do.
CAPACITY = {"memory", "compute", "count"}
POOL_UNREACHABLE = ("The GPU pool is unreachable right now, so no GPU can be given out. "
                    "Try again in a minute; if this goes on, tell your hub admin.")


class GPUSpawnError(SpawnException):
    """A SpawnException whose page shows only its sentence.

    JupyterHub shows ``jupyterhub_message`` on the spawn form, the spawn-pending page and in API
    errors, and falls back to ``str()`` (``503 SpawnException(reason=...): ...``, meant for the
    log) where it is missing."""

    @property
    def jupyterhub_message(self) -> str:
        return self.message

    @property
    def jupyterhub_html_message(self) -> str | None:
        return self.message_html or None


class GPUSpawner(Configurable):
    """Mix in before a JupyterHub spawner class (see the ready-made classes below); config: `c.GPUSpawner.*`."""

    gpu_profiles = Union([List(Dict()), Callable()], default_value=[], help="""
        Profiles offered in the spawn form, in KubeSpawner's `profile_list` schema: each a dict with
        `display_name`, `slug`, `description`, `default` and `profile_options` (`{name: {display_name,
        choices: {key: {display_name, default, gpu: {...}}}}}`), plus:

        - `gpu`: `{vram: "8G", compute: 25 (percent of a GPU), count: 1, mode: "local"|"remote"|"any",
          qos: "low"|"medium"|"high", burst: true|false}`; absent or null for a profile without GPU.
          `burst` says whether the vGPU may use idle GPU time beyond its compute share (default: true
          for qos high and medium, false for low);
        - `groups`: hub groups whose members see the profile (absent: everybody).

        May be a callable `f(spawner) -> list` (or a coroutine) to choose profiles per user.
        Sizes follow docs/configuration.md (*Sizes*), `compute` is 1..100 and `count` 1..16.  Each
        profile is checked when the list is read: a bad one is left out with one log line naming it,
        so the form still works for everyone.  Options are validated again on every start.""").tag(config=True)
    pool_url = Unicode(help="URL of the GPU pool API, e.g. http://127.0.0.1:8765/services/gpulab-pool/ "
                       "(default: $GPULAB_POOL_URL).").tag(config=True)
    pool_token = Unicode(help="Secret for the pool's allocation API (default: $GPULAB_POOL_API_TOKEN)."
                         ).tag(config=True)
    shim_path = Unicode(help="Directory of the gpulab libcuda.so.1 as the user's server sees it "
                        "(default: this installation's `gpulab shim-path`).").tag(config=True)
    native_shim_path = Unicode(help="""
        Directory of the native build of libcuda.so.1 (and libnvidia-ml.so.1) as the user's server sees it,
        put first on LD_LIBRARY_PATH for a local vGPU that the pool places natively (on the server's own
        node, on a worker with a Unix socket): it loads the node's real driver in-process, so PyTorch,
        CuPy and JAX work, and accounts to the vGPU's ledger on that worker (default: this installation's
        `gpu_worker.shim.native_dir()`, `native` inside the shim's directory).""").tag(config=True)
    real_libcuda = Unicode("", help="""
        Path of the node's real driver library (libcuda.so.1) for native vGPUs, as GPULAB_REAL_LIBCUDA;
        empty: the native libcuda.so.1 finds it on the system library path.""").tag(config=True)
    real_nvml = Unicode("", help="""
        Path of the node's real libnvidia-ml.so.1 for native vGPUs, as GPULAB_REAL_NVML; empty: found on
        the system library path.""").tag(config=True)
    gpu_node = Unicode(help="Node the user's server runs on, for local vGPUs (default: $GPULAB_NODE or this "
                       "host's name).").tag(config=True)
    form_template_paths = List(Unicode(), help="""
        Directories searched, before gpulab's own, for `form.html`, the Jinja template of the spawn form.
        It gets `profiles` (each with `slug`, `display_name`, `description`, `gpu_text`, `mode_text` (what
        its vGPU runs: local ones natively, PyTorch too; others forwarded), `has_gpu`, `fits`,
        `full_label`, `why`, `slots`, `checked`, `options`), `lost_message`, `emulated` and `pool_error`.
        """).tag(config=True)
    # Not cleared by clear_state(): LocalProcessSpawner clears state inside stop() and poll(), before
    # the vGPU is given back; release_gpu() forgets it once the pool has it back.
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

    @default("native_shim_path")
    def _native_shim_path_default(self):
        return str(native_dir())

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
        """The user's profiles, each checked (check_profile): a bad admin profile is left out and logged."""
        profiles = self.gpu_profiles
        if callable(profiles):
            profiles = profiles(self)
            if inspect.isawaitable(profiles):
                profiles = await profiles
        if not isinstance(profiles, (list, tuple)):
            self.log.error("c.GPUSpawner.gpu_profiles gave %s, not a list of profiles: no profile offered",
                           type(profiles).__name__)
            return []
        good = []
        for i, p in enumerate(profiles):
            try:
                good.append(check_profile(p))
            except LimitError as exc:
                name = p.get("slug") or p.get("display_name") if isinstance(p, dict) else None
                self.log.error("c.GPUSpawner.gpu_profiles: left out profile %s: %s",
                               repr(name) if name else f"#{i + 1}", exc)
        groups = {g.name for g in getattr(self.user, "groups", [])}
        return [p for p in good if not p.get("groups") or groups & set(p["groups"])]

    def resolve(self, profiles: list[dict], options: dict) -> tuple[dict, dict | None]:
        """The profile and GPU request named by ``options``; SpawnException(400) if invalid."""
        if not profiles:
            raise GPUSpawnError("No profile is available to you.", reason="no-profile", status_code=400)
        if not isinstance(options, dict):
            raise GPUSpawnError("The server options must be a JSON object such as {\"profile\": \"small\"}.",
                                reason="invalid-option", status_code=400)
        for name, value in options.items():
            if value is not None and not isinstance(value, str):
                raise GPUSpawnError(f"The option {str(name)[:40]!r} must be a string (a profile's slug or a "
                                    f"choice's key), not {json_kind(value)}.", reason="invalid-option",
                                    status_code=400)
        slug = options.get("profile")
        if slug is None:
            profile = next((p for p in profiles if p.get("default")), profiles[0])
        else:
            profile = next((p for p in profiles if profile_slug(p) == slug), None)
            if profile is None:
                raise GPUSpawnError(f"Unknown profile {slug!r}: choose one of "
                                    f"{', '.join(profile_slug(p) for p in profiles)}.",
                                    reason="invalid-profile", status_code=400)
        profile_options = [(name, {**opt, "choices": opt.get("choices", {})})
                           for name, opt in (profile.get("profile_options") or {}).items()]
        selection = {}
        for name, opt in profile_options:
            key = options.get(name)
            if key is None:
                key = default_choice(opt["choices"])
            if key not in opt["choices"]:
                raise GPUSpawnError(f"Invalid choice {key!r} for {opt.get('display_name', name)}.",
                                    reason="invalid-option", status_code=400)
            selection[name] = key
        gpu = merged_gpu(profile.get("gpu"), profile_options, selection)
        if gpu is not None:
            unknown = set(gpu) - GPU_KEYS
            if unknown:
                raise GPUSpawnError(f"Unknown GPU setting(s) {sorted(unknown)} in profile "
                                    f"{profile_slug(profile)!r}.", reason="invalid-profile", status_code=400)
            try:
                checked = gpu_settings(gpu, "gpu")  # vram required; the pool fills in what is left out
            except LimitError as exc:
                raise GPUSpawnError(f"Profile {profile_slug(profile)!r} has a GPU setting that is not valid: {exc}.",
                                    reason="invalid-profile", status_code=400) from None
            gpu = {k: checked[k] for k in gpu}
        return profile, gpu

    # ------------------------------------------------------------------- pool
    async def pool_call(self, method: str, path: str, body=None):
        if not self.pool_url:
            raise PoolError(503, "gpulab is not configured with a GPU pool URL (c.GPUSpawner.pool_url)")
        req = HTTPRequest(self.pool_url.rstrip("/") + "/" + path, method=method,
                          headers={"Authorization": f"token {self.pool_token}", "Content-Type": "application/json"},
                          body=json.dumps(body) if body is not None else None, request_timeout=20)
        try:
            resp = await AsyncHTTPClient().fetch(req)
        except HTTPClientError as exc:
            detail, body = "", {}
            if exc.response is not None and exc.response.body:
                try:
                    body = json.loads(exc.response.body)
                    detail = body.get("message", "")
                except (ValueError, AttributeError):
                    detail = exc.response.body.decode(errors="replace")[:200]
            raise PoolError(exc.code, detail or str(exc), body) from None
        except OSError as exc:
            raise PoolError(503, f"the GPU pool is unreachable ({exc})") from None
        return json.loads(resp.body) if resp.body else None

    async def allocate_gpu(self, profile: dict, gpu: dict) -> dict:
        # the user's hub groups: the pool reports usage per group too
        spec = {**gpu, "user": self.user.name, "server_name": self.name, "profile": profile_slug(profile),
                "node": self.gpu_node, "groups": sorted(g.name for g in getattr(self.user, "groups", []))}
        try:
            return await self.pool_call("POST", "api/allocations", spec)
        except PoolError as exc:
            log = f"no vGPU for {self.user.name}'s profile {profile_slug(profile)!r}: {exc.message}"
            if exc.code == 503 and exc.constraint:  # the scheduler's sentence names what is short
                raise GPUSpawnError(exc.message, reason=f"gpu-{exc.constraint}", status_code=503,
                                   log_message=log) from None
            if exc.code == 503:
                raise GPUSpawnError(POOL_UNREACHABLE, reason="gpu-pool", status_code=503, log_message=log) from None
            raise GPUSpawnError(f"The GPU pool refused the request: {exc.message}", reason="gpu-pool",
                               status_code=400 if exc.code == 400 else 503, log_message=log) from None

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
            self.gpu_allocation = alloc = await self.allocate_gpu(profile, gpu)
            if alloc.get("mode") == "local" and self.native_allocation() is None:
                self.log.warning("local vGPU allocation %s of %s is forwarded, not native: worker %s has no Unix "
                                 "socket (PyTorch, CuPy and JAX will not find a GPU)", alloc.get("id"),
                                 self.user.name, alloc.get("worker"))
            self.apply_gpu_placement(alloc)
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

    def native_allocation(self) -> dict | None:
        """The vGPU allocation when the pool placed it natively (its answer's ``native`` and
        ``local_address``: a local vGPU on a worker with a Unix socket), else None."""
        alloc = self.gpu_allocation
        return alloc if alloc and alloc.get("native") and alloc.get("local_address") else None

    def get_env(self):
        """The server's environment with its vGPU: forwarded (the shim sends driver calls to the worker's
        address), or native where the pool says so (the native libcuda.so.1 first on the library path, the
        worker's Unix socket on this node)."""
        env = super().get_env()
        alloc = self.gpu_allocation
        if alloc:
            native = self.native_allocation() is not None
            lib = self.native_shim_path if native else self.shim_path
            env.update({"GPULAB_WORKER": alloc["local_address"] if native else alloc["address"],
                        "GPULAB_TOKEN": alloc["token"],
                        "GPULAB_VRAM": str(alloc["vram"]), "GPULAB_COMPUTE": str(alloc["compute"]),
                        "GPULAB_ALLOCATION": str(alloc["id"]),
                        "LD_LIBRARY_PATH": ":".join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)})
            if native:
                env["GPULAB_MODE"] = "native"  # informational: the library path decides
                env.update({k: v for k, v in (("GPULAB_REAL_LIBCUDA", self.real_libcuda),
                                              ("GPULAB_REAL_NVML", self.real_nvml)) if v})
            if alloc.get("control_url"):  # the worker's control API: `gpulab vgpu` as the session itself
                env["GPULAB_CONTROL_URL"] = alloc["control_url"]
        return env

    def get_state(self):
        state = super().get_state()
        if self.gpu_allocation:
            state["gpu_allocation"] = self.gpu_allocation
        return state

    def load_state(self, state):
        super().load_state(state)
        self.gpu_allocation = state.get("gpu_allocation", {})

    # ------------------------------------------------------------------ form
    async def render_options_form(self, spawner=None) -> str:
        """The profiles with live availability; a profile that does not fit now is never preselected."""
        profiles = await self.visible_profiles()
        # one availability request per distinct GPU request (a profile's default choices, each choice)
        views, specs, asked = [], [], {}

        def ask(gpu: dict) -> int:
            spec = {**gpu, "node": self.gpu_node}
            key = json.dumps(spec, sort_keys=True)
            if key not in asked:
                asked[key] = len(specs)
                specs.append(spec)
            return asked[key]

        for p in profiles:
            gpu = self.resolve([p], {})[1]
            view = {"profile": p, "gpu": gpu, "ask": ask(gpu) if gpu else None, "options": []}
            for name, opt in (p.get("profile_options") or {}).items():
                choices = []
                for key, choice in opt.get("choices", {}).items():
                    choice_gpu = self.resolve([p], {name: key})[1]
                    choices.append({"key": key, "display_name": choice.get("display_name", key),
                                    "selected": bool(choice.get("default")),
                                    "ask": ask(choice_gpu) if choice_gpu else None})
                view["options"].append({"name": name, "display_name": opt.get("display_name", name),
                                        "choices": choices})
            views.append(view)
        lost_message, emulated, pool_error = "", False, ""
        try:
            avail = []
            for start in range(0, len(specs), MAX_AVAILABILITY_REQUESTS):  # the pool's cap per call
                chunk = specs[start:start + MAX_AVAILABILITY_REQUESTS]
                avail += await self.pool_call("POST", "api/availability", {"requests": chunk})
            query = urlencode({"user": self.user.name, "status": "lost"})
            lost = await self.pool_call("GET", f"api/allocations?{query}")
            lost_message = lost[-1]["message"] if lost else ""
            emulated = any(g["emulated"] for g in await self.pool_call("GET", "api/gpus"))
        except PoolError as exc:
            self.log.warning("spawn form without GPU availability: %s", exc.message)
            pool_error = POOL_UNREACHABLE
            avail = [{"fits": False, "slots": 0, "constraint": "pool",
                      "reason": "the GPU pool is unreachable right now"}] * len(specs)
        return self.form_environment().get_template("form.html").render(
            profiles=form_profiles(views, avail), lost_message=lost_message, emulated=emulated,
            pool_error=pool_error)

    def form_environment(self) -> jinja2.Environment:
        loader = jinja2.FileSystemLoader([*self.form_template_paths, str(TEMPLATES)])
        return jinja2.Environment(loader=loader, autoescape=True)

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
    """A failed pool call; ``constraint`` is set when the pool's scheduler found no room (NoFit)."""

    def __init__(self, code: int, message: str, body: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.constraint = body.get("constraint") if isinstance(body, dict) else None


def json_kind(value) -> str:
    """What a JSON value is, for a sentence: 'a list', 'an object', 'a number'."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", tuple: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def check_profile(p) -> dict:
    """One admin profile, checked once when the list is read: its structure, and every GPU request it can
    make (its own and each choice's) through the one validator of each kind.  LimitError names the part."""
    if not isinstance(p, dict):
        raise LimitError(f"a profile must be a dict, not {json_kind(p)}")
    for key in ("display_name", "slug", "description"):
        if p.get(key) is not None and not isinstance(p[key], str):
            raise LimitError(f"{key} must be a string, not {json_kind(p[key])}")
    if not p.get("display_name") and not p.get("slug"):
        raise LimitError("it has neither display_name nor slug")
    groups = p.get("groups")
    if groups is not None and not (isinstance(groups, (list, tuple)) and all(isinstance(g, str) for g in groups)):
        raise LimitError("groups must be a list of group names")
    gpu = p.get("gpu") or None
    for part, value in [("gpu", gpu)] + [(f"{name} choice {key!r} gpu", c.get("gpu"))
                                         for name, opt in _options(p) for key, c in opt["choices"].items()]:
        if value is not None and not isinstance(value, dict):
            raise LimitError(f"{part}: {json_kind(value)} is not a mapping of GPU settings")
        unknown = set(value or {}) - GPU_KEYS
        if unknown:
            raise LimitError(f"{part}: unknown GPU setting(s) {sorted(unknown)}")
        gpu_settings(value or {}, part, partial=True)
    # the requests the form asks about (as resolve() merges them): the default choices, and each choice
    # in turn with the other options at their defaults
    options = _options(p)
    defaults = {name: default_choice(opt["choices"]) for name, opt in options}
    for selection in [defaults] + [{**defaults, name: key} for name, opt in options for key in opt["choices"]]:
        combo = merged_gpu(gpu, options, selection)
        if combo is not None:
            gpu_settings(combo, "gpu")
    return p


def _options(p: dict) -> list[tuple[str, dict]]:
    """A profile's profile_options as (name, option) pairs, their structure checked."""
    opts = p.get("profile_options") or {}
    if not isinstance(opts, dict):
        raise LimitError("profile_options must be a mapping of option names to options")
    out = []
    for name, opt in opts.items():
        if not isinstance(opt, dict) or not isinstance(opt.get("choices", {}), dict) or not all(
                isinstance(c, dict) for c in opt.get("choices", {}).values()):
            raise LimitError(f"profile option {name!r} must be a mapping with choices, each a mapping")
        out.append((name, {**opt, "choices": opt.get("choices", {})}))
    return out


def merged_gpu(base: dict | None, options: list[tuple[str, dict]], selection: dict) -> dict | None:
    """A profile's GPU request with the selected choice of each option: a choice's ``gpu`` overrides
    the profile's keys (None: neither asks for a GPU). ``selection`` maps option name -> choice key."""
    gpu = dict(base) if base else None
    for name, opt in options:
        key = selection.get(name)
        override = opt["choices"].get(key, {}).get("gpu") if key is not None else None
        if override:
            gpu = {**(gpu or {}), **override}
    return gpu


def default_choice(choices: dict) -> str | None:
    """The key of an option's default choice: the one marked default, else the first (None: no choices)."""
    return next((k for k, c in choices.items() if c.get("default")), next(iter(choices), None))


def profile_slug(p: dict) -> str:
    return p.get("slug") or p["display_name"].lower().replace(" ", "-")


def describe_gpu(gpu: dict | None) -> str:
    if not gpu:
        return "no GPU"
    compute = gpu.get("compute", 100)
    bursts = compute < 100 and gpu.get("burst", default_burst(gpu.get("qos", "medium")))
    parts = [f"{gpu['vram'] / 2**30:g} GiB VRAM",
             f"{compute}% compute" + (" (more when the GPU is idle)" if bursts else "")]
    if gpu.get("count", 1) > 1:
        parts.insert(0, f"{gpu['count']} vGPUs")
    return ", ".join(parts)


# What a profile's vGPU runs, by mode.  Only a local vGPU runs natively (the pool's local_address): the
# others are forwarded, which cuda-python, cuda.core and numba-cuda go through, and PyTorch, CuPy and JAX
# do not (the CUDA runtime they link asks the driver for export tables, which only a real driver in the
# process has).
FORWARDED_RUNS = "CUDA programs through cuda-python, cuda.core, numba-cuda (not PyTorch/CuPy/JAX)"
MODE_TEXT = {"local": "PyTorch, CuPy, JAX, and any CUDA program: local vGPU on this node",
             "remote": f"{FORWARDED_RUNS}: remote vGPU",
             "any": f"{FORWARDED_RUNS}: local or remote vGPU"}


def describe_mode(gpu: dict | None) -> str:
    """What programs a profile's vGPU runs, and where it is ("" for no GPU)."""
    return MODE_TEXT[gpu.get("mode", "any")] if gpu else ""


def form_profiles(views: list[dict], avail: list[dict]) -> list[dict]:
    """What form.html shows for each profile; preselects the default profile only if it fits now,
    else the first that fits, else none (the user then sees why each one is unavailable)."""
    out = []
    for v in views:
        p, a = v["profile"], avail[v["ask"]] if v["ask"] is not None else None
        item = {"slug": profile_slug(p), "display_name": p["display_name"], "description": p.get("description", ""),
                "gpu_text": describe_gpu(v["gpu"]), "mode_text": describe_mode(v["gpu"]),
                "has_gpu": v["gpu"] is not None, "default": bool(p.get("default")), "checked": False,
                **availability_view(a)}
        item["options"] = [{**o, "choices": [{**c, **availability_view(avail[c["ask"]] if c["ask"] is not None
                                                                         else None)} for c in o["choices"]]}
                           for o in v["options"]]
        if not item["fits"] and item["options"] and all(any(c["fits"] for c in o["choices"])
                                                       for o in item["options"]):
            fit_with_other_choices(item)
        out.append(item)
    default = next((i for i in out if i["default"]), out[0] if out else None)
    chosen = default if default and default["fits"] else next((i for i in out if i["fits"]), None)
    if chosen:
        chosen["checked"] = True
    return out


def fit_with_other_choices(item: dict) -> None:
    """A profile whose default choices are full but whose other choices fit (a smaller memory
    option, say) is not full: select the first choice that fits in each option and say so."""
    changed = []
    for o in item["options"]:
        selected = next((c for c in o["choices"] if c["selected"]), o["choices"][0])
        if not selected["fits"]:
            first = next(c for c in o["choices"] if c["fits"])
            for c in o["choices"]:
                c["selected"] = c is first
            changed.append(f"{o['display_name']} {first['display_name']}")
    chosen = [next(c for c in o["choices"] if c["selected"]) for o in item["options"]]
    slots = [c["slots"] for c in chosen if c["slots"] is not None]
    item.update(fits=True, slots=min(slots) if slots else None, why="",
                fits_note=f"with {', '.join(changed)}" if changed else "")


def availability_view(a: dict | None) -> dict:
    if a is None:  # no GPU: always fits
        return {"fits": True, "slots": None, "why": "", "full_label": ""}
    if a["fits"]:
        return {"fits": True, "slots": a["slots"], "why": "", "full_label": ""}
    return {"fits": False, "slots": 0, "why": a.get("reason", ""),
            "full_label": "Full" if a.get("constraint") in CAPACITY else "Unavailable"}


class GPUSimpleLocalProcessSpawner(GPUSpawner, SimpleLocalProcessSpawner):
    """The embedded default: servers run as the hub's user, each with a vGPU."""


class GPULocalProcessSpawner(GPUSpawner, LocalProcessSpawner):
    """Servers run as system users, each with a vGPU."""
