"""The shipped demo model: loads through the local-folder path and finds shapes by colour."""

from __future__ import annotations

import json
import os

import numpy as np

from clipsearch import synthetic

from .conftest import DEMO_MODEL_DIR

HELD_OUT_SEED = 4252  # the model was trained on seed 0; these 60 images hold every queried object


def test_folder_is_small_and_complete():
    names = {path.name for path in DEMO_MODEL_DIR.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md", "metadata.json"} <= names
    total = sum(path.stat().st_size for path in DEMO_MODEL_DIR.iterdir() if path.is_file())
    assert total <= 20 * 1024 * 1024
    config = json.loads((DEMO_MODEL_DIR / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 49408
    assert config["model_cfg"]["text_cfg"]["context_length"] == 77


def test_loads_by_path_and_gives_unit_vectors(demo_model):
    assert demo_model.dim == 512
    assert demo_model.dtype_name == "float32"
    texts = demo_model.encode_texts(["a red circle", "a small blue star on the left"])
    images = demo_model.encode_images([s.image for s in synthetic.generate(3, seed=HELD_OUT_SEED)])
    assert texts.shape == (2, 512) and images.shape == (3, 512)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)


def test_relative_path_loads_from_repo_root(monkeypatch):
    from encoder_service.model import load_model

    monkeypatch.chdir(DEMO_MODEL_DIR.parent.parent)
    assert os.path.isdir("models/demo")
    assert load_model(model_name="models/demo", device="cpu").dim == 512


def test_red_circle_query_ranks_red_circles_first(demo_model):
    samples = synthetic.generate(60, seed=HELD_OUT_SEED)
    image_vectors = demo_model.encode_images([s.image for s in samples])
    for text, shape, colour in [("a red circle", "circle", "red"), ("a blue square", "square", "blue"),
                                ("a yellow star", "star", "yellow")]:
        assert any(s.has(shape, colour) for s in samples)
        scores = image_vectors @ demo_model.encode_texts([text])[0]
        top5 = np.argsort(-scores)[:5]
        assert any(samples[i].has(shape, colour) for i in top5), (text, [samples[i].objects for i in top5])
