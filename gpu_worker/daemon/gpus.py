"""The worker's GPUs: what they are (for the pool's placement) and how they are doing now (for heartbeats
and metrics).

On a real GPU the facts come from NVML (nvidia-ml-py), which reads them without creating a CUDA
context: the daemon must never initialise CUDA, because it forks the executors that do.  NVML is
opened once per process and device handles are kept, so reading the facts every heartbeat is cheap.
An emulated worker's GPUs get uuids derived from the worker's name, stable across restarts, so the
pool recognises them.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid

log = logging.getLogger("gpulab.worker")

FACTS = ("memory_total", "memory_used", "utilization", "temperature", "power", "sm_clock")


def emulated_uuid(worker_name: str, index: int) -> str:
    # index 0 keeps the uuid of the one GPU emulated workers had before they could have several
    suffix = f"-{index}" if index else ""
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"gpulab-emulated-{worker_name}{suffix}"))


def describe_gpus(kind: str, worker_name: str, emulated_memory: int, emulated_gpus: int = 1) -> list[dict]:
    """The GPUs this worker serves, as the pool records them: uuid, index, model, memory, capability, emulated."""
    if kind == "emulated":
        from ..backends.emulated import DEVICE_NAME

        return [{"uuid": emulated_uuid(worker_name, i), "index": i, "model": DEVICE_NAME,
                 "memory": emulated_memory, "capability": "9.0", "emulated": True} for i in range(emulated_gpus)]
    nvml = _NVML.open()
    if nvml is None:
        # no NVML (a container without it, or the shim chained to another worker): ask the driver,
        # in a child process, as the daemon must never initialise CUDA itself (it forks executors)
        return _describe_with_driver(_NVML.error)
    gpus = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
        gpus.append({"uuid": str(nvml.nvmlDeviceGetUUID(h)), "index": i, "model": str(nvml.nvmlDeviceGetName(h)),
                     "memory": int(nvml.nvmlDeviceGetMemoryInfo(h).total), "capability": f"{major}.{minor}",
                     "emulated": False})
    return gpus


_DRIVER_PROBE = """
import json, uuid
from cuda.bindings import driver as d

def ok(res):
    if res[0] != d.CUresult.CUDA_SUCCESS:
        raise SystemExit(res[0].name)
    return res[1] if len(res) == 2 else res[1:]

ok(d.cuInit(0))
A = d.CUdevice_attribute
gpus = []
for i in range(ok(d.cuDeviceGetCount())):
    dev = ok(d.cuDeviceGet(i))
    cap = [ok(d.cuDeviceGetAttribute(getattr(A, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_" + x), dev))
           for x in ("MAJOR", "MINOR")]
    gpus.append({"uuid": "GPU-" + str(uuid.UUID(bytes=bytes(ok(d.cuDeviceGetUuid(dev)).bytes))), "index": i,
                 "model": ok(d.cuDeviceGetName(256, dev)).split(b"\\0")[0].decode(),
                 "memory": int(ok(d.cuDeviceTotalMem(dev))), "capability": "%d.%d" % tuple(cap), "emulated": False})
print(json.dumps(gpus))
"""


def _describe_with_driver(nvml_error: str) -> list[dict]:
    """The GPUs as the CUDA driver lists them, read by a short-lived child process."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _DRIVER_PROBE], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cannot read this worker's GPUs: NVML: {nvml_error}; the CUDA driver: {why}")
    return json.loads(p.stdout)


def nvml_available() -> bool:
    """Whether NVML can be read here (context overhead is measured with it)."""
    return _NVML.open() is not None


def nvml_facts(uuids: list[str]) -> dict[str, dict]:
    """Live facts of these GPUs, as the heartbeat's "gpus" carries them; a fact NVML cannot give is None."""
    nvml = _NVML.open()
    out = {}
    for u in uuids:
        h = _NVML.handle(u)
        facts = dict.fromkeys(FACTS)
        if h is not None:
            memory = _ask(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
            if memory is not None:
                facts["memory_total"], facts["memory_used"] = int(memory.total), int(memory.used)
            rates = _ask(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
            facts["utilization"] = rates.gpu / 100 if rates is not None else None
            facts["temperature"] = _ask(lambda: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)))
            milliwatts = _ask(lambda: nvml.nvmlDeviceGetPowerUsage(h))
            facts["power"] = milliwatts / 1000 if milliwatts is not None else None
            mhz = _ask(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
            facts["sm_clock"] = mhz * 1e6 if mhz is not None else None
        out[u] = {**facts, "emulated": False}
    return out


def nvml_process_memory(uuids: list[str]) -> dict[int, int]:
    """Device memory NVML counts for each process (by pid) on these GPUs: for a CUDA executor, its context
    and its allocations together.  Empty when NVML is unavailable; a process NVML cannot measure is left out."""
    nvml = _NVML.open()
    out: dict[int, int] = {}
    for u in uuids:
        h = _NVML.handle(u)
        procs = _ask(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(h)) if h is not None else None
        for p in procs or ():
            if p.usedGpuMemory is not None:  # None: NVML may not say (e.g. no permission)
                out[p.pid] = out.get(p.pid, 0) + int(p.usedGpuMemory)
    return out


def _ask(read):
    """One NVML reading, or None where this GPU or driver does not support it."""
    import pynvml

    try:
        return read()
    except pynvml.NVMLError:
        return None


class _NVML:
    """NVML opened once for this process, with a device handle kept per GPU uuid."""

    lock = threading.Lock()
    lib = None  # the pynvml module once opened
    error = ""  # why it could not be opened; it is not tried again
    handles: dict[str, object] = {}

    @classmethod
    def open(cls):
        with cls.lock:
            if cls.lib is None and not cls.error:
                cls.lib, cls.error = _init_nvml()
                if cls.error:
                    log.warning("NVML unavailable, GPU facts will be unknown: %s", cls.error)
            return cls.lib

    @classmethod
    def handle(cls, gpu_uuid: str):
        """The NVML handle of a GPU, or None when NVML or that GPU is not there (asked again next time)."""
        if cls.open() is None:
            return None
        with cls.lock:
            h = cls.handles.get(gpu_uuid)
            if h is None:
                h = _ask(lambda: cls.lib.nvmlDeviceGetHandleByUUID(gpu_uuid))
                if h is not None:
                    cls.handles[gpu_uuid] = h
            return h


def _init_nvml():
    """(pynvml, "") once NVML is initialised, or (None, why not)."""
    try:
        import pynvml
    except ImportError as exc:
        return None, f"nvidia-ml-py is not installed ({exc})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver library or no GPU
        return None, str(exc)
    return pynvml, ""
