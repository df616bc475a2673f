"""`gpulab up`: the embedded JupyterHub with the pool and a local worker."""
