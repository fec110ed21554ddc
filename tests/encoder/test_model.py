"""The model layer in-process: loading, normalization, trimming, fingerprints, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_service.model import ModelLoadError, load_model, save_model_dir

PROMPTS = [
    "a dog playing in snow",
    "a red circle",
    "an extremely long prompt " + "with many many words " * 30,
    "x",
]


@pytest.fixture(scope="module")
def tiny():
    return load_model("clipsearch-tiny", "none")


def test_vectors_are_unit_norm_deterministic_and_of_the_model_dim(tiny):
    first = tiny.encode_texts(PROMPTS)
    second = tiny.encode_texts(PROMPTS)
    assert first.shape == (len(PROMPTS), tiny.dim) == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("model_name", ["clipsearch-tiny", "ViT-B-32"])
def test_trimmed_text_encoding_equals_the_full_77_token_path(model_name):
    model = load_model(model_name, "none")
    assert model.text_tower is not None, "trimming must be active for causal CLIP text towers"
    trimmed = model.encode_texts(PROMPTS, trim=True)
    full = model.encode_texts(PROMPTS, trim=False)
    np.testing.assert_allclose(trimmed, full, atol=1e-5)
    if model_name == "ViT-B-32":
        assert model.dim == 512


def test_random_weights_are_the_same_in_every_load_so_the_fingerprint_is_stable(tiny):
    again = load_model("clipsearch-tiny", "none")
    assert again.fingerprint == tiny.fingerprint
    np.testing.assert_array_equal(again.encode_texts(["a"]), tiny.encode_texts(["a"]))


def test_fingerprint_changes_with_the_weights(tiny, tmp_path):
    model = tiny.model
    with torch.no_grad():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["logit_scale"] += 1.0
    path = tmp_path / "changed.pt"
    torch.save(state, path)
    changed = load_model("clipsearch-tiny", str(path))
    assert changed.fingerprint != tiny.fingerprint


def test_checkpoint_file_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_model("clipsearch-tiny", str(path))
    assert loaded.fingerprint == tiny.fingerprint
    np.testing.assert_allclose(loaded.encode_texts(PROMPTS), tiny.encode_texts(PROMPTS), atol=1e-6)


def test_model_folder_round_trip(tiny, tmp_path):
    import json

    from encoder_service.model import MODEL_CONFIG_DIR

    config = json.loads((MODEL_CONFIG_DIR / "clipsearch-tiny.json").read_text())
    folder = save_model_dir(tiny.model, config, tmp_path / "tiny-model")
    loaded = load_model(str(folder), "ignored")
    np.testing.assert_allclose(loaded.encode_texts(PROMPTS), tiny.encode_texts(PROMPTS), atol=1e-6)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-Nope'.*ViT-B-32"):
        load_model("ViT-Nope", "none")


def test_unknown_pretrained_tag_lists_the_valid_tags():
    with pytest.raises(ModelLoadError, match="valid tags.*openai"):
        load_model("ViT-B-32", "no-such-tag")


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("clipsearch-tiny", str(tmp_path / "missing.pt"))


def test_download_failure_names_the_offline_options(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelLoadError, match="Offline options") as info:
        load_model("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert "--pretrained none" in str(info.value)
