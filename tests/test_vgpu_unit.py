"""The vGPU as the worker's unit: one ledger over every process of a token, its own GPUs only,
context overhead charged, revocation that frees memory and tells the program why, a call trace.

Real worker processes and real clients through the shim (emulated backend: the test double)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from workertools import PRELUDE, ROOT, SEE_DEVICES

MiB = 1 << 20

# A client that takes 1 MiB allocations until the vGPU refuses, fills each with its own byte, says
# how many it holds, then (on a line from the test) checks every byte and says whether all held.
HOLDER = PRELUDE + """
mark = int(sys.argv[1])
setup()
held = []
while True:
    err, p = d.cuMemAlloc(1 << 20)
    if err != d.CUresult.CUDA_SUCCESS:
        refused = err.name
        break
    ok(d.cuMemsetD8(p, mark, 1 << 20))
    held.append(p)
free, total = ok(d.cuMemGetInfo())
print(json.dumps({"held": len(held), "refused": refused, "free": free, "total": total}), flush=True)
cmd = sys.stdin.readline().strip()
if cmd == "more":  # another process left: its memory is this vGPU's again
    while d.cuMemAlloc(1 << 20)[0] == d.CUresult.CUDA_SUCCESS:
        held.append(None)
    print(json.dumps({"held": len(held)}), flush=True)
    sys.stdin.readline()
intact = True
for p in held:
    if p is None:
        continue
    back = np.zeros(1 << 20, np.uint8)
    ok(d.cuMemcpyDtoH(back, p, 1 << 20))
    intact &= bool((back == mark).all())
print(json.dumps({"intact": intact}), flush=True)
"""


def start_holder(w, mark: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(mark)], env=w.env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def said(p: subprocess.Popen) -> dict:
    return json.loads(p.stdout.readline())


def tell(p: subprocess.Popen, line: str) -> None:
    p.stdin.write(line + "\n")
    p.stdin.flush()


@pytest.mark.parametrize("processes", [2, 5])
def test_processes_of_one_token_share_one_quota_exactly(make_worker, processes):
    w = make_worker(extra=("--vram-quota", "12M"))
    clients = []
    try:
        for i in range(processes):  # one after the other: each takes what the others left
            clients.append(start_holder(w, 10 + i))
            said_now = said(clients[-1])
            clients[-1].said = said_now
            assert said_now["refused"] == "CUDA_ERROR_OUT_OF_MEMORY"
        held = [c.said["held"] for c in clients]
        assert sum(held) == 12, held  # together exactly the quota, never more
        assert held[0] == 12 and all(h == 0 for h in held[1:])
        # what cuMemGetInfo tells the last process is the vGPU's truth, not its own
        assert clients[-1].said["free"] == 0 and clients[-1].said["total"] == 12 * MiB
        (vgpu,) = w.vgpus()
        assert vgpu["used"] == 12 * MiB and len(vgpu["processes"]) == processes
        assert sorted(p["used"] for p in vgpu["processes"]) == [0] * (processes - 1) + [12 * MiB]

        # the first process leaves: its memory, and only its, returns to the vGPU
        tell(clients[0], "check")
        assert said(clients[0]) == {"intact": True}
        clients[0].wait(30)
        settled(w, processes - 1)  # its executor saw the end and gave its slot back
        tell(clients[1], "more")
        assert said(clients[1]) == {"held": 12}
        tell(clients[1], "check")
        assert said(clients[1]) == {"intact": True}
        for c in clients[2:]:
            tell(c, "check")
            assert said(c) == {"intact": True}
    finally:
        for c in clients:
            c.kill()
            c.wait()


def test_concurrent_allocations_of_several_processes_never_pass_the_quota(make_worker):
    """Five processes allocate at the same moment: the ledger's lock makes the sum exact."""
    w = make_worker(extra=("--vram-quota", "20M"))
    clients = [start_holder(w, 20 + i) for i in range(5)]
    try:
        held = [said(c)["held"] for c in clients]
        assert sum(held) == 20, held
        assert sum(v["used"] for v in w.vgpus()) == 20 * MiB
    finally:
        for c in clients:
            c.kill()
            c.wait()


def test_a_vgpu_sees_exactly_the_gpus_it_was_placed_on(make_worker, tmp_path):
    from gpu_worker.daemon.gpus import describe_gpus

    tokens = {"on-3": {"vram": "1G", "gpus": [3]}, "on-1-2": {"vram": "2G", "gpus": [1, 2]}}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    w = make_worker(token=None, extra=("--emulated-gpus", "4", "--emulated-memory", "4G", "--name", "four",
                                       "--tokens-file", str(tmp_path / "tokens.json")))
    gpus = describe_gpus("emulated", "four", 4 << 30, 4)
    one = w.run(SEE_DEVICES, token="on-3").result
    assert one["count"] == 1 and one["beyond"] == "CUDA_ERROR_INVALID_DEVICE"
    assert one["devices"][0]["uuid"] == gpus[3]["uuid"]
    assert one["devices"][0]["memory"] == 1 << 30  # its quota, not the card
    assert "emulated" in one["devices"][0]["name"]
    two = w.run(SEE_DEVICES, token="on-1-2").result
    assert two["count"] == 2
    assert [x["uuid"] for x in two["devices"]] == [gpus[1]["uuid"], gpus[2]["uuid"]]
    listed = {v["id"]: v for v in w.vgpus()}
    assert sorted(g for v in listed.values() for g in v["gpus"]) == sorted(g["uuid"] for g in gpus[1:])


def test_a_quota_larger_than_the_gpu_is_refused_at_grant(make_worker):
    with pytest.raises(RuntimeError) as exc:
        make_worker(extra=("--vram-quota", "32G", "--emulated-memory", "16G"))
    assert "larger than its GPU" in str(exc.value)


OVERHEAD_CLIENT = PRELUDE + """
setup()
free, total = ok(d.cuMemGetInfo())
p = ok(d.cuMemAlloc(4 << 20))
err = name(d.cuMemAlloc(total))
done(free=free, total=total, over=err)
"""


def settled(w, processes: int) -> dict:
    """The one vGPU of ``w`` once the daemon has reaped the clients that ended (it does so within 0.5 s)."""
    deadline = time.monotonic() + 5
    while True:
        (vgpu,) = w.vgpus()
        if len(vgpu["processes"]) == processes or time.monotonic() > deadline:
            return vgpu
        time.sleep(0.05)


def test_context_overhead_is_charged_to_the_vgpu_and_reported(make_worker):
    w = make_worker(extra=("--vram-quota", "64M", "--GPUWorker.emulated_context_overhead=8M"))
    holder = subprocess.Popen([sys.executable, "-c", PRELUDE + "setup()\nprint('up', flush=True)\nsys.stdin.readline()"],
                              env=w.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "up"
        res = w.run(OVERHEAD_CLIENT).result
        # two processes' contexts (8 MiB each) come off the 64 MiB quota
        assert res == {"free": 48 * MiB, "total": 64 * MiB, "over": "CUDA_ERROR_OUT_OF_MEMORY"}
        vgpu = settled(w, 1)
        assert vgpu["overhead"] == 8 * MiB and [p["overhead"] for p in vgpu["processes"]] == [8 * MiB]
    finally:
        holder.kill()
        holder.wait()


def test_a_new_process_without_room_for_its_context_is_refused_with_the_reason(make_worker):
    w = make_worker(extra=("--vram-quota", "16M", "--GPUWorker.emulated_context_overhead=8M"))
    first = subprocess.Popen([sys.executable, "-c", PRELUDE + "setup()\nok(d.cuMemAlloc(8 << 20))\n"
                              "print('up', flush=True)\nsys.stdin.readline()"],
                             env=w.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert first.stdout.readline().strip() == "up"
        p = w.run(PRELUDE + "done(init=name(d.cuInit(0)))", check=False)
        assert p.result == {"init": "CUDA_ERROR_OUT_OF_MEMORY"}
        assert "no room for another process's CUDA context" in p.stderr
    finally:
        first.kill()
        first.wait()


REVOKED_CLIENT = PRELUDE + """
setup()
p = ok(d.cuMemAlloc(4 << 20))
print("holding", flush=True)
sys.stdin.readline()
err = name(d.cuMemAlloc(1 << 20))
again = name(d.cuCtxSynchronize())
done(next=err, again=again)
"""


def test_revoking_a_vgpu_frees_its_memory_and_the_next_call_says_why(make_worker):
    w = make_worker(extra=("--vram-quota", "64M"))
    client = subprocess.Popen([sys.executable, "-c", REVOKED_CLIENT], env=w.env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert client.stdout.readline().strip() == "holding"
        (vgpu,) = w.vgpus()
        assert vgpu["used"] == 4 * MiB
        status, body = w.api(f"/api/vgpus/{vgpu['id']}/revoke", method="POST", body={"reason": "course ended"})
        assert status == 200, body
        t0 = time.monotonic()
        while w.vgpus()[0]["used"] and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert w.vgpus()[0]["used"] == 0, "the idle client's memory was not freed"
        tell(client, "go")
        out, err = client.communicate(timeout=30)
        assert json.loads(out.strip().splitlines()[-1]) == {"next": "CUDA_ERROR_DEVICE_UNAVAILABLE",
                                                             "again": "CUDA_ERROR_DEVICE_UNAVAILABLE"}
        assert "course ended" in err
        # a new process of the revoked vGPU is refused with the same reason
        p = w.run(PRELUDE + "done(init=name(d.cuInit(0)))", check=False)
        assert p.result == {"init": "CUDA_ERROR_DEVICE_UNAVAILABLE"} and "course ended" in p.stderr
    finally:
        client.kill()
        client.wait()


def test_the_call_trace_shows_what_the_processes_did(make_worker):
    w = make_worker(extra=("--vram-quota", "8M"))
    w.run(PRELUDE + """
setup()
p = ok(d.cuMemAlloc(1 << 20))
ok(d.cuMemcpyHtoD(p, np.zeros(1 << 20, np.uint8), 1 << 20))
err = name(d.cuMemAlloc(64 << 20))
done(err=err)
""")
    vgpu = settled(w, 0)
    deadline = time.monotonic() + 5
    while True:
        status, body = w.api(f"/api/vgpus/{vgpu['id']}/trace?since=0")
        assert status == 200
        records = body["records"] if isinstance(body, dict) else body
        names = [r["function"] for r in records]
        if "cuMemcpyHtoD" in names or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    alloc = [r for r in records if r["function"] == "cuMemAlloc"]
    assert [r["result"] for r in alloc] == [0, 2] and alloc[0]["bytes"] == 1 << 20
    assert alloc[1]["error"] == "CUDA_ERROR_OUT_OF_MEMORY"
    copy = next(r for r in records if r["function"] == "cuMemcpyHtoD")
    assert copy["bytes"] == 1 << 20 and copy["duration"] > 0
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    vgpu = w.vgpus()[0]
    assert vgpu["bytes_in"] == 1 << 20 and vgpu["errors"] == {"CUDA_ERROR_OUT_OF_MEMORY": 1}
    assert vgpu["sessions_opened"] == 1 and vgpu["processes"] == []


def test_one_vgpus_token_cannot_read_or_revoke_another(make_worker, tmp_path):
    (tmp_path / "tokens.json").write_text(json.dumps({"alice": {"vram": "8M"}, "bob": {"vram": "8M"}}))
    w = make_worker(token=None, extra=("--tokens-file", str(tmp_path / "tokens.json")))
    for t in ("alice", "bob"):
        w.run(PRELUDE + "setup()\ndone()", token=t)
    ids = {v["user"] or v["id"]: v["id"] for v in w.vgpus()}
    alice, bob = sorted(ids.values())
    mine = w.api("/api/vgpus", token="alice")[1]["vgpus"]
    assert len(mine) == 1
    other = bob if mine[0]["id"] == alice else alice
    assert w.api(f"/api/vgpus/{other}", token="alice")[0] == 404
    assert w.api(f"/api/vgpus/{other}/revoke", token="alice", method="POST", body={})[0] == 404
    assert w.api("/api/vgpus", token="nobody")[0] == 403
    assert w.api("/metrics", token="alice")[0] in (403, 404)
    assert all(v["state"] == "active" for v in w.vgpus())


def test_a_token_removed_from_the_tokens_file_ends_its_vgpu(make_worker, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"gone": {"vram": "64M"}}))
    w = make_worker(token=None, extra=("--tokens-file", str(tokens)))
    client = subprocess.Popen([sys.executable, "-c", REVOKED_CLIENT], env=w.env(token="gone"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert client.stdout.readline().strip() == "holding"
        tokens.write_text("{}")
        p = w.run(PRELUDE + "done(init=name(d.cuInit(0)))", token="gone", check=False)
        assert p.result == {"init": "CUDA_ERROR_DEVICE_UNAVAILABLE"}  # the new session is told why
        assert "removed from the worker's configuration" in p.stderr
        tell(client, "go")
        out, err = client.communicate(timeout=30)
        assert json.loads(out.strip().splitlines()[-1])["next"] == "CUDA_ERROR_DEVICE_UNAVAILABLE"
        assert "removed from the worker's configuration" in err
    finally:
        client.kill()
        client.wait()


def registry_with_lookup():
    """An in-process registry of one emulated 1 GiB GPU whose pool look-up grants any hash asked for."""
    from gpu_worker.daemon.vgpus import VGPURegistry

    reg = VGPURegistry([{"uuid": "GPU-a", "index": 0, "model": "test", "memory": 1 << 30, "capability": "9.0",
                         "emulated": True}], "emulated")
    reg.set_lookup(lambda h: {"token_hash": h, "id": "7", "gpus": ["GPU-a"], "vram": 64 * MiB, "compute": 10})
    return reg


def test_a_grant_just_looked_up_survives_a_heartbeat_reply_computed_before_it():
    reg = registry_with_lookup()
    assert reg.admit("fresh-token")["id"] == "7"
    reg.apply_grants([], {})  # this reply's request may have left before the allocation existed
    assert reg.get("7")["state"] == "active"
    reg.apply_grants([], {})  # the next one left after: the pool no longer grants it
    assert reg.get("7")["state"] == "revoked"
    assert "no longer granted" in reg.get("7")["reason"]


def test_a_grant_just_looked_up_still_ends_when_the_reply_names_it_revoked():
    from gpu_worker.client.tokens import token_hash

    reg = registry_with_lookup()
    reg.admit("fresh-token")
    reg.apply_grants([], {token_hash("fresh-token"): "this vGPU was released: its Jupyter server stopped"})
    assert (reg.get("7")["state"], reg.get("7")["reason"]) == ("revoked", "this vGPU was released: its Jupyter "
                                                                           "server stopped")


def test_an_id_seen_twice_means_the_active_vgpu_and_malformed_grants_are_skipped():
    reg = registry_with_lookup()
    reg.admit("old-token")
    reg.revoke("7", "ended")
    reg.admit("new-token")  # e.g. a new pool database numbers allocations from 1 again
    assert reg.get("7")["state"] == "active"
    reg.apply_grants(["not a grant", {"id": 1}], {})  # logged and skipped, the rest goes on
    assert reg.get("7")["state"] == "active"


def test_a_session_looking_up_its_vgpu_gets_the_overhead_measured():
    """A session's GET /api/vgpus answers with find_token's description: it must measure the context
    overhead as vgpus() does (_measure itself keeps to one measurement per MEASURE_EVERY)."""
    reg = registry_with_lookup()
    reg.admit("fresh-token")
    measured = []
    reg._measure = lambda: measured.append(1)
    assert reg.find_token("fresh-token")["id"] == "7"
    assert measured == [1]
