"""gpulab: GPU labs for JupyterHub. The `gpulab` command (cli.py) sits above hub_spawner and gpu_worker."""
