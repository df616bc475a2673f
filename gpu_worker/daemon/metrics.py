"""The worker's Prometheus metrics, read from the vGPU registry at each scrape.

Nothing is counted twice: a collector turns `registry.vgpus()` and `registry.gpu_facts()` into
metric families when Prometheus asks, so the figures are the ledger's own (counters are the
registry's cumulative totals, ended processes included), and the worker's tier figures come from
its tier board (`registry.tier_figures()`).  The families live in a private
CollectorRegistry: the process-wide default one would mix in whatever else the process imports.

A vGPU whose grant asks for the whole GPU (quota None) reports its GPUs' memory as its quota, the
most it can use, so that `used / quota` means the same for every vGPU.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST

VGPU = ["vgpu", "user"]

# (family, help, key in a vGPU's dict, counter?) for the figures that are one number per vGPU.
_VGPU_FIGURES = [
    ("gpulab_vgpu_vram_used_bytes", "Device memory the vGPU's programs have allocated (live processes).",
     "used", False),
    ("gpulab_vgpu_context_overhead_bytes", "Device memory the driver spends on the vGPU's processes' CUDA "
     "contexts, charged to its quota.", "overhead", False),
    ("gpulab_vgpu_calls_total", "Driver calls the vGPU's processes made.", "calls", True),
    ("gpulab_vgpu_launches_total", "Kernel launches of the vGPU's processes.", "launches", True),
    ("gpulab_vgpu_kernel_seconds_total", "Seconds of GPU time the vGPU's kernels took (events on a GPU, "
     "simulated durations on the emulated device).", "kernel_time", True),
    ("gpulab_vgpu_throttled_seconds_total", "Seconds the vGPU's processes waited in the worker because it was "
     "over its compute share (summed over its processes).", "throttled_time", True),
    ("gpulab_vgpu_pacing_queue_depth", "The vGPU's processes waiting in the worker for their compute share now.",
     "queue_depth", False),
]

# VRAM tier moves per vGPU, by kind: (kind, key of its count, of its bytes, of its seconds) in a vGPU's "moves"
_MOVES = [("offload", "offloads", "bytes_offloaded", "offload_seconds"),
          ("restore", "restores", "bytes_restored", "restore_seconds"),
          ("failure", "failures", None, None)]

# (family, help, key in a GPU's facts) for the optional per-GPU facts (None: not known, no sample).
_GPU_FACTS = [
    ("gpulab_gpu_memory_used_bytes", "Device memory in use on the GPU (NVML; the ledgers' sum on an emulated "
     "GPU).", "memory_used"),
    ("gpulab_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran on the GPU (0..1).",
     "utilization"),
    ("gpulab_gpu_temperature_celsius", "GPU temperature.", "temperature"),
    ("gpulab_gpu_power_watts", "GPU power draw.", "power"),
    ("gpulab_gpu_sm_clock_hertz", "GPU streaming-multiprocessor clock.", "sm_clock"),
]


class WorkerCollector:
    """A prometheus_client collector over a VGPURegistry (see gpu_worker/daemon/vgpus.py)."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        gpus = {g["uuid"]: g for g in self.registry.gpus()}
        facts = self.registry.gpu_facts()
        yield from self._vgpus(gpus, facts)
        yield from self._gpus(gpus, facts)
        yield from self._tiers(gpus)

    def _tiers(self, gpus: dict):
        """The worker's tier board: warm host RAM held and its budget, device memory held per GPU."""
        board = self.registry.tier_figures()
        warm = GaugeMetricFamily("gpulab_worker_warm_bytes", "Host RAM the worker's warm tier holds (vGPU memory "
                                 "moved off its GPUs, native processes' checkpoints included), over all vGPUs.")
        warm.add_metric([], board["warm"])
        budget = GaugeMetricFamily("gpulab_worker_warm_budget_bytes", "Host RAM the warm tier may hold; beyond it "
                                   "offloads go cold (to disk).")
        budget.add_metric([], board["warm_budget"])
        hot = GaugeMetricFamily("gpulab_worker_gpu_hot_bytes", "Device memory the vGPUs' allocations hold on each "
                                "GPU (the worker's tier board).", labels=["gpu"])
        for uuid, n in sorted(board["hot"].items()):
            hot.add_metric([uuid], n)
        yield from (warm, budget, hot)

    def _vgpus(self, gpus: dict, facts: dict):
        vgpus = self.registry.vgpus()
        info = GaugeMetricFamily("gpulab_vgpu_info", "One series per vGPU on this worker (1), with its grant.",
                                 labels=[*VGPU, "profile", "qos", "state", "gpus"])
        quota = GaugeMetricFamily("gpulab_vgpu_vram_quota_bytes", "The vGPU's VRAM quota (the memory of its "
                                  "GPUs when its grant asks for whole GPUs).", labels=VGPU)
        procs = GaugeMetricFamily("gpulab_vgpu_processes", "Client processes attached to the vGPU.", labels=VGPU)
        families = [(key, (CounterMetricFamily if counter else GaugeMetricFamily)(name, text, labels=VGPU))
                    for name, text, key, counter in _VGPU_FIGURES]
        transfer = CounterMetricFamily("gpulab_vgpu_transfer_bytes", "Bytes copied between the host and the "
                                       "vGPU's memory (htod: to the device, dtoh: from it).",
                                       labels=[*VGPU, "direction"])
        # shares are ratios of one GPU (0..1; measured may pass the share when bursting, up to the GPU count)
        share = GaugeMetricFamily("gpulab_vgpu_compute_share_ratio", "The vGPU's compute share: the fraction of "
                                  "one GPU's kernel time its grant promises.", labels=VGPU)
        measured = GaugeMetricFamily("gpulab_vgpu_compute_measured_ratio", "Fraction of one GPU's time the vGPU's "
                                     "kernels took over the last 10 s (above its share when it bursts).",
                                     labels=VGPU)
        errors = CounterMetricFamily("gpulab_vgpu_errors", "Driver calls of the vGPU that failed, by CUresult.",
                                     labels=[*VGPU, "result"])
        tier_bytes = GaugeMetricFamily("gpulab_vgpu_tier_bytes", "Bytes of the vGPU's allocations in each tier: hot "
                                       "(on the GPU), warm (the worker's host RAM), cold (files on its disk).",
                                       labels=[*VGPU, "tier"])
        moves = CounterMetricFamily("gpulab_vgpu_tier_moves", "Moves of the vGPU's memory between tiers, by kind: "
                                    "offload (off the GPU), restore (back), failure (a move that failed).",
                                    labels=[*VGPU, "kind"])
        move_bytes = CounterMetricFamily("gpulab_vgpu_tier_move_bytes", "Bytes the vGPU's offloads and restores "
                                         "moved.", labels=[*VGPU, "kind"])
        move_seconds = CounterMetricFamily("gpulab_vgpu_tier_move_seconds", "Seconds the vGPU's offloads and "
                                           "restores took.", labels=[*VGPU, "kind"])
        for v in vgpus:
            labels = [str(v["id"]), v.get("user") or ""]
            info.add_metric([*labels, v.get("profile") or "", v.get("qos") or "", v.get("state") or "",
                             ",".join(v.get("gpus") or [])], 1)
            q = v.get("quota")
            if q is None:
                q = sum(_gpu_memory(u, gpus, facts) for u in v.get("gpus") or [])
            quota.add_metric(labels, q)
            procs.add_metric(labels, len(v.get("processes") or []))
            for key, family in families:
                family.add_metric(labels, v.get(key) or 0)
            share.add_metric(labels, (v.get("share", v.get("compute", 100)) or 0) / 100)
            measured.add_metric(labels, (v.get("share_measured") or 0) / 100)
            transfer.add_metric([*labels, "htod"], v.get("bytes_in") or 0)
            transfer.add_metric([*labels, "dtoh"], v.get("bytes_out") or 0)
            for result, n in sorted((v.get("errors") or {}).items()):
                errors.add_metric([*labels, result], n)
            for tier in ("hot", "warm", "cold"):
                tier_bytes.add_metric([*labels, tier], (v.get("tiers") or {}).get(tier) or 0)
            done = v.get("moves") or {}
            for kind, count, nbytes, secs in _MOVES:
                moves.add_metric([*labels, kind], done.get(count) or 0)
                if nbytes:
                    move_bytes.add_metric([*labels, kind], done.get(nbytes) or 0)
                    move_seconds.add_metric([*labels, kind], done.get(secs) or 0)
        yield info
        yield quota
        yield procs
        yield from (f for _, f in families)
        yield share
        yield measured
        yield transfer
        yield errors
        yield from (tier_bytes, moves, move_bytes, move_seconds)

    def _gpus(self, gpus: dict, facts: dict):
        total = GaugeMetricFamily("gpulab_gpu_memory_total_bytes", "Device memory of the GPU (an emulated GPU "
                                  "says so: emulated=\"true\").", labels=["gpu", "model", "emulated"])
        optional = [(key, GaugeMetricFamily(name, text, labels=["gpu"])) for name, text, key in _GPU_FACTS]
        for uuid in sorted(set(gpus) | set(facts)):
            g, f = gpus.get(uuid, {}), facts.get(uuid, {})
            emulated = bool(f.get("emulated", g.get("emulated", False)))
            total.add_metric([uuid, g.get("model") or "", str(emulated).lower()], _gpu_memory(uuid, gpus, facts))
            for key, family in optional:
                if f.get(key) is not None:
                    family.add_metric([uuid], f[key])
        yield total
        yield from (f for _, f in optional)


def _gpu_memory(uuid: str, gpus: dict, facts: dict) -> int:
    return (facts.get(uuid) or {}).get("memory_total") or (gpus.get(uuid) or {}).get("memory") or 0


def render(registry) -> bytes:
    """The Prometheus text exposition of a VGPURegistry (CONTENT_TYPE is its media type)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(WorkerCollector(registry))
    return generate_latest(reg)
