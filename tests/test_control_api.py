"""The worker's control API, its /metrics and `gpulab vgpu`, over a registry whose figures the test sets.

The server is the real ControlServer on a real port; the registry is a small stand-in with the
VGPURegistry's methods (gpu_worker/daemon/vgpus.py), so each answer can be checked to the byte.
Who sees what: the admin token everything, a vGPU's session token its own vGPU only (another's
id answers 404 like an unknown one), no or a wrong credential 403.  test_prometheus.py scrapes a
real worker."""
from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from gpu_worker.daemon import control
from gpu_worker.daemon.control import ControlServer, publish, published
from workertools import ROOT, metric_samples

ADMIN = "admin-s3cret"
GPU_A, GPU_B = "GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000"


def vgpu(vid, user, token, gpus, quota, used, overhead=0, **kw):
    return {"id": vid, "token_hash": f"hash-of-{token}", "user": user, "profile": "quarter", "qos": "medium",
            "gpus": gpus, "quota": quota, "compute": 25, "state": "active", "reason": "",
            "used": used, "overhead": overhead,
            "processes": [{"pid": 4000 + i, "client_pid": 3000 + i, "used": used // 2, "overhead": overhead // 2,
                           "calls": 10, "launches": 2, "bytes_in": 0, "bytes_out": 0, "started": 1.7e9,
                           "kernel_time": 6.0, "throttled_time": 1.25, "waiting": i == 0}
                          for i in range(kw.pop("nprocs", 2))],
            "calls": 20, "launches": 4, "bytes_in": 1 << 20, "bytes_out": 4096,
            "errors": {}, "sessions_opened": 2, "share": 25, "burst": True, "kernel_time": 12.5,
            "throttled_time": 2.5, "share_measured": 31.5, "queue_depth": 1,
            "tier": "mixed", "tiers": {"hot": used // 2, "warm": used // 4, "cold": used // 4},
            "moves": {"offloads": 3, "restores": 2, "failures": 1, "bytes_offloaded": 3 * used // 4,
                      "bytes_restored": used // 2, "offload_seconds": 0.75, "restore_seconds": 0.5},
            "idle_seconds": 42.0, **kw}


class FakeRegistry:
    """The VGPURegistry's methods over fixed vGPUs; `record()` adds a trace record as an executor would."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = {"tok-alice": "17", "tok-bob": "18"}
        self.table = {
            "17": vgpu("17", "alice", "tok-alice", [GPU_A], 1 << 30, 300 << 20, 200 << 20,
                       errors={"CUDA_ERROR_OUT_OF_MEMORY": 3}),
            "18": vgpu("18", "bob", "tok-bob", [GPU_B], None, 5 << 20, nprocs=1, compute=100, share=100,
                       burst=False, kernel_time=0.0, throttled_time=0.0, share_measured=0.0, queue_depth=0),
        }
        self.records: dict[str, list[dict]] = {"17": [], "18": []}
        self.revoked: list[tuple[str, str]] = []
        self.tier_asks: list[tuple[str, int]] = []  # (vGPU id, tier) asked of its processes
        self.acted = True  # whether its processes have acted on the last request
        self.failures: dict[int, int] = {}  # executor pid -> CUresult of a move that failed
        self.moves_memory = True  # processes that act move the memory (else it stays where it was)
        self.hints: list[tuple[str, float, float]] = []

    def record(self, vid, function="cuMemAlloc", nbytes=0, error=""):
        with self.lock:
            seq = len(self.records[vid]) + 1
            self.records[vid].append({"seq": seq, "time": time.time(), "pid": 3000, "function": function,
                                      "duration": 2e-5, "bytes": nbytes, "result": 2 if error else 0, "error": error})

    def vgpus(self):
        return [dict(v) for v in self.table.values()]

    def get(self, vgpu_id):
        v = self.table.get(str(vgpu_id))
        return dict(v) if v else None

    def find_token(self, token):
        return self.get(self.tokens[token]) if token in self.tokens else None

    def trace(self, vgpu_id, since=0, limit=256, last=0):
        with self.lock:
            out = [r for r in self.records.get(vgpu_id, []) if r["seq"] > since]
            out = out[-last:] if last else out[:limit]
        return out, (out[-1]["seq"] if out else since)

    def revoke(self, vgpu_id, reason):
        v = self.table.get(vgpu_id)
        if v is None or v["state"] != "active":
            return False
        v["state"], v["reason"] = "revoked", reason
        self.revoked.append((vgpu_id, reason))
        return True

    def request_tier(self, vgpu_id, want):
        v = self.table.get(vgpu_id)
        if v is None or v["state"] != "active":
            return None
        self.tier_asks.append((vgpu_id, want))
        if self.acted and self.moves_memory and not self.failures:
            total = sum(v["tiers"].values())
            name = ("hot", "warm", "cold")[want]
            v["tiers"] = {t: total if t == name else 0 for t in ("hot", "warm", "cold")}
            v["tier"] = name
        return len(self.tier_asks), [p["pid"] for p in v["processes"]]

    def tier_done(self, vgpu_id, seq):
        return None if vgpu_id not in self.table else self.acted

    def tier_failures(self, vgpu_id, seq):
        return dict(self.failures)

    def native_why_not(self, pid):
        return ""  # no native processes here: tests/test_native_mode.py shows the reasons

    def set_idle_hint(self, vgpu_id, since, now=None):
        v = self.table.get(vgpu_id)
        if v is None or v["state"] != "active":
            return False
        self.hints.append((vgpu_id, since, now))
        return True

    def tier_figures(self):
        return {"warm": 80 << 20, "warm_budget": 8 << 30, "hot": {GPU_A: 150 << 20, GPU_B: 0}}

    def gpus(self):
        return [{"uuid": GPU_A, "index": 0, "model": "Emulated GPU", "memory": 4 << 30, "capability": "9.0",
                 "emulated": True},
                {"uuid": GPU_B, "index": 1, "model": "Emulated GPU", "memory": 2 << 30, "capability": "9.0",
                 "emulated": True}]

    def gpu_facts(self):
        return {GPU_A: {"memory_total": 4 << 30, "memory_used": 500 << 20, "utilization": 0.25, "temperature": None,
                        "power": None, "sm_clock": None, "emulated": True},
                GPU_B: {"memory_total": 2 << 30, "memory_used": 5 << 20, "utilization": None, "temperature": 41.0,
                        "power": 70.5, "sm_clock": 1.98e9, "emulated": True}}


@pytest.fixture
def registry():
    return FakeRegistry()


@pytest.fixture
def server(registry):
    s = ControlServer(registry, ADMIN, "127.0.0.1:0")
    s.start()
    yield s
    s.stop()


def call(server, method, path, token=None, body=None, raw=None, scheme="token"):
    """(status, parsed JSON or text) of one request."""
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, ctype, text = r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        status, ctype, text = e.code, e.headers["Content-Type"], e.read().decode()
    return status, json.loads(text) if ctype == "application/json" else text


ROUTES = [("GET", "/api/vgpus"), ("GET", "/api/vgpus/17"), ("GET", "/api/vgpus/17/trace"),
          ("POST", "/api/vgpus/17/revoke"), ("POST", "/api/vgpus/17/offload"), ("POST", "/api/vgpus/17/restore"),
          ("POST", "/api/vgpus/17/idle"), ("GET", "/api/gpus"), ("GET", "/metrics")]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("token", [None, "", "wrong", ADMIN + "x", ADMIN[:-1]])
def test_every_route_refuses_a_missing_or_wrong_credential(server, registry, method, path, token):
    status, answer = call(server, method, path, token, body={} if method == "POST" else None)
    assert status == 403
    assert "admin token" in answer["message"] and "session token" in answer["message"]
    assert registry.revoked == [] and registry.tier_asks == [] and registry.hints == []


def test_the_credential_must_name_its_scheme(server):
    assert call(server, "GET", "/api/vgpus", ADMIN, scheme="Basic")[0] == 403
    assert call(server, "GET", "/api/vgpus", ADMIN, scheme="Bearer")[0] == 200  # what Prometheus sends


def test_admin_sees_every_vgpu_and_gpu(server):
    status, answer = call(server, "GET", "/api/vgpus", ADMIN)
    assert status == 200
    assert [(v["id"], v["user"], v["used"]) for v in answer["vgpus"]] == [("17", "alice", 300 << 20),
                                                                         ("18", "bob", 5 << 20)]
    status, v = call(server, "GET", "/api/vgpus/18", ADMIN)
    assert (status, v["user"], v["quota"], len(v["processes"])) == (200, "bob", None, 1)
    status, answer = call(server, "GET", "/api/gpus", ADMIN)
    assert [(g["uuid"], g["facts"]["memory_used"]) for g in answer["gpus"]] == [(GPU_A, 500 << 20), (GPU_B, 5 << 20)]


def test_a_session_token_sees_only_its_own_vgpu(server, registry):
    status, answer = call(server, "GET", "/api/vgpus", "tok-alice")
    assert status == 200 and [v["id"] for v in answer["vgpus"]] == ["17"]
    assert call(server, "GET", "/api/vgpus/17", "tok-alice")[1]["errors"] == {"CUDA_ERROR_OUT_OF_MEMORY": 3}
    status, answer = call(server, "GET", "/api/gpus", "tok-alice")
    assert [g["uuid"] for g in answer["gpus"]] == [GPU_A]  # its own GPU, not bob's
    # bob's vGPU is as unknown to alice as one that does not exist: ids cannot be probed
    registry.record("18", "cuMemAlloc", 1 << 20)
    for path in ("/api/vgpus/18", "/api/vgpus/18/trace", "/api/vgpus/99"):
        status, answer = call(server, "GET", path, "tok-alice")
        assert status == 404, path
        assert answer["message"] == f"there is no vGPU {path.split('/')[3]} on this worker"
    status, answer = call(server, "POST", "/api/vgpus/18/revoke", "tok-alice", {"reason": "mine now"})
    assert (status, answer["message"]) == (404, "there is no vGPU 18 on this worker")
    assert registry.revoked == [] and registry.table["18"]["state"] == "active"


def test_metrics_need_the_admin_token(server):
    status, answer = call(server, "GET", "/metrics", "tok-alice")
    assert status == 403 and "admin token" in answer["message"]


def test_admin_revokes_with_a_reason_the_programs_are_told(server, registry):
    status, v = call(server, "POST", "/api/vgpus/17/revoke", ADMIN, {"reason": "  the course\nended "})
    assert status == 200
    assert registry.revoked == [("17", "an admin of its worker revoked this vGPU: the course ended")]
    assert (v["id"], v["state"], v["reason"]) == ("17", "revoked", registry.revoked[0][1])
    status, answer = call(server, "POST", "/api/vgpus/17/revoke", ADMIN, {})
    assert status == 409 and answer["message"] == f"vGPU 17 is already revoked: {registry.revoked[0][1]}"
    assert call(server, "GET", "/api/vgpus/17", "tok-alice")[1]["state"] == "revoked"  # it still sees why


def test_a_session_may_revoke_its_own_vgpu(server, registry):
    status, v = call(server, "POST", "/api/vgpus/18/revoke", "tok-bob")
    assert status == 200 and registry.revoked == [("18", "its own session revoked this vGPU")]


@pytest.mark.parametrize("method,path,body,status,words", [
    ("GET", "/api/vgpus/17/trace?since=abc", None, 400, "since must be a whole number, not 'abc'"),
    ("GET", "/api/vgpus/17/trace?wait=soon", None, 400, "wait must be a finite number, not 'soon'"),
    # nan passed the number check and held the long-poll for ever (min(nan, MAX_WAIT) is nan)
    ("GET", "/api/vgpus/17/trace?wait=nan", None, 400, "wait must be a finite number, not 'nan'"),
    ("GET", "/api/vgpus/17/trace?wait=inf", None, 400, "wait must be a finite number, not 'inf'"),
    ("GET", "/api/vgpus/17/trace?wait=-Infinity", None, 400, "wait must be a finite number, not '-Infinity'"),
    ("GET", "/api/vgpus/17/trace?since=-1", None, 400, "must not be negative"),
    ("GET", "/api/vgpus/17/trace?limit=0", None, 400, "limit must be at least 1"),
    ("GET", "/api/nothing", None, 404, "no such route: GET /api/nothing"),
    ("GET", "/api/vgpus/17/revoke", None, 405, "answers POST, not GET"),
    ("POST", "/api/vgpus/17", b"{}", 405, "answers GET, not POST"),
    ("POST", "/api/vgpus/17/revoke", b"{not json", 400, "must be a JSON object"),
    ("POST", "/api/vgpus/17/revoke", b'{"reason": 5}', 400, "\"reason\" is a string"),
    ("POST", "/api/vgpus/17/revoke", b'["x"]', 400, "\"reason\" is a string"),
    ("POST", "/api/vgpus/17/revoke", b"x" * (control.MAX_BODY + 1), 413, "at most 65536 bytes"),
    ("POST", "/api/vgpus/17/offload", b"", 400, "\"to\" must be \"warm\" (the worker's host RAM) or \"cold\""),
    ("POST", "/api/vgpus/17/offload", b'{"to": "hot"}', 400, "or \"cold\" (files on its disk), not \"hot\""),
    ("POST", "/api/vgpus/17/offload", b'{"to": 1}', 400, "not 1"),
    ("POST", "/api/vgpus/17/offload", b'["warm"]', 400, "must be a JSON object such as {\"to\": \"warm\"}"),
    ("GET", "/api/vgpus/17/offload", None, 405, "answers POST, not GET"),
    ("POST", "/api/vgpus/99/offload", b'{"to": "warm"}', 404, "there is no vGPU 99 on this worker"),
    ("POST", "/api/vgpus/99/restore", None, 404, "there is no vGPU 99 on this worker"),
    ("POST", "/api/vgpus/17/idle", b'{"since": "yesterday"}', 400, "\"since\" must be a time in epoch seconds"),
    ("POST", "/api/vgpus/17/idle", b'{"since": true}', 400, "\"since\" must be a time in epoch seconds"),
    ("POST", "/api/vgpus/17/idle", b'{"since": -5}', 400, "\"since\" must be a time in epoch seconds"),
    ("POST", "/api/vgpus/17/idle", b'{"since": 1e12}', 400, "is in the future"),
    ("POST", "/api/vgpus/17/idle", b"{nope", 400, "must be a JSON object"),
    ("POST", "/api/vgpus/99/idle", b"{}", 404, "there is no vGPU 99 on this worker"),
])
def test_bad_requests_get_a_sentence(server, registry, method, path, body, status, words):
    got, answer = call(server, method, path, ADMIN, raw=body)
    assert got == status and words in answer["message"], answer
    assert registry.revoked == [] and registry.tier_asks == [] and registry.hints == []


def test_offload_and_restore_ask_the_processes_and_answer_the_vgpu(server, registry):
    status, v = call(server, "POST", "/api/vgpus/17/offload", ADMIN, {"to": "cold"})
    assert (status, v["id"], v["done"]) == (200, "17", True)
    status, v = call(server, "POST", "/api/vgpus/18/offload", "tok-bob", {"to": "warm"})  # its own session
    assert (status, v["id"]) == (200, "18")
    status, v = call(server, "POST", "/api/vgpus/17/restore", "tok-alice")
    assert (status, v["done"]) == (200, True)
    assert registry.tier_asks == [("17", 2), ("18", 1), ("17", 0)]
    # another session's vGPU is unknown to it; a revoked one cannot move
    status, answer = call(server, "POST", "/api/vgpus/18/restore", "tok-alice")
    assert (status, answer["message"]) == (404, "there is no vGPU 18 on this worker")
    registry.table["18"].update(state="revoked", reason="the course ended")
    status, answer = call(server, "POST", "/api/vgpus/18/offload", ADMIN, {"to": "warm"})
    assert (status, answer["message"]) == (409, "vGPU 18 is revoked: the course ended")
    assert call(server, "POST", "/api/vgpus/18/idle", ADMIN, {})[0] == 409
    assert registry.tier_asks == [("17", 2), ("18", 1), ("17", 0)]


def test_an_offload_its_processes_do_not_act_on_answers_202(server, registry, monkeypatch):
    monkeypatch.setattr(control, "TIER_WAIT", 0.3)
    registry.acted = False
    t0 = time.monotonic()
    status, v = call(server, "POST", "/api/vgpus/17/offload", ADMIN, {"to": "warm"})
    assert (status, v["id"], v["done"]) == (202, "17", False)
    assert 0.25 < time.monotonic() - t0 < 5


@pytest.mark.parametrize("failures, status, words", [
    ({4001: 2}, 507, "the restore of vGPU 17 failed (process 4001: CUDA_ERROR_OUT_OF_MEMORY); the worker's log "
                     "says why, and \"tiers\" where its memory is now"),
    ({4000: 2, 4001: 1}, 409, "the restore of vGPU 17 failed (process 4000: CUDA_ERROR_OUT_OF_MEMORY, process "
                              "4001: CUDA_ERROR_INVALID_VALUE)"),
])
def test_a_move_a_process_failed_is_not_done_and_names_the_cuda_error(server, registry, failures, status, words):
    registry.failures = failures
    answer_status, v = call(server, "POST", "/api/vgpus/17/restore", ADMIN)
    assert (answer_status, v["id"], v["done"]) == (status, "17", False)
    assert v["message"].startswith(words), v["message"]
    assert v["tiers"] == {"hot": 150 << 20, "warm": 75 << 20, "cold": 75 << 20}  # where it is, as it is


def test_a_move_that_left_memory_behind_is_not_done(server, registry):
    registry.moves_memory = False  # acted with success, yet some memory is still hot (a new allocation)
    status, v = call(server, "POST", "/api/vgpus/17/offload", ADMIN, {"to": "warm"})
    assert (status, v["done"]) == (409, False)
    assert v["message"] == ("the processes of vGPU 17 acted on the offload to warm, but 150.0 MiB hot of its memory "
                            "did not move (a program allocated or touched memory since, or the worker has no room "
                            "for it there)")
    status, v = call(server, "POST", "/api/vgpus/17/offload", ADMIN, {"to": "cold"})
    assert (status, v["done"]) == (409, False) and "but 150.0 MiB hot and 75.0 MiB warm of its memory" in v["message"]
    registry.table["17"]["tiers"] = {"hot": 0, "warm": 300 << 20, "cold": 0}
    assert call(server, "POST", "/api/vgpus/17/offload", ADMIN, {"to": "warm"})[0] == 200
    status, v = call(server, "POST", "/api/vgpus/17/restore", ADMIN)
    assert (status, v["done"]) == (409, False) and "but 300.0 MiB warm of its memory" in v["message"]


def test_cli_says_why_a_move_failed(server, registry):
    env = {"GPULAB_CONTROL_URL": server.url, "GPULAB_TOKEN": "tok-alice"}
    registry.failures = {4000: 2}
    p = gpulab_vgpu("restore", "17", env=env)
    assert (p.returncode, p.stderr.strip()) == (1, "gpulab vgpu: the restore of vGPU 17 failed (process 4000: "
                                                   "CUDA_ERROR_OUT_OF_MEMORY); the worker's log says why, and "
                                                   "\"tiers\" where its memory is now")


def test_an_idle_hint_reaches_the_registry(server, registry):
    t0 = time.time()
    status, v = call(server, "POST", "/api/vgpus/17/idle", "tok-alice", {"since": t0 - 600})
    assert (status, v["id"]) == (200, "17")
    status, _ = call(server, "POST", "/api/vgpus/17/idle", ADMIN)  # no body: idle from now
    assert status == 200
    (vid, since, received), (vid2, since2, received2) = registry.hints
    assert (vid, since, vid2) == ("17", t0 - 600, "17")
    assert t0 <= received <= since2 == received2 <= time.time()


def test_trace_pages_and_long_polls(server, registry):
    for i in range(5):
        registry.record("17", "cuMemcpyHtoD", 1000 * i)
    status, page = call(server, "GET", "/api/vgpus/17/trace?limit=3", "tok-alice")
    assert status == 200 and [r["seq"] for r in page["records"]] == [1, 2, 3] and page["next"] == 3
    page = call(server, "GET", "/api/vgpus/17/trace?since=3", "tok-alice")[1]
    assert [(r["seq"], r["bytes"]) for r in page["records"]] == [(4, 3000), (5, 4000)] and page["next"] == 5

    # nothing newer: the request is held until a record comes, then answered at once
    threading.Timer(0.5, registry.record, ("17", "cuLaunchKernel", 0, "CUDA_ERROR_LAUNCH_FAILED")).start()
    t0 = time.monotonic()
    page = call(server, "GET", "/api/vgpus/17/trace?since=5&wait=20", ADMIN)[1]
    took = time.monotonic() - t0
    assert 0.4 < took < 5, took
    assert [(r["seq"], r["function"], r["error"]) for r in page["records"]] == [
        (6, "cuLaunchKernel", "CUDA_ERROR_LAUNCH_FAILED")]
    # nothing comes: an empty page after the wait, with the same next
    t0 = time.monotonic()
    assert call(server, "GET", "/api/vgpus/17/trace?since=6&wait=0.3", ADMIN)[1] == {"records": [], "next": 6}
    assert 0.25 < time.monotonic() - t0 < 5


def test_trace_last_answers_the_newest_records_oldest_first(server, registry):
    for i in range(5):
        registry.record("17", "cuMemAlloc", i)
    page = call(server, "GET", "/api/vgpus/17/trace?last=2", "tok-alice")[1]
    assert [r["seq"] for r in page["records"]] == [4, 5] and page["next"] == 5
    page = call(server, "GET", "/api/vgpus/17/trace?since=4&last=3", "tok-alice")[1]
    assert [r["seq"] for r in page["records"]] == [5]
    status, body = call(server, "GET", "/api/vgpus/17/trace?last=-1", "tok-alice")
    assert status == 400 and "last" in body["message"]


def test_the_vgpu_list_can_carry_each_vgpus_newest_records(server, registry):
    for i in range(4):
        registry.record("17", "cuMemAlloc", i)
    status, body = call(server, "GET", "/api/vgpus?trace=2", "tok-alice")
    assert status == 200 and [v["id"] for v in body["vgpus"]] == ["17"]
    assert [r["seq"] for r in body["vgpus"][0]["trace"]] == [3, 4]
    assert "trace" not in call(server, "GET", "/api/vgpus", "tok-alice")[1]["vgpus"][0]
    status, body = call(server, "GET", "/api/vgpus?trace=-1", "tok-alice")
    assert status == 400 and "trace" in body["message"]


def test_a_long_wait_is_capped_and_ends_when_the_server_stops(server, monkeypatch):
    monkeypatch.setattr(control, "MAX_WAIT", 0.5)
    t0 = time.monotonic()
    assert call(server, "GET", "/api/vgpus/17/trace?wait=3600", ADMIN)[1]["records"] == []
    assert time.monotonic() - t0 < 5
    monkeypatch.setattr(control, "MAX_WAIT", 30.0)
    answers = []
    poll = threading.Thread(target=lambda: answers.append(call(server, "GET", "/api/vgpus/17/trace?wait=30", ADMIN)))
    poll.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    server.stop()
    poll.join(10)
    assert answers and answers[0][0] == 200 and time.monotonic() - t0 < 5


def idle(server, n) -> list:
    """`n` connections that send nothing, each being served (a thread each) once this returns."""
    import socket

    host, port = server.httpd.server_address
    conns = [socket.create_connection((host, port)) for _ in range(n)]
    time.sleep(0.3)
    return conns


def test_the_admin_gets_through_a_full_house_of_idle_connections(registry, monkeypatch):
    monkeypatch.setattr(control, "HEADER_TIMEOUT", 60.0)  # they stay: the reserve, not the deadline, lets us in
    s = ControlServer(registry, ADMIN, "127.0.0.1:0")
    s.start()
    conns = idle(s, control.MAX_CONNECTIONS)
    try:
        t0 = time.monotonic()
        assert call(s, "GET", "/api/vgpus", ADMIN)[0] == 200
        assert call(s, "GET", "/metrics", ADMIN)[0] == 200
        assert time.monotonic() - t0 < 2
        status, answer = call(s, "GET", "/api/vgpus", "tok-alice")  # the reserve is the admin's
        assert status == 503 and "as many connections as it may" in answer["message"]
        conns += idle(s, control.ADMIN_RESERVE)
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected)):
            call(s, "GET", "/api/vgpus", ADMIN)  # beyond the reserve: closed unanswered, never a thread
    finally:
        for c in conns:
            c.close()
    time.sleep(0.3)
    assert call(s, "GET", "/api/vgpus", "tok-alice")[0] == 200  # their threads are back
    s.stop()


def test_a_connection_must_send_its_request_within_seconds(registry, monkeypatch):
    monkeypatch.setattr(control, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 2)
    s = ControlServer(registry, ADMIN, "127.0.0.1:0")
    s.start()
    quiet, slow = idle(s, 2)
    try:
        slow.settimeout(5)
        quiet.settimeout(5)
        t0 = time.monotonic()
        for byte in b"GET /api/vgpus HTTP/1.1\r\n":  # a byte at a time never earns more time
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        assert quiet.recv(1) == b"" and slow.recv(1) == b""  # both closed
        assert time.monotonic() - t0 < 3
        # a kept-alive connection owes its next request within the deadline too
        keep = http.client.HTTPConnection(*s.httpd.server_address, timeout=5)
        keep.request("GET", "/api/vgpus", headers={"Authorization": f"token {ADMIN}"})
        assert keep.getresponse().read() and keep.sock is not None
        time.sleep(1.0)
        assert keep.sock.recv(1) == b""
        keep.close()
        assert call(s, "GET", "/api/vgpus", "tok-alice")[0] == 200  # the slots are free for others
    finally:
        quiet.close()
        slow.close()
        s.stop()


def test_one_credential_holds_a_few_long_polls_at_most(server, registry):
    answers = []
    polls = [threading.Thread(target=lambda: answers.append(call(server, "GET", "/api/vgpus/17/trace?wait=20",
                                                                 "tok-alice")))
             for _ in range(control.MAX_POLLS)]
    for p in polls:
        p.start()
    time.sleep(0.5)
    status, answer = call(server, "GET", "/api/vgpus/17/trace?wait=20", "tok-alice")
    assert status == 429 and f"already holds {control.MAX_POLLS} trace long-polls" in answer["message"]
    assert call(server, "GET", "/api/vgpus/17/trace", "tok-alice")[0] == 200  # without wait: answered
    assert call(server, "GET", "/api/vgpus/18/trace?wait=0.1", "tok-bob")[0] == 200  # others are not counted
    assert call(server, "GET", "/api/vgpus/17/trace?wait=0.1", ADMIN)[0] == 200
    registry.record("17", "cuInit")
    for p in polls:
        p.join(10)
    assert [a[0] for a in answers] == [200] * control.MAX_POLLS
    assert call(server, "GET", "/api/vgpus/17/trace?since=1&wait=0.1", "tok-alice")[0] == 200  # given back


def test_metrics_are_the_registry_figures(server):
    status, text = call(server, "GET", "/metrics", ADMIN)
    assert status == 200
    m = metric_samples(text)
    alice, bob = (("user", "alice"), ("vgpu", "17")), (("user", "bob"), ("vgpu", "18"))
    assert m[("gpulab_vgpu_vram_used_bytes", alice)] == 300 << 20
    assert m[("gpulab_vgpu_context_overhead_bytes", alice)] == 200 << 20
    assert m[("gpulab_vgpu_vram_quota_bytes", alice)] == 1 << 30
    assert m[("gpulab_vgpu_vram_quota_bytes", bob)] == 2 << 30  # a whole GPU: its memory
    assert m[("gpulab_vgpu_processes", alice)] == 2 and m[("gpulab_vgpu_processes", bob)] == 1
    assert m[("gpulab_vgpu_calls_total", alice)] == 20 and m[("gpulab_vgpu_launches_total", alice)] == 4
    assert m[("gpulab_vgpu_transfer_bytes_total", (("direction", "htod"), *alice))] == 1 << 20
    assert m[("gpulab_vgpu_transfer_bytes_total", (("direction", "dtoh"), *alice))] == 4096
    assert m[("gpulab_vgpu_errors_total", (("result", "CUDA_ERROR_OUT_OF_MEMORY"), *alice))] == 3
    # VRAM tiers: bytes per tier, moves by kind with their bytes and seconds, the worker's tier board
    assert [m[("gpulab_vgpu_tier_bytes", (("tier", t), *alice))] for t in ("hot", "warm", "cold")] == [
        150 << 20, 75 << 20, 75 << 20]
    assert [m[("gpulab_vgpu_tier_moves_total", (("kind", k), *alice))] for k in ("offload", "restore", "failure")
            ] == [3, 2, 1]
    assert m[("gpulab_vgpu_tier_move_bytes_total", (("kind", "offload"), *alice))] == 225 << 20
    assert m[("gpulab_vgpu_tier_move_bytes_total", (("kind", "restore"), *alice))] == 150 << 20
    assert m[("gpulab_vgpu_tier_move_seconds_total", (("kind", "offload"), *alice))] == 0.75
    assert m[("gpulab_vgpu_tier_move_seconds_total", (("kind", "restore"), *alice))] == 0.5
    assert ("gpulab_vgpu_tier_move_bytes_total", (("kind", "failure"), *alice)) not in m
    assert m[("gpulab_worker_warm_bytes", ())] == 80 << 20
    assert m[("gpulab_worker_warm_budget_bytes", ())] == 8 << 30
    assert m[("gpulab_worker_gpu_hot_bytes", (("gpu", GPU_A),))] == 150 << 20
    assert m[("gpulab_worker_gpu_hot_bytes", (("gpu", GPU_B),))] == 0
    # compute shares: the grant's and the measured one as ratios of one GPU, seconds, processes waiting
    assert m[("gpulab_vgpu_compute_share_ratio", alice)] == 0.25
    assert m[("gpulab_vgpu_compute_measured_ratio", alice)] == 0.315
    assert m[("gpulab_vgpu_kernel_seconds_total", alice)] == 12.5
    assert m[("gpulab_vgpu_throttled_seconds_total", alice)] == 2.5
    assert m[("gpulab_vgpu_pacing_queue_depth", alice)] == 1
    assert m[("gpulab_vgpu_compute_share_ratio", bob)] == 1.0
    assert m[("gpulab_vgpu_pacing_queue_depth", bob)] == 0
    assert m[("gpulab_vgpu_info", (("gpus", GPU_A), ("profile", "quarter"), ("qos", "medium"),
                                   ("state", "active"), *alice))] == 1
    assert m[("gpulab_gpu_memory_total_bytes", (("emulated", "true"), ("gpu", GPU_A),
                                                ("model", "Emulated GPU")))] == 4 << 30
    assert m[("gpulab_gpu_memory_used_bytes", (("gpu", GPU_A),))] == 500 << 20
    assert m[("gpulab_gpu_utilization_ratio", (("gpu", GPU_A),))] == 0.25
    assert m[("gpulab_gpu_temperature_celsius", (("gpu", GPU_B),))] == 41.0
    assert m[("gpulab_gpu_power_watts", (("gpu", GPU_B),))] == 70.5
    assert m[("gpulab_gpu_sm_clock_hertz", (("gpu", GPU_B),))] == 1.98e9
    # an unknown fact is no sample, not a made-up 0
    assert ("gpulab_gpu_temperature_celsius", (("gpu", GPU_A),)) not in m


def test_published_state_files(tmp_path):
    publish(tmp_path / "state", "w1", "http://127.0.0.1:7001", "sekrit")
    url_file, token_file = control.state_files(tmp_path / "state", "w1")
    assert url_file.read_text() == "http://127.0.0.1:7001\n" and token_file.read_text() == "sekrit\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert published(tmp_path / "state") == {"w1": ("http://127.0.0.1:7001", token_file)}


# ------------------------------------------------------------------------------ gpulab vgpu


def gpulab_vgpu(*args, env=None, timeout=60):
    base = {k: v for k, v in os.environ.items() if k not in ("GPULAB_CONTROL_URL", "GPULAB_TOKEN")}
    return subprocess.run([sys.executable, "-m", "gpulab.cli", "vgpu", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**base, **(env or {})})


def test_cli_as_admin_from_the_state_directory(server, registry, tmp_path):
    state = tmp_path / "state"
    publish(state, "w1", server.url, ADMIN)
    env = {"GPULAB_STATE_DIR": str(state)}
    p = gpulab_vgpu("list", env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "USER", "PROFILE", "STATE", "GPUS", "VRAM", "TIER", "HOT", "WARM", "COLD",
                                "SHARE", "MEASURED", "THROTTLED", "QUEUE", "PROCS", "CALLS"]
    assert lines[1].split() == ["17", "alice", "quarter", "active", "GPU-aaaaaaaa", "500.0", "MiB", "/", "1.0",
                                "GiB", "mixed", "150.0", "MiB", "75.0", "MiB", "75.0", "MiB", "25%", "31.5%", "2.50",
                                "s", "1", "2", "20"]
    assert lines[2].split()[:2] == ["18", "bob"] and "whole GPU" in lines[2]
    p = gpulab_vgpu("show", "17", env=env)
    assert p.returncode == 0, p.stderr
    assert "VRAM:     500.0 MiB / 1.0 GiB (allocations 300.0 MiB, context overhead 200.0 MiB)" in p.stdout
    assert "errors:   CUDA_ERROR_OUT_OF_MEMORY x3" in p.stdout
    assert "tiers:    mixed: 150.0 MiB hot, 75.0 MiB warm, 75.0 MiB cold; idle 42 s" in p.stdout
    assert ("moves:    3 offloads (225.0 MiB in 0.75 s), 2 restores (150.0 MiB in 0.50 s), 1 failed"
            in p.stdout)
    assert "compute:  25% of a GPU (may burst into idle time), measured 31.5% over the last 10 s" in p.stdout
    assert ("kernels:  12.50 s of GPU time; throttled 2.50 s waiting for its share, 1 process(es) waiting now"
            in p.stdout)
    assert [ln.split()[7:12] for ln in p.stdout.splitlines() if ln.startswith("400")] == [
        ["6.00", "s", "1.25", "s", "yes"], ["6.00", "s", "1.25", "s", "no"]]
    assert [ln.split()[:2] for ln in p.stdout.splitlines() if ln.startswith("400")] == [["4000", "3000"],
                                                                                         ["4001", "3001"]]
    p = gpulab_vgpu("list", "--json", env=env)
    assert [v["id"] for v in json.loads(p.stdout)] == ["17", "18"]
    p = gpulab_vgpu("revoke", "18", "--reason", "maintenance", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "vGPU 18 revoked: an admin of its worker revoked this vGPU: maintenance"
    assert registry.revoked == [("18", "an admin of its worker revoked this vGPU: maintenance")]


def test_cli_offload_restore_and_idle(server, registry, monkeypatch):
    env = {"GPULAB_CONTROL_URL": server.url, "GPULAB_TOKEN": "tok-alice"}
    p = gpulab_vgpu("offload", "17", "--to", "cold", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "vGPU 17 is cold: 0 bytes hot, 0 bytes warm, 300.0 MiB cold"
    assert gpulab_vgpu("offload", "17", env=env).returncode == 0  # warm by default
    p = gpulab_vgpu("restore", "17", "--json", env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["done"] is True
    assert registry.tier_asks == [("17", 2), ("17", 1), ("17", 0)]
    p = gpulab_vgpu("offload", "17", "--to", "hot", env=env)
    assert (p.returncode, p.stderr.strip()) == (1, "gpulab vgpu: \"to\" must be \"warm\" (the worker's host RAM) "
                                                   "or \"cold\" (files on its disk), not \"hot\"")
    p = gpulab_vgpu("restore", "18", env=env)  # bob's
    assert (p.returncode, p.stderr.strip()) == (1, "gpulab vgpu: there is no vGPU 18 on this worker")
    p = gpulab_vgpu("idle", "17", "--since", "1700000000", env=env)
    assert (p.returncode, p.stdout.strip()) == (0, "vGPU 17 counts as idle for 42 s"), p.stderr
    assert registry.hints[0][:2] == ("17", 1700000000)
    monkeypatch.setattr(control, "TIER_WAIT", 0.2)
    registry.acted = False
    p = gpulab_vgpu("offload", "17", env=env)
    assert p.returncode == 0 and "its processes have not all acted within" in p.stdout


def test_cli_as_the_session_from_a_kernels_environment(server, registry):
    env = {"GPULAB_CONTROL_URL": server.url, "GPULAB_TOKEN": "tok-alice"}
    registry.record("17", "cuMemAlloc", 1 << 20)
    registry.record("17", "cuMemAlloc", 2 << 30, "CUDA_ERROR_OUT_OF_MEMORY")
    p = gpulab_vgpu("trace", "17", env=env)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines()]
    assert rows[0] == ["TIME", "PID", "FUNCTION", "DURATION", "BYTES", "RESULT"]
    assert [r[1:] for r in rows[1:]] == [["3000", "cuMemAlloc", "20", "us", "1.0", "MiB", "CUDA_SUCCESS"],
                                         ["3000", "cuMemAlloc", "20", "us", "2.0", "GiB", "CUDA_ERROR_OUT_OF_MEMORY"]]
    p = gpulab_vgpu("show", "18", env=env)  # bob's
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr.strip() == "gpulab vgpu: there is no vGPU 18 on this worker"


def test_cli_trace_follow_prints_calls_as_they_come(server, registry):
    registry.record("17", "cuInit")
    env = {"GPULAB_CONTROL_URL": server.url, "GPULAB_TOKEN": "tok-alice"}
    proc = subprocess.Popen([sys.executable, "-m", "gpulab.cli", "vgpu", "trace", "17", "--follow", "--json"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **env})
    try:
        first = json.loads(proc.stdout.readline())
        registry.record("17", "cuMemFree")
        second = json.loads(proc.stdout.readline())  # within one long-poll, not after it
        assert (first["function"], second["function"], second["seq"]) == ("cuInit", "cuMemFree", 2)
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_errors_are_one_sentence(server, tmp_path):
    empty = {"GPULAB_STATE_DIR": str(tmp_path / "none")}
    p = gpulab_vgpu("list", env=empty)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"gpulab vgpu: no worker on this host published its control API in "
                                f"{tmp_path / 'none'}; set GPULAB_CONTROL_URL and GPULAB_TOKEN, or pass --url "
                                f"with GPULAB_TOKEN set")
    state = tmp_path / "two"
    publish(state, "w1", server.url, ADMIN)
    publish(state, "w2", "http://127.0.0.1:9", "x")
    p = gpulab_vgpu("list", env={"GPULAB_STATE_DIR": str(state)})
    assert p.returncode == 1 and "several workers" in p.stderr and "w1, w2" in p.stderr
    p = gpulab_vgpu("list", "--worker", "w1", "--json", env={"GPULAB_STATE_DIR": str(state)})
    assert p.returncode == 0 and len(json.loads(p.stdout)) == 2
    p = gpulab_vgpu("list", "--url", server.url, "--token", "wrong")
    assert p.returncode == 1 and p.stderr.startswith("gpulab vgpu: this needs a credential")
    assert len(p.stderr.strip().splitlines()) == 1
    p = gpulab_vgpu("list", "--url", "http://127.0.0.1:9", "--token", "x")  # nothing listens on port 9
    assert p.returncode == 1 and p.stderr.startswith("gpulab vgpu: cannot reach the worker's control API at "
                                                     "http://127.0.0.1:9")
    p = gpulab_vgpu("show", "--url", server.url, "--token", ADMIN)
    assert p.returncode == 1 and "give one vGPU id" in p.stderr


def test_cli_help_describes_every_subcommand():
    p = gpulab_vgpu("--help")
    assert p.returncode == 0
    for cmd in ("list", "show", "trace", "offload", "restore", "idle", "revoke"):
        assert cmd in p.stdout.splitlines()
    p = gpulab_vgpu("trace", "--help")
    assert "--follow" in p.stdout and "--url" in p.stdout and "--json" in p.stdout
    # a token on the command line is in `ps` for every user: the help says so and shows the environment
    assert "visible to every user of the host in `ps`" in " ".join(p.stdout.split())
    p = gpulab_vgpu("--help")
    assert "--token" not in p.stdout and 'GPULAB_TOKEN="$(cat' in p.stdout


def test_cli_takes_the_token_from_the_environment_with_url(server):
    p = gpulab_vgpu("list", "--url", server.url, "--json", env={"GPULAB_TOKEN": ADMIN})
    assert p.returncode == 0, p.stderr
    assert [v["id"] for v in json.loads(p.stdout)] == ["17", "18"]
    p = gpulab_vgpu("list", "--url", server.url)
    assert p.returncode == 1 and "set GPULAB_TOKEN" in p.stderr and "`ps`" in p.stderr


def test_the_clients_tier_wait_is_the_workers():
    """gpu_worker/client/control.py keeps its own copy (the kernel's magics must not load the daemon)."""
    from gpu_worker.client import control as client_control

    assert client_control.TIER_WAIT == control.TIER_WAIT
