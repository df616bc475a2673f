"""A `gpulab worker` started by a benchmark: its Unix socket, its control API as admin, its log, its end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from remote_driver import stop_group

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin"


class BenchWorker:
    def __init__(self, tmp: Path, name: str, args: list[str]):
        """``args``: the worker's options besides its name, socket, admin token and control API."""
        self.name = name
        self.log = open(tmp / f"{name}.log", "w")
        self.sock = str(tmp / f"{name}.sock")
        cmd = [sys.executable, "-m", "gpu_worker.daemon", "--name", name, "--unix-socket", self.sock,
               f"--GPUWorker.admin_token={ADMIN}", "--GPUWorker.control=127.0.0.1:0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True, env={**os.environ, "GPULAB_STATE_DIR": str(tmp / name)})
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise SystemExit(f"worker {name} did not start: {line!r}\n{Path(self.log.name).read_text()}")
        self.unix = "unix://" + self.sock
        line = self.proc.stdout.readline()
        if "control API at" not in line:
            self.stop()
            raise SystemExit(f"worker {name} has no control API: {line!r}")
        self.control = line.split("control API at ")[1].strip()

    def api(self, path: str, body: dict | None = None) -> dict:
        """A control API call as admin (a POST with ``body``), its JSON."""
        req = urllib.request.Request(self.control + path, headers={"Authorization": f"token {ADMIN}"},
                                     data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc.stdout.close()
        self.log.close()
