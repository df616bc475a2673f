"""The pool service as a real process with a real SQLite file: registration, heartbeats,
restart persistence, concurrent allocations, bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpu_worker.client import shim_env, token_hash
from hubtools import G, HUB_TOKEN, WORKER_TOKEN, Pool
from workertools import PRELUDE


def test_allocate_issue_token_and_release(pool):
    pool.register()
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G", "compute": 25})
    assert status == 201 and alloc["address"] == "tcp://10.0.0.1:7001" and alloc["token"]
    # the worker asks for the grant of a token a session presents, by its hash
    status, grant = pool.worker_call("POST", "api/workers/w1/grants", {"token_hash": token_hash(alloc["token"])})
    assert status == 200 and grant["vram"] == 4 * G and grant["id"] == str(alloc["id"])
    assert pool.worker_call("POST", "api/workers/w1/grants", {"token_hash": token_hash("forged")})[0] == 404
    assert pool.call("DELETE", f"api/allocations/{alloc['id']}")[0] == 204
    assert pool.call("DELETE", f"api/allocations/{alloc['id']}")[0] == 204  # idempotent
    assert pool.worker_call("POST", "api/workers/w1/grants", {"token_hash": token_hash(alloc["token"])})[0] == 404
    _, usage = pool.call("GET", "api/usage")
    [ann] = usage["users"]
    assert ann["user"] == "ann" and ann["active"] == 0 and ann["gpu_hours"] > 0 and ann["gpu_hours_weighted"] == 0


def test_bad_input_and_wrong_tokens(pool):
    pool.register()
    assert pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G"}, token="wrong")[0] == 403
    assert pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G"}, token=WORKER_TOKEN)[0] == 403
    assert pool.worker_call("POST", "api/workers", {"name": "x"}, HUB_TOKEN)[0] == 403
    assert pool.worker_call("POST", "api/workers", {"name": "x"}, WORKER_TOKEN)[0] == 400
    status, body = pool.call("POST", "api/allocations", {"user": "ann", "vram": "lots"})
    assert status == 400 and "invalid GPU request" in body["message"]
    status, body = pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G", "compute": 300})
    assert status == 400 and "compute share" in body["message"]
    assert pool.call("POST", "api/allocations", {"vram": "4G"})[0] == 400
    assert pool.call("DELETE", "api/allocations/999")[0] == 404
    status, body = pool.call("POST", "api/allocations", {"user": "ann", "vram": "64G"})
    assert status == 503 and "largest GPU here offers 16 GiB" in body["message"] and body["constraint"] == "size"
    assert pool.call("GET", "api/allocations")[1] == []  # nothing was booked by the failures


def test_availability_counts_slots(pool):
    pool.register(gpus=2)
    _, avail = pool.call("POST", "api/availability", {"requests": [{"vram": "4G", "compute": 25},
                                                                    {"vram": "16G"}, {"vram": "32G"}]})
    assert [a["slots"] for a in avail] == [8, 2, 0]
    assert not avail[2]["fits"] and "largest GPU" in avail[2]["reason"]


def test_heartbeat_loss_marks_worker_and_sessions_lost(tmp_path):
    p = Pool(str(tmp_path / "pool.sqlite"), timeout=1.0)
    try:
        p.register()
        _, alloc = p.call("POST", "api/allocations", {"user": "ann", "vram": "4G"})
        time.sleep(2.5)
        _, gpus = p.call("GET", "api/gpus")
        assert gpus[0]["worker_status"] == "lost"
        _, a = p.call("GET", f"api/allocations/{alloc['id']}")
        assert a["status"] == "lost" and "stopped responding" in a["message"]
        status, body = p.call("POST", "api/allocations", {"user": "bob", "vram": "1G"})
        assert status == 503 and body["constraint"] == "lost" and "no other GPU worker is up" in body["message"]
        # the worker comes back: it can be used again
        assert p.worker_call("POST", "api/workers/w1/heartbeat", {})[0] == 200
        assert p.call("POST", "api/allocations", {"user": "bob", "vram": "1G"})[0] == 201
        assert p.worker_call("POST", "api/workers/nobody/heartbeat", {})[0] == 403  # not its own name
    finally:
        p.stop()


def test_allocations_survive_a_restart(tmp_path):
    db = str(tmp_path / "pool.sqlite")
    p = Pool(db)
    p.register()
    _, alloc = p.call("POST", "api/allocations", {"user": "ann", "vram": "12G"})
    p.stop()
    credentials, p = p.credentials, Pool(db)
    p.credentials = credentials  # the worker keeps its credential across the pool's restart
    try:
        _, a = p.call("GET", f"api/allocations/{alloc['id']}")
        assert a["status"] == "active" and a["user"] == "ann"
        status, body = p.call("POST", "api/allocations", {"user": "bob", "vram": "8G"})
        assert status == 503  # the 12 GiB are still promised
        assert p.worker_call("POST", "api/workers/w1/grants", {"token_hash": token_hash(alloc["token"])})[0] == 200
    finally:
        p.stop()


def test_concurrent_allocations_never_double_book(tmp_path):
    """Two pool processes on one SQLite file, 40 requests at once: exactly the capacity is booked."""
    db = str(tmp_path / "pool.sqlite")
    a, b = Pool(db), Pool(db)
    try:
        a.register(gpus=2)  # 2 x 16 GiB: room for 16 vGPUs of 2 GiB
        with ThreadPoolExecutor(40) as ex:
            results = list(ex.map(lambda i: (a if i % 2 else b).call(
                "POST", "api/allocations", {"user": f"u{i}", "vram": "2G", "compute": 10}), range(40)))
        codes = sorted(s for s, _ in results)
        assert codes.count(201) == 16 and codes.count(503) == 24
        _, gpus = a.call("GET", "api/gpus")
        assert [g["used_vram"] for g in gpus] == [16 * G, 16 * G]
        tokens = {r["token"] for s, r in results if s == 201}
        assert len(tokens) == 16
    finally:
        a.stop()
        b.stop()


def test_worker_reports_session_vram_use(pool, tmp_path):
    """A real worker registers, serves a session with a pool-issued token and reports its use."""
    env = dict(os.environ, GPULAB_POOL_TOKEN=WORKER_TOKEN, XDG_STATE_HOME=str(tmp_path))  # its credential
    worker = subprocess.Popen([sys.executable, "-m", "gpu_worker.daemon", "--backend", "emulated",
                               "--tcp", "127.0.0.1:0", "--pool-url", pool.worker_url, "--name", "real",
                               "--heartbeat-interval", "0.3"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    client = None
    try:
        address = worker.stdout.readline().split("listening on ")[1].split()[0]
        deadline = time.time() + 20
        while not [g for g in pool.call("GET", "api/gpus")[1] if g["worker"] == "real"]:
            assert time.time() < deadline
            time.sleep(0.1)
        status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "1G"})
        assert status == 201 and alloc["worker"] == "real" and alloc["address"] == address
        client = subprocess.Popen([sys.executable, "-c", PRELUDE + """
setup()
p = ok(d.cuMemAlloc(3 << 20))
total = ok(d.cuMemGetInfo())[1]
print(total, flush=True)
sys.stdin.readline()
"""], env=shim_env(address, alloc["token"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert int(client.stdout.readline()) == 1 << 30  # the pool's quota reached the worker
        deadline = time.time() + 20
        while pool.call("GET", f"api/allocations/{alloc['id']}")[1]["used_vram"] != 3 << 20:
            assert time.time() < deadline, "the heartbeat never reported the session's VRAM"
            time.sleep(0.1)
    finally:
        if client:
            client.kill()
        os.killpg(worker.pid, signal.SIGKILL)


# --------------------------------------------------------------- bad allocation and availability bodies
def raw_call(pool, method, path, raw: bytes):
    """A body no JSON encoder writes (1e400, a huge integer): sent as bytes."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(pool.url + path, data=raw, method=method,
                                 headers={"Authorization": f"token {HUB_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


SIZE_HINT = "use a number with a unit, e.g. 8G or 512M"


@pytest.mark.parametrize("spec, sentence", [
    ({"vram": "inf"}, f"invalid GPU request: vram: 'inf' is not a size: {SIZE_HINT}"),
    ({"vram": "8"}, "invalid GPU request: vram: '8' has no unit"),
    ({"vram": "-1G"}, f"invalid GPU request: vram: '-1G' is not a size above zero: {SIZE_HINT}"),
    ({"vram": [1]}, f"invalid GPU request: vram: [1] is not a size: {SIZE_HINT}"),
    ({"vram": {"a": 1}}, f"invalid GPU request: vram: {{'a': 1}} is not a size: {SIZE_HINT}"),
    ({"vram": "1G", "count": "abc"}, "invalid GPU request: count: 'abc' is not a GPU count: use a whole number "
                                     "from 1 to 16"),
    ({"vram": "1G", "compute": [5]}, "invalid GPU request: compute: [5] is not a compute share"),
    ({"vram": "1G", "mode": ["local"]}, "invalid GPU request: mode: ['local'] is not one of local, remote, any"),
    ({"vram": "1G", "node": {"n": 1}}, "invalid GPU request: node must be a host name"),
    ({"compute": 5}, "invalid GPU request: no GPU memory size (vram)"),
    ({"user": ["ann"], "vram": "1G"}, "user must be a string of at most 255 characters"),
    ({"server_name": {}, "vram": "1G"}, "server_name must be a string of at most 255 characters"),
])
def test_bad_allocation_bodies_are_400_with_a_sentence(pool, spec, sentence):
    pool.register()
    status, body = pool.call("POST", "api/allocations", {"user": "ann", **spec})
    assert status == 400 and body["message"].startswith(sentence), body
    status, body = pool.call("POST", "api/availability", {"requests": [{"vram": "1G"}, spec]})
    if "user" in spec or "server_name" in spec:
        return  # not GPU settings: availability ignores them
    where = "requests[1]: " if sentence.endswith("(vram)") else "requests[1]."
    assert status == 400 and body["message"].startswith(sentence.replace("request: ", "request: " + where)), body


def test_numbers_json_cannot_hold_are_400_and_ids_out_of_range_404(pool):
    pool.register()
    for raw in (b'{"user": "ann", "vram": 1e400}', b'{"user": "ann", "vram": ' + b"9" * 400 + b"}",
                b'{"user": "ann", "vram": "1G", "compute": 1e400}', b'{"user": "ann", "vram": NaN}'):
        status, body = raw_call(pool, "POST", "api/allocations", raw)
        assert status == 400 and body["message"].startswith("invalid GPU request: "), (raw[:60], body)
    status, body = raw_call(pool, "POST", "api/availability", b'{"requests": [{"vram": 1e400}]}')
    assert status == 400 and body["message"] == f"invalid GPU request: requests[0].vram: inf is not a size: {SIZE_HINT}"
    for method in ("GET", "DELETE"):
        for alloc_id in (10 ** 20, 2 ** 63, 2 ** 63 - 1):
            status, body = pool.call(method, f"api/allocations/{alloc_id}")
            assert status == 404 and body["message"].startswith("no allocation "), (method, alloc_id, body)
    for bad in ({"requests": "all"}, {"requests": ["1G"]}, {"requests": [None]}):
        status, body = pool.call("POST", "api/availability", bad)
        assert status == 400 and body["message"], body
    assert pool.call("GET", "api/allocations")[1] == []


def test_availability_caps_the_number_of_requests(pool):
    pool.register(gpus=2)
    start = time.monotonic()
    status, body = pool.call("POST", "api/availability", {"requests": [{"vram": "1G"}] * 3000})
    assert status == 400 and body["message"] == ("at most 100 requests per availability call, not 3000: "
                                                 "split the list")
    assert time.monotonic() - start < 2
    status, avail = pool.call("POST", "api/availability", {"requests": [{"vram": "1G", "compute": 1}] * 100})
    assert status == 200 and len(avail) == 100 and avail[0]["slots"] == 32
