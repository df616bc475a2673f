"""The dashboard's GPU and vGPU panels: the VRAM bar's segments carry the heartbeats' exact bytes,
oversubscription is visible, the last-hour chart plots the history's samples, and every vGPU shows
its processes and last calls."""
from __future__ import annotations

import asyncio
import re
import threading
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from tornado import ioloop, web

from gpu_worker.client import token_hash
from hubtools import HUB_TOKEN, WORKER_TOKEN, Pool, free_port, registration
from hub_spawner.pool.app import GPUPool
from hub_spawner.pool.dashboard import dashboard_panels, dashboard_rows, environment, page_namespace
from hub_spawner.pool.db import Allocation
from hub_spawner.pool.panels import CHART_H, CHART_W
from hub_spawner.pool.worker_api import MAX_VRAM, check_heartbeat

G, M = 2**30, 2**20


class StandIn:
    """LiveFacts' interface (live.py) over fixed figures."""

    def __init__(self, vgpus=None, gpus=None, history=None):
        self._vgpus, self._gpus, self._history = vgpus or {}, gpus or {}, history or {}

    def vgpu(self, token_hash):
        return self._vgpus.get(token_hash)

    def gpu(self, uuid):
        return self._gpus.get(uuid)

    def history(self, uuid):
        return self._history.get(uuid, [])


def allocation(id, user, vram, gpus=("GPU-a",), token_hash=None, profile="quarter"):
    return SimpleNamespace(id=id, user=user, profile=profile, worker_name="w1", gpu_list=list(gpus), vram=vram,
                           count=len(gpus), status="active", token_hash=token_hash or f"h{id}", server_name="",
                           compute=25, used_vram=0, message="")


def gpu(uuid="GPU-a", memory=16 * G, model="test GPU", emulated=False):
    return {"uuid": uuid, "worker": "w1", "worker_status": "up", "model": model, "memory": memory,
            "capability": "9.0", "emulated": emulated, "used_vram": 0, "used_compute": 0, "sessions": 0}


def render(gpus, sessions, live, now):
    ns = page_namespace({"name": "admin", "admin": True}, "/hub/", "/services/gpulab-pool/")
    html = environment().get_template("dashboard.html").render(
        **ns, **dashboard_rows(gpus, [], sessions, []), **dashboard_panels(gpus, sessions, live, now))
    return re.sub(r"\s+", " ", html)  # line breaks of the template are not the page's text


def segments(html: str, vgpu) -> dict:
    """{kind: bytes} of one vGPU's group in the bar."""
    group = re.search(rf'<div class="gpulab-vgpu"[^>]*data-vgpu="{vgpu}".*?</span>', html).group(0)
    return {k: int(n) for k, n in re.findall(r'gpulab-seg-(\w+)"[^>]*data-bytes="(\d+)"', group)}


def polylines(html: str, kind: str) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, p.split(","))) for p in pts.split()]
            for pts in re.findall(rf'class="gpulab-line-{kind}" points="([^"]*)"', html)]


def test_bar_segments_carry_each_vgpus_bytes_and_the_free_rest():
    live = StandIn(vgpus={"h1": {"id": "1", "used": 1 * G, "overhead": 300 * M, "processes": [], "last_calls": []},
                          "h2": {"id": "2", "used": 0, "overhead": 0, "processes": [], "last_calls": []}})
    sessions = [allocation(1, "alice", 4 * G), allocation(2, "bob", 2 * G), allocation(3, "carl", 1 * G)]
    html = render([gpu()], sessions, live, time.time())
    assert segments(html, 1) == {"used": 1 * G, "overhead": 300 * M, "reserved": 4 * G - 1 * G - 300 * M}
    assert segments(html, 2) == {"reserved": 2 * G}
    assert segments(html, 3) == {"reserved": 1 * G}  # no report yet: its quota, said so
    assert "vGPU 3 · carl: 1.0 GiB quota (no report yet)" in html
    assert re.search(r'gpulab-seg-free"[^>]*data-bytes="%d"' % (16 * G - 7 * G), html)
    assert "vGPU 1 · alice: 1.0 GiB used + 300.0 MiB context overhead of 4.0 GiB quota" in html
    widths = dict(re.findall(r'class="gpulab-vgpu" style="width: ([\d.]+)%" data-vgpu="(\d+)"', html))
    assert {v: float(w) for w, v in widths.items()} == {"1": 25.0, "2": 12.5, "3": 6.25}
    assert "oversubscribed" not in html.split("gpulab-bar-legend")[1].split("</ul>")[0]


def test_oversubscription_is_marked_where_the_memory_ends():
    live = StandIn()
    sessions = [allocation(1, "alice", 12 * G), allocation(2, "bob", 12 * G)]
    html = render([gpu()], sessions, live, time.time())
    assert "oversubscribed: 24.0 GiB promised of 16.0 GiB (1.50×)" in html
    assert re.search(r'class="gpulab-mark" style="left: 66.667%"', html)
    assert "gpulab-seg gpulab-seg-free" not in html


def test_a_vgpu_on_two_gpus_is_drawn_on_both_with_half_its_figures():
    live = StandIn(vgpus={"h1": {"id": "1", "used": 2 * G, "overhead": 2 * M}})
    html = render([gpu("GPU-a"), gpu("GPU-b")], [allocation(1, "alice", 4 * G, gpus=("GPU-a", "GPU-b"))], live,
                  time.time())
    panels = html.split('data-gpu="GPU-')[1:]
    assert len(panels) == 2
    for p in panels:
        assert segments(p, 1) == {"used": G, "overhead": M, "reserved": 3 * G - M}


def test_chart_plots_the_last_hour_and_breaks_at_missing_figures():
    now = 1_000_000.0
    history = [(now - 4000, 8 * G, 0.9),                 # older than an hour: not drawn
               (now - 3600, 0, 0.0), (now - 1800, 8 * G, 0.5), (now - 900, None, 0.25), (now, 16 * G, 1.0)]
    live = StandIn(gpus={"GPU-a": {"memory_total": 16 * G, "memory_used": 16 * G, "utilization": 1.0,
                                   "temperature": 61.0, "power": 310.0, "sm_clock": 1.98e9, "emulated": False}},
                   history={"GPU-a": history})
    html = render([gpu()], [], live, now)
    assert 'data-samples="4"' in html
    assert polylines(html, "memory") == [[(0, CHART_H), (CHART_W / 2, CHART_H / 2)], [(CHART_W, 0)]]
    assert polylines(html, "utilization") == [[(0, CHART_H), (CHART_W / 2, CHART_H / 2),
                                               (CHART_W * 0.75, CHART_H * 0.75), (CHART_W, 0)]]
    assert "memory used (top: 16.0 GiB)" in html
    assert "Now: memory used 16.0 GiB · utilization 100% · temperature 61 °C · power 310 W · SM clock 1980 MHz" in html


def test_without_history_the_chart_says_so():
    html = render([gpu()], [], StandIn(), time.time())
    assert "No heartbeat has reported this GPU in the last hour." in html and "<svg" not in html


def test_emulated_gpu_is_labelled_in_its_panel():
    html = render([gpu(model="Fake H100", emulated=True), gpu("GPU-b", model="gpulab emulated vGPU (test double)",
                                                               emulated=True)], [], StandIn(), time.time())
    headings = re.findall(r'<h3 class="h6 card-title">(.*?)</h3>', html)
    assert len(headings) == 2 and all(h.lower().count("emulated") == 1 for h in headings), headings


def test_vgpu_panel_lists_processes_and_last_calls():
    facts = {"id": "1", "used": 3 * M, "overhead": 1 * M, "calls": 42, "launches": 7, "bytes_in": 4 * M,
             "bytes_out": 2 * M, "errors": 1, "kernel_time": 40.0, "throttled_time": 12.5, "share_measured": 24.6,
             "queue_depth": 2,
             "processes": [{"pid": 501, "client_pid": 401, "used": 2 * M, "overhead": M // 2, "calls": 30},
                           {"pid": 502, "client_pid": 402, "used": 1 * M, "overhead": M // 2, "calls": 12}],
             "last_calls": [{"seq": 1, "time": 1.0, "pid": 401, "function": "cuMemAlloc_v2", "duration": 0.000012,
                             "bytes": 2 * M, "result": 0, "error": ""},
                            {"seq": 2, "time": 2.0, "pid": 402, "function": "cuMemAlloc_v2", "duration": 0.0031,
                             "bytes": 64 * G, "result": 2, "error": "CUDA_ERROR_OUT_OF_MEMORY"}]}
    html = render([gpu()], [allocation(1, "alice", 4 * G)], StandIn(vgpus={"h1": facts}), time.time())
    panel = html.split('class="card mb-3 gpulab-vgpu-panel" data-vgpu="1"')[1]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", panel))
    assert "vGPU 1 · alice · quarter" in text
    assert "GPUs GPU-a · quota 4.0 GiB · used 3.0 MiB · context overhead 1.0 MiB · 42 calls · 7 launches" in text
    assert "501 401 2.0 MiB 512.0 KiB 30" in text and "502 402 1.0 MiB 512.0 KiB 12" in text
    # newest first
    assert text.index("64.0 GiB CUDA_ERROR_OUT_OF_MEMORY") < text.index("cuMemAlloc_v2 12 µs 2.0 MiB CUDA_SUCCESS")
    assert "3.10 ms" in text
    assert ("compute share 25% · measured 24.6% over the last 10 s · throttled 12.50 s · waiting for its share "
            "2 processes") in text
    assert "memory" not in text.split("throttled")[1].split("501")[0]  # no tier figures: no tier line


def test_vgpu_panel_shows_its_memory_tier():
    facts = {"id": "1", "used": 3 * M, "overhead": 0, "tier": "mixed",
             "tiers": {"hot": 1 * M, "warm": 2 * M, "cold": 0}}
    html = render([gpu()], [allocation(1, "alice", 4 * G)], StandIn(vgpus={"h1": facts}), time.time())
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html.split('gpulab-vgpu-panel" data-vgpu="1"')[1]))
    assert ("memory mixed · 1.0 MiB on the GPU · 2.0 MiB in its worker's RAM (warm) · 0 bytes on its worker's disk "
            "(cold)") in text


def test_vgpu_panel_compute_share_unknown_without_the_figures():
    """A worker without compute shares (its heartbeat has none of the figures) shows them unknown, never 0;
    the allocation's burst flag is shown beside its share."""
    a = allocation(1, "alice", 4 * G)
    a.burst = False
    html = render([gpu()], [a], StandIn(vgpus={"h1": {"id": "1", "used": 0, "overhead": 0}}), time.time())
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html.split('gpulab-vgpu-panel" data-vgpu="1"')[1]))
    assert ("compute share 25% (no burst) · measured unknown over the last 10 s · throttled unknown · waiting for "
            "its share unknown") in text


class InProcessPool(Pool):
    """The pool's two listeners on an event loop in a thread of this process, so that a test reaches its
    LiveFacts and book (the dashboard's sources) after real heartbeats through the worker API."""

    def __init__(self, db: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.worker_url = f"http://127.0.0.1:{free_port()}/"
        self.credentials = {}
        self.app = GPUPool(db_url=f"sqlite:///{db}", api_token=HUB_TOKEN, worker_token=WORKER_TOKEN, prefix="/")
        self.app.open_state()
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(asyncio.new_event_loop())
            self.loop = ioloop.IOLoop.current()
            self.app.make_app().listen(self.port, "127.0.0.1")
            self.app.make_worker_app().listen(int(self.worker_url.rsplit(":", 1)[1].rstrip("/")), "127.0.0.1")
            self.loop.add_callback(ready.set)
            self.loop.start()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self):
        self.loop.add_callback(self.loop.stop)
        self.thread.join(10)

    def page(self) -> str:
        """The dashboard as an admin sees it (without the hub's sign-in, which needs a hub)."""
        book = self.app.book
        gpus = book.gpu_table()
        with book.Session() as db:
            sessions = list(db.scalars(select(Allocation).where(Allocation.status != "released")))
        ns = page_namespace({"name": "admin", "admin": True}, "/hub/", "/")
        html = environment().get_template("dashboard.html").render(
            **ns, **dashboard_rows(gpus, [], sessions, book.usage_table()),
            **dashboard_panels(gpus, sessions, self.app.live, time.time()))
        return re.sub(r"\s+", " ", html)


@pytest.fixture
def live_pool(tmp_path):
    p = InProcessPool(str(tmp_path / "pool.sqlite"))
    yield p
    p.stop()


def test_dashboard_after_real_heartbeats(live_pool):
    p = live_pool
    p.register("w1", gpus=1, memory=16 * G)
    status, a = p.call("POST", "api/allocations", {"user": "alice", "vram": "4G", "compute": 25, "profile": "quarter"})
    assert status == 201
    status, b = p.call("POST", "api/allocations", {"user": "bob", "vram": "2G", "compute": 25, "profile": "small"})
    assert status == 201
    body = {"pid": 99, "vgpus": {token_hash(a["token"]): {
        "id": str(a["id"]), "used": 1 * G, "overhead": 300 * M, "calls": 12, "launches": 3, "bytes_in": 64 * M,
        "bytes_out": 0, "errors": 1, "kernel_time": 30.0, "throttled_time": 0.25, "share_measured": 25.5,
        "queue_depth": 1, "tier": "warm", "tiers": {"hot": 0, "warm": 1 * G, "cold": 0},
        "processes": [{"pid": 501, "client_pid": 401, "used": 768 * M, "overhead": 150 * M, "calls": 8},
                      {"pid": 502, "client_pid": 402, "used": 256 * M, "overhead": 150 * M, "calls": 4}],
        "last_calls": [{"seq": 11, "time": time.time(), "pid": 401, "function": "cuMemAlloc_v2",
                        "duration": 0.00002, "bytes": 768 * M, "result": 0, "error": ""},
                       {"seq": 12, "time": time.time(), "pid": 402, "function": "cuMemAlloc_v2",
                        "duration": 0.00001, "bytes": 8 * G, "result": 2, "error": "CUDA_ERROR_OUT_OF_MEMORY"}]}},
        "gpus": {"GPU-w1-0": {"memory_total": 16 * G, "memory_used": 4 * G, "utilization": 0.25,
                              "temperature": None, "power": None, "sm_clock": None, "emulated": True}}}
    status, reply = p.worker_call("POST", "api/workers/w1/heartbeat", body)
    assert status == 200, reply
    html = p.page()
    assert segments(html, a["id"]) == {"used": 1 * G, "overhead": 300 * M, "reserved": 3 * G - 300 * M}
    assert segments(html, b["id"]) == {"reserved": 2 * G}  # bob's vGPU is not in the heartbeat: holds nothing
    assert re.search(r'gpulab-seg gpulab-seg-free"[^>]*data-bytes="%d"' % (10 * G), html)
    # one history point so far: memory 4 of 16 GiB, utilization 25%, drawn at now (the right edge)
    assert 'data-samples="1"' in html
    [[(x, y)]] = polylines(html, "memory")
    assert x > CHART_W * 0.99 and y == CHART_H * 0.75
    assert polylines(html, "utilization")[0][0][1] == CHART_H * 0.75
    assert "Now: memory used 4.0 GiB · utilization 25%" in html
    heading = re.search(r'<h3 class="h6 card-title">(.*?)</h3>', html).group(1)
    assert "EMULATED" in heading  # the heartbeat says the device is emulated; its model name does not
    panel = html.split(f'gpulab-vgpu-panel" data-vgpu="{a["id"]}"')[1].split("</section>")[0]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", panel))
    assert "501 401 768.0 MiB 150.0 MiB 8" in text and "502 402 256.0 MiB 150.0 MiB 4" in text
    assert text.index("8.0 GiB CUDA_ERROR_OUT_OF_MEMORY") < text.index("768.0 MiB CUDA_SUCCESS")
    assert ("compute share 25% (may burst) · measured 25.5% over the last 10 s · throttled 250.00 ms · waiting "
            "for its share 1 process") in text
    assert "memory warm · 0 bytes on the GPU · 1.0 GiB in its worker's RAM (warm) · 0 bytes on its worker's disk" in text
    assert "Its worker has not reported it yet." in html.split(f'gpulab-vgpu-panel" data-vgpu="{b["id"]}"')[1]


def test_a_heartbeat_fills_only_its_own_workers_panels(live_pool):
    """Through the worker API: w2's credential cannot overwrite w1's vGPU and GPU facts nor store made-up
    uuids; a worker marked lost, or registered again with other GPUs, is no longer live."""
    p, live = live_pool, live_pool.app.live
    p.register("w1")
    p.register("w2")
    status, a = p.call("POST", "api/allocations", {"user": "alice", "vram": "4G", "node": "n1"})
    assert status == 201 and a["worker"] == "w1"
    h = token_hash(a["token"])
    facts = {"memory_total": 16 * G, "memory_used": 1 * G, "utilization": 0.5}
    assert p.worker_call("POST", "api/workers/w1/heartbeat", {"vgpus": {h: {"used": 1 * G}},
                                                              "gpus": {"GPU-w1-0": facts}})[0] == 200
    forged = {"vgpus": {h: {"used": 9 * G}}, "gpus": {"GPU-w1-0": {**facts, "memory_used": 9 * G},
                                                      "GPU-w2-0": facts,
                                                      **{f"GPU-made-up-{i}": facts for i in range(40)}}}
    status, reply = p.worker_call("POST", "api/workers/w2/heartbeat", forged, worker="w2")
    assert status == 200 and reply == {"grants": [], "revoked": {}}
    assert live.vgpu(h)["used"] == 1 * G and live.vgpu(h)["worker"] == "w1"
    assert live.gpu("GPU-w1-0")["memory_used"] == 1 * G and live.gpu("GPU-w1-0")["worker"] == "w1"
    assert live.gpu("GPU-w2-0")["worker"] == "w2"
    assert live.gpu("GPU-made-up-0") is None and live.history("GPU-made-up-0") == []
    p.register("w2", gpus=2)  # registered again with another GPU besides: its facts wait for its next heartbeat
    assert live.gpu("GPU-w2-0") is None and live.history("GPU-w2-0") != []
    status, body = p.worker_call("POST", "api/workers", {**registration("w2"), "gpus": [
        {"uuid": "GPU-w2-new", "index": 0, "model": "test GPU", "memory": 16 * G}]}, p.credentials["w2"])
    assert status == 200, body
    assert live.history("GPU-w2-0") == []  # gone from the pool, with its history
    assert [g["uuid"] for g in p.call("GET", "api/gpus")[1] if g["worker"] == "w2"] == ["GPU-w2-new"]
    p.app.heartbeat_timeout = p.app.book.write_every = 0.1  # the book allows for last_seen's lag too
    time.sleep(0.3)
    p.app.check_heartbeats()  # both silent: marked lost
    assert live.vgpu(h) is None and live.gpu("GPU-w1-0") is None and live.history("GPU-w1-0") != []


def test_a_heartbeats_tier_figures_are_checked_and_bounded():
    entry = {"id": "7", "used": G, "tier": "mixed", "tiers": {"hot": G, "warm": 2 * G}}
    got = check_heartbeat({"vgpus": {"h": entry}})["vgpus"]["h"]
    assert (got["tier"], got["tiers"]) == ("mixed", {"hot": G, "warm": 2 * G, "cold": 0})
    assert check_heartbeat({"vgpus": {"h": {"id": "7"}}})["vgpus"]["h"]["tiers"] is None  # a worker without tiers
    for bad, why in [({"tiers": {"hot": -1}}, "tiers.hot must be between 0 and"),
                     ({"tiers": {"cold": MAX_VRAM + 1}}, f"tiers.cold must be between 0 and {MAX_VRAM}"),
                     ({"tiers": {"warm": 1.5}}, "tiers.warm must be an integer"),
                     ({"tiers": [1, 2, 3]}, "tiers must be a JSON object"),
                     ({"tier": "x" * 9}, "tier must be a string of at most 8 characters")]:
        with pytest.raises(web.HTTPError) as e:
            check_heartbeat({"vgpus": {"h": {**entry, **bad}}})
        assert e.value.status_code == 400 and why in e.value.log_message, e.value.log_message
