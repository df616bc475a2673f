"""The "Python 3 (vGPU)" kernels' provisioner: every kernel it starts runs with the gpulab shim as its
libcuda.so.1 and the session's vGPU credentials, whatever front end asked for it.

A kernelspec names it in ``metadata.kernel_provisioner`` (server_extension/kernelspec.py writes one);
jupyter_client finds it through the ``jupyter_client.kernel_provisioners`` entry point.  The kernel
is an ordinary local process (LocalProvisioner): only its environment differs.  The credentials come
from the provisioner's config in the kernelspec, else from the environment the server hands the
kernel (the hub's spawner puts GPULAB_WORKER, GPULAB_TOKEN and GPULAB_CONTROL_URL there).  Without
them, or when the worker refuses the token, the kernel is not started at all and the front end
shows why: a CUDA kernel that cannot reach a GPU fails later, in a cell, and less clearly.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from tornado.web import HTTPError
from traitlets import Float, Unicode

from gpu_worker.client import native_dir, shim_dir, shim_env
from gpu_worker.client.control import ControlError, call, missing_vgpu_settings

NAME = "gpulab-vgpu"  # its entry point name, which kernelspecs give as provisioner_name


class NoVGPU(HTTPError):
    """Why this kernel gets no vGPU, as one sentence for the person starting it.  An HTTPError so that a
    Jupyter server answers the front end with the sentence (its API handlers answer any other
    exception with "Unhandled error"); 503: the server cannot give this kernel what it needs."""

    def __init__(self, sentence: str):
        super().__init__(503, sentence, reason="No vGPU")
        self.sentence = sentence

    def __str__(self) -> str:
        return self.sentence


class VGPUProvisioner(LocalProvisioner):
    """A local kernel on the session's vGPU: the shim first on LD_LIBRARY_PATH, the vGPU's credentials set."""

    worker = Unicode("", config=True, help="The vGPU's worker, tcp://host:port or unix:///path (default: "
                                           "$GPULAB_WORKER of the server's environment).")
    token = Unicode("", config=True, help="The vGPU's session token (default: $GPULAB_TOKEN of the server's "
                                          "environment). Prefer the environment: a kernelspec is a file others "
                                          "may read.")
    control_url = Unicode("", config=True, help="The worker's control API, http://host:port, which %vgpu and "
                                                "the check before the start ask (default: $GPULAB_CONTROL_URL "
                                                "of the server's environment; none: no check).")
    check_timeout = Float(5.0, config=True, help="Seconds to wait for the worker's control API to confirm the "
                                                 "vGPU before the kernel starts.")

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        env = dict(kwargs.get("env") or os.environ)
        worker = self.worker or env.get("GPULAB_WORKER", "")
        token = self.token or env.get("GPULAB_TOKEN", "")
        control = self.control_url or env.get("GPULAB_CONTROL_URL", "")
        missing = missing_vgpu_settings(worker, token)
        if missing:
            raise NoVGPU(f"the \"{self.kernel_spec.display_name}\" kernel needs a vGPU, but this Jupyter server "
                         f"has none: {missing} not set in its environment (start the server from a GPU "
                         f"profile, or set them)")
        if control:
            await self.confirm(control, token)
        self.vgpu = (worker, token, control)  # applied by _finalize_env, after the kernelspec's own env stanza
        kwargs["env"] = env
        return await super().pre_launch(**kwargs)

    def _finalize_env(self, env: dict[str, str]) -> None:
        super()._finalize_env(env)
        if getattr(self, "vgpu", None):
            env.update(vgpu_env(env, *self.vgpu))

    async def confirm(self, control: str, token: str) -> None:
        """Ask the worker whether the token still has a usable vGPU; NoVGPU if not."""
        try:
            answer = await asyncio.to_thread(call, control.rstrip("/"), token, "GET", "/api/vgpus",
                                             None, self.check_timeout)
        except ControlError as e:
            if e.status == 403:
                raise NoVGPU(f"the vGPU's worker at {control} does not accept this server's session token (the "
                             f"session has ended or the token is wrong)") from None
            raise NoVGPU(f"the kernel would have no GPU: {e}") from None
        for v in answer.get("vgpus") or []:
            if v.get("state") == "revoked":
                raise NoVGPU(f"this server's vGPU {v.get('id')} was revoked: {v.get('reason') or 'no reason given'}")


def vgpu_env(base: dict, worker: str, token: str, control: str = "") -> dict:
    """`base` with the shim first on LD_LIBRARY_PATH (once) and the vGPU's credentials. An entry left as
    "${LD_LIBRARY_PATH}" (the kernelspec's stanza, where the server had none to substitute) goes.

    A server whose vGPU the pool placed natively (the spawner sets GPULAB_MODE=native and puts the native
    library first) gives its kernels the native library, not the forwarding shim the kernelspec names: the
    kernel then runs PyTorch on the node's GPU, accounted to the same vGPU."""
    shims = {str(shim_dir()), str(native_dir())}
    rest = [p for p in base.get("LD_LIBRARY_PATH", "").split(":") if p and p not in shims and "${" not in p]
    env = shim_env(worker, token, base={**base, "LD_LIBRARY_PATH": ":".join(rest)})
    if base.get("GPULAB_MODE") == "native":
        env["LD_LIBRARY_PATH"] = ":".join([str(native_dir()), *rest])
    if control:
        env["GPULAB_CONTROL_URL"] = control
    return env
