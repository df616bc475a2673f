"""GPUKubeSpawner: KubeSpawner whose pods get a vGPU from the gpulab pool.

A remote vGPU needs nothing from the node the pod runs on: the pod gets the worker's
address, its session token and the shim on ``LD_LIBRARY_PATH`` (environment only), and
neither an ``nvidia.com/gpu`` resource nor a GPU node.  A local vGPU is served by the
worker on the pod's own node, so the pod is pinned to that worker's node.
"""
from __future__ import annotations

from kubespawner import KubeSpawner
from traitlets import Unicode

from .mixin import GPUSpawnError, GPUSpawner, profile_slug

HOSTNAME_LABEL = "kubernetes.io/hostname"


class GPUKubeSpawner(GPUSpawner, KubeSpawner):
    """KubeSpawner with vGPUs; config: ``c.GPUSpawner.*`` and ``c.KubeSpawner.*``.

    Profiles come from ``GPUSpawner.gpu_profiles`` (``KubeSpawner.profile_list`` is not
    used) so that one list drives the form, the vGPU request and the pod.  KubeSpawner's
    profile machinery overlaps with the mix-in's; the mix-in wins where they conflict:

    - ``options_form``: both define a ``_options_form_default``; GPUSpawner comes first in
      the MRO, so the form is GPUSpawner's (profiles with live GPU availability), not the
      one KubeSpawner renders from ``profile_list`` (empty here: it would render nothing).
    - ``options_from_form``: GPUSpawner's method shadows the trait whose default
      KubeSpawner sets; both produce ``{"profile": slug, option: choice}``.
    - ``load_user_options``: KubeSpawner's checks ``user_options["profile"]`` against
      ``profile_list`` (empty here: every start with a profile would fail); the override
      below applies the chosen ``gpu_profiles`` entry's ``kubespawner_override`` (and those
      of its option choices) with KubeSpawner's own helpers, so profiles can still set the
      image, resources, volumes...  It runs inside KubeSpawner's start, after the vGPU is
      allocated and placed: a failure there still releases the vGPU.
    - ``start``/``stop``/``poll``/``get_env``/``get_state``/``load_state``
      chain with ``super()``, so both classes' parts run.
    """

    shim_path = Unicode("/opt/gpulab/lib", help="""
        Directory of the gpulab libcuda.so.1 inside the user image, put first on LD_LIBRARY_PATH.
        The hub's own installation path means nothing in the user's pod, so the default is a fixed
        path the image provides, e.g. with
        `RUN mkdir -p /opt/gpulab && ln -s "$(gpulab shim-path)" /opt/gpulab/lib`.""").tag(config=True)
    gpu_node = Unicode("", help="""
        Node sent with vGPU requests.  Empty on Kubernetes: the hub cannot know the node of a pod
        not yet scheduled, so a local vGPU may go to a worker on any node and the pod is then pinned
        to that node.""").tag(config=True)
    nvidia_visible_devices = Unicode("void", help="""
        NVIDIA_VISIBLE_DEVICES for user pods that request no `nvidia.com/gpu` ('void': no GPU and no
        driver libraries).  Pods of local vGPUs run on GPU nodes; where the NVIDIA runtime is the
        default and the image sets NVIDIA_VISIBLE_DEVICES=all (CUDA images do), the pod would see
        every GPU of the node and bypass the pool's limits.  Empty: leave it to the image.""").tag(config=True)

    def apply_gpu_placement(self, alloc: dict) -> None:
        """Pins the pod of a local vGPU to its worker's node; a remote vGPU goes anywhere.

        A node selector rather than a required affinity: profile ``kubespawner_override``s
        are applied after this (in KubeSpawner's start) and merge into dicts but replace
        lists, so a selector entry survives them."""
        if alloc.get("mode") != "local":
            return
        node = alloc.get("node")
        if not node:
            self.log.warning("vGPU allocation %s is local but names no node: %s's pod is not pinned and "
                             "reaches worker %s over the network", alloc.get("id"), self.user.name,
                             alloc.get("worker"))
            return
        self.node_selector = {**self.node_selector, HOSTNAME_LABEL: node}

    async def load_user_options(self):
        """Applies the chosen ``gpu_profiles`` entry like KubeSpawner applies ``profile_list``."""
        profiles = [{**p, "slug": profile_slug(p)} for p in await self.visible_profiles()]
        profiles = self._get_initialized_profile_list(profiles)
        if not profiles:
            return
        try:
            self._validate_user_options(profiles)
            self._load_profile((self.user_options or {}).get("profile"), profiles)
        except (KeyError, ValueError) as exc:
            raise GPUSpawnError(f"Invalid server options: {exc}", reason="invalid-option",
                                status_code=400) from None

    def get_env(self):
        env = super().get_env()
        if self.nvidia_visible_devices and not any(k.startswith("nvidia.com/") for k in self.extra_resource_limits):
            env.setdefault("NVIDIA_VISIBLE_DEVICES", self.nvidia_visible_devices)
        return env
