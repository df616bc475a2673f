"""The front end's build and shipping: tools/build_labextension.py says what it lacks in a sentence,
and a wheel carries the built front end where JupyterLab finds it (a user needs no Node.js)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from workertools import ROOT, load_script

lab = load_script("gpulab_build_labextension", "tools/build_labextension.py")


def test_without_node_the_check_names_what_is_missing(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no node, no npm
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_labextension.py"), "--check"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Node.js (node) and npm not found on PATH" in r.stderr, r.stderr


def test_an_empty_output_folder_is_not_a_build(tmp_path):
    assert not lab.built(tmp_path)
    (tmp_path / "package.json").write_text("{}")
    (tmp_path / "static").mkdir()
    assert not lab.built(tmp_path)  # no remote entry: the builder did not finish
    (tmp_path / "static" / "remoteEntry.0123abcd.js").write_text("")
    assert lab.built(tmp_path)


def test_the_wheel_carries_the_front_end(tmp_path):
    if not lab.built():
        pytest.fail("the front end is not built: run `make build` (make labextension)")
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(lab.OUTPUT, src / "server_extension" / "labextension")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("gpulab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    share = "data/share/jupyter/labextensions/@gpulab/vgpu-panel/"
    for prefix in ("server_extension/labextension/", share):
        inside = [n.split(prefix, 1)[1] for n in names if prefix in n]
        assert "package.json" in inside, names
        assert "schemas/@gpulab/vgpu-panel/plugin.json" in inside, inside
        assert any(n.startswith("static/remoteEntry.") and n.endswith(".js") for n in inside), inside
