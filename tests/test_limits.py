"""Limits are parsed once where they enter: the validators' sentences, a worker that refuses a bad
limit at start-up, and tokens-file entries checked per session through a real worker and client."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from gpu_worker.client import LimitError, gpu_settings, parse_count, parse_share, parse_size, token_limits
from workertools import PRELUDE, ROOT

G, M = 1 << 30, 1 << 20
HINT = "use a number with a unit, e.g. 8G or 512M"


@pytest.mark.parametrize("value, size", [
    ("8G", 8 * G), ("512M", 512 * M), ("512MiB", 512 * M), ("1.5g", 3 * G // 2), (" 4 GB ", 4 * G),
    ("100B", 100), ("2K", 2048), ("1T", 1 << 40), (1024, 1024), (2.0 ** 30, G), ("1024T", 1 << 50)])
def test_sizes_people_write(value, size):
    assert parse_size(value, "vram") == size


@pytest.mark.parametrize("value, sentence", [
    ("8X", f"vram: '8X' is not a size: {HINT}"),
    ("8", f"vram: '8' has no unit: {HINT} (a bare number of bytes is written as an integer or with B, e.g. 8B)"),
    ("-1G", f"vram: '-1G' is not a size above zero: {HINT}"),
    (-5, f"vram: -5 is not a size above zero: {HINT}"),
    (0, f"vram: 0 is not a size above zero: {HINT}"),
    ("inf", f"vram: 'inf' is not a size: {HINT}"),
    (float("inf"), f"vram: inf is not a size: {HINT}"),   # what JSON's 1e400 becomes
    (float("nan"), f"vram: nan is not a size: {HINT}"),
    (1.5, f"vram: 1.5 is not a size: {HINT}"),
    (True, f"vram: True is not a size: {HINT}"),
    ([1], f"vram: [1] is not a size: {HINT}"),
    ({"a": 1}, f"vram: {{'a': 1}} is not a size: {HINT}"),
    ("1e3G", f"vram: '1e3G' is not a size: {HINT}"),
    ("2000T", "vram: '2000T' is larger than 1 PiB (1024T), the largest size gpulab accepts"),
    (10 ** 20, "vram: 100000000000000000000 is larger than 1 PiB (1024T), the largest size gpulab accepts"),
])
def test_bad_sizes_are_one_sentence_naming_the_setting(value, sentence):
    with pytest.raises(LimitError) as err:
        parse_size(value, "vram")
    assert str(err.value) == sentence


def test_a_long_value_is_cut_short_in_the_sentence():
    with pytest.raises(LimitError) as err:
        parse_size("x" * 10_000, "vram")
    assert len(str(err.value)) < 200


def test_shares_and_counts():
    assert parse_share(25) == parse_share("25") == parse_share("25%") == 25
    assert parse_count(2) == parse_count("2") == 2
    for bad in (0, 101, -1, "abc", 2.5, True, None, [25], float("inf")):
        with pytest.raises(LimitError, match=r"^compute: .* is not a compute share: use a whole percent of one "
                                             r"GPU from 1 to 100, e\.g\. 25$"):
            parse_share(bad)
    for bad in (0, 17, -1, "abc", 1.5, False, None, {"n": 1}):
        with pytest.raises(LimitError, match=r"^count: .* is not a GPU count: use a whole number from 1 to 16$"):
            parse_count(bad)


def test_gpu_settings_fill_defaults_and_name_the_key():
    assert gpu_settings({"vram": "2G", "compute": "25"}) == {"vram": 2 * G, "compute": 25, "count": 1,
                                                             "mode": "any", "qos": "medium", "burst": True}
    assert gpu_settings({"compute": 50}, partial=True) == {"compute": 50}
    with pytest.raises(LimitError, match=r"^requests\[3\]\.count: 'abc' is not a GPU count"):
        gpu_settings({"vram": "1G", "count": "abc"}, "requests[3]")
    with pytest.raises(LimitError, match=r"^gpu\.mode: 'nearby' is not one of local, remote, any$"):
        gpu_settings({"vram": "1G", "mode": "nearby"}, "gpu")
    with pytest.raises(LimitError, match=r"^gpu: no GPU memory size \(vram\)"):
        gpu_settings({"compute": 5})
    with pytest.raises(LimitError, match=r"^no GPU memory size \(vram\)"):
        gpu_settings({"compute": 5}, "")


def test_token_limits():
    assert token_limits(None, "t") == {} and token_limits({}, "t") == {}
    assert token_limits({"vram": "1G", "user": "ann"}, "t") == {"vram": G, "user": "ann"}
    with pytest.raises(LimitError, match=r"^t\.vram: 0 is not a size above zero"):
        token_limits({"vram": 0}, "t")
    with pytest.raises(LimitError, match=r"^t: '1G' is not a mapping of limits"):
        token_limits("1G", "t")


# ------------------------------------------------------------------ the worker's command line
@pytest.mark.parametrize("args, sentence", [
    (["--vram-quota", "8X"], f"gpulab worker: c.GPUWorker.vram_quota: '8X' is not a size: {HINT}"),
    (["--vram-quota=-1G"], f"gpulab worker: c.GPUWorker.vram_quota: '-1G' is not a size above zero: {HINT}"),
    (["--vram-quota", "8"], "gpulab worker: c.GPUWorker.vram_quota: '8' has no unit"),
    (["--emulated-memory", "lots"], f"gpulab worker: c.GPUWorker.emulated_memory: 'lots' is not a size: {HINT}"),
])
def test_worker_refuses_a_bad_limit_at_start_up(tmp_path, args, sentence):
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "gpu_worker.daemon", "--backend", "emulated",
                        "--unix-socket", str(tmp_path / "w.sock"), "--token", "t", *args],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode != 0 and time.monotonic() - start < 15
    assert sentence in p.stderr and "Traceback" not in p.stderr
    assert "listening" not in p.stdout


def test_worker_refuses_a_bad_token_limit_in_its_config(tmp_path):
    config = tmp_path / "worker_config.py"
    config.write_text('c.GPUWorker.tokens = {"s3cret": {"vram": -1}}\n')
    p = subprocess.run([sys.executable, "-m", "gpu_worker.daemon", "--backend", "emulated",
                        "--unix-socket", str(tmp_path / "w.sock"), "--config", str(config)],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode != 0 and "vram: -1 is not a size above zero" in p.stderr
    assert "s3cret" not in p.stderr  # a token is a secret: the sentence names its hash


# ------------------------------------------------------------------ tokens file, real worker and client
ALLOC = PRELUDE + """
err = d.cuInit(0)[0]
if err != d.CUresult.CUDA_SUCCESS:
    done(init=err.name)
    raise SystemExit(0)
setup()
fits = name(d.cuMemAlloc(900 << 20))
over = name(d.cuMemAlloc(200 << 20))
free, total = ok(d.cuMemGetInfo())
done(init="CUDA_SUCCESS", fits=fits, over=over, total=int(total))
"""


@pytest.fixture
def file_worker(make_worker, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text("{}")
    w = make_worker(token=None, extra=("--tokens-file", str(tokens)))
    w.tokens_path = tokens
    return w


def test_tokens_file_size_string_is_a_quota(file_worker):
    file_worker.tokens_path.write_text(json.dumps({"one-gig": {"vram": "1G"}}))
    r = file_worker.run(ALLOC, token="one-gig")
    assert r.result == {"init": "CUDA_SUCCESS", "fits": "CUDA_SUCCESS", "over": "CUDA_ERROR_OUT_OF_MEMORY",
                        "total": G}


@pytest.mark.parametrize("entry, why", [
    ({"vram": 0}, "vram: 0 is not a size above zero"),
    ({"vram": -1}, "vram: -1 is not a size above zero"),
    ({"vram": "8X"}, "vram: '8X' is not a size"),
    ("1G", "'1G' is not a mapping of limits"),
    ([1, 2], "[1, 2] is not a mapping of limits"),
])
def test_a_bad_tokens_file_entry_refuses_that_token_with_a_reason(file_worker, entry, why):
    file_worker.tokens_path.write_text(json.dumps({"bad": entry, "good": {"vram": "1G"}}))
    r = file_worker.run(ALLOC, token="bad")
    assert r.result == {"init": "CUDA_ERROR_NOT_PERMITTED"}
    assert "this worker's limits for the session token are not valid" in r.stderr and why in r.stderr
    assert "tell your hub admin" in r.stderr
    log = file_worker.log_text()
    assert why in log and "Traceback" not in log
    # the other entries still work, and the worker is still up
    assert file_worker.run(ALLOC, token="good").result["fits"] == "CUDA_SUCCESS"


@pytest.mark.parametrize("setting, sentence", [
    ("--vram-oversubscription=0.5", "c.GPUPool.vram_oversubscription: 0.5 is not a number from 1 to 100"),
    ("--GPUPool.compute_oversubscription=nan", "c.GPUPool.compute_oversubscription: nan is not a number from 1 to 100"),
    ("--GPUPool.heartbeat_timeout=inf", "c.GPUPool.heartbeat_timeout: inf is not a number from 0.1 to 3600"),
])
def test_pool_refuses_a_bad_ratio_or_timeout_at_start(setting, sentence):
    p = subprocess.run([sys.executable, "-m", "hub_spawner.pool", setting, "--bind-url", "http://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert sentence in p.stderr and "Traceback" not in p.stderr
