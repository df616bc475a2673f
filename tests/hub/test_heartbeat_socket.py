"""Heartbeats over one WebSocket per worker (``api/workers/<name>/heartbeats``): the same body, checks,
sentences and figures as ``POST api/workers/<name>/heartbeat``, authenticated at the upgrade, a
released credential closing the socket with 4403; and the worker's PoolLink beating over it on one
connection, or by POST against a pool without the route.  Real pool processes on SQLite files."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request

import pytest
from tornado import httpclient, ioloop, web, websocket

from gpu_worker.client import token_hash
import hubtools
from hubtools import G, HUB_TOKEN, WORKER_TOKEN, Pool, free_port, registration


class Socket:
    """A heartbeat socket to a pool, driven synchronously on an event loop of its own."""

    def __init__(self, url: str, worker: str = "w1", token: str | None = None):
        self.loop = asyncio.new_event_loop()
        self.ws = None
        url = url.replace("http://", "ws://", 1) + f"api/workers/{worker}/heartbeats"
        request = httpclient.HTTPRequest(url, headers={"Authorization": f"token {token}"} if token else {})

        async def connect():
            return await websocket.websocket_connect(request)

        self.ws = self.run(connect())

    def run(self, awaitable):
        async def bounded():
            return await asyncio.wait_for(awaitable, 10)
        return self.loop.run_until_complete(bounded())

    def send(self, message) -> dict | None:
        """One message (a dict goes as JSON, bytes as a binary message) and its reply; None: closed."""
        if isinstance(message, dict):
            message = json.dumps(message)

        async def exchange():
            await self.ws.write_message(message, binary=isinstance(message, bytes))
            return await self.ws.read_message()

        answer = self.run(exchange())
        return None if answer is None else json.loads(answer)

    def close(self):
        async def hang_up():
            self.ws.close()
            await self.ws.read_message()  # None: the pool's side of the close came

        if self.ws is not None:
            self.run(hang_up())
        self.loop.close()


@pytest.fixture
def sockets(pool):
    made = []

    def open_socket(worker="w1", token=None) -> Socket:
        s = Socket(pool.worker_url, worker, token or pool.credentials[worker])
        made.append(s)
        return s

    yield open_socket
    for s in made:
        s.close()


def refused(pool, worker, token) -> tuple[int, str]:
    """(status, sentence) of an upgrade the pool refuses."""
    with pytest.raises(httpclient.HTTPClientError) as info:
        Socket(pool.worker_url, worker, token)
    return info.value.code, json.loads(info.value.response.body)["message"]


def allocate(pool, vram="4G"):
    status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": vram, "compute": 10})
    assert status == 201, alloc
    return alloc, token_hash(alloc["token"])


def vgpu(alloc, used, overhead=100 << 20) -> dict:
    return {"id": str(alloc["id"]), "used": used, "overhead": overhead, "kernel_time": 1.5,
            "processes": [{"pid": 10, "client_pid": 20, "used": used, "overhead": overhead, "calls": 7}]}


def http_beat(pool, raw: bytes, worker="w1") -> tuple[int, dict]:
    """The HTTP route's answer to a raw body (JSON or not)."""
    req = urllib.request.Request(f"{pool.worker_url}api/workers/{worker}/heartbeat", data=raw, method="POST",
                                 headers={"Authorization": f"token {pool.credentials[worker]}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_grants_arrive_in_the_reply(pool, sockets):
    pool.register("w1")
    s = sockets()
    assert s.send({}) == {"status": 200, "grants": [], "revoked": {}}
    alloc, h = allocate(pool)
    reply = s.send({"pid": 1})
    assert reply["status"] == 200 and [(g["token_hash"], g["id"]) for g in reply["grants"]] == [(h, str(alloc["id"]))]
    assert pool.call("DELETE", f"api/allocations/{alloc['id']}")[0] == 204
    assert s.send({}) == {"status": 200, "grants": [],
                          "revoked": {h: "this vGPU was released: its Jupyter server stopped"}}


def test_figures_reach_the_allocation_as_over_http(pool, sockets):
    pool.register("w1")
    alloc, h = allocate(pool)
    s = sockets()

    def figures():
        a = pool.call("GET", f"api/allocations/{alloc['id']}")[1]
        return a["used_vram"], a["overhead_vram"]

    body = {"vgpus": {h: vgpu(alloc, 3 * G)}}
    assert http_beat(pool, json.dumps(body).encode())[0] == 200
    over_http = figures()
    assert over_http == (3 * G + (100 << 20), 100 << 20)
    assert s.send({"vgpus": {h: vgpu(alloc, G)}})["status"] == 200
    assert figures() == (G + (100 << 20), 100 << 20)
    assert s.send(body)["status"] == 200
    assert figures() == over_http
    assert s.send({"vgpus": {}})["status"] == 200  # the whole truth: it holds nothing now
    assert figures() == (0, 0)


def test_the_upgrade_is_refused_without_the_workers_own_credential(pool):
    pool.register("w1")
    pool.register("w2", node="n2")
    assert refused(pool, "w1", WORKER_TOKEN) == (403, "the enrolment secret cannot act for worker w1: use the "
                                                      "credential the pool issued to it at enrolment")
    assert refused(pool, "w1", pool.credentials["w2"]) == (403, "this credential belongs to worker w2, not w1")
    assert refused(pool, "w1", None) == (403, "a valid worker credential is required")
    assert refused(pool, "w1", HUB_TOKEN) == (403, "a valid worker credential is required")


@pytest.mark.parametrize("message", [b"not json", b"[1]", b'{"vgpus": []}', b'{"gpus": {"GPU-w1-0": {}}}',
                                     b'{"ended": {"h": ""}}'])
def test_a_bad_body_is_answered_with_the_http_routes_sentence_and_the_socket_goes_on(pool, sockets, message):
    pool.register("w1")
    alloc, h = allocate(pool)
    s = sockets()
    status, answer = http_beat(pool, message)
    assert status == 400
    assert s.send(message.decode()) == {"status": 400, "message": answer["message"]}
    assert s.send(message) == {"status": 400, "message": "a heartbeat is a text message: a JSON object"}
    reply = s.send({"vgpus": {h: vgpu(alloc, G)}})  # the same socket answers the next good one
    assert reply["status"] == 200 and [g["token_hash"] for g in reply["grants"]] == [h]
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["used_vram"] == G + (100 << 20)


def test_a_credential_released_by_an_admin_closes_the_socket(pool, sockets):
    pool.register("w1")
    s = sockets()
    assert s.send({})["status"] == 200
    assert pool.call("DELETE", "api/workers/w1/credential")[0] == 204
    assert s.send({}) is None
    assert (s.ws.close_code, s.ws.close_reason) == (4403, "a valid worker credential is required")
    s.ws = None


def test_the_service_url_does_not_serve_the_socket(pool):
    pool.register("w1")
    for token in (pool.credentials["w1"], WORKER_TOKEN, HUB_TOKEN):
        status, body = pool.call("GET", "api/workers/w1/heartbeats", token=token)
        assert status == 404 and "worker API is not served here" in body["message"], body
        with pytest.raises(httpclient.HTTPClientError) as info:
            Socket(pool.url, "w1", token)
        assert info.value.code == 404 and "worker API is not served here" in info.value.response.body.decode()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


def connections_to(port: int) -> set[int]:
    """Local ports of the established TCP connections to 127.0.0.1:``port`` (/proc/net/tcp)."""
    out = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and remote == f"0100007F:{port:04X}":
                out.add(int(local.split(":")[1], 16))
    return out


def link_to(url: str, tmp_path, name="wl"):
    from gpu_worker.daemon.pool_link import PoolLink

    return PoolLink(url, WORKER_TOKEN, name, "tcp://10.0.0.2:7000", "n1", "emulated", registration(name)["gpus"],
                    credential_file=str(tmp_path / f"{name}.credential"))


def test_pool_link_beats_on_one_connection_and_enrols_again_when_closed_out(pool, tmp_path):
    link = link_to(pool.worker_url, tmp_path)
    try:
        link.register()
        port = port_of(pool.worker_url)
        assert connections_to(port) == set()
        seen = []
        for _ in range(3):
            assert link.heartbeat({}) == {"grants": [], "revoked": {}}
            seen.append(connections_to(port))
        assert len(seen[0]) == 1 and seen[0] == seen[1] == seen[2], seen  # one socket for every beat
        alloc, h = allocate(pool)
        assert [g["token_hash"] for g in link.heartbeat({})["grants"]] == [h]
        # an admin releases the name: the socket closes with 4403 and the link enrols again
        credential = link.credential
        assert pool.call("DELETE", "api/workers/wl/credential")[0] == 204
        assert link.heartbeat({}) is None
        assert link.credential != credential and (tmp_path / "wl.credential").read_text().strip() == link.credential
        assert link.heartbeat({})["grants"][0]["token_hash"] == h
        link.stop()
        assert connections_to(port) == set()  # stop() closed the socket
    finally:
        link.stop()


class OlderPool:
    """A stand-in for a pool older than the heartbeat socket: its worker routes, over HTTP only (the socket
    route answers tornado's 404), in a thread of its own."""

    def __init__(self):
        self.beats, self.requests = [], []
        ready = threading.Event()
        older = self

        class Workers(web.RequestHandler):
            def post(self):
                self.finish({"name": "wl", "credential": "older-credential"})

        class Heartbeat(web.RequestHandler):
            def post(self, name):
                older.beats.append(json.loads(self.request.body))
                self.finish({"grants": [], "revoked": {}})

        def serve():
            self.loop = ioloop.IOLoop(make_current=False)

            def listen():
                app = web.Application([("/api/workers", Workers), (r"/api/workers/([^/]+)/heartbeat", Heartbeat)],
                                      log_function=lambda h: older.requests.append(
                                          (h.request.method, h.request.path, h.get_status())))
                self.server = app.listen(0, "127.0.0.1")
                self.port = next(iter(self.server._sockets.values())).getsockname()[1]
                ready.set()

            self.loop.add_callback(listen)
            self.loop.start()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/"

    def close(self):
        self.loop.add_callback(self.server.stop)
        self.loop.add_callback(self.loop.stop)
        self.thread.join(10)


def test_pool_link_falls_back_to_http_against_an_older_pool(tmp_path, caplog):
    older = OlderPool()
    link = link_to(older.url, tmp_path)
    try:
        with caplog.at_level(logging.INFO, logger="gpulab.worker"):
            link.register()
            for i in range(3):
                assert link.heartbeat({"pid": i}) == {"grants": [], "revoked": {}}
        assert older.beats == [{"pid": 0}, {"pid": 1}, {"pid": 2}]  # every beat by POST
        upgrades = [r for r in older.requests if r[0] == "GET"]
        assert upgrades == [("GET", "/api/workers/wl/heartbeats", 404)]  # the socket tried once only
        said = [r.getMessage() for r in caplog.records if "serves no heartbeat socket" in r.getMessage()]
        assert len(said) == 1 and "404" in said[0], said
    finally:
        link.stop()
        older.close()


def test_pool_link_beats_on_through_a_restart_of_the_pool(tmp_path, monkeypatch):
    """The socket kept from the last beat died with the pool: the next beat opens another and counts."""
    first = Pool(str(tmp_path / "pool.sqlite"))
    link = link_to(first.worker_url, tmp_path)
    try:
        link.register()
        assert link.heartbeat({}) == {"grants": [], "revoked": {}}
        first.stop()
        # the pool again on the same database and the same worker listener (Pool takes its ports in this order)
        monkeypatch.setattr(hubtools, "free_port", iter([free_port(), port_of(first.worker_url)]).__next__)
        again = Pool(str(tmp_path / "pool.sqlite"))
        assert again.worker_url == first.worker_url
        alloc, h = allocate(again)
        assert [g["token_hash"] for g in link.heartbeat({})["grants"]] == [h]
        again.stop()
    finally:
        link.stop()
