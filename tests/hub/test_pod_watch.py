"""The pool's pod watch (hub_spawner/pool/kube.py) against KubeAPIDouble, a test double of the Kubernetes
API server on loopback (tests/kube_api_double.py), through the official `kubernetes` client: a deleted,
terminating or failed worker pod is reported gone at once; an expired watch (410) lists again; a refused
credential is logged once and retried; stop() ends the watch at once.  Then the comparison of GPU
feature discovery's node labels with a worker's GPUs, and the whole path in a real pool process: a pod
deleted in the double marks its worker and its allocation lost well within the heartbeat timeout."""
from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

pytest.importorskip("kubernetes")

from kube_api_double import KubeAPIDouble  # noqa: E402
from hubtools import G, HUB_TOKEN, WORKER_TOKEN, Pool, registration  # noqa: E402

from hub_spawner.pool import kube  # noqa: E402

GPU_LABELS = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "1",
              "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.memory": "81920"}


class Seen:
    """What the watch told, from its thread: gone pods and node labels."""

    def __init__(self):
        self.gone: list[tuple[str, str, str]] = []
        self.nodes: list[tuple[str, dict]] = []
        self.cond = threading.Condition()

    def on_gone(self, pod, node, why):
        with self.cond:
            self.gone.append((pod, node, why))
            self.cond.notify_all()

    def on_node(self, node, labels):
        with self.cond:
            self.nodes.append((node, labels))
            self.cond.notify_all()

    def wait(self, what: str, n: int = 1, within: float = 2.0) -> list:
        deadline = time.monotonic() + within
        with self.cond:
            while len(getattr(self, what)) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(getattr(self, what))} {what} within {within} s, {n} expected"
                self.cond.wait(left)
            return list(getattr(self, what))


def wait_for(condition, failure, within: float = 5.0) -> None:
    """Until condition() holds; else fail with ``failure`` (a string, or a function that gives one then)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, failure() if callable(failure) else failure
        time.sleep(0.02)


@pytest.fixture
def double():
    d = KubeAPIDouble()
    d.set_node_labels("n1", GPU_LABELS)
    yield d
    d.close()


@pytest.fixture
def watching(double, tmp_path):
    """Start a PodWatch on the double (a kubeconfig with the given token) with a Seen; stopped after."""
    made = []

    def start(token=None, watch_timeout=30):
        seen = Seen()
        api = kube.api_client(double.write_kubeconfig(tmp_path / "kubeconfig", token=token))
        w = kube.PodWatch(api, "default", on_gone=seen.on_gone, on_node=seen.on_node, watch_timeout=watch_timeout)
        w.start()
        made.append(w)
        return w, seen

    yield start
    for w in made:
        w.stop()
        assert w.join(2), "the pod watch's thread did not end within 2 s of stop()"


def test_a_deleted_pod_is_gone_within_2_s(double, watching):
    double.add_pod("gpulab-worker-a", "n1")
    double.add_pod("jupyter-ann", "n1", labels={"component": "singleuser-server"})  # not a worker
    _, seen = watching()
    double.wait_watching()
    assert seen.wait("nodes") == [("n1", {"kubernetes.io/hostname": "n1", **GPU_LABELS})]
    start = time.monotonic()
    double.delete_pod("jupyter-ann")
    double.delete_pod("gpulab-worker-a")
    assert seen.wait("gone", within=2.0) == [("gpulab-worker-a", "n1",
                                              "its pod gpulab-worker-a on node n1 was deleted")]
    assert time.monotonic() - start < 2.0


def test_a_terminating_pod_is_gone_at_once_and_again_when_deleted(double, watching):
    """Gone when it starts terminating; said again at its deletion, as a heartbeat its worker sent while
    terminating may have brought it back in the pool meanwhile."""
    double.add_pod("gpulab-worker-a", "n1")
    _, seen = watching()
    double.wait_watching()
    double.delete_pod("gpulab-worker-a", graceful=True)  # MODIFIED with a deletionTimestamp, then DELETED
    assert seen.wait("gone")[0] == ("gpulab-worker-a", "n1", "its pod gpulab-worker-a on node n1 is being deleted")
    double.add_pod("gpulab-worker-b", "n1")
    double.delete_pod("gpulab-worker-b")  # a later event: the DELETED of a above has been handled
    assert seen.wait("gone", 3) == [
        ("gpulab-worker-a", "n1", "its pod gpulab-worker-a on node n1 is being deleted"),
        ("gpulab-worker-a", "n1", "its pod gpulab-worker-a on node n1 was deleted"),
        ("gpulab-worker-b", "n1", "its pod gpulab-worker-b on node n1 was deleted")]


def test_a_failed_pod_is_gone_with_its_reason(double, watching):
    _, seen = watching()
    double.wait_watching()
    double.add_pod("gpulab-worker-a", "n2", phase="Pending")
    double.set_phase("gpulab-worker-a", "Failed", reason="Evicted", message="The node was low on memory.")
    assert seen.wait("gone") == [("gpulab-worker-a", "n2", "its pod gpulab-worker-a on node n2 failed "
                                  "(Evicted; The node was low on memory.)")]
    assert seen.nodes == []  # never running: its node was not read


def test_an_expired_watch_lists_again_and_goes_on(double, watching, caplog):
    caplog.set_level(logging.INFO, "gpulab.pool")
    double.add_pod("gpulab-worker-a", "n1")
    double.add_pod("gpulab-worker-b", "n1")
    _, seen = watching()
    double.wait_watching()
    lists = sum("watch=" not in r and "/pods" in r for r in double.requests)
    double.expire()  # the open watch ends; the watch from its version is answered 410 Expired
    double.delete_pod("gpulab-worker-a")  # seen in the new list (missing) or in the new watch
    assert seen.wait("gone") == [("gpulab-worker-a", "n1", "its pod gpulab-worker-a on node n1 was deleted")]
    wait_for(lambda: "too old resource version" in caplog.text, "the watch did not meet the 410")
    assert sum("watch=" not in r and "/pods" in r for r in double.requests) == lists + 1
    double.wait_watching(2)
    double.set_phase("gpulab-worker-b", "Failed")
    assert [g[0] for g in seen.wait("gone", 2)] == ["gpulab-worker-a", "gpulab-worker-b"]
    assert "cannot use the Kubernetes API" not in caplog.text  # an expiry is no failure


def test_a_watch_the_server_ends_goes_on_from_its_version(double, watching):
    double.add_pod("gpulab-worker-a", "n1")
    _, seen = watching(watch_timeout=1)
    double.wait_watching()
    time.sleep(1.5)  # the double ended the first watch after timeoutSeconds=1
    double.delete_pod("gpulab-worker-a")
    assert seen.wait("gone")[0][0] == "gpulab-worker-a"
    watches = [r for r in double.requests if "watch=true" in r]
    version = watches[0].split("resourceVersion=")[1].split("&")[0]
    assert len(watches) >= 2 and f"resourceVersion={version}&" in watches[1]  # from where it ended: no new list
    assert sum("watch=" not in r and "/pods" in r for r in double.requests) == 1


def test_a_refused_token_is_logged_once_and_retried(double, watching, caplog):
    caplog.set_level(logging.DEBUG, "gpulab.pool")
    double.add_pod("gpulab-worker-a", "n1")
    w, seen = watching(token="not-the-token")
    time.sleep(2.0)  # tries at about 0, 0.5 and 1.5 s
    refused = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(refused) == 1 and "401" in refused[0].getMessage(), caplog.text
    assert sum("/pods" in r for r in double.requests) >= 2  # it kept trying
    double.token = "not-the-token"  # the credential works now (e.g. the RoleBinding was created)
    double.wait_watching(within=5)
    wait_for(lambda: "reaches the Kubernetes API" in caplog.text, "the recovery was not logged")
    double.delete_pod("gpulab-worker-a")
    assert seen.wait("gone")[0][0] == "gpulab-worker-a"


def test_a_forbidden_watch_after_a_good_list_is_logged_once(double, watching, caplog):
    """A list that works is no recovery while the watch is refused: one error line, retries backing off."""
    caplog.set_level(logging.DEBUG, "gpulab.pool")
    double.forbid_watch = True
    double.add_pod("gpulab-worker-a", "n1")
    watching()
    time.sleep(2.0)  # tries at about 0, 0.5 and 1.5 s
    refused = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(refused) == 1 and "403" in refused[0].getMessage(), caplog.text
    assert "reaches the Kubernetes API" not in caplog.text
    assert 2 <= sum("watch=true" in r for r in double.requests) <= 4  # backing off, not spinning


def test_stop_ends_the_watch_at_once_and_silences_it(double, watching):
    double.add_pod("gpulab-worker-a", "n1")
    w, seen = watching()
    double.wait_watching()
    start = time.monotonic()
    w.stop()
    assert w.join(1.0) and time.monotonic() - start < 1.0
    double.delete_pod("gpulab-worker-a")
    time.sleep(0.3)
    assert seen.gone == []
    w.start()  # leading again: a new list, where the pod is missing but was never seen by this run
    double.wait_watching(2)
    double.add_pod("gpulab-worker-b", "n1")
    double.delete_pod("gpulab-worker-b")
    assert [g[0] for g in seen.wait("gone")] == ["gpulab-worker-b"]


def test_node_labels_are_read_for_running_pods(double, watching):
    double.set_node_labels("n2", {"nvidia.com/gpu.count": "2"})
    double.add_pod("gpulab-worker-a", "n1")
    double.add_pod("gpulab-worker-b", "n2", phase="Pending")
    _, seen = watching()
    double.wait_watching()
    assert [n for n, _ in seen.wait("nodes")] == ["n1"]
    double.set_phase("gpulab-worker-b", "Running")
    assert seen.wait("nodes", 2)[1] == ("n2", {"kubernetes.io/hostname": "n2", "nvidia.com/gpu.count": "2"})
    assert sum("/nodes/" in r for r in double.requests) == 2  # read once each


def test_an_unknown_node_is_logged_and_the_watch_goes_on(double, watching, caplog):
    caplog.set_level(logging.WARNING, "gpulab.pool")
    double.add_pod("gpulab-worker-x", "nowhere")
    _, seen = watching()
    double.wait_watching()
    assert "cannot read node nowhere" in caplog.text and "404" in caplog.text
    double.delete_pod("gpulab-worker-x")
    assert seen.wait("gone")[0][:2] == ("gpulab-worker-x", "nowhere")


def test_api_client_needs_a_cluster_or_a_kubeconfig(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match="no Kubernetes API"):
        kube.api_client("")


# ------------------------------------------------------------------------------ compare_node
def gpus(n=1, model="NVIDIA A100-SXM4-80GB", mib=81920):
    return [{"model": model, "memory": mib << 20} for _ in range(n)]


def test_compare_node_agrees():
    assert kube.compare_node(GPU_LABELS, gpus()) == []
    assert kube.compare_node({}, gpus(3, "anything", 1)) == []  # no GPU feature discovery: nothing to say
    shared = {**GPU_LABELS, "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-SHARED"}  # time-slicing
    assert kube.compare_node(shared, gpus()) == []
    assert kube.compare_node(GPU_LABELS, gpus(mib=81920 - 300)) == []  # within 2%


def test_compare_node_says_what_differs():
    labels = {**GPU_LABELS, "nvidia.com/gpu.count": "8"}
    assert kube.compare_node(labels, gpus(1)) == [
        "GPU feature discovery counts 8 GPU(s) on the node (nvidia.com/gpu.count), the worker registered 1"]
    assert kube.compare_node(GPU_LABELS, gpus(model="Tesla T4", mib=15360)) == [
        "GPU feature discovery names the node's GPUs NVIDIA-A100-SXM4-80GB (nvidia.com/gpu.product), the worker "
        "registered 'Tesla T4'",
        "GPU feature discovery gives the node's GPUs 81920 MiB each (nvidia.com/gpu.memory), the worker "
        "registered 15360 MiB"]
    assert kube.compare_node({"nvidia.com/gpu.count": "two"}, gpus()) == [
        "the node's label nvidia.com/gpu.count is 'two', not a number of GPUs"]


# ------------------------------------------------------------------------------ the whole path
def test_a_deleted_pod_marks_its_worker_lost_in_the_pool(double, tmp_path):
    """A real pool process watches the double; its worker registered from pod gpulab-worker-a on n1 with an
    active allocation; the pod is deleted: worker and allocation are lost within 2 s, not after the
    heartbeat timeout (60 s)."""
    config = double.write_kubeconfig(tmp_path / "kubeconfig", namespace="gpulab")
    double.add_pod("gpulab-worker-a", "n1", namespace="gpulab")
    pool = Pool(str(tmp_path / "pool.sqlite"), timeout=60.0,
                extra=[f"--GPUPool.kubeconfig={config}", "--GPUPool.kubernetes_namespace=gpulab",
                       "--GPUPool.worker_pod_selector=app.kubernetes.io/name=gpulab-worker"])
    try:
        body = {**registration("w1", gpus=1, memory=16 * G, node="n1"), "pod": "gpulab-worker-a"}
        status, answer = pool.worker_call("POST", "api/workers", body, WORKER_TOKEN)
        assert status == 200, answer
        status, alloc = pool.call("POST", "api/allocations", {"user": "ann", "vram": "4G", "compute": 25},
                                  HUB_TOKEN)
        assert status == 201, alloc
        double.wait_watching(within=10)  # the pool leads and watches
        start = time.monotonic()
        double.delete_pod("gpulab-worker-a", namespace="gpulab")
        while True:
            status, allocs = pool.call("GET", f"api/allocations/{alloc['id']}")
            if allocs["status"] == "lost":
                break
            assert time.monotonic() - start < 2.0, f"still {allocs['status']} 2 s after the pod was deleted"
            time.sleep(0.05)
        assert "gpulab-worker-a" in allocs["message"] and "deleted" in allocs["message"], allocs["message"]
        assert {g["worker_status"] for g in pool.call("GET", "api/gpus")[1]} == {"gone"}
    finally:
        pool.stop()


def test_the_pool_logs_what_node_labels_say_against_its_worker(double, tmp_path):
    """A worker registered with one 16 GiB "test GPU" on n1, whose labels say two A100s of 80 GiB: the pool
    that starts watching (here: started again, leading) logs the three differences, naming worker and node."""
    db = str(tmp_path / "pool.sqlite")
    first = Pool(db, timeout=60.0)  # no Kubernetes: the worker registers
    status, answer = first.worker_call("POST", "api/workers", {**registration("w1", node="n1"), "pod": "gpulab-worker-a"},
                                       WORKER_TOKEN)
    assert status == 200, answer
    first.stop(signal.SIGTERM)  # gives the leader lease up
    double.set_node_labels("n1", {**GPU_LABELS, "nvidia.com/gpu.count": "2"})
    double.add_pod("gpulab-worker-a", "n1")
    pool = Pool(db, timeout=60.0, extra=[f"--GPUPool.kubeconfig={double.write_kubeconfig(tmp_path / 'kc')}",
                                         "--GPUPool.kubernetes_namespace=default"])
    try:
        wait_for(lambda: pool.output().count("worker w1 on node n1: GPU feature discovery") == 3,
                 lambda: "the pool did not log three differences:\n" + pool.output(), within=10)
        out = pool.output()
        assert "counts 2 GPU(s) on the node (nvidia.com/gpu.count), the worker registered 1" in out
        assert "NVIDIA-A100-SXM4-80GB (nvidia.com/gpu.product), the worker registered 'test GPU'" in out
        assert "81920 MiB each (nvidia.com/gpu.memory), the worker registered 16384 MiB" in out
    finally:
        pool.stop()


def test_a_new_worker_pods_registration_is_compared_with_its_node(double, tmp_path):
    """The usual order in a cluster: the pool watches, a worker pod starts running, then its worker registers."""
    double.set_node_labels("n1", {**GPU_LABELS, "nvidia.com/gpu.count": "2"})
    pool = Pool(str(tmp_path / "pool.sqlite"), timeout=60.0,
                extra=[f"--GPUPool.kubeconfig={double.write_kubeconfig(tmp_path / 'kc')}",
                       "--GPUPool.kubernetes_namespace=default"])
    try:
        double.wait_watching(within=10)
        double.add_pod("gpulab-worker-a", "n1")
        time.sleep(0.5)  # the watch has read the node
        status, answer = pool.worker_call("POST", "api/workers",
                                          {**registration("w1", node="n1"), "pod": "gpulab-worker-a"}, WORKER_TOKEN)
        assert status == 200, answer
        wait_for(lambda: "worker w1 on node n1: GPU feature discovery counts 2 GPU(s)" in pool.output(),
                 lambda: "no difference logged:\n" + pool.output(), within=3)
    finally:
        pool.stop()


def test_only_the_leader_watches_and_the_next_leader_takes_the_watch_over(double, tmp_path):
    """Two replicas on one database: one watch at a time; the leader killed, the other leads within the lease
    period and its watch marks a deleted pod's worker lost."""
    db = str(tmp_path / "pool.sqlite")
    double.add_pod("gpulab-worker-a", "n1")
    extra = [f"--GPUPool.kubeconfig={double.write_kubeconfig(tmp_path / 'kc')}",
             "--GPUPool.kubernetes_namespace=default", "--GPUPool.lease_period=6"]
    pools = [Pool(db, timeout=60.0, extra=extra + [f"--GPUPool.replica_name=r{i}"]) for i in (1, 2)]
    try:
        double.wait_watching(1, within=10)
        time.sleep(3.5)  # two renewals of the lease: the other replica never watches meanwhile
        assert double.watches == 1
        leader = next(p for p in pools if p.call("GET", "api/health")[1]["leader"])
        other = next(p for p in pools if p is not leader)
        status, answer = other.worker_call("POST", "api/workers",
                                           {**registration("w1", node="n1"), "pod": "gpulab-worker-a"}, WORKER_TOKEN)
        assert status == 200, answer
        leader.stop()  # SIGKILL: its lease runs out
        double.wait_watching(2, within=2 + 5)
        start = time.monotonic()
        double.delete_pod("gpulab-worker-a")
        wait_for(lambda: other.call("GET", "api/gpus")[1][0]["worker_status"] == "gone",
                 "the new leader's watch did not mark w1 lost", within=2)
        assert time.monotonic() - start < 2
        wait_for(lambda: other.call("GET", "api/health")[1]["leader"], "the survivor does not say it leads", within=2)
    finally:
        for p in pools:
            if p.proc.poll() is None:
                p.stop()
