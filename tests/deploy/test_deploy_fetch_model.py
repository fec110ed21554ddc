"""The encoder pods' init step (deploy/k8s/base/fetch_model.py) that fills the
shared model cache: it reads the same settings as the encoder, skips local
models, and fails loudly. No network here, so the download itself is not run;
a fake open_clip stands in to check what it would fetch and where."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import pytest

from deploy_helpers import K8S

SCRIPT = K8S / "base" / "fetch_model.py"


@pytest.fixture
def fetch_model():
    spec = importlib.util.spec_from_file_location("fetch_model_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(env: dict, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_reads_the_encoder_section_then_env(fetch_model, tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("log_json: true\nmodel_cache_dir: /top\nencoder:\n  model: ViT-L-14\n  model_cache_dir: /models\n"
                      "index:\n  data_dir: /data\n")
    settings = fetch_model.load_settings({"CLIPSEARCH_CONFIG": str(config), "CLIPSEARCH_PRETRAINED": "laion2b_s32b_b82k"})
    assert settings == {"model": "ViT-L-14", "pretrained": "laion2b_s32b_b82k", "model_cache_dir": "/models"}


@pytest.mark.parametrize("model, pretrained", [
    ("/app/models/demo", "openai"),          # a model folder baked into the image
    ("ViT-B-32", "/models/my-finetune.pt"),  # a local checkpoint
    ("ViT-B-32", "none"),                    # random weights (tests)
])
def test_local_or_no_weights_download_nothing(model, pretrained, tmp_path):
    proc = run_script({"CLIPSEARCH_MODEL": model, "CLIPSEARCH_PRETRAINED": pretrained,
                       "CLIPSEARCH_MODEL_CACHE_DIR": str(tmp_path / "cache")}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to download" in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_marker_skips_a_second_fetch(fetch_model, tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        get_pretrained_cfg=lambda model, tag: {"hf_hub": f"org/{model}-{tag}/"},
        download_pretrained=lambda cfg, cache_dir: calls.append((cfg, cache_dir)) or f"{cache_dir}/weights.bin",
        list_pretrained_tags_by_model=lambda model: ["openai"],
    )
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIPSEARCH_MODEL", "ViT-B-32")
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", "openai")
    monkeypatch.setenv("CLIPSEARCH_MODEL_CACHE_DIR", str(cache))
    monkeypatch.delenv("CLIPSEARCH_CONFIG", raising=False)
    assert fetch_model.main() == 0
    assert calls == [({"hf_hub": "org/ViT-B-32-openai/"}, str(cache))]
    assert fetch_model.marker_path(str(cache), "ViT-B-32", "openai").is_file()
    assert fetch_model.main() == 0
    assert len(calls) == 1, "the second pod must not download again"


def test_download_failure_fails_the_init_container(fetch_model, tmp_path, monkeypatch, capsys):
    def offline(cfg, cache_dir):
        raise OSError("Temporary failure in name resolution")

    fake = types.SimpleNamespace(get_pretrained_cfg=lambda m, t: {"url": "https://example.invalid/w.pt"},
                                 download_pretrained=offline, list_pretrained_tags_by_model=lambda m: [])
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    monkeypatch.setenv("CLIPSEARCH_MODEL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CLIPSEARCH_CONFIG", raising=False)
    assert fetch_model.main() == 1
    err = capsys.readouterr().err
    assert "Temporary failure" in err and "local checkpoint" in err
    assert not fetch_model.marker_path(str(tmp_path), "ViT-B-32", "openai").exists()


def test_unknown_tag_names_the_valid_ones_with_real_open_clip(fetch_model, tmp_path, monkeypatch):
    """Real open_clip registry lookup (no network needed to fail here)."""
    pytest.importorskip("open_clip")
    monkeypatch.setenv("CLIPSEARCH_MODEL", "ViT-B-32")
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", "no-such-tag")
    monkeypatch.setenv("CLIPSEARCH_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPSEARCH_CONFIG", raising=False)
    with pytest.raises(SystemExit) as failure:
        fetch_model.main()
    message = str(failure.value)
    assert "no-such-tag" in message and "openai" in message, message
    assert not (tmp_path / "cache").exists()
