"""Encoder runtimes: ONNX Runtime against torch on the same weights, the export
cache, int8, and the service serving through each runtime.

Exports happen once per session into a temporary cache (the ``onnx_cache``
fixture); timings belong to bench/encoder_bench.py, not here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from google.rpc import code_pb2

from clipsearch.encoder.v1 import encoder_service_pb2 as pb
from clipsearch.vectors import unpack_matrix
from encoder_service.model import ModelLoadError, load_model, resolve_runtime
from encoder_service.onnx_runtime import ExportCache, OnnxTowers
from tests.encoder.conftest import LIMITS, TINY, jpeg_bytes

DEMO = "models/demo"
WORDS = "a photo of the red dog running on a beach next to an old lighthouse at sunset".split()


def mixed_texts() -> list[str]:
    """Prompts of 1 to 77 tokens (with start and end tokens), cut to the context when longer."""
    return ["x", "a dog", *(" ".join(WORDS * 6)[: 4 * n] for n in (3, 9, 17, 30, 60, 75)), " ".join(WORDS * 20)]


def assert_equivalent(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-4
    assert (ours * reference).sum(axis=1).min() >= 0.99999


@pytest.fixture(scope="module", params=[DEMO, "ViT-B-32"])
def pair(request, onnx_cache):
    """(torch, onnx) loads of one model; ViT-B-32 with random weights."""
    name = request.param
    torch_model = load_model(name, "none", runtime="torch")
    onnx_model = load_model(name, "none", runtime="onnx", onnx_cache_dir=str(onnx_cache))
    return torch_model, onnx_model


def test_texts_of_1_to_77_tokens_in_mixed_batches_match_torch(pair):
    torch_model, onnx_model = pair
    texts = mixed_texts()
    lengths = sorted(int((t != 0).sum()) for t in torch_model.tokenize(texts))
    assert lengths[0] == 3 and lengths[-1] == 77 and len(set(lengths)) >= 6
    assert onnx_model.runtime == "onnx" and onnx_model.fingerprint == torch_model.fingerprint
    reference = torch_model.encode_texts(texts, trim=False)
    for batch in (texts, texts[:1], texts[2:5], texts[::-1], [texts[1], texts[-1]]):
        want = torch_model.encode_texts(batch, trim=False)
        assert_equivalent(onnx_model.encode_texts(batch), want)
    assert_equivalent(onnx_model.encode_texts(texts), reference)


def test_images_match_torch_at_batch_1_and_5(pair):
    torch_model, onnx_model = pair
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, torch_model.image_size, torch_model.image_size, generator=generator)
        assert_equivalent(onnx_model.encode_pixels(pixels), torch_model.encode_pixels(pixels))


def test_auto_is_onnx_on_cpu_and_torch_on_cuda():
    assert resolve_runtime("auto", torch.device("cpu")) == "onnx"
    assert resolve_runtime("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ModelLoadError, match="CPU only"):
        resolve_runtime("onnx", torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="auto, torch, onnx"):
        resolve_runtime("tensorrt", torch.device("cpu"))


# ---------------------------------------------------------------- export cache

def test_cache_hit_after_export_and_no_false_hit_for_another_model(onnx_cache, tmp_path):
    first = load_model(DEMO, "none", runtime="onnx", onnx_cache_dir=str(tmp_path))
    assert first.onnx.cache_hits == {"text": False, "image": False}
    again = load_model(DEMO, "none", runtime="onnx", onnx_cache_dir=str(tmp_path))
    assert again.onnx.cache_hits == {"text": True, "image": True}
    other = load_model("clipsearch-tiny", "none", runtime="onnx", onnx_cache_dir=str(tmp_path))
    assert other.fingerprint != first.fingerprint
    assert other.onnx.cache_hits == {"text": False, "image": False}, "another model never hits"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.fingerprint, other.fingerprint])
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files are left behind"


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no manifest", "other exporter"])
def test_a_corrupt_or_stale_cache_file_is_exported_again(tmp_path, damage):
    model = load_model(DEMO, "none", runtime="torch")
    OnnxTowers(model, cache_dir=tmp_path)
    path, manifest = ExportCache(tmp_path).paths(model.fingerprint, "text", "fp32")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif damage == "no manifest":
        manifest.unlink()
    else:
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "torch": "0.0"}))
    assert ExportCache(tmp_path).lookup(model.fingerprint, "text", "fp32") is None
    rebuilt = OnnxTowers(model, cache_dir=tmp_path)
    assert rebuilt.cache_hits == {"text": False, "image": True}
    assert ExportCache(tmp_path).lookup(model.fingerprint, "text", "fp32") == path
    assert_equivalent(rebuilt.encode_tokens(model.trim(model.tokenize(["a dog"])).numpy()),
                      model.encode_texts(["a dog"]))
    assert OnnxTowers(model, cache_dir=tmp_path).cache_hits == {"text": True, "image": True}


def test_int8_runs_and_stays_close_but_is_its_own_cache_entry(onnx_cache):
    torch_model = load_model(DEMO, "none", runtime="torch")
    int8 = load_model(DEMO, "none", runtime="onnx", onnx_quantize="int8", onnx_cache_dir=str(onnx_cache))
    assert int8.onnx.paths["text"].name == "text-int8.onnx" and int8.fingerprint == torch_model.fingerprint
    texts = mixed_texts()
    cosine = (int8.encode_texts(texts) * torch_model.encode_texts(texts)).sum(axis=1)
    assert cosine.min() > 0.9  # no accuracy asserted: `clipsearch eval` measures it (README)
    with pytest.raises(ModelLoadError, match="onnx_quantize"):
        load_model(DEMO, "none", runtime="onnx", onnx_quantize="int4", onnx_cache_dir=str(onnx_cache))


def test_eval_synthetic_gives_the_same_numbers_on_both_runtimes(onnx_cache, monkeypatch):
    from clipsearch import eval as evaluation

    monkeypatch.setenv("CLIPSEARCH_ONNX_CACHE_DIR", str(onnx_cache))
    results = {}
    for runtime in ("torch", "onnx"):
        args = evaluation.build_parser().parse_args(
            ["--synthetic", "--n", "60", "--model", DEMO, "--runtime", runtime, "--quiet"])
        results[runtime] = evaluation.run_eval(args)
    assert results["onnx"]["ranker"]["runtime"] == "onnx"
    assert results["onnx"]["metrics"] == results["torch"]["metrics"]


# ---------------------------------------------------------------- the service on each runtime

@pytest.fixture(scope="module")
def torch_encoder(tmp_path_factory, onnx_cache):
    from tests.conftest import ServiceProcess

    proc = ServiceProcess("encoder_service", [*TINY, *LIMITS, "--runtime", "torch", "--port", "0"],
                          tmp_path_factory.mktemp("torch-encoder"), name="torch-encoder").start()
    yield proc
    proc.terminate()


def test_the_service_serves_through_each_runtime_with_the_same_per_item_errors(stub, torch_encoder, onnx_cache):
    import grpc

    from clipsearch.encoder.v1 import encoder_service_pb2_grpc
    from tests.encoder.test_service import bad_images

    items = [pb.ImageInput(data=jpeg_bytes(10)), *(pb.ImageInput(data=d) for d in bad_images().values()),
             pb.ImageInput(data=jpeg_bytes(11))]
    texts = [text[:300] for text in mixed_texts()]  # the module's encoder takes 300 characters at most
    with grpc.insecure_channel(torch_encoder.address) as channel:
        torch_stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
        served = {name: (s.EmbedImages(pb.EmbedImagesRequest(images=items)),
                         s.EmbedTexts(pb.EmbedTextsRequest(texts=texts)))
                  for name, s in (("onnx", stub), ("torch", torch_stub))}
    (onnx_images, onnx_texts), (torch_images, torch_texts) = served["onnx"], served["torch"]
    assert [(s.code, s.message) for s in onnx_images.statuses] == [
        (s.code, s.message) for s in torch_images.statuses]
    good = [i for i, s in enumerate(onnx_images.statuses) if s.code == code_pb2.OK]
    assert good == [0, len(items) - 1]
    assert onnx_images.model_fingerprint == torch_images.model_fingerprint
    assert (onnx_cache / onnx_images.model_fingerprint / "text-fp32.onnx").is_file(), "auto served through onnx"
    assert_equivalent(unpack_matrix(onnx_images.embeddings)[good], unpack_matrix(torch_images.embeddings)[good])
    assert not unpack_matrix(onnx_images.embeddings)[1:-1].any()
    assert_equivalent(unpack_matrix(onnx_texts.embeddings), unpack_matrix(torch_texts.embeddings))


# ---------------------------------------------------------------- CUDA graphs (their bucketing, on the CPU)

def test_small_batches_padded_to_graph_buckets_equal_the_unpadded_model():
    """The CUDA-graph path without capture: same buckets, same padding, on the CPU."""
    from encoder_service.cuda_graphs import GraphedTowers, batch_buckets

    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(6) == (1, 2, 4, 6) and batch_buckets(0) == ()
    model = load_model(DEMO, "none", runtime="torch")
    texts = mixed_texts()
    expected = model.encode_texts(texts)
    pixels = torch.randn(5, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    expected_images = model.encode_pixels(pixels)
    graphs = GraphedTowers(model, max_batch=4, capture=False)
    assert graphs.lengths == (16, 32, 77) and sorted(graphs.image) == [1, 2, 4]
    assert graphs.encode_tokens(model.trim(model.tokenize(texts[:5]))) is None, "batch 5 runs eagerly"
    model.graphs = graphs
    for rows in ([0], [1, 2], [0, 3, 5], [2, 4, 6, 7], [1, 8], list(range(len(texts)))):
        assert_equivalent(model.encode_texts([texts[i] for i in rows]), expected[rows])
    for rows in ([0], [1, 2, 3], list(range(5))):
        assert_equivalent(model.encode_pixels(pixels[rows]), expected_images[rows])
