"""gpulab: GPU labs for JupyterHub. The `gpulab` command (cli.py) sits above hub_spawner and gpu_worker.

`%load_ext gpulab` in IPython loads the `%vgpu` magics (server_extension/magics.py)."""


def load_ipython_extension(ipython):
    from server_extension.magics import load_ipython_extension as load

    load(ipython)
