"""A credential per worker: the shared secret only enrols a new name, each worker changes only its
own record and its own allocations' usage, bad bodies are refused with a sentence and stored
nowhere, and the worker API is not published through the hub's proxy.  Real pool processes, and
the module's real `gpulab up` (conftest.py) for the proxy."""
from __future__ import annotations

import ast
import json
import re

import pytest

from gpu_worker.client import token_hash
from hubtools import G, HUB_TOKEN, WORKER_TOKEN, Pool, _call, registration


def test_another_worker_or_the_shared_secret_cannot_take_a_name_over(pool):
    pool.register("w1")
    pool.register("w2")
    _, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G", "count": 1})
    victim = alloc["worker"]
    thief = "w2" if victim == "w1" else "w1"
    attack = registration(victim, "tcp://attacker.example:6666")
    status, body = pool.worker_call("POST", "api/workers", attack, WORKER_TOKEN)
    assert status == 403 and f"worker {victim} is already enrolled" in body["message"]
    status, body = pool.worker_call("POST", "api/workers", attack, worker=thief)
    assert status == 403 and f"belongs to worker {thief}, not {victim}" in body["message"]
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["address"] == "tcp://10.0.0.1:7001"
    # its own credential may move it
    moved = registration(victim, "tcp://10.0.0.9:7001")
    assert pool.worker_call("POST", "api/workers", moved, worker=victim)[0] == 200
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["address"] == "tcp://10.0.0.9:7001"
    # a GPU uuid of another worker cannot be claimed either
    status, body = pool.worker_call("POST", "api/workers", registration(thief, uuid=f"GPU-{victim}-0"),
                                    worker=thief)
    assert status == 409 and f"registered by worker {victim}" in body["message"]


def test_a_worker_touches_only_its_own_allocations(pool):
    pool.register("w1", node="n1")
    pool.register("w2", node="n2")
    _, a1 = pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G", "mode": "local", "node": "n1"})
    assert a1["worker"] == "w1", a1
    h1 = token_hash(a1["token"])
    status, reply = pool.worker_call("POST", "api/workers/w1/heartbeat", vgpus({h1: 3 * G}))
    assert status == 200 and [g["token_hash"] for g in reply["grants"]] == [h1]
    # w2 cannot beat for w1, nor does its own heartbeat reach w1's allocation or learn its grant
    status, body = pool.worker_call("POST", "api/workers/w1/heartbeat", vgpus({}), worker="w2")
    assert status == 403 and "belongs to worker w2" in body["message"]
    status, reply = pool.worker_call("POST", "api/workers/w2/heartbeat", vgpus({h1: 5}), worker="w2")
    assert status == 200 and reply == {"grants": [], "revoked": {}}
    status, body = pool.worker_call("POST", "api/workers/w1/heartbeat", vgpus({}), WORKER_TOKEN)
    assert status == 403 and "enrolment secret cannot act for worker w1" in body["message"]
    assert pool.call("GET", f"api/allocations/{a1['id']}")[1]["used_vram"] == 3 * G
    # nor learn the grants of w1's session tokens
    assert pool.worker_call("POST", "api/workers/w1/grants", {"token_hash": h1}, worker="w2")[0] == 403
    assert pool.worker_call("POST", "api/workers/w2/grants", {"token_hash": h1}, worker="w2")[0] == 404
    assert pool.worker_call("POST", "api/workers/w1/grants", {"token_hash": h1}, WORKER_TOKEN)[0] == 403


def test_an_admin_releases_a_lost_credential(pool):
    pool.register("w1")
    old = pool.credentials["w1"]
    assert pool.call("DELETE", "api/workers/w1/credential", token=WORKER_TOKEN)[0] == 403  # the hub's only
    assert pool.call("DELETE", "api/workers/w1/credential")[0] == 204
    status, body = pool.worker_call("POST", "api/workers", registration("w1"), WORKER_TOKEN)
    assert status == 200 and body["credential"] != old
    assert pool.worker_call("POST", "api/workers/w1/heartbeat", {}, old)[0] == 403
    assert pool.worker_call("POST", "api/workers/w1/heartbeat", {}, body["credential"])[0] == 200


BAD_REGISTRATIONS = [
    ({"memory": 2**62}, "memory (bytes) must be between 1 and 17592186044416"),
    ({"memory": -1}, "memory (bytes) must be between 1"),
    ({"memory": 0}, "memory (bytes) must be between 1"),
    ({"memory": 1e30}, "memory (bytes) must be an integer"),
    ({"memory": "16G"}, "memory (bytes) must be an integer"),
    ({"uuid": ""}, "uuid must be a non-empty string"),
    ({"capability": "nine"}, "capability must look like '9.0'"),
]


@pytest.mark.parametrize("gpu, sentence", BAD_REGISTRATIONS)
def test_bad_gpus_are_refused_with_a_sentence(pool, gpu, sentence):
    status, body = pool.worker_call("POST", "api/workers", registration(**gpu), WORKER_TOKEN)
    assert status == 400 and sentence in body["message"], body
    assert pool.call("GET", "api/gpus")[1] == []  # nothing stored, and the name is still free
    pool.register("w1")


@pytest.mark.parametrize("change, sentence", [
    ({"gpus": "abc"}, "gpus must be a list of GPUs"),
    ({"gpus": [1]}, "gpus[0] must be an object"),
    ({"gpus": [{"uuid": f"GPU-{i}", "memory": G} for i in range(65)]}, "at most 64 GPUs"),
    ({"gpus": [{"uuid": "GPU-x", "memory": G}, {"uuid": "GPU-x", "memory": G}]}, "GPU uuid GPU-x appears twice"),
    ({"address": "attacker.example:6666"}, "address must be tcp://host:port or unix:///path"),
    ({"address": "http://10.0.0.1:80"}, "address must be tcp://host:port"),
    ({"address": "tcp://10.0.0.1"}, "address must be tcp://host:port"),
    ({"address": "tcp://10.0.0.1:99999"}, "address must be tcp://host:port"),
    ({"name": "../w1"}, "name must be 1 to 128 letters"),
    ({"name": None}, "name must be 1 to 128 letters"),
    ({"backend": "quantum"}, "backend must be 'cuda' or 'emulated'"),
])
def test_bad_registrations_are_refused_with_a_sentence(pool, change, sentence):
    status, body = pool.worker_call("POST", "api/workers", {**registration(), **change}, WORKER_TOKEN)
    assert status == 400 and sentence in body["message"], body
    assert pool.call("GET", "api/gpus")[1] == []


def vgpus(used: dict, **entry) -> dict:
    """A heartbeat body reporting ``used`` bytes ({token hash: bytes}) of each vGPU, with ``entry``'s fields."""
    return {"vgpus": {h: {"id": "1", "used": n, "overhead": 0, **entry} for h, n in used.items()}}


@pytest.mark.parametrize("body, sentence", [
    (vgpus({"x": -5}), "vgpus[x].used must be between 0"),
    (vgpus({"x": "lots"}), "vgpus[x].used must be an integer"),
    (vgpus({"x": 1e30}), "must be an integer"),
    (vgpus({"x": True}), "must be an integer"),
    (vgpus({"x": 1}, overhead=-1), "vgpus[x].overhead must be between 0"),
    (vgpus({"x": 1}, processes={}), "vgpus[x].processes must be a list"),
    (vgpus({"x": 1}, processes=[{"pid": "a"}]), "vgpus[x].processes[0].pid must be an integer"),
    (vgpus({"x": 1}, last_calls=[{}] * 6), "vgpus[x].last_calls may have at most 5 entries"),
    (vgpus({"x": 1}, last_calls=[{"time": 1.0, "function": 7}]), "last_calls[0].function must be a string"),
    (vgpus({f"h{i}": 0 for i in range(4097)}), "vgpus may have at most 4096 entries"),
    (vgpus({"x": 0}, processes=[{}] * 4097), "processes may have at most 4096 entries"),
    ({"vgpus": []}, "vgpus must be a JSON object"),
    ({"vgpus": "abc"}, "vgpus must be a JSON object"),
    ({"gpus": {"GPU-w1-0": {"memory_total": 1, "utilization": 2}}}, "utilization must be a number from 0 to 1"),
    ({"gpus": {"GPU-w1-0": {"memory_total": 1, "temperature": float("nan")}}}, "temperature must be a number"),
    ({"gpus": {"GPU-w1-0": {"memory_total": 1, "emulated": "yes"}}}, "emulated must be true or false"),
    ({"gpus": {"GPU-w1-0": {"memory_used": 1}}}, "memory_total must be an integer"),
])
def test_bad_heartbeats_are_refused_with_a_sentence(pool, body, sentence):
    pool.register("w1")
    _, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G"})
    assert pool.worker_call("POST", "api/workers/w1/heartbeat", vgpus({token_hash(alloc["token"]): 2 * G}))[0] == 200
    status, answer = pool.worker_call("POST", "api/workers/w1/heartbeat", body)
    assert status == 400 and sentence in answer["message"], answer
    assert pool.call("GET", f"api/allocations/{alloc['id']}")[1]["used_vram"] == 2 * G  # untouched


def test_the_service_url_does_not_serve_the_worker_api(pool):
    pool.register("w1")
    for path in ("api/workers", "api/workers/w1/heartbeat", "api/workers/w1/grants"):
        for token in (WORKER_TOKEN, pool.credentials["w1"], HUB_TOKEN):
            status, body = pool.call("POST", path, {}, token)
            assert status == 404 and "worker API is not served here" in body["message"], (path, body)


def hub_settings(hub) -> dict:
    """The settings `gpulab up` wrote into the hub's config file."""
    text = (hub.state / "jupyterhub_config.py").read_text()
    return json.loads(ast.literal_eval(re.search(r"settings = json\.loads\((.*)\)\n", text).group(1)))


def test_gpulab_up_keeps_the_worker_api_off_its_proxy(hub):
    """The hub's public URL refuses worker routes; the pool's internal listener serves them, and the
    lab's worker enrolled there with a credential of its own."""
    secret = json.loads((hub.state / "secrets.json").read_text())["pool_worker_token"]
    for path in ("api/workers", "api/workers/local/heartbeat", "api/workers/local/grants"):
        status, body = _call("POST", f"{hub.url}/services/gpulab-pool/{path}", registration("local"), secret)
        assert status == 404 and "worker API is not served here" in body["message"], (path, body)
    internal = hub_settings(hub)["pool_worker_url"]
    assert internal.startswith("http://127.0.0.1:")
    credential = (hub.state / "worker-local.credential").read_text().strip()
    assert credential and credential != secret
    assert _call("POST", internal + "api/workers/local/heartbeat", {}, credential)[0] == 200
    status, body = _call("POST", internal + "api/workers", registration("local", "tcp://attacker.example:6666"),
                         secret)
    assert status == 403 and "already enrolled" in body["message"]
    assert hub.wait_for_worker()[0]["worker"] == "local"


def test_pool_link_enrols_once_keeps_its_credential_and_enrols_again_for_a_new_database(tmp_path):
    """The worker side: the credential goes to a private file, a restarted link uses it, a pool that
    lost its database is enrolled with again, and a name held by another credential is refused
    with the pool's sentence."""
    from gpu_worker.daemon.pool_link import PoolLink, PoolRefused

    gpus = registration("wl")["gpus"]

    def link(pool, name="wl", path=tmp_path / "wl.credential"):
        return PoolLink(pool.worker_url, WORKER_TOKEN, name, "tcp://10.0.0.2:7000", "n1", "emulated", gpus,
                        credential_file=str(path))

    pool = Pool(str(tmp_path / "one.sqlite"))
    try:
        link(pool).register()
        path = tmp_path / "wl.credential"
        credential = path.read_text().strip()
        assert path.stat().st_mode & 0o777 == 0o600 and credential != WORKER_TOKEN
        again = link(pool)
        again.register()  # a restarted daemon: the same credential, nothing new issued
        assert path.read_text().strip() == credential
        again.heartbeat({})
        with pytest.raises(PoolRefused, match="worker wl is already enrolled"):
            link(pool, path=tmp_path / "other.credential").register()
    finally:
        pool.stop()
    pool = Pool(str(tmp_path / "two.sqlite"))  # a new database: the credential means nothing there
    try:
        link(pool).register()
        assert (tmp_path / "wl.credential").read_text().strip() != credential
        assert [g["worker"] for g in pool.call("GET", "api/gpus")[1]] == ["wl"]
    finally:
        pool.stop()
