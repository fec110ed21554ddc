"""The kustomize overlays render, pass Kubernetes schema validation, and hold
together: ports, probes, shard endpoints, secrets, security and policies.

No cluster here, so everything is checked on the rendered YAML."""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from deploy_helpers import (
    CRD_KINDS,
    JOBS,
    LONG_RUNNING_KINDS,
    OVERLAYS,
    REPO,
    SECTIONS,
    SERVICES,
    all_containers,
    clipsearch_containers,
    effective_settings,
    find,
    label_match,
    literal_env,
    mounted_file,
    one,
    render,
    settings_file,
    workloads,
)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed; pip install -e '.[test]'"
)
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, latest_version  # noqa: E402

TARGETS = [f"overlays/{o}" for o in OVERLAYS] + ["base"] + [f"jobs/{j}" for j in JOBS]
# Oldest Kubernetes the manifests are written for: native gRPC probes (1.27),
# preStop sleep (1.30), backoffLimitPerIndex (1.33 GA).
MIN_K8S = (1, 33)


def validation_version() -> str:
    version = latest_version()
    assert tuple(int(p) for p in version.split(".")[:2]) >= MIN_K8S, (
        f"kubernetes-validate only knows Kubernetes <= {version}; upgrade it to validate against a current release"
    )
    return version


def overlay_with_jobs(overlay: str) -> list[dict]:
    """An overlay plus the Jobs that are applied next to it."""
    objects = render(f"overlays/{overlay}")
    for job in JOBS:
        objects = objects + render(f"jobs/{job}")
    return objects


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("target", TARGETS)
def test_renders_with_kubectl_kustomize(target):
    objects = render(target)
    assert objects, f"{target} rendered nothing"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_piece(overlay):
    objects = render(f"overlays/{overlay}")
    one(objects, "Namespace", "clipsearch")
    one(objects, "Deployment", "encoder")
    one(objects, "HorizontalPodAutoscaler", "encoder")
    one(objects, "StatefulSet", "index")
    one(objects, "PodDisruptionBudget", "index")
    one(objects, "Deployment", "gateway")
    for name in ("encoder", "index", "gateway"):
        one(objects, "Service", name)
    assert find(objects, "ConfigMap"), "no settings ConfigMap"
    one(objects, "Secret", "clipsearch-s3")
    one(objects, "Secret", "clipsearch-api-keys")
    assert len(find(objects, "NetworkPolicy")) >= 4
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "clipsearch", f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_monitoring_objects_present(target):
    objects = render(target)
    one(objects, "ServiceMonitor", "clipsearch")
    one(objects, "PrometheusRule", "clipsearch")


# --------------------------------------------------------- schema validation


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_objects_pass_kubernetes_validate(target):
    """Strict schema validation (unknown fields are errors) against the newest
    Kubernetes that kubernetes-validate knows. ServiceMonitor/PrometheusRule
    are CRDs it has no schema for: they are skipped here on purpose and
    checked by the structure tests below."""
    version = validation_version()
    errors, skipped = [], []
    for obj in render(target):
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            skipped.append(ident)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except ValidationError as exc:
            errors.append(f"{ident}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(f"{ident}: {exc.message}")
    assert not errors, f"schema errors against Kubernetes {version}:\n" + "\n".join(errors)


def test_validation_is_not_vacuous():
    """The validator really rejects a broken object of the kinds we ship."""
    version = validation_version()
    deployment = copy.deepcopy(one(render("overlays/cpu"), "Deployment", "gateway"))
    kubernetes_validate.validate(deployment, version, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)


# ------------------------------------------------- containers: resources etc.


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target):
    missing = []
    for obj, spec in workloads(render(target)):
        for role, container in all_containers(spec):
            resources = container.get("resources") or {}
            for part, key in (("requests", "cpu"), ("requests", "memory"), ("limits", "cpu"), ("limits", "memory")):
                if key not in (resources.get(part) or {}):
                    missing.append(f"{obj['kind']}/{obj['metadata']['name']} {role} {container['name']}: {part}.{key}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("target", TARGETS)
def test_long_running_containers_have_all_probes(target):
    missing = []
    for obj, spec in workloads(render(target)):
        if obj["kind"] not in LONG_RUNNING_KINDS:
            continue
        for container in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in container:
                    missing.append(f"{obj['metadata']['name']}/{container['name']}: {probe}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned(target):
    for obj, spec in workloads(render(target)):
        for _, container in all_containers(spec):
            image = container["image"]
            name_part = image.split("@")[0].rsplit("/", 1)[-1]
            assert "@sha256:" in image or ":" in name_part, f"{image}: no tag or digest"
            tag = name_part.partition(":")[2]
            assert tag != "latest", f"{image}: 'latest' is not a version"


# ------------------------------------------------------- ports and probes


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_services_listen_where_probes_and_ports_point(target):
    """The port a service binds (flags > env > settings file) is the probes'
    port and the containerPort named grpc; the metrics port is the one named
    metrics; and the host is 0.0.0.0 so kubelet and peers reach it."""
    objects = render(target)
    seen = set()
    for obj, spec, container, section in clipsearch_containers(objects):
        seen.add(section)
        settings = effective_settings(spec, container, objects, section)
        where = f"{obj['metadata']['name']}/{container['name']}"
        assert settings.get("host") == "0.0.0.0", f"{where}: binds {settings.get('host')!r}, unreachable from kubelet"
        assert "port" in settings, f"{where}: no --port, CLIPSEARCH_PORT or port setting"
        port = int(settings["port"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("grpc") == port, f"{where}: containerPort grpc={ports.get('grpc')} but listens on {port}"
        assert int(settings["metrics_port"]) == ports.get("metrics"), f"{where}: metrics port mismatch"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_probe = container[probe].get("grpc")
            assert grpc_probe, f"{where}: {probe} is not a native gRPC probe"
            assert grpc_probe["port"] == port, f"{where}: {probe} probes {grpc_probe['port']}, listens on {port}"
            # "" is the server's overall health, NOT_SERVING until loaded.
            assert grpc_probe.get("service", "") == ""
    assert seen == set(SERVICES), f"{target}: services found {seen}"


@pytest.mark.parametrize("target", TARGETS)
def test_other_probes_point_at_declared_ports(target):
    for obj, spec in workloads(render(target)):
        for container in spec.get("containers", []):
            declared = {p["containerPort"] for p in container.get("ports", [])} | {
                p.get("name") for p in container.get("ports", [])
            }
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                handler = container.get(probe) or {}
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    if kind in handler:
                        assert handler[kind]["port"] in declared, (
                            f"{obj['metadata']['name']}/{container['name']} {probe} port {handler[kind]['port']} "
                            f"is not a declared containerPort {sorted(map(str, declared))}"
                        )


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_services_select_pods_and_target_real_ports(target):
    objects = render(target)
    pods = [(obj, tpl_spec, obj["spec"]["template"]["metadata"].get("labels", {})) for obj, tpl_spec in workloads(objects)
            if obj["kind"] != "CronJob"]
    for service in find(objects, "Service"):
        name = service["metadata"]["name"]
        selected = [(o, s) for o, s, labels in pods if label_match({"matchLabels": service["spec"]["selector"]}, labels)]
        assert selected, f"Service {name} selects no pods"
        for obj, spec in selected:
            container_ports = {}
            for container in spec["containers"]:
                for p in container.get("ports", []):
                    container_ports[p.get("name")] = p["containerPort"]
                    container_ports[p["containerPort"]] = p["containerPort"]
            for port in service["spec"]["ports"]:
                target_port = port.get("targetPort", port["port"])
                assert target_port in container_ports, f"Service {name} targets {target_port}, not on {obj['metadata']['name']}"
                if name in SERVICES:
                    # Clients dial <service>:<port>, so the numbers must agree.
                    assert container_ports[target_port] == port["port"], f"Service {name}: {port}"


@pytest.mark.parametrize("target", TARGETS)
def test_dependent_env_vars_are_defined_first(target):
    """$(VAR) in env values and args only expands for vars defined earlier."""
    for obj, spec in workloads(render(target)):
        for _, container in all_containers(spec):
            defined = set()
            for env in container.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")):
                    assert ref in defined, f"{container['name']}: {env['name']} uses $({ref}) before it is defined"
                defined.add(env["name"])
            for arg in container.get("args", []) + container.get("command", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert ref in defined, f"{container['name']}: argument uses undefined $({ref})"


# ----------------------------------------------------- gateway <-> shards


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_gateway_index_endpoints_match_statefulset(target):
    objects = render(target)
    statefulset = one(objects, "StatefulSet", "index")
    replicas = statefulset["spec"].get("replicas", 1)
    headless = one(objects, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"].get("clusterIP") == "None", "the index Service must be headless for per-pod DNS"
    gateway = one(objects, "Deployment", "gateway")
    spec = gateway["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "gateway")
    gateway_settings = effective_settings(spec, container, objects, "gateway")

    index_container = next(c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "index")
    index_port = int(effective_settings(statefulset["spec"]["template"]["spec"], index_container, objects, "index")["port"])
    endpoints = [e.strip() for e in str(gateway_settings["index"]).split(",") if e.strip()]
    expected = [f"index-{i}.{headless['metadata']['name']}:{index_port}" for i in range(replicas)]
    assert endpoints == expected, (
        f"{target}: gateway index endpoints {endpoints} do not match the StatefulSet's {replicas} pods {expected}"
    )

    encoder_host, _, encoder_port = str(gateway_settings["encoder"]).rpartition(":")
    encoder_service = one(objects, "Service", encoder_host)
    assert int(encoder_port) in [p["port"] for p in encoder_service["spec"]["ports"]]


# ---------------------------------------------------------------- security


@pytest.mark.parametrize("target", TARGETS)
def test_no_container_runs_as_root(target):
    for obj, spec in workloads(render(target)):
        pod_ctx = spec.get("securityContext") or {}
        for role, container in all_containers(spec):
            ctx = {**pod_ctx, **(container.get("securityContext") or {})}
            where = f"{obj['kind']}/{obj['metadata']['name']} {role} {container['name']}"
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true"
            assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] != 0, f"{where}: runAsUser {ctx.get('runAsUser')}"
            assert ctx.get("runAsGroup", 1) != 0, f"{where}: runs with group 0"
            assert not ctx.get("privileged"), f"{where}: privileged"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_meet_restricted_pod_security(target):
    """The namespace enforces the restricted Pod Security Standard, so a pod
    that misses one of these would be refused at admission."""
    for obj, spec in workloads(render(target)):
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), obj["metadata"]["name"]
        assert not any("hostPath" in v for v in spec.get("volumes", [])), obj["metadata"]["name"]
        pod_ctx = spec.get("securityContext") or {}
        for role, container in all_containers(spec):
            ctx = container.get("securityContext") or {}
            where = f"{obj['metadata']['name']} {role} {container['name']}"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
            assert not ctx.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
            seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
            assert seccomp in ("RuntimeDefault", "Localhost"), f"{where}: seccomp {seccomp}"
            assert not any(p.get("hostPort") for p in container.get("ports", [])), f"{where}: hostPort"
    for namespace in find(render(target), "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _secret_keys(obj: dict) -> set[str]:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {}) | set(obj.get("binaryData") or {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_secrets_and_configmaps_exist(overlay):
    """Every Secret/ConfigMap (and key) a pod uses is in the render: the
    overlay's own pods and the Jobs applied next to it."""
    objects = overlay_with_jobs(overlay)
    existing = {(o["kind"], o["metadata"]["name"]): _secret_keys(o) for o in objects if o["kind"] in ("Secret", "ConfigMap")}
    problems = []

    def need(kind, name, key=None, optional=False, where=""):
        if optional:
            return
        if (kind, name) not in existing:
            problems.append(f"{where}: {kind} {name} does not exist")
        elif key is not None and key not in existing[(kind, name)]:
            problems.append(f"{where}: {kind} {name} has no key {key}")

    for obj, spec in workloads(objects):
        for role, container in all_containers(spec):
            where = f"{obj['metadata']['name']}/{container['name']}"
            for env in container.get("env", []):
                source = env.get("valueFrom") or {}
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    need("Secret", ref["name"], ref["key"], ref.get("optional", False), where)
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    need("ConfigMap", ref["name"], ref["key"], ref.get("optional", False), where)
            for env_from in container.get("envFrom", []):
                if "secretRef" in env_from:
                    need("Secret", env_from["secretRef"]["name"], None, env_from["secretRef"].get("optional", False), where)
                if "configMapRef" in env_from:
                    ref = env_from["configMapRef"]
                    need("ConfigMap", ref["name"], None, ref.get("optional", False), where)
        for volume in spec.get("volumes", []):
            where = f"{obj['metadata']['name']} volume {volume['name']}"
            if "secret" in volume:
                src = volume["secret"]
                for item in src.get("items") or [None]:
                    need("Secret", src["secretName"], item and item["key"], src.get("optional", False), where)
            if "configMap" in volume:
                src = volume["configMap"]
                for item in src.get("items") or [None]:
                    need("ConfigMap", src["name"], item and item["key"], src.get("optional", False), where)
        for pull in spec.get("imagePullSecrets", []):
            need("Secret", pull["name"], where=f"{obj['metadata']['name']} imagePullSecrets")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_volume_mounts_and_claims_resolve(target):
    objects = render(target)
    claims = {o["metadata"]["name"] for o in find(objects, "PersistentVolumeClaim")}
    for obj, spec in workloads(objects):
        volumes = {v["name"] for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])} if obj["kind"] == "StatefulSet" else set()
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
        for _, container in all_containers(spec):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes | templates, f"{container['name']}: mount {mount['name']} has no volume"


def test_placeholder_secrets_are_marked_as_placeholders():
    """The shipped credentials are obviously fake, so nobody mistakes them."""
    objects = render("base")
    for name in ("clipsearch-s3", "clipsearch-api-keys", "clipsearch-gateway"):
        secret = one(objects, "Secret", name)
        values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        secret_values = [v for k, v in values.items() if k != "AWS_REGION"]
        assert secret_values and all("CHANGE-ME" in v for v in secret_values), f"{name}: {sorted(values)}"
    keys = one(objects, "Secret", "clipsearch-api-keys")["data"]
    entries = yaml.safe_load(base64.b64decode(keys["api-keys"]).decode())["keys"]
    client_key = base64.b64decode(keys["client-key"]).decode().strip()
    assert hashlib.sha256(client_key.encode()).hexdigest() in {e["sha256"] for e in entries}, \
        "client-key must be a gateway key"
    assert client_key not in base64.b64decode(keys["api-keys"]).decode(), "the keys file holds hashes only"


# ------------------------------------------------------------ workload shape


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_encoder_requests_a_gpu(target):
    spec = one(render(target), "Deployment", "encoder")["spec"]["template"]["spec"]
    encoder = next(c for c in spec["containers"] if c["name"] == "encoder")
    assert encoder["resources"]["limits"].get("nvidia.com/gpu") == "1"
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))


@pytest.mark.parametrize("overlay", ["cpu", "minio"])
def test_cpu_overlay_needs_no_gpu_and_uses_demo_model(overlay):
    objects = render(f"overlays/{overlay}")
    for obj, spec in workloads(objects):
        for _, container in all_containers(spec):
            for part in ("requests", "limits"):
                assert "nvidia.com/gpu" not in (container["resources"].get(part) or {}), container["name"]
    spec = one(objects, "Deployment", "encoder")["spec"]["template"]["spec"]
    encoder = next(c for c in spec["containers"] if c["name"] == "encoder")
    settings = effective_settings(spec, encoder, objects, "encoder")
    assert settings["model"] == "/app/models/demo"
    assert settings.get("device", "auto") in ("cpu", "auto")
    claim = one(objects, "PersistentVolumeClaim", "encoder-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], "kind's local-path storage only does RWO"


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_encoder_model_cache_is_shared_and_prefilled(target):
    objects = render(target)
    spec = one(objects, "Deployment", "encoder")["spec"]["template"]["spec"]
    encoder = next(c for c in spec["containers"] if c["name"] == "encoder")
    cache_dir = effective_settings(spec, encoder, objects, "encoder")["model_cache_dir"]
    volumes = {v["name"]: v for v in spec["volumes"]}

    def cache_volume(container):
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == cache_dir]
        assert mounts, f"{container['name']} does not mount the model cache at {cache_dir}"
        return volumes[mounts[0]["name"]]

    volume = cache_volume(encoder)
    assert "persistentVolumeClaim" in volume, "the model cache must be a PVC shared by the encoder pods"
    init = [c for c in spec.get("initContainers", []) if c["name"] == "fetch-model"]
    assert init, "no init container fills the model cache"
    assert cache_volume(init[0]) is volume
    assert "fetch_model.py" in " ".join(init[0]["command"])
    # The init step reads the same settings as the encoder.
    assert settings_file(spec, init[0], objects)[1] == settings_file(spec, encoder, objects)[1]
    hpa = one(objects, "HorizontalPodAutoscaler", "encoder")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "encoder"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_index_statefulset_is_durable(target):
    objects = render(target)
    statefulset = one(objects, "StatefulSet", "index")
    spec = statefulset["spec"]["template"]["spec"]
    index = next(c for c in spec["containers"] if c["name"] == "index")
    settings = effective_settings(spec, index, objects, "index")
    # Each pod has its own volume at the data dir.
    templates = {t["metadata"]["name"]: t for t in statefulset["spec"]["volumeClaimTemplates"]}
    def volume_of(path):
        mounts = [m for m in index["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        return max(mounts, key=lambda m: len(m["mountPath"]))["name"] if mounts else None

    data_volume = volume_of(settings["data_dir"])
    assert data_volume in templates, f"data_dir {settings['data_dir']} is not on the per-pod volume"
    assert templates[data_volume]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Backups copy the whole store to a temporary file first: on the volume.
    assert volume_of(literal_env(index).get("TMPDIR", "/tmp")) == data_volume, "TMPDIR is not on the shard volume"
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # Backups: one S3 prefix per shard, credentials from the Secret.
    backup = settings.get("backup_s3_uri", "")
    assert backup.startswith("s3://") and "$(POD_NAME)" in backup, backup
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {e["name"] for e in index["env"]}
    # Enough grace to drain, snapshot and upload after SIGTERM.
    grace = float(settings.get("grace_seconds", 10))
    assert spec["terminationGracePeriodSeconds"] >= grace + 30, "no time left for the final snapshot"
    assert int(settings["snapshot_interval_seconds"]) > 0
    # Disruption budget and anti-affinity.
    pdb = one(objects, "PodDisruptionBudget", "index")
    assert label_match(pdb["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    anti = spec["affinity"]["podAntiAffinity"]
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
        t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    ]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and label_match(t["labelSelector"], statefulset["spec"]["template"]["metadata"]["labels"]) for t in terms)


def test_gateway_reads_api_keys_from_the_secret():
    objects = render("overlays/gpu")
    spec = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    gateway = next(c for c in spec["containers"] if c["name"] == "gateway")
    settings = effective_settings(spec, gateway, objects, "gateway")
    path = settings["api_keys_file"]
    content = mounted_file(spec, gateway, path, objects)
    assert content is not None and content.strip(), f"{path} is not mounted from a Secret"
    access = pytest.importorskip("gateway.access")
    keys = access.parse_keys(content, access.SourceAllowList(settings["import_sources"]))
    assert keys, "the keys file the gateway reads holds no valid key"
    volume = next(v for v in spec["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "clipsearch-api-keys"


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_disruption_budgets_and_autoscalers_target_something(target):
    objects = render(target)
    workload_labels = [(o, o["spec"]["template"]["metadata"].get("labels", {})) for o, _ in workloads(objects) if o["kind"] in LONG_RUNNING_KINDS]
    for pdb in find(objects, "PodDisruptionBudget"):
        assert any(label_match(pdb["spec"]["selector"], labels) for _, labels in workload_labels), pdb["metadata"]["name"]
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target_obj = one(objects, ref["kind"], ref["name"])
        assert "replicas" not in target_obj["spec"], f"{ref['name']}: the HPA owns replicas; apply would reset them"


def test_minio_overlay_points_every_service_at_minio():
    objects = render("overlays/minio")
    one(objects, "StatefulSet", "minio")
    service = one(objects, "Service", "minio")
    one(objects, "Job", "minio-create-bucket")
    assert 9000 in [p["port"] for p in service["spec"]["ports"]]
    for obj, spec, container, section in clipsearch_containers(objects):
        env = literal_env(container)
        assert env.get("AWS_ENDPOINT_URL_S3") == "http://minio:9000", container["name"]
        if section in ("encoder", "index", "gateway"):
            assert effective_settings(spec, container, objects, section)["s3_endpoint_url"] == "http://minio:9000"
    # Buckets named in the settings are the ones the Job creates.
    job = one(objects, "Job", "minio-create-bucket")
    buckets = set(literal_env(job["spec"]["template"]["spec"]["containers"][0])["BUCKETS"].split(","))
    for obj, spec, container, section in clipsearch_containers(objects):
        settings = effective_settings(spec, container, objects, section)
        for key in ("storage", "backup_s3_uri"):
            if str(settings.get(key, "")).startswith("s3://"):
                assert settings[key][5:].split("/")[0] in buckets, f"{section}.{key} bucket is not created"
    # MinIO's own credentials are the clients' credentials.
    minio = one(objects, "StatefulSet", "minio")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["env"] if "valueFrom" in e}
    assert refs["MINIO_ROOT_USER"] == {"name": "clipsearch-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["MINIO_ROOT_PASSWORD"] == {"name": "clipsearch-s3", "key": "AWS_SECRET_ACCESS_KEY"}


# ------------------------------------------------------------ network policy


def _policies_for(objects, labels):
    return [p for p in find(objects, "NetworkPolicy") if label_match(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]


def _rule_ports(rule, container_ports):
    if not rule.get("ports"):
        return set(container_ports.values())
    return {container_ports.get(p["port"], p["port"]) for p in rule["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_expose_only_the_gateway(overlay):
    objects = overlay_with_jobs(overlay)
    gateway_labels = one(objects, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    for obj, spec in workloads(objects):
        labels = obj["spec"]["template"]["metadata"].get("labels", {})
        policies = _policies_for(objects, labels)
        name = obj["metadata"]["name"]
        if obj["kind"] == "Job":
            continue  # clients; nothing connects to them
        assert policies, f"{name}: no NetworkPolicy selects it, so all ingress is open"
        ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        rules = [r for p in policies for r in p["spec"].get("ingress", [])]
        grpc = ports.get("grpc")
        if name == "gateway":
            assert any(not r.get("from") and grpc in _rule_ports(r, ports) for r in rules), "gateway gRPC must be open"
            continue
        for rule in rules:
            if not rule.get("from"):
                raise AssertionError(f"{name}: a rule allows any source on {_rule_ports(rule, ports)}")
            if name in ("encoder", "index") and grpc in _rule_ports(rule, ports):
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, f"{name}: gRPC open to {peer}"
                    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "gateway"}}, peer
                    assert label_match(peer["podSelector"], gateway_labels)
        if name in ("encoder", "index"):
            assert any(grpc in _rule_ports(r, ports) for r in rules), f"{name}: the gateway cannot reach it"


# ---------------------------------------------------------------- monitoring

REQUIRED_ALERTS = {
    "ClipsearchHighErrorRate": "grpc_server_handled_total",
    "ClipsearchSearchLatencyHigh": "grpc_server_handling_seconds_bucket",
    "ClipsearchEncoderQueueFull": "clipsearch_encoder_queue_rejected_total",
    "ClipsearchIndexShardDown": "kube_statefulset_status_replicas_ready",
    "ClipsearchIndexSnapshotTooOld": "clipsearch_index_snapshot_age_seconds",
}


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_prometheus_rule_has_the_alerts(target):
    rule = one(render(target), "PrometheusRule", "clipsearch")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for name, metric in REQUIRED_ALERTS.items():
        assert name in alerts, f"missing alert {name}"
        assert metric in alerts[name]["expr"], f"{name} does not use {metric}"
        assert re.fullmatch(r"\d+[smh]", alerts[name]["for"]), alerts[name]["for"]
        assert alerts[name]["labels"]["severity"] in ("warning", "critical")
        assert alerts[name]["annotations"]["summary"]


def test_prometheus_rules_pass_promtool(tmp_path):
    import shutil

    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not on PATH (Debian package 'prometheus'); PromQL syntax of the alerts not checked")
    rule = one(render("base"), "PrometheusRule", "clipsearch")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_service_monitor_scrapes_every_service(target):
    objects = render(target)
    monitor = one(objects, "ServiceMonitor", "clipsearch")
    selected = [s for s in find(objects, "Service") if label_match(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
    assert {s["metadata"]["name"] for s in selected} == set(SERVICES)
    for endpoint in monitor["spec"]["endpoints"]:
        for service in selected:
            assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]], service["metadata"]["name"]
    # job label = app.kubernetes.io/name, which the alert rules filter on.
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    for service in selected:
        assert service["metadata"]["labels"]["app.kubernetes.io/name"] in SERVICES


# ------------------------------------------------------------ settings files

# Settings named in the services' run contracts, per section, on top of the
# server settings every service has.
CONTRACT_SETTINGS = {
    "encoder": {"model", "pretrained", "device", "model_cache_dir", "max_batch_size", "max_queue_delay_ms",
                "max_queue_size", "preprocess_workers", "s3_endpoint_url", "runtime", "onnx_cache_dir"},
    "index": {"data_dir", "backup_s3_uri", "s3_endpoint_url", "snapshot_interval_seconds"},
    "gateway": {"encoder", "index", "storage", "s3_endpoint_url", "api_keys_file", "url_ttl_seconds", "data_dir",
                "startup_timeout_seconds", "page_token_secret", "reflection", "import_sources"},
}


def _server_settings() -> set[str]:
    import dataclasses

    settings_module = pytest.importorskip("clipsearch.server.settings")
    return {f.name for f in dataclasses.fields(settings_module.ServerSettings)}


def _settings_documents():
    for target in [f"overlays/{o}" for o in OVERLAYS] + ["base"]:
        objects = render(target)
        docs = {}
        for obj, spec, container, section in clipsearch_containers(objects):
            path, document = settings_file(spec, container, objects)
            assert path, f"{container['name']} reads no settings file"
            docs[path] = document
        for path, document in docs.items():
            yield target, document


def test_settings_files_use_known_names():
    """Services refuse unknown keys in the settings file, so a typo here
    would crash-loop the pods: every key must be a known setting."""
    server = _server_settings()
    for target, document in _settings_documents():
        top = {k for k in document if k not in SECTIONS}
        assert top <= server, f"{target}: top-level keys {top - server} are not settings every service has"
        for section, names in CONTRACT_SETTINGS.items():
            keys = set(document.get(section) or {})
            assert keys <= server | names, f"{target}: {section}: unknown {keys - server - names}"


def _service_flags(module: str) -> set[str] | None:
    if not (REPO / module / "__main__.py").exists():
        return None
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, f"python -m {module} --help failed:\n{proc.stderr[-2000:]}"
    return {m.replace("-", "_") for m in re.findall(r"--([a-z][a-z0-9-]*)", proc.stdout)}


@pytest.mark.parametrize("section", list(SERVICES))
def test_settings_and_flags_exist_in_the_real_service(section):
    """Against the service's own --help: every settings key, flag and
    CLIPSEARCH_* variable the manifests set is one the service accepts."""
    module = SERVICES[section]
    flags = _service_flags(module)
    if flags is None:
        pytest.skip(f"{module}/__main__.py is not in the tree yet; checked against the run contract only")
    for target in [f"overlays/{o}" for o in OVERLAYS] + ["base"]:
        objects = render(target)
        for obj, spec, container, name in clipsearch_containers(objects):
            if name != section:
                continue
            _, document = settings_file(spec, container, objects)
            used = {k for k in document if k not in SECTIONS} | set(document.get(section) or {})
            used |= {a[2:].partition("=")[0].replace("-", "_") for a in container.get("args", []) if a.startswith("--")}
            used |= {e[len("CLIPSEARCH_"):].lower() for e in literal_env(container) if e.startswith("CLIPSEARCH_") and e != "CLIPSEARCH_CONFIG"}
            unknown = used - flags
            assert not unknown, f"{target}: {module} has no setting {sorted(unknown)}"


# ------------------------------------------------------------- bulk import


def test_bulk_import_job_covers_every_partition():
    objects = render("jobs/bulk-import")
    job = one(objects, "Job", "bulk-import")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    partitions_cm = one(objects, "ConfigMap", volume["configMap"]["name"])
    partitions = [line for line in partitions_cm["data"]["partitions.txt"].splitlines() if line.strip()]
    assert spec["completions"] == len(partitions), "completions must equal the number of partitions"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert all(p.startswith("s3://") for p in partitions)
    assert len(set(partitions)) == len(partitions), "a partition is listed twice"
    script = " ".join(container["command"] + container.get("args", []))
    assert "JOB_COMPLETION_INDEX" in script
    exec_line = next(line.strip() for line in script.splitlines() if line.strip().startswith("exec clipsearch "))
    argv = shlex.split(exec_line.replace('"$GATEWAY"', "gateway:50050").replace('"$PARTITION"', partitions[0]))[2:]
    # The real CLI accepts the command line (not just a plausible string).
    cli = pytest.importorskip("clipsearch.cli", reason="the clipsearch CLI is not in the tree")
    parsed = cli.build_parser().parse_args(argv)
    assert parsed.source == partitions[0] and parsed.target == "gateway:50050"
    assert getattr(parsed, "quiet", False), "progress bars do not belong in pod logs"
    assert_dials_the_gateway(job, container)


def assert_dials_the_gateway(job: dict, container: dict) -> None:
    """The Job's GATEWAY is the gateway Service on the gateway's port, in the deployment's namespace."""
    host, _, port = literal_env(container)["GATEWAY"].rpartition(":")
    gateway_service = one(render("overlays/gpu"), "Service", host)
    assert int(port) in [p["port"] for p in gateway_service["spec"]["ports"]]
    assert job["metadata"]["namespace"] == "clipsearch"


# ------------------------------------------------------------------ repair


def test_repair_job_runs_the_cli_against_the_gateway():
    objects = render("jobs/repair")
    job = one(objects, "Job", "repair")
    spec = job["spec"]
    assert spec.get("completionMode", "NonIndexed") == "NonIndexed" and spec.get("completions", 1) == 1
    assert spec.get("parallelism", 1) == 1, "two repairs of one collection would race"
    assert spec["backoffLimit"] >= 1, "RepairCollection resumes after its cursor, so a retry continues the work"
    [container] = spec["template"]["spec"]["containers"]
    env = literal_env(container)
    # Kubernetes expands $(VAR) in command and args from the container's env.
    argv = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a)
            for a in container["command"] + container.get("args", [])]
    assert argv[:2] == ["clipsearch", "repair"]
    cli = pytest.importorskip("clipsearch.cli", reason="the clipsearch CLI is not in the tree")
    parsed = cli.build_parser().parse_args(argv[1:])
    assert parsed.func is cli.cmd_repair
    assert parsed.collection == env["COLLECTION"] and parsed.collection, "say which collection to repair"
    assert parsed.target == env["GATEWAY"] and not parsed.dry_run
    assert getattr(parsed, "quiet", False), "progress bars do not belong in pod logs"
    assert_dials_the_gateway(job, container)
    # Same image, pod security and API key as the bulk-import Job.
    bulk = one(render("jobs/bulk-import"), "Job", "bulk-import")["spec"]["template"]["spec"]
    bulk_container = bulk["containers"][0]
    pod = spec["template"]["spec"]
    assert container["image"] == bulk_container["image"]
    assert pod["securityContext"] == bulk["securityContext"]
    assert container["securityContext"] == bulk_container["securityContext"]
    assert container["resources"] == bulk_container["resources"]
    api_key = next(e for e in container["env"] if e["name"] == "CLIPSEARCH_API_KEY")
    assert api_key == next(e for e in bulk_container["env"] if e["name"] == "CLIPSEARCH_API_KEY")


# ---------------------------------------------------------- shutdown timing


def _probe_window(probe: dict) -> float:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_termination_grace_covers_the_drain(target):
    """SIGKILL must not cut the drain short: preStop + drain_delay_seconds +
    grace_seconds (+ the index's final snapshot) fit in the pod's grace."""
    objects = render(target)
    for obj, spec, container, section in clipsearch_containers(objects):
        settings = effective_settings(spec, container, objects, section)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        needed = pre_stop + float(settings.get("drain_delay_seconds", 1.0)) + float(settings.get("grace_seconds", 10.0)) + 5
        if section == "index":
            needed += 30  # final snapshot and its upload
        assert spec["terminationGracePeriodSeconds"] >= needed, (
            f"{target} {section}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} < {needed}"
        )


@pytest.mark.parametrize("target", [f"overlays/{o}" for o in OVERLAYS] + ["base"])
def test_startup_probes_allow_for_loading(target):
    objects = render(target)
    for obj, spec, container, section in clipsearch_containers(objects):
        window = _probe_window(container["startupProbe"])
        settings = effective_settings(spec, container, objects, section)
        if section == "gateway":
            # The gateway waits startup_timeout_seconds for encoder and shards.
            assert window > float(settings.get("startup_timeout_seconds", 120)), f"{target}: {window}"
        else:
            assert window >= 300, f"{target} {section}: {window}s to load a model or a shard is too short"
        # Liveness must not fire on a busy but healthy pod.
        assert _probe_window(container["livenessProbe"]) >= 30


# ---------------------------------------------- through the services' loaders

SETTINGS_CLASSES = {
    "encoder": ("encoder_service.__main__", "EncoderSettings"),
    "index": ("index_service.settings", "IndexSettings"),
    "gateway": ("gateway.settings", "GatewaySettings"),
}
SAMPLE_FIELDS = {"metadata.name": "index-0", "metadata.namespace": "clipsearch"}


def _pod_environment(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: literal values,
    downward-API fields (sample values), $(VAR) expanded in order. Secret
    values are not needed for parsing settings and are left out."""
    environ: dict[str, str] = {}
    for env in container.get("env", []):
        if "value" in env:
            environ[env["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: environ.get(m.group(1), m.group(0)), env["value"]
            )
        elif "fieldRef" in env.get("valueFrom", {}):
            environ[env["name"]] = SAMPLE_FIELDS.get(env["valueFrom"]["fieldRef"]["fieldPath"], "x")
    return environ


@pytest.mark.parametrize("section", list(SETTINGS_CLASSES))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_configuration_loads_with_the_real_settings_code(section, overlay, tmp_path):
    """Feed each pod's args, environment and settings file to the service's
    own settings loader: the pod would start with exactly these values."""
    import importlib

    module_name, class_name = SETTINGS_CLASSES[section]
    try:
        settings_cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{module_name}.{class_name} is not importable yet ({exc}); checked against the contract only")
    from clipsearch.server.settings import load_settings

    objects = render(f"overlays/{overlay}")
    found = [(obj, spec, c) for obj, spec, c, name in clipsearch_containers(objects) if name == section]
    assert len(found) == 1
    obj, spec, container = found[0]
    path, document = settings_file(spec, container, objects)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(document))
    environ = {k: v for k, v in _pod_environment(container).items() if k != "CLIPSEARCH_CONFIG"}
    argv = [a for a in container.get("args", [])] + ["--config", str(config)]
    settings = load_settings(settings_cls, section=section, argv=argv, environ=environ)
    if hasattr(settings, "validate"):
        settings = settings.validate() or settings

    assert settings.host == "0.0.0.0"
    assert settings.port == next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert settings.metrics_port == next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    if section == "gateway":
        replicas = one(objects, "StatefulSet", "index")["spec"]["replicas"]
        assert settings.index == [f"index-{i}.index:50052" for i in range(replicas)]
        assert settings.encoder == "encoder:50051"
        assert settings.api_keys_file == "/secrets/api-keys"
    if section == "index":
        assert settings.backup_s3_uri == "s3://clipsearch/index-backups/clipsearch/index-0"
        assert settings.data_dir.startswith("/data/")
    if section == "encoder":
        assert settings.model_cache_dir == "/models"
