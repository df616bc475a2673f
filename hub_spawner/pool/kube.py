"""The pool's view of Kubernetes: watch the worker DaemonSet's pods and read their GPU nodes' facts.

A worker whose pod is deleted, fails or starts terminating is gone at once; without this the pool
would learn it only when the heartbeat timeout passes, placing students on it meanwhile.
``PodWatch`` lists the worker pods, then watches them from the list's resourceVersion, in a daemon
thread, through the official ``kubernetes`` client (an optional dependency: import this module only
when the pool runs with Kubernetes, and at start-up rather than on the event loop: the client takes
about 0.3 s to import; CoreV1Api's module, most of a second more, is imported by the watch thread).  It tells the pool through two callbacks, called from that
thread (the pool hands them to its event loop):

- ``on_gone(pod_name, node_name, why)``: the worker of this pod is gone; ``why`` is a sentence such
  as "its pod gpulab-worker-abc on node n1 was deleted".  Called once per pod, and once more when a pod
  already said to be terminating or failed is deleted.
- ``on_node(node_name, labels)``: a worker pod runs on this node, whose labels (NVIDIA GPU feature
  discovery's ``nvidia.com/gpu.*`` among them) are these.  Called when a pod is first seen running
  on the node and again when the node's labels change.

``compare_node`` holds those labels against the GPUs a worker registered.

Only one pool replica watches (the leader): ``stop()`` ends the watch at once when it stops leading.
The API server's errors are logged once per outage, with back-off between tries; a watch that the
server expired (410 Gone) starts again from a new list.  RBAC: ``deploy/kubernetes/rbac.yaml``.
"""
from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
import time
from typing import Callable

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("gpulab.pool")

WORKER_SELECTOR = "app.kubernetes.io/name=gpulab-worker"
WATCH_TIMEOUT = 300      # seconds the API server keeps one watch open; then a new one, from where it ended
CONNECT_TIMEOUT = 10.0   # seconds to reach the API server
NODE_TTL = 60.0          # seconds a node's labels are taken as read before a running pod reads them again
BACKOFF = (0.5, 30.0)    # first and longest wait after a failure; doubled each time in between
MEMORY_TOLERANCE = 0.02  # relative difference of a GPU's memory that is not a mismatch (rounding, ECC)

# GPU feature discovery's labels (https://github.com/NVIDIA/k8s-device-plugin, gpu-feature-discovery)
GPU_COUNT, GPU_PRODUCT, GPU_MEMORY = "nvidia.com/gpu.count", "nvidia.com/gpu.product", "nvidia.com/gpu.memory"


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod (the kubelet sets this variable in every pod)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def api_client(kubeconfig: str = "") -> client.ApiClient:
    """A client of the API server: from the kubeconfig file at this path when one is given, else the
    pod's service account (in-cluster config).  ValueError when neither is there."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig, persist_config=False)
    if in_cluster():
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    raise ValueError("no Kubernetes API: not in a pod ($KUBERNETES_SERVICE_HOST is not set) and no kubeconfig "
                     "file given")


class Expired(Exception):
    """The API server no longer has the history a watch asked for (410 Gone): list again."""


class PodWatch:
    """Watch the worker pods in ``namespace`` selected by ``selector`` (see the module's docstring for
    ``on_gone`` and ``on_node``)."""

    def __init__(self, api: client.ApiClient, namespace: str, selector: str = WORKER_SELECTOR, *,
                 on_gone: Callable[[str, str, str], None], on_node: Callable[[str, dict], None] | None = None,
                 watch_timeout: int = WATCH_TIMEOUT):
        self.api = api
        self.core: client.CoreV1Api | None = None  # made in the thread: its module takes most of a second to import
        self.server = api.configuration.host
        self.namespace, self.selector = namespace, selector
        self.on_gone, self.on_node = on_gone, on_node
        self.watch_timeout = watch_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._resp = None                     # the open watch stream (a urllib3 response)
        self._thread: threading.Thread | None = None
        self._pods: dict[str, str] = {}       # pod -> node of the pods seen and not gone
        self._gone: set[str] = set()          # pods whose on_gone was called, until their DELETED
        self._nodes: dict[str, tuple[float, dict]] = {}  # node -> (when read, labels reported)
        self._failing = ""                    # what failed, while the API server cannot be used
        self._delay, self._expiries = BACKOFF[0], 0  # the next back-off; expiries since the last event

    # ---------------------------------------------------------------- thread
    def start(self) -> None:
        """Watch in a daemon thread (again after a stop: from a new list)."""
        self.stop()
        if not self.join(1.0):  # stop() shuts the stream at once; a list or node read may take longer
            log.warning("the previous pod watch thread has not ended yet; it calls back no more")
        self._stop = threading.Event()
        self._pods, self._gone, self._nodes = {}, set(), {}
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="gpulab-pod-watch",
                                        daemon=True)
        self._thread.start()
        log.info("watching the worker pods (%s) in namespace %s at %s", self.selector, self.namespace, self.server)

    def stop(self) -> None:
        """End the watch now; no callback is called after this returns (one under way may finish)."""
        with self._lock:
            self._stop.set()
            if self._resp is not None:
                shut(self._resp)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end after stop(); whether it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _run(self, stop: threading.Event) -> None:
        if self.core is None:
            self.core = client.CoreV1Api(self.api)
        while not stop.is_set():
            try:
                version = self._list(stop)
                while not stop.is_set():
                    version = self._watch_from(version, stop)
            except Expired as exc:
                self._expiries += 1
                log.info("the pod watch expired (%s): listing the worker pods again", exc)
                if self._expiries > 1:  # expired again with no event between: do not spin on it
                    stop.wait(self._backoff())
            except Exception as exc:  # the API server's errors and a bug alike: never end the thread
                if stop.is_set():
                    break
                self._fail(exc)
                stop.wait(self._backoff())

    def _backoff(self) -> float:
        """Seconds to wait before the next try: doubled at each failure in a row, from BACKOFF[0] to BACKOFF[1]."""
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, BACKOFF[1])
        return delay

    def _fail(self, exc: Exception) -> None:
        """Log the first failure of an outage (the rest at debug level: no line per retry)."""
        what = describe(exc)
        if not self._failing:
            if isinstance(exc, ApiException):
                log.error("the pod watch cannot use the Kubernetes API at %s: %s (retrying; workers are still "
                          "marked lost by the heartbeat timeout)", self.server, what)
            else:
                log.error("the pod watch failed: %s (retrying)", what, exc_info=not isinstance(exc, OSError))
        else:
            log.debug("the pod watch failed again: %s", what)
        self._failing = what

    def _recover(self) -> None:
        """The API server answered a watch: the outage, if any, is over."""
        if self._failing:
            log.info("the pod watch reaches the Kubernetes API at %s again", self.server)
            self._failing = ""
        self._delay, self._expiries = BACKOFF[0], 0

    # ---------------------------------------------------------------- list and watch
    def _list(self, stop: threading.Event) -> str:
        """LIST the worker pods: each is an event (a pod known before and missing now was deleted meanwhile);
        the list's resourceVersion."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                             _request_timeout=(CONNECT_TIMEOUT, 60))
        seen = set()
        for pod in pods.items:
            if stop.is_set():
                break
            seen.add(pod.metadata.name)
            self._event("ADDED", pod, stop)
        for name in sorted(set(self._pods) - seen):  # deleted while this replica was not watching
            self._gone_now(name, self._pods.pop(name), "was deleted", stop)
            self._gone.discard(name)
        return pods.metadata.resource_version

    def _watch_from(self, version: str, stop: threading.Event) -> str:
        """One WATCH from ``version`` until the server ends it; the last version seen.  Expired on 410."""
        def open_stream(*args, **kwargs):
            """The watch request; its stream is where stop() finds it (shut at once if stop() came first)."""
            resp = self.core.list_namespaced_pod(*args, **kwargs)
            if 200 <= resp.status < 300:
                self._recover()  # the API server accepted the watch: any outage is over
            with self._lock:
                self._resp = resp
                if stop.is_set():
                    shut(resp)
            return resp

        w = watch.Watch(return_type=client.V1Pod)
        try:
            for event in w.stream(open_stream, self.namespace, label_selector=self.selector,
                                  resource_version=version, timeout_seconds=self.watch_timeout,
                                  _request_timeout=(CONNECT_TIMEOUT, self.watch_timeout + 30)):
                if stop.is_set():
                    break
                kind, pod = event["type"], event["object"]
                if kind == "ERROR":
                    raise watch_error(event["raw_object"])
                if kind == "BOOKMARK":
                    version = w.resource_version or version
                    continue
                version = pod.metadata.resource_version or version
                self._event(kind, pod, stop)
        except ApiException as exc:
            if exc.status == 410:
                raise Expired(exc.reason) from None
            raise
        finally:
            with self._lock:
                self._resp = None
        return version

    # ---------------------------------------------------------------- one pod
    def _event(self, kind: str, pod, stop: threading.Event) -> None:
        name, node = pod.metadata.name, (pod.spec.node_name if pod.spec else None) or ""
        why = gone_reason(kind, pod)
        if why:
            if kind == "DELETED":
                # said again though its terminating or failure was said: a heartbeat the worker sent while
                # its pod was terminating may have brought it back meanwhile
                self._gone.discard(name)
            self._gone_now(name, node, why, stop)
            if kind == "DELETED":
                self._gone.discard(name)
                self._pods.pop(name, None)
            return
        if node:
            self._pods[name] = node
        if self.on_node is not None and node and pod.status is not None and pod.status.phase == "Running":
            self._node_facts(node, stop)

    def _gone_now(self, name: str, node: str, why: str, stop: threading.Event) -> None:
        """Tell the pool once that this pod's worker is gone."""
        if name in self._gone or stop.is_set():
            return
        self._gone.add(name)
        log.warning("worker pod %s on node %s %s", name, node or "(none)", why)
        self.on_gone(name, node, f"its pod {name} on node {node or '(none)'} {why}")

    def _node_facts(self, node: str, stop: threading.Event) -> None:
        """Read the node (at most once per NODE_TTL) and report its labels when they are new."""
        read_at, labels = self._nodes.get(node, (float("-inf"), None))
        if time.monotonic() - read_at < NODE_TTL:
            return
        try:
            fresh = self.core.read_node(node, _request_timeout=(CONNECT_TIMEOUT, 30)).metadata.labels or {}
        except ApiException as exc:
            # e.g. 403 without the ClusterRole: the watch goes on without node facts
            self._nodes[node] = (time.monotonic(), labels)
            log.warning("cannot read node %s for its GPU facts: %s", node, describe(exc))
            return
        self._nodes[node] = (time.monotonic(), fresh)
        if fresh != labels and not stop.is_set():
            self.on_node(node, dict(fresh))


def gone_reason(kind: str, pod) -> str:
    """The end of the phrase saying why this pod's worker is gone ("was deleted"), or "" if it is not."""
    if kind == "DELETED":
        return "was deleted"
    if pod.metadata.deletion_timestamp is not None:
        return "is being deleted"
    phase = pod.status.phase if pod.status is not None else None
    if phase in ("Failed", "Succeeded"):
        detail = "; ".join(x for x in (pod.status.reason, pod.status.message) if x)
        return ("failed" if phase == "Failed" else "ended") + (f" ({detail})" if detail else "")
    return ""


def shut(resp) -> None:
    """Shut a stream's socket from another thread: the read blocked on it ends at once (closing it
    would not wake that read)."""
    try:
        sock = resp.connection.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass  # already closed


def watch_error(obj: dict) -> Exception:
    """An ERROR event's Status as the exception it stands for."""
    obj = obj if isinstance(obj, dict) else {}
    code = obj.get("code") or 500
    reason = f"{obj.get('reason', 'Error')}: {obj.get('message', '')}"
    return Expired(reason) if code == 410 else ApiException(status=code, reason=reason)


def describe(exc: Exception) -> str:
    """An error of the API server in a short phrase (ApiException's own text holds headers and body)."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}".strip() if exc.status else str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ node facts
def _product(name: str) -> str:
    """A GPU model as GPU feature discovery writes it in a label: spaces as dashes, case ignored."""
    return re.sub(r"[\s_]+", "-", name.strip()).lower()


def compare_node(labels: dict, gpus: list[dict]) -> list[str]:
    """What GPU feature discovery's labels of a node say against the GPUs its worker registered
    (dicts with "model" and "memory" in bytes), as sentences; empty when they agree.  A label that is
    not there is no mismatch (the node has no GPU feature discovery, or an older one).

    - ``nvidia.com/gpu.count``: the node's GPUs, all of which the worker should share out (a worker
      given fewer by the device plugin leaves the rest idle);
    - ``nvidia.com/gpu.product``: the model, spaces as dashes; a suffix (``-SHARED`` under time-slicing,
      ``-MIG-...``) is allowed;
    - ``nvidia.com/gpu.memory``: each GPU's memory in MiB, within MEMORY_TOLERANCE.
    """
    out = []
    count = labels.get(GPU_COUNT)
    if count is not None:
        if not str(count).isdigit():
            out.append(f"the node's label {GPU_COUNT} is {count!r}, not a number of GPUs")
        elif int(count) != len(gpus):
            out.append(f"GPU feature discovery counts {int(count)} GPU(s) on the node ({GPU_COUNT}), "
                       f"the worker registered {len(gpus)}")
    product = labels.get(GPU_PRODUCT)
    if product:
        want = _product(str(product))
        other = sorted({g.get("model", "") for g in gpus
                        if not (want == _product(g.get("model", "")) or want.startswith(_product(g.get("model", ""))
                                                                                        + "-"))})
        if other:
            out.append(f"GPU feature discovery names the node's GPUs {product} ({GPU_PRODUCT}), the worker "
                       f"registered {', '.join(repr(m) for m in other)}")
    memory = labels.get(GPU_MEMORY)
    if memory is not None:
        if not str(memory).isdigit():
            out.append(f"the node's label {GPU_MEMORY} is {memory!r}, not a number of MiB")
        else:
            mib = int(memory)
            other = sorted({int(g.get("memory", 0)) >> 20 for g in gpus
                            if abs((int(g.get("memory", 0)) >> 20) - mib) > mib * MEMORY_TOLERANCE})
            if other:
                out.append(f"GPU feature discovery gives the node's GPUs {mib} MiB each ({GPU_MEMORY}), the "
                           f"worker registered {', '.join(f'{m} MiB' for m in other)}")
    return out
