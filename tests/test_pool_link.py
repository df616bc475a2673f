"""The worker's pool link keeps beating whatever the pool answers: a malformed heartbeat reply, or a
bug on the worker's side, is logged and the next heartbeat goes as due, since a link thread that
died would leave the pool to mark the worker lost.  A small in-process pool answers scripted
replies; the registry is the real VGPURegistry of one emulated GPU."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_worker.daemon.pool_link import PoolLink
from gpu_worker.daemon.vgpus import VGPURegistry

GPU = {"uuid": "GPU-a", "index": 0, "model": "test", "memory": 1 << 30, "capability": "9.0", "emulated": True}
GOOD = {"token_hash": "h-good", "id": "7", "gpus": ["GPU-a"], "vram": 64 << 20, "compute": 10}


class FakePool:
    """Enrols any worker; answers heartbeats with `replies` in turn (the last one for ever)."""

    def __init__(self, replies: list):
        self.replies, self.beats, self.registrations = replies, [], []
        pool = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                if self.path == "/api/workers":
                    pool.registrations.append(body)
                    answer = {"credential": "cred"}
                else:
                    pool.beats.append(body)
                    answer = pool.replies[min(len(pool.beats), len(pool.replies)) - 1]
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def wait_beats(self, n: int, within: float = 10) -> None:
        deadline = time.monotonic() + within
        while len(self.beats) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.beats) >= n, f"{len(self.beats)} heartbeat(s) arrived, {n} expected"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def link_to(tmp_path):
    made = []

    def link(replies, registry, pod="", unix_socket=""):
        pool = FakePool(replies)
        pl = PoolLink(pool.url, "enrol", "w1", "tcp://127.0.0.1:7000", "n1", "emulated", [GPU], interval=0.1,
                      credential_file=str(tmp_path / f"w1{pod}.credential"), registry=registry, pod=pod,
                      unix_socket=unix_socket)
        pl.start()
        made.append((pool, pl))
        return pool, pl

    yield link
    for pool, pl in made:
        pl.stop()
        pool.close()


def test_a_malformed_reply_is_skipped_and_the_beats_go_on(link_to, caplog):
    caplog.set_level(logging.ERROR, "gpulab.worker")
    registry = VGPURegistry([GPU], "emulated")
    # a grant that is not an object made the registry raise, which ended the link's thread
    bad = {"grants": ["not a grant", GOOD], "revoked": {"h-gone": 5, "h-old": "released"}}
    pool, link = link_to([bad], registry)
    pool.wait_beats(3)
    assert registry.get("7")["state"] == "active"  # the well-formed grant was taken
    assert "h-gone" not in registry.revoked and registry.revoked["h-old"][0] == "released"
    assert "1 grant(s) that are not objects" in caplog.text
    assert "1 revocation(s) whose reason is not a string" in caplog.text
    with open(link.grants_file) as f:  # what is kept for a restart is well-formed
        assert json.load(f) == {"grants": [GOOD], "revoked": {"h-old": "released"}}


def test_an_unforeseen_failure_is_logged_and_the_beats_go_on(link_to, caplog):
    caplog.set_level(logging.ERROR, "gpulab.worker")
    registry = VGPURegistry([GPU], "emulated")
    real, failures = registry.vgpus, []

    def vgpus():
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("a bug while reading the figures")
        return real()

    registry.vgpus = vgpus
    pool, _ = link_to([{"grants": [GOOD], "revoked": {}}], registry)
    pool.wait_beats(2)
    assert len(failures) == 2 and "a bug while reading the figures" in caplog.text
    assert registry.get("7")["state"] == "active"


def test_saved_grants_of_the_wrong_shape_are_skipped(tmp_path, caplog):
    caplog.set_level(logging.ERROR, "gpulab.worker")
    (tmp_path / "worker-w1.grants").write_text(json.dumps({"grants": [3, GOOD], "revoked": {"h": None}}))
    registry = VGPURegistry([GPU], "emulated")
    PoolLink("http://127.0.0.1:9", "enrol", "w1", "tcp://127.0.0.1:7000", "n1", "emulated", [GPU],
             credential_file=str(tmp_path / "w1.credential"), registry=registry)
    assert registry.get("7")["state"] == "active" and "h" not in registry.revoked
    assert "grant(s) that are not objects" in caplog.text


@pytest.mark.parametrize("pod", ["gpulab-worker-x7k2p", ""])
def test_the_registration_names_the_pod_only_in_one(link_to, pod):
    """The pool's pod watch finds a worker by its pod's name ($GPULAB_POD_NAME in worker.yaml); outside a
    pod the registration has no such field."""
    pool, _ = link_to([{"grants": [], "revoked": {}}], VGPURegistry([GPU], "emulated"), pod=pod)
    pool.wait_beats(1)
    assert pool.registrations[0].get("pod", None) == (pod or None)
    assert pool.registrations[0]["node"] == "n1"


@pytest.mark.parametrize("unix_socket", ["/run/gpulab/worker.sock", "worker.sock", ""])
def test_the_registration_names_the_unix_socket_absolute_only_with_one(link_to, unix_socket, monkeypatch, tmp_path):
    """The pool hands a local vGPU's server the worker's Unix socket (native mode): a relative --unix-socket is
    sent as the absolute path the worker bound; a worker with none sends no such field."""
    monkeypatch.chdir(tmp_path)
    pool, _ = link_to([{"grants": [], "revoked": {}}], VGPURegistry([GPU], "emulated"), unix_socket=unix_socket)
    pool.wait_beats(1)
    expected = {"/run/gpulab/worker.sock": "/run/gpulab/worker.sock", "worker.sock": str(tmp_path / "worker.sock"),
                "": None}[unix_socket]
    assert pool.registrations[0].get("unix_socket", None) == expected
