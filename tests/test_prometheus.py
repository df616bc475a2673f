"""A real Prometheus (Debian's `prometheus` package) scrapes a real worker and a real pool.

The worker's /metrics need its admin token and the pool's its API token: Prometheus sends them
(`authorization: {type: token, credentials_file: ...}`), so `up` being 1 proves the shipped way to
configure it works.  A client holds VRAM on a vGPU through the shim; the exact bytes appear in
Prometheus, and each alert rule of deploy/prometheus/alerts.yml, evaluated by this Prometheus,
returns the series it should: the GPU nearly full, the vGPU at its quota, a worker lost, refusals
rising, a vGPU throttled to its compute share (over a shorter window than the rule's 10 minutes),
a worker down once it stops; the restore-failures rule none (nothing failed to move).

`promtool` checks the shipped rules and the example configuration.  Without the package the tests
skip, except in CI ($CI set), where `make test`'s bootstrap installs it and a skip would hide a gap.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from gpu_worker.daemon.control import published
from workertools import PRELUDE, ROOT, Worker, load_script

DEPLOY = ROOT / "deploy" / "prometheus"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL) and not os.environ.get("CI"),
    reason="needs Debian's prometheus package (prometheus and promtool): `make test` installs it "
           "(tools/bootstrap.py), or apt-get install prometheus")

MiB = 1 << 20
QUOTA, ALLOC, OVERHEAD = 64 * MiB, 62 * MiB, 1 * MiB  # 63 of 64 MiB charged: over 98% of the quota


def promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is missing: tools/bootstrap.py installs Debian's prometheus package for make test"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]}


def test_promtool_checks_the_shipped_rules():
    p = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(rules())} rules found" in p.stdout
    assert set(rules()) == {"GPULabGPUMemoryNearlyFull", "GPULabWorkerLost", "GPULabWorkerDown",
                            "GPULabPoolRefusalsRising", "GPULabVGPUAtQuota", "GPULabVGPURestoreFailures",
                            "GPULabVGPUThrottled"}


def test_promtool_checks_the_example_configuration(tmp_path):
    """prometheus.yml as shipped, its secret files put in a temporary directory (promtool checks they
    exist); the Kubernetes variant is checked for the job names the rules match (Debian's build has
    no Kubernetes discovery for promtool to check it with)."""
    shutil.copy(DEPLOY / "alerts.yml", tmp_path)
    for name in ("gpulab-worker-admin-token", "gpulab-pool-api-token"):
        (tmp_path / name).write_text("x\n")
    for config in ("prometheus.yml", "prometheus-kubernetes.yml"):
        text = (DEPLOY / config).read_text()
        assert "/etc/prometheus/secrets/gpulab-worker-admin-token" in text
        (tmp_path / config).write_text(text.replace("/etc/prometheus/secrets/", f"{tmp_path}/"))
    p = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    for config in ("prometheus.yml", "prometheus-kubernetes.yml"):
        jobs = {j["job_name"]: j for j in yaml.safe_load((tmp_path / config).read_text())["scrape_configs"]}
        assert set(jobs) == {"gpulab-worker", "gpulab-pool"}, config
        assert all(j["authorization"]["type"] == "token" for j in jobs.values())
    assert 'up{job="gpulab-worker"}' in rules()["GPULabWorkerDown"]["expr"]


# ------------------------------------------------------------------------------ a real Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A prometheus process on a free port, with its own storage in a temporary directory."""

    def __init__(self, tmp, config: dict):
        assert PROMETHEUS, "prometheus is missing: tools/bootstrap.py installs Debian's package for make test"
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address={self.url[len('http://'):]}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self.log_path = tmp / "prometheus.log"
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, f"prometheus not ready:\n{self.log_path.read_text()}"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait(self, expr: str, check=bool, timeout: float = 45.0) -> list[dict]:
        """Query `expr` until check(result) holds; the last result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if check(result):
                return result
            if time.monotonic() > deadline:
                targets = self.api("targets")["activeTargets"]
                pytest.fail(f"{expr!r} never gave the expected series; last {result}; targets "
                            f"{[(t['scrapePool'], t['health'], t['lastError']) for t in targets]}")
            time.sleep(0.25)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def values(result: list[dict], label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}


HOLD = PRELUDE + f"""
dev, ctx = setup()
ptr = ok(d.cuMemAlloc({ALLOC}))
done(ptr=int(ptr))
sys.stdout.flush()
sys.stdin.read()  # hold the memory until the test closes stdin
"""

# A second vGPU, of a tokens file: 10% of the GPU without bursting, kept busy with 20 ms kernels, so its
# process waits in the worker about 90% of the time.
THROTTLED = {"throttled-token": {"compute": 10, "burst": False, "vram": "8M"}}
SPIN_PTX = r"""
.version 8.0
.target sm_90
.address_size 64
.visible .entry spin_20ms()
{
    ret;
}
"""
SPIN = PRELUDE + f"""
setup()
fn = ok(d.cuModuleGetFunction(ok(d.cuModuleLoadData({SPIN_PTX!r}.encode() + b"\\0")), b"spin_20ms"))
done(ready=True)
sys.stdout.flush()
while True:
    ok(d.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0))
    ok(d.cuCtxSynchronize())
"""


@pytest.fixture
def lab(tmp_path):
    """A worker whose one vGPU has a 64 MiB quota on a 64 MiB emulated GPU, a client holding 62 MiB
    of it (plus 1 MiB of context overhead), and a pool that knows one worker already lost."""
    hubtools = load_script("hubtools", "tests/hub/hubtools.py")
    state = tmp_path / "state"
    (tmp_path / "tokens.json").write_text(json.dumps(THROTTLED))
    worker = Worker(tmp_path, token="prom-token",
                    extra=("--name", "w1", "--vram-quota", "64M", "--emulated-memory", "64M",
                           "--tokens-file", str(tmp_path / "tokens.json"),
                           "--GPUWorker.emulated_context_overhead=1M", "--GPUWorker.control=127.0.0.1:0"),
                    env={**os.environ, "GPULAB_STATE_DIR": str(state)})
    client = pool = None
    try:
        client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD)], env=worker.env(),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = client.stdout.readline()
        assert line, f"the client failed; worker log:\n{worker.log_text()}"
        assert json.loads(line)["ptr"]
        pool = hubtools.Pool(str(tmp_path / "pool.sqlite"), timeout=1.0)
        pool.register("w-gone", memory=8 << 30)
        pool.wait_lost()
        url, token_file = published(state)["w1"]
        yield worker, url, token_file, pool, hubtools
    finally:
        if client is not None:
            client.stdin.close()
            client.wait(30)
        if pool is not None:
            pool.stop()
        worker.stop()


def test_prometheus_scrapes_a_worker_and_the_pool_and_the_alert_rules_find_them(lab, tmp_path):
    worker, control_url, token_file, pool, hubtools = lab
    (tmp_path / "pool-token").write_text(hubtools.HUB_TOKEN + "\n")
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    control = control_url[len("http://"):]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": "gpulab-worker", "static_configs": [{"targets": [control]}],
             "authorization": {"type": "token", "credentials_file": str(token_file)}},
            {"job_name": "gpulab-pool", "metrics_path": "/metrics",
             "static_configs": [{"targets": [pool.url[len("http://"):].rstrip("/")]}],
             "authorization": {"type": "token", "credentials_file": str(tmp_path / "pool-token")}},
        ]}
    prom = Prometheus(tmp_path, config)
    try:
        # both scrapes succeed with the tokens as configured
        up = prom.wait("up", lambda r: values(r, "job") == {"gpulab-worker": 1.0, "gpulab-pool": 1.0})
        assert {s["metric"]["instance"] for s in up} == {control, pool.url[len("http://"):].rstrip("/")}

        # the client's exact bytes, its context overhead and the quota, per vGPU
        (vgpu,) = prom.wait("gpulab_vgpu_vram_used_bytes", lambda r: values(r, "vgpu") and
                            list(values(r, "vgpu").values()) == [ALLOC])
        vid = vgpu["metric"]["vgpu"]
        assert re.fullmatch(r"t-[0-9a-f]{8}", vid)  # a configured token's vGPU
        assert values(prom.query("gpulab_vgpu_context_overhead_bytes"), "vgpu") == {vid: OVERHEAD}
        assert values(prom.query("gpulab_vgpu_vram_quota_bytes"), "vgpu") == {vid: QUOTA}
        assert values(prom.query("gpulab_vgpu_processes"), "vgpu") == {vid: 1}
        assert values(prom.query('gpulab_gpu_memory_total_bytes{emulated="true"}'), "job") == {
            "gpulab-worker": QUOTA}
        calls = values(prom.query("gpulab_vgpu_calls_total"), "vgpu")[vid]
        assert calls >= 3  # cuInit, context, cuMemAlloc at least

        # the pool's own figures
        assert values(prom.query("gpulab_pool_workers"), "status") == {"up": 0, "lost": 1, "gone": 0}
        assert values(prom.query("gpulab_pool_workers_lost_total"), "job") == {"gpulab-pool": 1}

        # each rule's expression, evaluated by Prometheus as its rule evaluation does
        expr = {name: r["expr"] for name, r in rules().items()}
        full = prom.wait(expr["GPULabGPUMemoryNearlyFull"])
        assert [(s["metric"]["instance"], round(float(s["value"][1]), 4)) for s in full] == [
            (control, round((ALLOC + OVERHEAD) / QUOTA, 4))]
        at_quota = prom.wait(expr["GPULabVGPUAtQuota"])
        assert [s["metric"]["vgpu"] for s in at_quota] == [vid]
        lost = prom.wait(expr["GPULabWorkerLost"])
        assert [float(s["value"][1]) for s in lost] == [1.0]
        assert prom.query(expr["GPULabPoolRefusalsRising"]) == []
        assert prom.query(expr["GPULabVGPURestoreFailures"]) == []  # nothing moved, nothing failed
        assert values(prom.query('gpulab_vgpu_tier_moves_total{kind="failure"}'), "vgpu") == {vid: 0}
        # VRAM tiers: the client's bytes are on the GPU (the tier board counts them there too)
        assert values(prom.query('gpulab_vgpu_tier_bytes{tier="hot"}'), "vgpu") == {vid: ALLOC}
        assert values(prom.query("gpulab_worker_gpu_hot_bytes"), "job") == {"gpulab-worker": ALLOC}
        assert values(prom.query("gpulab_worker_warm_bytes"), "job") == {"gpulab-worker": 0}
        assert prom.query(expr["GPULabWorkerDown"]) == []

        # refusals after Prometheus has seen the counter at 0: the rule sees them rise
        prom.wait("gpulab_pool_refusals_total")
        time.sleep(1.5)  # one more scrape at 0
        reasons = set()
        for _ in range(4):
            status, refusal = pool.call("POST", "api/allocations", {"user": "zoe", "vram": "1G"})
            assert status == 503, refusal
            reasons.add(refusal["constraint"])
        assert reasons == {"lost"}  # the pool's only worker is lost
        rising = prom.wait(expr["GPULabPoolRefusalsRising"])
        assert [s["metric"]["reason"] for s in rising] == ["lost"]

        # a vGPU held to its 10% share: the throttled rule's query finds it, over a window of seconds (the
        # rule's 10 minutes would count the seconds this test has against ten minutes)
        assert prom.query(expr["GPULabVGPUThrottled"]) == []
        spinner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SPIN)],
                                   env=worker.env(token="throttled-token"), stdout=subprocess.PIPE, text=True,
                                   cwd=ROOT)
        try:
            assert json.loads(spinner.stdout.readline() or "{}").get("ready"), worker.log_text()
            assert "[10m]" in expr["GPULabVGPUThrottled"]
            throttled = prom.wait(expr["GPULabVGPUThrottled"].replace("[10m]", "[5s]"))
            assert len(throttled) == 1 and throttled[0]["metric"]["vgpu"] != vid
            slow = throttled[0]["metric"]["vgpu"]
            assert 0.5 < float(throttled[0]["value"][1]) <= 1.0
            assert values(prom.query("gpulab_vgpu_compute_share_ratio"), "vgpu") == {vid: 1.0, slow: 0.1}
            assert values(prom.query("gpulab_vgpu_pacing_queue_depth"), "vgpu")[vid] == 0
            measured = values(prom.wait("gpulab_vgpu_compute_measured_ratio > 0"), "vgpu")
            assert set(measured) == {slow} and measured[slow] < 0.2, measured
            assert values(prom.query("gpulab_vgpu_kernel_seconds_total"), "vgpu")[slow] > 0
        finally:
            spinner.kill()
            spinner.wait()

        # Prometheus loaded every rule and evaluates it without error; the quota alert is pending (for: 10m)
        loaded = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
        assert set(loaded) == set(expr)
        assert all(r["health"] == "ok" for r in loaded.values()), {n: r.get("lastError") for n, r in loaded.items()}
        alerts = prom.wait("ALERTS", lambda r: {"GPULabVGPUAtQuota", "GPULabGPUMemoryNearlyFull"}
                           <= {s["metric"]["alertname"] for s in r})
        assert {s["metric"]["alertstate"] for s in alerts if s["metric"]["alertname"] == "GPULabVGPUAtQuota"} == {
            "pending"}

        # the worker stops: Prometheus's own `up` turns the worker-down rule on
        worker.stop()
        down = prom.wait(expr["GPULabWorkerDown"])
        assert [s["metric"]["instance"] for s in down] == [control]
    finally:
        prom.stop()
