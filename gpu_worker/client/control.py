"""A small synchronous client of the worker's control API (gpu_worker/daemon/control.py), for the
command line (`gpulab vgpu`) and the kernel's `%vgpu` magics, which both want an answer at once
and nothing but the standard library.

Who asks decides what is seen: the worker's admin sees every vGPU, a session sees its own.  The
credential is found in this order (`find_credential`):
  1. an explicit URL, with an explicit token or $GPULAB_TOKEN;
  2. $GPULAB_CONTROL_URL and $GPULAB_TOKEN: the session itself, from a kernel's environment;
  3. what a worker on this host published in the state directory ($GPULAB_STATE_DIR, else
     $XDG_STATE_HOME/gpulab, else ~/.local/state/gpulab): its control URL and admin token, of the
     only worker there or of the one named.
Every failure is one `ControlError` whose text is a sentence for the person: the worker's own
"message" when it answered, else why it could not be reached.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

MAX_TRACE = 1024  # trace records one answer may hold (daemon/control.py MAX_LIMIT)
# Seconds the worker waits for a vGPU's processes to move its memory: the client side's copy of
# daemon/control.py's TIER_WAIT (not imported: the kernel's magics would load the daemon's modules).
TIER_WAIT = 30


class ControlError(Exception):
    """What went wrong, as one sentence; ``status`` is the worker's HTTP status when it answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def missing_vgpu_settings(worker: str, token: str) -> str:
    """Which of a vGPU's two settings are empty, as a sentence's subject and verb ("GPULAB_TOKEN is",
    "GPULAB_WORKER and GPULAB_TOKEN are"); "" when both are set."""
    missing = [name for name, value in (("GPULAB_WORKER", worker), ("GPULAB_TOKEN", token)) if not value]
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}" if missing else ""


def find_credential(url: str = "", token: str = "", worker: str = "", state_dir: str = "",
                    environ=None) -> tuple[str, str]:
    """(control URL, token) in the order the module docstring gives; ControlError if none is found."""
    env = os.environ if environ is None else environ
    if url:
        token = token or env.get("GPULAB_TOKEN", "")
        if not token:
            raise ControlError("--url needs a credential: set GPULAB_TOKEN (or pass --token, which `ps` shows "
                               "to every user of this host)")
        return url.rstrip("/"), token
    if env.get("GPULAB_CONTROL_URL") and not worker:
        token = token or env.get("GPULAB_TOKEN", "")
        if not token:
            raise ControlError("GPULAB_CONTROL_URL is set but GPULAB_TOKEN is not: set it too")
        return env["GPULAB_CONTROL_URL"].rstrip("/"), token
    from ..daemon.control import published  # where the worker writes them is the worker's to say
    from .env import default_state_dir

    state = state_dir or default_state_dir()
    workers = published(state)
    if not workers:
        raise ControlError(f"no worker on this host published its control API in {state}; set "
                           f"GPULAB_CONTROL_URL and GPULAB_TOKEN, or pass --url with GPULAB_TOKEN set")
    if worker:
        if worker not in workers:
            raise ControlError(f"no worker named {worker} published its control API in {state} "
                               f"(there: {', '.join(workers)})")
        name = worker
    elif len(workers) > 1:
        raise ControlError(f"several workers published their control API in {state} ({', '.join(workers)}): "
                           f"choose one with --worker NAME")
    else:
        (name,) = workers
    found_url, token_file = workers[name]
    if token:
        return found_url.rstrip("/"), token
    try:
        return found_url.rstrip("/"), token_file.read_text().strip()
    except PermissionError:
        raise ControlError(f"cannot read worker {name}'s admin token {token_file}: run this as the user the "
                           f"worker runs as") from None
    except OSError as e:
        raise ControlError(f"cannot read worker {name}'s admin token {token_file}: {e.strerror}") from None


def call(url: str, token: str, method: str, path: str, body: dict | None = None, timeout: float = 30):
    """One request to the control API at `url` with `token`: the JSON it answers with, or ControlError
    carrying the worker's sentence (or why it could not be reached)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["message"]
        except (ValueError, KeyError, TypeError):
            message = f"the worker answered {e.code} {e.reason}"
        raise ControlError(message, e.code) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ControlError(f"cannot reach the worker's control API at {url}: {reason}") from None


class Control:
    """The control API as one credential sees it: `call(method, path, body, timeout)`."""

    def __init__(self, url: str = "", token: str = "", worker: str = "", state_dir: str = "", environ=None):
        self.url, self.token = find_credential(url, token, worker, state_dir, environ)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        return call(self.url, self.token, method, path, body, timeout)

    def vgpus(self) -> list[dict]:
        return self.call("GET", "/api/vgpus")["vgpus"]

    def trace_last(self, vgpu_id, n: int) -> list[dict]:
        """The `n` newest trace records of a vGPU (at most MAX_TRACE), oldest first."""
        page = self.call("GET", f"/api/vgpus/{quote(vgpu_id)}/trace?last={min(max(n, 1), MAX_TRACE)}")
        return page["records"]


def quote(vgpu_id) -> str:
    """A vGPU id as one path component."""
    return urllib.parse.quote(str(vgpu_id), safe="")
