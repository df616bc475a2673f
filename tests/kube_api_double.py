"""KubeAPIDouble: a TEST DOUBLE of the Kubernetes API server, on 127.0.0.1, for the pool's pod watch.

It is not Kubernetes: it speaks only what the pod watch (hub_spawner/pool/kube.py) asks through the
official `kubernetes` client, the way the real API server answers it:

- ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...``: a PodList whose ``metadata.resourceVersion``
  is the double's current version (selectors ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, comma-joined);
- the same with ``watch=true`` (or ``1``): a chunked stream of newline-delimited watch events
  ``{"type": "ADDED|MODIFIED|DELETED|ERROR", "object": {...}}`` after ``resourceVersion``, open until
  ``timeoutSeconds``; a ``resourceVersion`` older than the double keeps history for (``expire``) is
  answered as the API server does, with an ERROR event of a Status with code 410 (Expired);
- ``GET /api/v1/nodes/{name}``: a Node with its labels.

Every request needs ``Authorization: Bearer <token>``; anything else is answered 401 (and with
``forbid_watch`` a watch is answered 403, as for a Role without the verb).  The tests drive
it with ``add_pod``, ``set_phase``, ``delete_pod``, ``set_node_labels`` and ``expire``; each change
is an event to every open watch.  ``write_kubeconfig`` writes a kubeconfig file for it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

log = logging.getLogger("gpulab.tests.kube_api_double")

WORKER_LABELS = {"app.kubernetes.io/name": "gpulab-worker", "app.kubernetes.io/part-of": "gpulab"}


def selects(selector: str, labels: dict) -> bool:
    """Whether a label selector (equality and existence terms) selects these labels."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class KubeAPIDouble:
    """The test double's state (pods, nodes, the event history) and its HTTP server."""

    def __init__(self, token: str = "kube-double-token"):
        self.token = token
        self.version = 1          # the last resourceVersion handed out
        self.oldest = 1           # a watch from a version below this one is answered 410
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> pod
        self.nodes: dict[str, dict] = {}
        self.history: list[tuple[int, str, dict]] = []  # (version, type, pod) of every change
        self.requests: list[str] = []  # "GET <path>?<query>" of each request, for the tests
        self.watches = 0          # watch streams started (a watch answered 410 is not one)
        self.closed = False
        self.forbid_watch = False  # answer watches 403 (a Role that allows list but not watch)
        self.cond = threading.Condition()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                double._serve(self)

            def log_message(self, fmt, *args):
                log.debug("KubeAPIDouble: " + fmt, *args)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="kube-api-double",
                                       daemon=True)
        self.thread.start()
        log.info("KubeAPIDouble (a test double of the Kubernetes API) at %s", self.url)

    # ------------------------------------------------------------------ driving it
    def _bump(self) -> str:
        self.version += 1
        return str(self.version)

    def _change(self, kind: str, pod: dict) -> None:
        """Record a change of ``pod`` (under the lock) and wake the watches."""
        pod["metadata"]["resourceVersion"] = self._bump()
        self.history.append((self.version, kind, json.loads(json.dumps(pod))))
        self.cond.notify_all()

    def add_pod(self, name: str, node: str, phase: str = "Running", namespace: str = "default",
                labels: dict | None = None) -> dict:
        """A pod of the worker DaemonSet (its labels by default) scheduled on ``node``."""
        pod = {"kind": "Pod", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                            "labels": dict(WORKER_LABELS if labels is None else labels),
                            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "spec": {"nodeName": node, "containers": [{"name": "worker", "image": "gpulab"}]},
               "status": {"phase": phase}}
        with self.cond:
            self.pods[namespace, name] = pod
            self._change("ADDED", pod)
        return pod

    def set_phase(self, name: str, phase: str, reason: str = "", message: str = "",
                  namespace: str = "default") -> None:
        with self.cond:
            pod = self.pods[namespace, name]
            pod["status"] = {"phase": phase, **({"reason": reason} if reason else {}),
                             **({"message": message} if message else {})}
            self._change("MODIFIED", pod)

    def delete_pod(self, name: str, graceful: bool = False, namespace: str = "default") -> None:
        """Delete a pod: at once (DELETED), or ``graceful``: first MODIFIED with a deletionTimestamp,
        as a pod that is terminating, then DELETED."""
        with self.cond:
            pod = self.pods[namespace, name]
            if graceful:
                pod["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                pod["metadata"]["deletionGracePeriodSeconds"] = 30
                self._change("MODIFIED", pod)
            del self.pods[namespace, name]
            self._change("DELETED", pod)

    def set_node_labels(self, node: str, labels: dict) -> None:
        with self.cond:
            self.nodes[node] = {"kind": "Node", "apiVersion": "v1",
                                "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node, **labels},
                                             "resourceVersion": self._bump()}}

    def expire(self) -> None:
        """Forget the history as an API server does after compaction: every watch from a version up to now
        is answered 410 Expired; the open watches end (their clients come back with an old version)."""
        with self.cond:
            self._bump()
            self.oldest = self.version
            self.history.clear()
            self.cond.notify_all()
        log.info("KubeAPIDouble: history expired; versions below %d are too old", self.oldest)

    def write_kubeconfig(self, path, namespace: str = "default", token: str | None = None) -> str:
        """A kubeconfig file (JSON is YAML) for this double, with a bearer token (its own by default)."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "kube-api-double",
                  "clusters": [{"name": "kube-api-double", "cluster": {"server": self.url}}],
                  "users": [{"name": "gpulab-pool", "user": {"token": self.token if token is None else token}}],
                  "contexts": [{"name": "kube-api-double", "context": {"cluster": "kube-api-double",
                                                                       "user": "gpulab-pool",
                                                                       "namespace": namespace}}]}
        with open(path, "w") as f:
            json.dump(config, f)
        return str(path)

    def wait_watching(self, n: int = 1, within: float = 5.0) -> None:
        """Until the ``n``-th watch stream has started (a client that listed and now watches: every change
        from here on reaches it)."""
        deadline = time.monotonic() + within
        with self.cond:
            while self.watches < n:
                left = deadline - time.monotonic()
                assert left > 0, f"KubeAPIDouble: {self.watches} watch(es) started, {n} expected"
                self.cond.wait(left)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ serving
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.requests.append(f"GET {h.path}")
        if h.headers.get("Authorization", "") != f"Bearer {self.token}":
            log.info("KubeAPIDouble: 401 for %s (no or wrong bearer token)", url.path)
            return self._reply(h, 401, status(401, "Unauthorized", "Unauthorized"))
        parts = url.path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 5 and parts[4] == "pods":
            if query.get("watch") in ("true", "1"):
                if self.forbid_watch:
                    return self._reply(h, 403, status(403, "Forbidden", 'pods is forbidden: User cannot watch '
                                                                        'resource "pods" (KubeAPIDouble)'))
                return self._watch(h, parts[3], query)
            return self._list(h, parts[3], query.get("labelSelector", ""))
        if parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4:
            with self.cond:
                node = self.nodes.get(parts[3])
            if node is None:
                return self._reply(h, 404, status(404, "NotFound", f'nodes "{parts[3]}" not found'))
            return self._reply(h, 200, node)
        return self._reply(h, 404, status(404, "NotFound", f"KubeAPIDouble does not serve {url.path}"))

    def _reply(self, h, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _list(self, h, namespace: str, selector: str) -> None:
        with self.cond:
            items = [json.loads(json.dumps(p)) for (ns, _), p in sorted(self.pods.items())
                     if ns == namespace and selects(selector, p["metadata"].get("labels", {}))]
            version = str(self.version)
        self._reply(h, 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": version},
                             "items": items})

    def _watch(self, h, namespace: str, query: dict) -> None:
        """Stream the events after ``resourceVersion`` until ``timeoutSeconds`` (or the double closes)."""
        selector = query.get("labelSelector", "")
        since = int(query.get("resourceVersion") or self.version)
        until = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(event: dict) -> None:
            data = json.dumps(event).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        try:
            with self.cond:
                expired = since < self.oldest
                self.watches += not expired
                self.cond.notify_all()
            if expired:
                log.info("KubeAPIDouble: watch from version %d: too old (410)", since)
                send({"type": "ERROR", "object": status(410, "Expired",
                                                        f"too old resource version: {since} ({self.oldest})")})
                return
            while True:
                with self.cond:
                    # an expired history ends the stream too: the client comes back with its old version
                    if self.closed or since < self.oldest or time.monotonic() >= until:
                        return
                    events = [(kind, pod) for v, kind, pod in self.history if v > since
                              and pod["metadata"]["namespace"] == namespace
                              and selects(selector, pod["metadata"].get("labels", {}))]
                    since = self.version
                    if not events:
                        self.cond.wait(min(until - time.monotonic(), 0.5))
                for kind, pod in events:  # written outside the lock: a slow client holds up no one
                    send({"type": kind, "object": pod})
        except OSError:  # the client went away
            h.close_connection = True
        finally:
            try:
                h.wfile.write(b"0\r\n\r\n")
                h.wfile.flush()
            except OSError:
                h.close_connection = True
