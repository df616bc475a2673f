"""Helpers for the browser tests of the JupyterLab front end: a real `jupyter lab` process, Debian's
Chromium through Playwright, and where screenshots go."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
LAB_TOKEN = "gpulab-lab-test-token"
PANEL_TAB = "li.lm-TabBar-tab[data-id='gpulab-vgpu-panel']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifacts() -> Path:
    """Where screenshots go: $GPULAB_TEST_ARTIFACTS, else tests/artifacts/ (gitignored)."""
    path = Path(os.environ.get("GPULAB_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def built() -> bool:
    """Whether the front end is built and installed where this venv's JupyterLab looks."""
    share = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "@gpulab" / "vgpu-panel"
    return (share / "package.json").is_file()


def user_settings(directory: Path, refresh: float) -> None:
    """JupyterLab user settings for a quiet, quick test page: no news or update prompts (nothing
    outside is reachable), the panel's refresh interval."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        "@gpulab/vgpu-panel/plugin.jupyterlab-settings": {"refreshInterval": refresh},
    }
    for name, value in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps(value))


class Lab:
    """A `jupyter lab` process on a free port with its own root, settings and workspaces."""

    def __init__(self, tmp: Path, env: dict, refresh: float = 1.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = LAB_TOKEN
        self.root = tmp / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        settings = tmp / "settings"
        user_settings(settings, refresh)
        env = dict(env)
        env.update(JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
        self.log_path = tmp / "lab.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.expose_app_in_browser=True"]  # window.jupyterapp: the tests ask the page what it sent
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True)
        deadline = time.time() + 90
        while True:
            try:
                self.get("api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("jupyter lab did not start:\n" + self.log_text()[-4000:])
                time.sleep(0.3)

    def get(self, path: str):
        req = urllib.request.Request(f"{self.url}/{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def put(self, path: str, body) -> None:
        req = urllib.request.Request(f"{self.url}/{path}", method="PUT", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).close()

    def theme(self, name: str) -> None:
        """Switch the user's theme through the settings API (the page picks it up at its next load)."""
        self.put("lab/api/settings/@jupyterlab/apputils-extension:themes", {"raw": json.dumps({"theme": name})})

    def page_url(self, path: str = "lab") -> str:
        return f"{self.url}/{path}?token={self.token}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


def notebook(path: Path, cells: list[str]) -> None:
    """A notebook file of code cells, with the venv's python3 kernel."""
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                   "source": src} for src in cells],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }))


def copy_to_docs(shot: Path) -> None:
    """With GPULAB_DOCS_SCREENSHOT=1, the light screenshot becomes docs/images/vgpu-panel.png (kept
    out of ordinary runs so a test run never dirties a tracked file)."""
    if os.environ.get("GPULAB_DOCS_SCREENSHOT") == "1":
        dest = ROOT / "docs" / "images" / "vgpu-panel.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
