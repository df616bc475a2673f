"""The pool's Prometheus metrics, scraped from a real pool process: exact figures after placing,
releasing and refusing, lost workers counted once each, and no figures without the pool's token."""
from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from hubtools import G, HUB_TOKEN, Pool
from hub_spawner.pool import metrics as pool_metrics


def scrape(pool, auth=f"Bearer {HUB_TOKEN}") -> dict:
    """{(sample name, sorted labels): value} of the pool's /metrics."""
    req = urllib.request.Request(pool.url + "metrics", headers={"Authorization": auth})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def status_of(pool, auth) -> int:
    req = urllib.request.Request(pool.url + "metrics", headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_need_the_pools_token(pool):
    assert status_of(pool, "") == 403
    assert status_of(pool, "Bearer wrong") == 403
    assert status_of(pool, "token worker-secret-for-tests") == 403  # the workers' enrolment secret is not it
    assert status_of(pool, f"token {HUB_TOKEN}") == 200
    assert status_of(pool, f"Bearer {HUB_TOKEN}") == 200


def test_gpus_capacity_allocations_and_refusals_exact(pool):
    pool.register("w1", gpus=2, memory=16 * G)
    pool.register("w2", gpus=1, memory=8 * G)
    m = scrape(pool)
    assert m[("gpulab_pool_gpus", (("emulated", "false"), ("worker", "w1")))] == 2
    assert m[("gpulab_pool_gpus", (("emulated", "false"), ("worker", "w2")))] == 1
    assert m[("gpulab_pool_workers", (("status", "up"),))] == 2
    assert m[("gpulab_pool_workers", (("status", "lost"),))] == 0
    assert all(m[("gpulab_pool_allocations", (("state", s),))] == 0 for s in pool_metrics.STATES)
    assert all(m[("gpulab_pool_refusals_total", (("reason", r),))] == 0 for r in pool_metrics.REASONS)

    status, a = pool.call("POST", "api/allocations", {"user": "ann", "vram": "12G", "compute": 25})
    assert status == 201
    status, b = pool.call("POST", "api/allocations", {"user": "bob", "vram": "3G", "compute": 25})
    assert status == 201
    m = scrape(pool)
    assert m[("gpulab_pool_allocations", (("state", "active"),))] == 2
    left = {dict(k[1])["gpu"]: v for k, v in m.items() if k[0] == "gpulab_pool_gpu_capacity_left_bytes"}
    promised = {u: 0 for u in left}
    for alloc, size in ((a, 12 * G), (b, 3 * G)):
        promised[alloc["gpus"][0]] += size
    memory = {"GPU-w1-0": 16 * G, "GPU-w1-1": 16 * G, "GPU-w2-0": 8 * G}
    assert left == {u: memory[u] - promised[u] for u in memory}

    assert pool.call("POST", "api/allocations", {"user": "cat", "vram": "20G"})[0] == 503  # size
    assert pool.call("POST", "api/allocations", {"user": "cat", "vram": "15G"})[0] == 201  # the one GPU left
    status, refusal = pool.call("POST", "api/allocations", {"user": "dan", "vram": "15G"})
    assert status == 503 and refusal["constraint"] == "memory"
    assert pool.call("POST", "api/allocations", {"user": "dan", "vram": "1G", "count": 3})[0] == 503  # count
    assert pool.call("DELETE", f"api/allocations/{a['id']}")[0] == 204
    m = scrape(pool)
    refusals = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "gpulab_pool_refusals_total"}
    assert refusals == {**dict.fromkeys(pool_metrics.REASONS, 0), "size": 1, "memory": 1, "count": 1}
    assert m[("gpulab_pool_allocations", (("state", "active"),))] == 2
    assert m[("gpulab_pool_allocations", (("state", "released"),))] == 1


def test_lost_workers_counted_once_each(tmp_path):
    p = Pool(str(tmp_path / "pool.sqlite"), timeout=0.5)
    try:
        p.register("w1")
        p.wait_lost()
        m = scrape(p)
        assert m[("gpulab_pool_workers_lost_total", ())] == 1
        assert m[("gpulab_pool_workers", (("status", "lost"),))] == 1
        assert m[("gpulab_pool_gpu_capacity_left_bytes", (("gpu", "GPU-w1-0"), ("worker", "w1")))] == 0
        p.register("w1")  # back, then silent again: a second loss
        deadline = time.time() + 10
        while scrape(p)[("gpulab_pool_workers_lost_total", ())] < 2:
            assert time.time() < deadline, "the second loss was not counted"
            time.sleep(0.1)
        assert scrape(p)[("gpulab_pool_workers_lost_total", ())] == 2
    finally:
        p.stop()


def test_reasons_are_the_schedulers_constraints():
    source = (Path(pool_metrics.__file__).parent / "scheduler.py").read_text()
    assert set(re.findall(r'NoFit\("([a-z-]+)"', source)) == set(pool_metrics.REASONS)
