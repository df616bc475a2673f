"""A worker that stops while a vGPU's memory is on disk (VRAM tiering, issue 9).

A real cuda-python program through the shim holds an allocation that the control API moved to the
cold tier (a file in the worker's spool directory). When the worker stops (SIGTERM, as a restart
does), the program's next call fails with CUDA_ERROR_DEVICE_UNAVAILABLE and the person reads what
was lost; no spool file stays. When the worker is killed outright (SIGKILL: no clean-up at all), the
next worker on the same spool directory removes what was left in its own subdirectory, and says so.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rawclient import RawSession
from workertools import PRELUDE, ROOT, Worker
from workertools import spool_files as files_under

from gpu_worker.api import errors as E

MiB = 1 << 20

# Allocates 4 MiB of random bytes, says "ready", waits for a line, then reads them back.
HOLDER = PRELUDE + """
import os
setup()
n = 4 << 20
data = np.frombuffer(os.urandom(n), np.uint8)
ptr = ok(d.cuMemAlloc(n))
ok(d.cuMemcpyHtoD(ptr, data.ctypes.data, n))
print("ready", flush=True)
sys.stdin.readline()
back = np.empty(n, np.uint8)
r = name(d.cuMemcpyDtoH(back.ctypes.data, ptr, n))
done(r=r, later=name(d.cuMemAlloc(64)), same=bool((back == data).all()))
"""


def own(spool: Path) -> Path:
    """The worker's own subdirectory of spool_dir (gpulab-<name>), where its cold files go."""
    (mine,) = spool.glob("gpulab-*")
    return mine


def spool_files(spool: Path) -> list[str]:
    """The cold files in the worker's subdirectory (its lock file aside), relative to it."""
    return files_under(own(spool))


def start_cold_holder(tmp_path: Path) -> tuple[Worker, subprocess.Popen, dict]:
    """A worker, a program holding 4 MiB, and that vGPU moved cold by the control API."""
    spool = tmp_path / "spool"
    # a restarted worker keeps its name, and so its spool subdirectory (gpulab-<name>)
    w = Worker(tmp_path, extra=["--vram-quota", "64M", "--name", "lab", f"--GPUWorker.spool_dir={spool}"])
    env = w.env()
    env["GPULAB_TIMEOUT"] = "5"
    p = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, cwd=ROOT, text=True, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        (vgpu,) = w.vgpus()
        status, body = w.api(f"/api/vgpus/{vgpu['id']}/offload", method="POST", body={"to": "cold"})
        assert status == 200 and body["tier"] == "cold" and body["tiers"]["cold"] >= 4 * MiB, (status, body)
        files = spool_files(spool)
        assert files and all(f.startswith(vgpu["id"] + "/") and f.endswith(".cold") for f in files), files
        assert sum((own(spool) / f).stat().st_size for f in files) >= 4 * MiB
    except BaseException:
        p.kill()
        w.stop()
        raise
    return w, p, body


def finish(p: subprocess.Popen) -> tuple[dict, str]:
    out, err = p.communicate("go\n", timeout=60)
    return json.loads(out.strip().splitlines()[-1]), err


def test_a_worker_stopping_tells_the_program_what_was_lost_and_leaves_no_spool_file(tmp_path):
    w, p, _ = start_cold_holder(tmp_path)
    # a second process of the vGPU (a raw session) allocates while the vGPU is cold: a new hot allocation
    raw = RawSession(w.unix, w.token)
    assert raw.open_device()[0] == 0 and raw.alloc(MiB)[0] == 0
    deadline = time.monotonic() + 5
    while (tiers := w.vgpus()[0]["tiers"])["hot"] != MiB and time.monotonic() < deadline:
        time.sleep(0.05)  # the executors publish their figures a few times a second
    assert tiers == {"hot": MiB, "warm": 0, "cold": 4 * MiB}, tiers
    t0 = time.monotonic()
    w.stop()  # SIGTERM to the worker's process group, as a service manager's restart does
    stopped = time.monotonic() - t0
    res, err = finish(p)
    assert res["r"] == "CUDA_ERROR_DEVICE_UNAVAILABLE" and res["later"] == "CUDA_ERROR_DEVICE_UNAVAILABLE", (res, err)
    # the executor's last frame (REPLY_ENDED) names what this process lost, by tier
    lost = [line for line in err.splitlines() if "the gpulab worker stopped" in line]
    assert lost and "4.0 MiB cold" in lost[0] and "is lost" in lost[0], err
    print(lost[0])
    assert "connection to the worker lost" not in err, err
    # the raw session's next call finds the same last frame, with its own figures
    assert raw.sync() == (E.DEVICE_UNAVAILABLE, (), raw.ended), raw.ended
    assert "the gpulab worker stopped" in raw.ended and "(1.0 MiB hot, 0 bytes warm, 0 bytes cold)" in raw.ended, \
        raw.ended
    assert spool_files(tmp_path / "spool") == [], spool_files(tmp_path / "spool")
    assert stopped < 10, stopped  # stopped within Worker.stop's grace, not killed after it
    assert "Traceback" not in w.log_path.read_text(), w.log_path.read_text()[-3000:]


def test_a_killed_worker_leaves_its_spool_to_the_next_one_which_empties_it(tmp_path):
    w, p, desc = start_cold_holder(tmp_path)
    left = spool_files(tmp_path / "spool")
    os.killpg(w.proc.pid, signal.SIGKILL)  # the daemon and its executors at once: nobody cleans up
    w.proc.wait()
    w.stop()
    res, err = finish(p)
    assert res["r"] == "CUDA_ERROR_DEVICE_UNAVAILABLE", (res, err)
    assert "connection to the worker lost" in err, err  # no last frame from a killed executor
    assert spool_files(tmp_path / "spool") == left  # still there: what the next worker must clean

    again = Worker(tmp_path, extra=["--vram-quota", "64M", "--name", "lab",
                                    f"--GPUWorker.spool_dir={tmp_path / 'spool'}"])
    try:
        log = again.log_text()
        said = [line for line in log.splitlines() if "cold-tier files" in line]
        assert said and f"removed {len(left)} cold-tier file" in said[0], log
        assert str(own(tmp_path / "spool")) in said[0], log
        assert spool_files(tmp_path / "spool") == []
        print(said[0])
        # and it serves the same token again, from nothing
        r = again.run(PRELUDE + """
setup()
free, total = ok(d.cuMemGetInfo())
done(free=free, total=total)
""")
        assert r.result == {"free": 64 * MiB, "total": 64 * MiB}
    finally:
        again.stop()
    assert desc["moves"]["offloads"] >= 1
