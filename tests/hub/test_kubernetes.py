"""GPUKubeSpawner's pod manifests, built without a cluster, and the deploy/kubernetes/ files."""
from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

yaml = pytest.importorskip("yaml")
ks = pytest.importorskip("kubespawner.spawner")
from kubernetes_asyncio.client import ApiClient  # noqa: E402
from traitlets.config import Config  # noqa: E402

from hub_spawner.spawner.kubernetes import HOSTNAME_LABEL, GPUKubeSpawner  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"

PROFILES = [
    {"display_name": "Remote vGPU", "slug": "remote", "default": True,
     "gpu": {"vram": "4G", "compute": 25, "mode": "remote"},
     "kubespawner_override": {"image": "lab/gpu:1"},
     "profile_options": {"vram": {"display_name": "GPU memory", "choices": {
         "2g": {"display_name": "2 GiB", "gpu": {"vram": "2G"}},
         "4g": {"display_name": "4 GiB", "default": True, "gpu": {"vram": "4G"},
                "kubespawner_override": {"mem_limit": "8G"}}}}}},
    {"display_name": "Local vGPU", "slug": "local", "gpu": {"vram": "8G", "compute": 50, "mode": "local"},
     "kubespawner_override": {"node_selector": {"pool": "gpu"}}},
    {"display_name": "CPU only", "slug": "cpu"},
]


def alloc(mode="remote", node="gpu-node-2", **kw) -> dict:
    """What the pool answers to POST api/allocations (plus the worker's node)."""
    return {"id": 17, "user": "alice", "worker": "gpu-node-2", "address": "tcp://10.1.2.3:7000",
            "token": "s3ssion-t0ken", "control_url": "http://10.1.2.3:7100", "gpus": ["GPU-0"], "vram": 4 << 30, "compute": 25, "count": 1,
            "mode": mode, "node": node, "status": "active", **kw}


@pytest.fixture
def make_spawner():
    """A GPUKubeSpawner without a cluster: no kube config, no API client, a fake user."""
    with mock.patch.object(ks, "load_config"), mock.patch.object(ks, "shared_client"):
        def make(**kw):
            user = SimpleNamespace(name="alice", id=7, url="/user/alice/", groups=[])
            return GPUKubeSpawner(_mock=True, user=user, pool_url="http://pool/", config=Config(),
                                  **{"gpu_profiles": PROFILES, **kw})
        yield make


def manifest(spawner) -> dict:
    """The pod as KubeSpawner would send it to the API server (camelCase JSON)."""
    async def build():
        async with ApiClient() as api:
            return api.sanitize_for_serialization(await spawner.get_pod_manifest())
    return asyncio.run(build())


def container_env(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def pins(pod: dict) -> list:
    """Everything in the pod spec that ties it to a node by host name."""
    spec = pod["spec"]
    found = [v for k, v in (spec.get("nodeSelector") or {}).items() if k == HOSTNAME_LABEL]
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    for term in required.get("nodeSelectorTerms", []):
        found += [e["values"] for e in term.get("matchExpressions", []) if e["key"] == HOSTNAME_LABEL]
    return found


def gpu_resources(pod: dict) -> dict:
    resources = pod["spec"]["containers"][0].get("resources") or {}
    return {k: v for part in resources.values() for k, v in (part or {}).items() if "gpu" in k}


def place(spawner, a: dict) -> dict:
    """What GPUSpawner.start() does with an allocation before KubeSpawner starts the pod."""
    spawner.gpu_allocation = a
    spawner.apply_gpu_placement(a)
    return manifest(spawner)


# ------------------------------------------------------------------ placement
def test_remote_vgpu_is_environment_only(make_spawner):
    pod = place(make_spawner(), alloc("remote"))
    env = container_env(pod)
    assert env["GPULAB_WORKER"] == "tcp://10.1.2.3:7000"
    assert env["GPULAB_TOKEN"] == "s3ssion-t0ken" and env["GPULAB_CONTROL_URL"] == "http://10.1.2.3:7100"
    assert env["GPULAB_VRAM"] == str(4 << 30) and env["GPULAB_COMPUTE"] == "25"
    assert env["GPULAB_ALLOCATION"] == "17"
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/opt/gpulab/lib"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert pins(pod) == []
    assert not pod["spec"].get("nodeSelector")
    assert not (pod["spec"].get("affinity") or {}).get("nodeAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    assert gpu_resources(pod) == {}
    assert not pod["spec"].get("runtimeClassName")


def test_local_vgpu_pins_the_pod_to_the_workers_node(make_spawner):
    pod = place(make_spawner(), alloc("local", node="gpu-node-2"))
    assert pod["spec"]["nodeSelector"] == {HOSTNAME_LABEL: "gpu-node-2"}
    assert container_env(pod)["GPULAB_WORKER"] == "tcp://10.1.2.3:7000"
    assert gpu_resources(pod) == {}


def test_local_pin_keeps_the_configured_node_selector(make_spawner):
    pod = place(make_spawner(node_selector={"pool": "users"}), alloc("local", node="gpu-node-9"))
    assert pod["spec"]["nodeSelector"] == {"pool": "users", HOSTNAME_LABEL: "gpu-node-9"}


def test_local_allocation_without_node_is_not_pinned(make_spawner):
    pod = place(make_spawner(), alloc("local", node=None))
    assert pins(pod) == []
    assert container_env(pod)["GPULAB_WORKER"] == "tcp://10.1.2.3:7000"


def test_cpu_only_pod_has_no_gpulab_environment(make_spawner):
    pod = manifest(make_spawner())
    env = container_env(pod)
    assert not [k for k in env if k.startswith("GPULAB_")]
    assert "LD_LIBRARY_PATH" not in env
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert pins(pod) == [] and gpu_resources(pod) == {}


def test_configured_paths_and_gpu_visibility(make_spawner):
    s = make_spawner(shim_path="/srv/shim", environment={"LD_LIBRARY_PATH": "/usr/local/cuda/lib64"},
                     nvidia_visible_devices="")
    env = container_env(place(s, alloc("remote")))
    assert env["LD_LIBRARY_PATH"] == "/srv/shim:/usr/local/cuda/lib64"
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    # a profile that hands out a whole GPU through the device plugin keeps its GPU visible
    s = make_spawner(extra_resource_limits={"nvidia.com/gpu": "1"})
    pod = manifest(s)
    assert "NVIDIA_VISIBLE_DEVICES" not in container_env(pod)
    assert gpu_resources(pod) == {"nvidia.com/gpu": "1"}


# ------------------------------------------------------------------ native mode
def native(**kw) -> dict:
    """A local vGPU the pool placed natively: the worker's Unix socket on the node, GPUs by uuid."""
    placed = {"native": True, "local_address": "unix:///run/gpulab/worker.sock", "backend": "cuda",
              "gpus": ["GPU-5a1c0e2d-0000-4000-8000-000000000001"]}
    return alloc("local", node="gpu-node-2", **{**placed, **kw})


def socket_mounts(pod: dict) -> tuple[list, list]:
    """The pod's volumes and the notebook container's mounts of the worker's socket directory."""
    volumes = [v for v in pod["spec"].get("volumes") or [] if v.get("hostPath")]
    mounts = [m for m in pod["spec"]["containers"][0].get("volumeMounts") or []
              if m["name"] in {v["name"] for v in volumes}]
    return volumes, mounts


def test_native_vgpu_gets_its_gpu_from_the_runtime_not_the_device_plugin(make_spawner):
    pod = place(make_spawner(), native())
    env = container_env(pod)
    assert env["GPULAB_WORKER"] == "unix:///run/gpulab/worker.sock" and env["GPULAB_MODE"] == "native"
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/opt/gpulab/lib/native"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-5a1c0e2d-0000-4000-8000-000000000001"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert pod["spec"]["runtimeClassName"] == "nvidia"
    assert gpu_resources(pod) == {}  # no nvidia.com/gpu: the scheduler does not count the GPU as taken
    assert pod["spec"]["nodeSelector"] == {HOSTNAME_LABEL: "gpu-node-2"}
    volumes, mounts = socket_mounts(pod)
    assert [v["hostPath"] for v in volumes] == [{"path": "/run/gpulab", "type": "Directory"}]
    assert [(m["mountPath"], m["readOnly"]) for m in mounts] == [("/run/gpulab", True)]


def test_native_settings_are_configurable(make_spawner, caplog):
    s = make_spawner(native_runtime_class="", worker_socket_dir="/var/run/gpu", native_shim_path="/srv/native",
                     real_libcuda="/usr/lib64/libcuda.so.1")
    pod = place(s, native(local_address="unix:///var/run/gpu/w.sock", gpus=["GPU-a", "GPU-b"], count=2))
    env = container_env(pod)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-a,GPU-b" and env["LD_LIBRARY_PATH"].split(":")[0] == "/srv/native"
    assert env["GPULAB_REAL_LIBCUDA"] == "/usr/lib64/libcuda.so.1" and "GPULAB_REAL_NVML" not in env
    assert not pod["spec"].get("runtimeClassName")  # the node's default runtime
    volumes, mounts = socket_mounts(pod)
    assert [v["hostPath"]["path"] for v in volumes] == ["/var/run/gpu"] and mounts[0]["mountPath"] == "/var/run/gpu"
    assert "not in c.GPUKubeSpawner.worker_socket_dir" not in caplog.text
    place(make_spawner(), native(local_address="unix:///tmp/w.sock"))  # a socket the mount does not hold
    assert "listens on /tmp/w.sock, not in c.GPUKubeSpawner.worker_socket_dir /run/gpulab" in caplog.text


def test_a_native_vgpu_of_an_emulated_worker_sees_no_device(make_spawner):
    env = container_env(place(make_spawner(), native(backend="emulated")))
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and "NVIDIA_DRIVER_CAPABILITIES" not in env
    assert env["GPULAB_WORKER"] == "unix:///run/gpulab/worker.sock"


def test_a_local_vgpu_that_is_not_native_stays_forwarded(make_spawner):
    pod = place(make_spawner(), alloc("local", native=False, local_address=""))
    env = container_env(pod)
    assert env["GPULAB_WORKER"] == "tcp://10.1.2.3:7000" and env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "GPULAB_MODE" not in env and not pod["spec"].get("runtimeClassName") and socket_mounts(pod) == ([], [])


# --------------------------------------------------------- start() end to end
def run_start(spawner, monkeypatch, user_options, allocation):
    """GPUSpawner.start() with the pool and the cluster replaced: KubeSpawner's start loads the
    user options and builds the pod manifest, as its _start() does before creating the pod."""
    requests = []

    async def allocate_gpu(profile, gpu):
        requests.append(gpu)
        return allocation

    async def kube_start(self):
        await self.load_user_options()
        async with ApiClient() as api:
            return api.sanitize_for_serialization(await self.get_pod_manifest())

    monkeypatch.setattr(spawner, "allocate_gpu", allocate_gpu)
    monkeypatch.setattr(spawner, "release_gpu", mock.AsyncMock())
    monkeypatch.setattr(ks.KubeSpawner, "start", kube_start)
    spawner.user_options = user_options
    return asyncio.run(spawner.start()), requests


def test_start_applies_gpu_profile_and_its_kubespawner_overrides(make_spawner, monkeypatch):
    s = make_spawner()
    pod, requests = run_start(s, monkeypatch, {"profile": "remote", "vram": "4g"}, alloc("remote"))
    assert requests == [{"vram": 4 << 30, "compute": 25, "mode": "remote"}]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "lab/gpu:1"  # profile override
    assert container["resources"]["limits"]["memory"] == 8 << 30  # option choice override
    assert container_env(pod)["GPULAB_TOKEN"] == "s3ssion-t0ken"
    assert pins(pod) == []


def test_start_local_profile_pin_survives_profile_node_selector(make_spawner, monkeypatch):
    s = make_spawner()
    pod, _ = run_start(s, monkeypatch, {"profile": "local"}, alloc("local", node="gpu-node-4"))
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu", HOSTNAME_LABEL: "gpu-node-4"}


def test_start_native_keeps_the_socket_when_a_profile_replaces_the_volumes(make_spawner, monkeypatch):
    profiles = [{"display_name": "Local vGPU", "slug": "local", "gpu": {"vram": "8G", "mode": "local"},
                 "kubespawner_override": {"volumes": [{"name": "data", "emptyDir": {}}],
                                          "volume_mounts": [{"name": "data", "mountPath": "/data"}]}}]
    s = make_spawner(gpu_profiles=profiles)
    pod, _ = run_start(s, monkeypatch, {"profile": "local"}, native())
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["data", "gpulab-worker-socket"]
    assert [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]] == ["/data", "/run/gpulab"]
    assert pod["spec"]["runtimeClassName"] == "nvidia" and gpu_resources(pod) == {}


def test_start_cpu_profile_allocates_nothing(make_spawner, monkeypatch):
    s = make_spawner()
    pod, requests = run_start(s, monkeypatch, {"profile": "cpu"}, alloc())
    assert requests == []
    assert not [k for k in container_env(pod) if k.startswith("GPULAB_")]
    assert container_env(pod)["JUPYTER_IMAGE"] != "lab/gpu:1"


def test_start_rejects_unlisted_choice_and_releases(make_spawner, monkeypatch):
    from jupyterhub.spawner import SpawnException

    s = make_spawner()
    with pytest.raises(SpawnException) as info:
        run_start(s, monkeypatch, {"profile": "remote", "vram--unlisted-choice": "64g"}, alloc())
    assert info.value.status_code == 400
    assert s.release_gpu.await_count == 2  # the stale-allocation check, then the failed start


def test_gpu_form_wins_over_kubespawner_profile_form(make_spawner):
    s = make_spawner()
    assert s.options_form == s.render_options_form
    assert s.options_from_form({"profile": ["local"], "profile-option-local--x": ["y"], "other": ["z"]}) == {
        "profile": "local", "x": "y"}
    assert s.run_options_from_form({"profile": ["cpu"]}) == {"profile": "cpu"}


# ------------------------------------------------------------ deploy/kubernetes
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict[str, dict]:
    """kind/name -> object, over every manifest file (not the Helm values)."""
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "z2jh-values.yaml":
            continue
        for doc in load_docs(path):
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: an object without apiVersion/kind"
            name = doc.get("metadata", {}).get("name", path.name)
            out[f"{doc['kind']}/{name}"] = doc
    return out


def test_every_deploy_file_parses():
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {"pool.yaml", "worker.yaml", "secret.yaml", "z2jh-values.yaml"}
    for f in files:
        assert load_docs(f), f"{f.name} is empty"


def test_worker_daemonset():
    ds = manifests()["DaemonSet/gpulab-worker"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["nodeSelector"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    (c,) = spec["containers"]
    cmd = c.get("command", []) + c.get("args", [])
    assert cmd[:2] == ["gpulab", "worker"]
    flags = dict(a.split("=", 1) for a in cmd[2:])
    assert flags["--node"] == "$(NODE_NAME)"
    assert flags["--advertise"].startswith("tcp://$(HOST_IP):")
    assert flags["--tcp"].startswith("$(HOST_IP):")
    assert flags["--pool-url"].startswith("http://gpulab-pool:8766/")  # the pool's worker listener
    # native vGPUs: the socket lies in the node's directory that GPUKubeSpawner mounts into their pods
    socket_dir = GPUKubeSpawner.worker_socket_dir.default_value
    assert flags["--unix-socket"].rsplit("/", 1)[0] == socket_dir
    (volume,) = [v for v in spec["volumes"] if v["hostPath"]["path"] == socket_dir]
    assert {"name": volume["name"], "mountPath": socket_dir} in c["volumeMounts"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["GPULAB_POOL_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "gpulab-secrets",
                                                                     "key": "pool-worker-token"}
    assert "nvidia.com/gpu" in c["resources"]["limits"] or spec.get("runtimeClassName") == "nvidia"


def test_pool_deployment_and_service():
    objs = manifests()
    dep = objs["Deployment/gpulab-pool"]
    # two replicas on PostgreSQL (SQLite, one replica, is the commented variant)
    assert dep["apiVersion"] == "apps/v1" and dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    cmd = c.get("command", []) + c.get("args", [])
    assert cmd[:2] == ["gpulab", "pool"] or cmd[:3] == ["python", "-m", "hub_spawner.pool"]
    assert "--GPUPool.bind_url=http://0.0.0.0:8765" in cmd
    env = {e["name"]: e for e in c["env"]}
    for name, key in [("GPULAB_POOL_API_TOKEN", "pool-api-token"), ("GPULAB_POOL_WORKER_TOKEN", "pool-worker-token"),
                      ("GPULAB_POOL_DB_URL", "db-url")]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "gpulab-secrets", "key": key}
    assert "--GPUPool.db_url=$(GPULAB_POOL_DB_URL)" in cmd
    assert not pod["spec"].get("volumes")  # no SQLite volume shared by two replicas
    # the pod watch: its namespace from the downward API, the service account of rbac.yaml
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "--GPUPool.kubernetes_namespace=$(POD_NAMESPACE)" in cmd
    assert f"ServiceAccount/{pod['spec']['serviceAccountName']}" in objs
    svc = objs["Service/gpulab-pool"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == 8765
    # the worker API on its own port, which the hub's proxy (routed to 8765) never reaches
    assert "--GPUPool.worker_bind_url=http://0.0.0.0:8766" in cmd
    assert {"name": "workers", "port": 8766, "targetPort": "workers"} in svc["spec"]["ports"]


def test_rbac_lets_the_pool_read_worker_pods_and_nodes_only():
    objs = manifests()
    account = objs["Deployment/gpulab-pool"]["spec"]["template"]["spec"]["serviceAccountName"]
    role, crole = objs["Role/gpulab-pool"], objs["ClusterRole/gpulab-pool-nodes"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert crole["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    for kind, ref in (("RoleBinding", role), ("ClusterRoleBinding", crole)):
        binding = objs[f"{kind}/{ref['metadata']['name']}"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": ref["kind"],
                                      "name": ref["metadata"]["name"]}
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["name"] == account
    assert objs["ClusterRoleBinding/gpulab-pool-nodes"]["subjects"][0]["namespace"]  # required cluster-wide
    assert "rbac.yaml" in load_docs(DEPLOY / "kustomization.yaml")[0]["resources"]
    # the workers register their pod's name, by which the watch finds them
    (c,) = objs["DaemonSet/gpulab-worker"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["GPULAB_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_secret_has_every_key_the_manifests_use():
    objs = manifests()
    secret = objs["Secret/gpulab-secrets"]
    used = {e["valueFrom"]["secretKeyRef"]["key"]
            for kind in ("DaemonSet/gpulab-worker", "Deployment/gpulab-pool")
            for c in objs[kind]["spec"]["template"]["spec"]["containers"]
            for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert used <= set(secret["stringData"])


def test_kustomization_lists_existing_files():
    kust = load_docs(DEPLOY / "kustomization.yaml")[0]
    assert all((DEPLOY / r).exists() for r in kust["resources"])


def test_z2jh_values_configure_the_hub(make_spawner, monkeypatch):
    values = load_docs(DEPLOY / "z2jh-values.yaml")[0]
    assert set(values["hub"]["extraEnv"]) >= {"GPULAB_POOL_API_TOKEN", "GPULAB_POOL_SERVICE_TOKEN"}
    monkeypatch.setenv("GPULAB_POOL_API_TOKEN", "api-secret")
    monkeypatch.setenv("GPULAB_POOL_SERVICE_TOKEN", "service-secret")
    c = Config()
    c.JupyterHub.services = []  # as z2jh's jupyterhub_config.py leaves it
    for name, code in values["hub"]["extraConfig"].items():
        exec(compile(code, f"extraConfig.{name}", "exec"), {"c": c})
    assert c.JupyterHub.spawner_class in ("gpulab-kube", "hub_spawner.spawner.kubernetes.GPUKubeSpawner")
    assert 'gpulab-kube = "hub_spawner.spawner.kubernetes:GPUKubeSpawner"' in (ROOT / "pyproject.toml").read_text()
    assert c.GPUSpawner.pool_token == "api-secret"
    assert c.GPUSpawner.pool_url.startswith("http://gpulab-pool:8765/services/gpulab-pool/")
    (svc,) = c.JupyterHub.services
    assert svc["name"] == "gpulab-pool" and svc["api_token"] == "service-secret"
    # the example profiles are valid: each resolves, with its default options
    s = make_spawner()
    for p in c.GPUSpawner.gpu_profiles:
        _, gpu = s.resolve([p], {})
        assert gpu is None or gpu["mode"] in ("local", "remote", "any")
