"""A vGPU sees its own GPUs only: a multi-GPU worker's GPUs as the pool records them, and the backends
showing a vGPU exactly the GPUs it was placed on, as devices 0..count-1.

The emulated tests run anywhere; the `-m gpu` ones check the real driver's enumeration and NVML."""
from __future__ import annotations

import json
import subprocess
import sys
import types
import uuid

import pytest

from gpu_worker.api import errors as E
from gpu_worker.api.errors import CudaError
from gpu_worker.backends.emulated import DEVICE_NAME, EmulatedBackend
from gpu_worker.daemon import gpus as gpus_module
from gpu_worker.daemon.gpus import describe_gpus, nvml_facts, nvml_process_memory

GiB = 1 << 30


@pytest.fixture
def four():
    return describe_gpus("emulated", "w1", 2 * GiB, emulated_gpus=4)


def uuid_bytes(gpu: dict) -> bytes:
    return uuid.UUID(gpu["uuid"].removeprefix("GPU-")).bytes


def code_of(call, *args) -> int:
    with pytest.raises(CudaError) as info:
        call(*args)
    return info.value.code


def on_device(backend: EmulatedBackend, ordinal: int) -> None:
    (ctx,) = backend.cuDevicePrimaryCtxRetain(ordinal)
    backend.set_current(ctx)


def test_an_emulated_worker_describes_four_gpus_with_stable_uuids(four):
    assert [g["index"] for g in four] == [0, 1, 2, 3]
    assert len({g["uuid"] for g in four}) == 4
    assert all(g["uuid"].startswith("GPU-") and len(uuid_bytes(g)) == 16 for g in four)
    assert {(g["model"], g["memory"], g["capability"], g["emulated"]) for g in four} == \
        {(DEVICE_NAME, 2 * GiB, "9.0", True)}
    assert describe_gpus("emulated", "w1", 2 * GiB, emulated_gpus=4) == four  # the same after a restart
    assert describe_gpus("emulated", "w2", 2 * GiB, emulated_gpus=4)[3]["uuid"] != four[3]["uuid"]
    # a one-GPU worker keeps the uuid it had before workers could emulate several
    assert four[0]["uuid"] == "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, "gpulab-emulated-w1"))


def test_a_vgpu_on_gpu_3_sees_one_device_and_it_is_gpu_3(four):
    b = EmulatedBackend(gpus=[four[3]])
    b.cuInit(0)
    assert b.cuDeviceGetCount() == (1,)
    assert b.cuDeviceGet(0) == (0,)
    assert b.cuDeviceGetUuid(0) == (uuid_bytes(four[3]),)
    assert b.cuDeviceGetName(256, 0) == (f"{DEVICE_NAME} #3".encode(),)
    assert b"test double" in b.cuDeviceGetName(256, 0)[0]
    assert b.cuDeviceTotalMem(0) == (2 * GiB,)
    assert b.cuDeviceGetPCIBusId(16, 0) == (b"0000:03:00.0",)
    assert code_of(b.cuDeviceGet, 1) == E.INVALID_DEVICE
    assert code_of(b.cuDeviceGetUuid, 1) == E.INVALID_DEVICE


def test_a_vgpu_on_gpus_1_and_2_sees_two_devices_in_order(four):
    four[2]["memory"] = 3 * GiB  # tell the two apart by their memory too
    b = EmulatedBackend(gpus=[four[1], four[2]])
    assert b.cuDeviceGetCount() == (2,)
    assert [b.cuDeviceGetUuid(d)[0] for d in (0, 1)] == [uuid_bytes(four[1]), uuid_bytes(four[2])]
    assert [b.cuDeviceGetName(256, d)[0] for d in (0, 1)] == [f"{DEVICE_NAME} #1".encode(),
                                                              f"{DEVICE_NAME} #2".encode()]
    assert [b.cuDeviceTotalMem(d)[0] for d in (0, 1)] == [2 * GiB, 3 * GiB]
    assert [b.cuDeviceGetPCIBusId(16, d)[0] for d in (0, 1)] == [b"0000:01:00.0", b"0000:02:00.0"]
    assert b.cuDeviceComputeCapability(1) == (9, 0)
    assert b.cuDeviceCanAccessPeer(0, 1) == (0,)
    for call, args in [(b.cuDeviceGet, (2,)), (b.cuDeviceTotalMem, (2,)), (b.cuDeviceGetName, (256, 2)),
                       (b.cuDevicePrimaryCtxRetain, (2,)), (b.cuDeviceGet, (-1,)), (b.cuDeviceCanAccessPeer, (0, 2))]:
        assert code_of(call, *args) == E.INVALID_DEVICE, call.__name__


def test_each_device_has_its_own_memory(four):
    mib = 1 << 20
    gpu_a, gpu_b = dict(four[0], memory=8 * mib), dict(four[1], memory=4 * mib)
    b = EmulatedBackend(gpus=[gpu_a, gpu_b])
    on_device(b, 0)
    a_ptr = b.mem_alloc(6 * mib)
    assert b.cuMemGetInfo() == (2 * mib, 8 * mib)
    on_device(b, 1)
    assert b.cuMemGetInfo() == (4 * mib, 4 * mib)  # device 0's allocation is not on this one
    b_ptr = b.mem_alloc(4 * mib)
    assert b.cuMemGetInfo() == (0, 4 * mib)
    assert code_of(b.mem_alloc, 1) == E.OUT_OF_MEMORY
    on_device(b, 0)
    assert b.mem_alloc(2 * mib)  # device 0 still has its own 2 MiB
    assert code_of(b.mem_alloc, 1) == E.OUT_OF_MEMORY

    from cuda.bindings import driver

    ordinal = int(driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)
    assert b.cuPointerGetAttribute(ordinal, b_ptr) == ((1).to_bytes(4, "little"),)
    assert b.cuPointerGetAttribute(ordinal, a_ptr) == ((0).to_bytes(4, "little"),)
    b.mem_free(b_ptr)  # freed from the device it was on, whatever the current context
    on_device(b, 1)
    assert b.cuMemGetInfo() == (4 * mib, 4 * mib)


def test_without_gpus_the_backend_is_the_one_default_device():
    b = EmulatedBackend(total_memory=GiB)
    assert b.cuDeviceGetCount() == (1,)
    assert b.cuDeviceGetName(256, 0) == (DEVICE_NAME.encode(),)
    assert b.cuDeviceGetUuid(0) == (uuid.uuid5(uuid.NAMESPACE_DNS, "gpulab-emulated-device-0").bytes,)
    assert b.cuDeviceTotalMem(0) == (GiB,)
    assert code_of(b.cuDeviceGet, 1) == E.INVALID_DEVICE


# ------------------------------------------------------------------------ NVML facts, with a stand-in NVML
class _FakeNVML(types.ModuleType):
    """What nvidia-ml-py answers for one GPU with two processes on it (the power reading unsupported)."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlDeviceGetHandleByUUID(self, u):
        if u != "GPU-a":
            raise self.NVMLError("Not Found")
        return "handle-a"

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=80 * GiB, used=5 * GiB, free=75 * GiB)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 41

    def nvmlDeviceGetPowerUsage(self, h):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1980 if clock == self.NVML_CLOCK_SM else 0

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=101, usedGpuMemory=512 << 20),
                types.SimpleNamespace(pid=102, usedGpuMemory=None)]


@pytest.fixture
def fresh_nvml(monkeypatch):
    """NVML not yet opened in this process; the test decides what `import pynvml` gives."""
    monkeypatch.setattr(gpus_module._NVML, "lib", None)
    monkeypatch.setattr(gpus_module._NVML, "error", "")
    monkeypatch.setattr(gpus_module._NVML, "handles", {})
    return monkeypatch


def test_nvml_facts_are_converted_to_the_heartbeats_units(fresh_nvml):
    fake = _FakeNVML()
    fresh_nvml.setitem(sys.modules, "pynvml", fake)
    facts = nvml_facts(["GPU-a", "GPU-gone"])
    assert facts["GPU-a"] == {"memory_total": 80 * GiB, "memory_used": 5 * GiB, "utilization": 0.37,
                              "temperature": 41.0, "power": None, "sm_clock": 1980e6, "emulated": False}
    assert facts["GPU-gone"] == {"memory_total": None, "memory_used": None, "utilization": None,
                                 "temperature": None, "power": None, "sm_clock": None, "emulated": False}
    assert nvml_process_memory(["GPU-a", "GPU-gone"]) == {101: 512 << 20}
    nvml_facts(["GPU-a"])
    assert fake.inits == 1  # opened once, not every heartbeat


def test_without_nvml_every_fact_is_unknown(fresh_nvml):
    fresh_nvml.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails
    assert nvml_facts(["GPU-a"])["GPU-a"] == dict.fromkeys(gpus_module.FACTS) | {"emulated": False}
    assert nvml_process_memory(["GPU-a"]) == {}
    with pytest.raises(RuntimeError, match="nvidia-ml-py is not installed"):
        describe_gpus("cuda", "w1", 0)


# ------------------------------------------------------------------------------- on a real GPU
VISIBLE = """
import json, sys
from gpu_worker.backends.cuda import CudaBackend
b = CudaBackend(visible=[sys.argv[1]])
n, = b.cuDeviceGetCount()
print(json.dumps({"count": n, "uuid": b.cuDeviceGetUuid(0)[0].hex(), "total": b.cuDeviceTotalMem(0)[0]}))
"""


@pytest.mark.gpu
def test_the_cuda_backend_sees_only_the_gpu_it_is_placed_on():
    real = describe_gpus("cuda", "w1", 0)
    last = real[-1]  # on a multi-GPU host, not the device 0 every process sees by default
    # a fresh process, as an executor is: CUDA_VISIBLE_DEVICES counts only before the driver's cuInit
    out = subprocess.run([sys.executable, "-c", VISIBLE, last["uuid"]], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen == {"count": 1, "uuid": uuid_bytes(last).hex(), "total": last["memory"]}


@pytest.mark.gpu
def test_nvml_reads_the_real_gpus_facts():
    real = describe_gpus("cuda", "w1", 0)
    facts = nvml_facts([g["uuid"] for g in real])
    for g in real:
        f = facts[g["uuid"]]
        assert f["memory_total"] == g["memory"] and 0 <= f["memory_used"] <= f["memory_total"]
        assert f["emulated"] is False and 0 <= f["utilization"] <= 1 and f["sm_clock"] > 0
