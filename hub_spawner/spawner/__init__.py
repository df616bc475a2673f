"""The GPUSpawner mix-in (profiles form, pool allocation on start, release on stop) and the
spawners it is mixed into. `c.JupyterHub.spawner_class = "gpulab-simple"` (or -local, -kube)."""
from .mixin import GPULocalProcessSpawner, GPUSimpleLocalProcessSpawner, GPUSpawner, profile_slug

__all__ = ["GPUSpawner", "GPUSimpleLocalProcessSpawner", "GPULocalProcessSpawner", "profile_slug"]
