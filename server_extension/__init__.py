"""gpulab's Jupyter server extension: the session's vGPU (usage, kernels, recent calls) and tier controls.

Enabled on install by jupyter-config/ (jupyter_server_config.d/gpulab.json); the JupyterLab panel
(labextension/, built into server_extension/labextension) is its front end.  Without a vGPU (no
worker or token in the environment) it answers so on GET vgpus and starts nothing else."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jupyter_server_extension_points():
    return [{"module": "server_extension"}]


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "@gpulab/vgpu-panel"}]


def _load_jupyter_server_extension(serverapp):
    """Read and check the settings (a bad one raises, naming it), add the routes, start the timers."""
    from .config import VGPUExtension
    from .handlers import routes

    config = VGPUExtension(parent=serverapp)
    config.check()
    state = None
    if config.configured:
        from .vgpu_state import VGPUState

        state = VGPUState(config, serverapp.kernel_manager, serverapp.session_manager)
        state.start()
        serverapp.log.info("gpulab: vGPU panel for the worker at %s", state.client.where)
    else:
        serverapp.log.info("gpulab: %s", config.why_not())
    web_app = serverapp.web_app
    web_app.settings["gpulab_vgpu_state"] = state
    web_app.add_handlers(".*$", routes(web_app.settings["base_url"], state, config))


# jupyter_server < 2 looked for this name
load_jupyter_server_extension = _load_jupyter_server_extension


def _unload_jupyter_server_extension(serverapp):
    """Stop the timers and running actions' followers when the server stops."""
    state = serverapp.web_app.settings.get("gpulab_vgpu_state")
    if state is not None:
        state.stop()
