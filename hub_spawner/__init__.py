"""GPU pool and JupyterHub spawner (see issue: JupyterHub GPU pool and spawner)."""
