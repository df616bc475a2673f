"""GPUKubeSpawner: KubeSpawner whose pods get a vGPU from the gpulab pool.

A remote vGPU needs nothing from the node the pod runs on: the pod gets the worker's
address, its session token and the shim on ``LD_LIBRARY_PATH`` (environment only), and
neither an ``nvidia.com/gpu`` resource nor a GPU node.  A local vGPU is served by the
worker on the pod's own node, so the pod is pinned to that worker's node.  Where the pool
places it natively, the pod gets its GPUs' device nodes and driver libraries from the NVIDIA
container runtime (NVIDIA_VISIBLE_DEVICES set to their uuids, the runtime class ``nvidia``),
again without ``nvidia.com/gpu``: the device plugin is not involved, the pool accounts for the
GPU, and the pod reaches the worker through its Unix socket's directory, mounted from the node.
"""
from __future__ import annotations

import posixpath

from kubernetes_asyncio.client.models import V1HostPathVolumeSource, V1Volume, V1VolumeMount
from kubespawner import KubeSpawner
from traitlets import Unicode

from .mixin import GPUSpawnError, GPUSpawner, profile_slug

HOSTNAME_LABEL = "kubernetes.io/hostname"
SOCKET_VOLUME = "gpulab-worker-socket"


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
    native_shim_path = Unicode("/opt/gpulab/lib/native", help="""
        Directory of the native libcuda.so.1 inside the user image, put first on LD_LIBRARY_PATH for a
        native (local) vGPU: `native` inside `shim_path` where the image links `/opt/gpulab/lib` to
        `gpulab shim-path`.""").tag(config=True)
    native_runtime_class = Unicode("nvidia", help="""
        runtimeClassName of the pods of native (local) vGPUs: the NVIDIA container runtime, whose hook
        mounts the GPUs named in NVIDIA_VISIBLE_DEVICES and the node's driver libraries into the pod.
        Empty: the node's default runtime (where that is NVIDIA's already).""").tag(config=True)
    worker_socket_dir = Unicode("/run/gpulab", help="""
        Directory on each GPU node that holds the gpulab worker's Unix socket (`--unix-socket` of the
        worker DaemonSet, docs/kubernetes.md); mounted (hostPath, read-only) at the same path in the pods
        of native vGPUs, whose GPULAB_WORKER names the socket in it.""").tag(config=True)
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
        alloc = self.native_allocation()
        # the runtime hook gives the pod these GPUs' device nodes and the driver libraries (compute: libcuda;
        # utility: libnvidia-ml); an emulated worker's GPUs are no devices, so its pods keep seeing none
        if alloc and alloc.get("backend", "cuda") != "emulated":
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(alloc["gpus"])
            env["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
        if self.nvidia_visible_devices and not any(k.startswith("nvidia.com/") for k in self.extra_resource_limits):
            env.setdefault("NVIDIA_VISIBLE_DEVICES", self.nvidia_visible_devices)
        return env

    async def get_pod_manifest(self):
        """KubeSpawner's pod; a native vGPU's also gets the NVIDIA runtime class and the worker's socket
        directory.  Added to the built pod, not to the volume traits, which a profile's
        ``kubespawner_override`` may replace."""
        pod = await super().get_pod_manifest()
        alloc = self.native_allocation()
        if alloc is None:
            return pod
        if self.native_runtime_class:
            pod.spec.runtime_class_name = self.native_runtime_class
        socket_path = alloc["local_address"].split("://", 1)[-1]
        mounted = posixpath.normpath(self.worker_socket_dir)
        if posixpath.commonpath([socket_path, mounted]) != mounted:
            self.log.warning("worker %s listens on %s, not in c.GPUKubeSpawner.worker_socket_dir %s: %s's pod "
                             "will not reach it", alloc.get("worker"), socket_path, self.worker_socket_dir,
                             self.user.name)
        pod.spec.volumes = [*(pod.spec.volumes or []), V1Volume(
            name=SOCKET_VOLUME, host_path=V1HostPathVolumeSource(path=self.worker_socket_dir, type="Directory"))]
        container = pod.spec.containers[0]
        container.volume_mounts = [*(container.volume_mounts or []), V1VolumeMount(
            name=SOCKET_VOLUME, mount_path=self.worker_socket_dir, read_only=True)]
        return pod
