"""The extension's settings (``c.VGPUExtension.*``): where the vGPU's worker is, and how often to ask it.

The trait help is the manual (docs/jupyter.md lists the same).  Every value is checked when the
extension loads, so a bad one fails then with the setting's name, not later inside a request."""
from __future__ import annotations

import os
import urllib.parse

from traitlets import Bool, Float, Int, TraitError, Unicode, default, validate
from traitlets.config import Configurable


class VGPUExtension(Configurable):
    """Settings of the gpulab server extension (the vGPU panel's REST API)."""

    control_url = Unicode(help="The control API of the worker that holds this session's vGPU, http://host:port. "
                               "Default: $GPULAB_CONTROL_URL, which the gpulab spawner sets. Empty: this server has "
                               "no vGPU, and the extension only says so.").tag(config=True)
    token = Unicode(help="The session token of this server's vGPU; the worker shows a session token only its own "
                         "vGPU. Default: $GPULAB_TOKEN, which the gpulab spawner sets.").tag(config=True)
    refresh = Float(5.0, help="Seconds the server keeps the worker's answer: however many browser tabs poll, the "
                              "worker gets at most one request per interval (vGPUs and GPUs; and the recent calls "
                              "while a panel shows them). Also the interval of the usage history's samples while a "
                              "panel is open (see background_refresh). 5 s, the pace of jupyter-resource-usage's "
                              "own polling; the panel's refreshInterval setting has the same default."
                    ).tag(config=True)
    background_refresh = Float(10.0, help="Seconds between two refreshes while nothing is expected to change: no "
                                           "panel polls this server (none asked within three refresh intervals), or "
                                           "the vGPU is quiet (its last two answers showed no call, allocation, move "
                                           "or process, no cell runs in any kernel and no tier action runs). The "
                                           "first sign of work brings back the refresh pace; an idle lab's servers "
                                           "cost the worker little.").tag(config=True)
    history = Int(900, help="Samples of the usage history kept per vGPU (one per refresh: 900 at 5 s is 75 minutes "
                            "of a panel open, more with none), so a panel opened later draws its chart at once."
                  ).tag(config=True)
    idle_hint = Bool(True, help="Tell the worker when no cell runs in any kernel (all kernels idle), with the time "
                                "of the kernels' last activity: the worker's idle clock, which moves an idle vGPU's "
                                "memory to host RAM and disk, then counts from there.").tag(config=True)
    idle_interval = Float(5.0, help="Seconds between two looks at whether all kernels are idle (with idle_hint). "
                                    "The worker is told once per idle period.").tag(config=True)
    wake_on_busy = Bool(True, help="When a cell starts and the vGPU's memory was moved off the GPU (warm or cold) "
                                   "while idle, ask the worker to restore it at once (looked at every idle_interval, "
                                   "once per busy period): the move overlaps the cell's host work, and a native "
                                   "process frozen by the driver's checkpoint is thawed even if its first call is "
                                   "one the shim does not see.").tag(config=True)
    request_timeout = Float(10.0, help="Seconds one request to the worker may take before it counts as failed "
                                       "(an offload or restore may take longer: the worker holds it up to 30 s "
                                       "more while the vGPU's processes move their memory).").tag(config=True)

    @default("control_url")
    def _control_url_default(self):
        return os.environ.get("GPULAB_CONTROL_URL", "")

    @default("token")
    def _token_default(self):
        return os.environ.get("GPULAB_TOKEN", "")

    @validate("control_url")
    def _check_url(self, proposal):
        url = proposal.value.strip().rstrip("/")
        if url:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                raise TraitError(f"c.VGPUExtension.control_url must be http://host:port (the worker's control API), "
                                 f"not {proposal.value!r}")
        return url

    @validate("refresh", "background_refresh", "idle_interval", "request_timeout")
    def _check_seconds(self, proposal):
        name, value = proposal.trait.name, proposal.value
        if not value >= 0.1 or value == float("inf"):  # nan fails too
            raise TraitError(f"c.VGPUExtension.{name} must be a number of seconds of at least 0.1, not {value!r}")
        return value

    @validate("history")
    def _check_history(self, proposal):
        if proposal.value < 1:
            raise TraitError(f"c.VGPUExtension.history must be at least 1 sample, not {proposal.value!r}")
        return proposal.value

    def check(self) -> None:
        """Read every setting once, so that a bad default (from the environment) fails now, with its name."""
        for name in self.trait_names(config=True):
            setattr(self, name, getattr(self, name))  # a default is not validated until it is set

    @property
    def configured(self) -> bool:
        return bool(self.control_url and self.token)

    def why_not(self) -> str:
        """The sentence a panel shows on a server without a vGPU."""
        missing = [what for what, value in (("the worker's control URL ($GPULAB_CONTROL_URL or "
                                             "c.VGPUExtension.control_url)", self.control_url),
                                            ("a session token ($GPULAB_TOKEN or c.VGPUExtension.token)", self.token))
                   if not value]
        return ("This Jupyter server has no vGPU: it was started without " + " and without ".join(missing)
                + ". A server spawned by JupyterHub with a GPU profile gets both.")
