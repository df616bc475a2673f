"""A Jupyter server without a vGPU refuses to start a "Python 3 (vGPU)" kernel, and its REST API gives
the front end (JupyterLab, VS Code or PyCharm connected to the server) the provisioner's sentence."""
from __future__ import annotations

import json

import pytest

from server_extension import kernelspec


@pytest.fixture
def no_vgpu(monkeypatch):
    for name in ("GPULAB_CONTROL_URL", "GPULAB_TOKEN", "GPULAB_WORKER"):
        monkeypatch.delenv(name, raising=False)


async def test_the_server_answers_the_refusal_in_words(no_vgpu, jp_fetch, jp_data_dir):
    kernelspec.install(user=True)  # jp_environ's JUPYTER_DATA_DIR: the server's kernelspecs
    specs = json.loads((await jp_fetch("api", "kernelspecs")).body)["kernelspecs"]
    assert specs[kernelspec.KERNEL_NAME]["spec"]["display_name"] == "Python 3 (vGPU)"
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": kernelspec.KERNEL_NAME}),
                       raise_error=False)
    assert r.code == 503
    answer = json.loads(r.body)
    assert answer["message"] == ("the \"Python 3 (vGPU)\" kernel needs a vGPU, but this Jupyter server has none: "
                                 "GPULAB_WORKER and GPULAB_TOKEN are not set in its environment (start the server "
                                 "from a GPU profile, or set them)"), answer
    assert json.loads((await jp_fetch("api", "kernels")).body) == []  # nothing was started
