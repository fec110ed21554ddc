"""ONNX Runtime for the encoder on CPU: the towers exported from the loaded
open_clip model, cached on disk by the weights' fingerprint.

- The text tower is exported trimmed (``model.TrimmedText``: dynamic batch and
  length axes), the image tower with a dynamic batch axis. Both end in the
  L2 normalization, so the runtime returns unit vectors as the torch path does.
- The cache holds ``<fingerprint>/<tower>-<variant>.onnx`` beside a manifest
  (fingerprint, exporter, opset, sha256 of the file). A file whose manifest is
  missing, differs, or whose bytes do not hash to it is exported again; files
  are written to ``.tmp`` and then ``os.replace``d, so a crash leaves no half file.
- ``quantize="int8"``: dynamic int8 quantization of the MatMul/Gemm weights
  (onnxruntime.quantization), cached as its own variant.

No gRPC here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

OPSET = 17
FORMAT_VERSION = 2  # bump when what is exported changes
QUANTIZE_CHOICES = ("none", "int8")


class OnnxExportError(RuntimeError):
    """The model could not be exported or loaded for ONNX Runtime."""


def default_cache_dir() -> Path:
    """$CLIPSEARCH_ONNX_CACHE_DIR (the service setting's variable), else ~/.cache/clipsearch/onnx."""
    if os.environ.get("CLIPSEARCH_ONNX_CACHE_DIR"):
        return Path(os.environ["CLIPSEARCH_ONNX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipsearch" / "onnx"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_key(fingerprint: str, tower: str, variant: str) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "fingerprint": fingerprint, "tower": tower, "variant": variant,
            "opset": OPSET, "torch": torch.__version__.split("+")[0]}


class ExportCache:
    """ONNX files keyed by the model fingerprint; checked against their manifest on every use."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def paths(self, fingerprint: str, tower: str, variant: str) -> tuple[Path, Path]:
        folder = self.root / fingerprint
        return folder / f"{tower}-{variant}.onnx", folder / f"{tower}-{variant}.json"

    def lookup(self, fingerprint: str, tower: str, variant: str) -> Path | None:
        """The cached file when its manifest matches and its bytes hash to it; else None."""
        path, manifest_path = self.paths(fingerprint, tower, variant)
        if not path.is_file() or not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            log.warning("ONNX cache: unreadable manifest %s; exporting again", manifest_path)
            return None
        expected = _manifest_key(fingerprint, tower, variant)
        if {k: manifest.get(k) for k in expected} != expected:
            log.info("ONNX cache: %s was made by another exporter or model; exporting again", path)
            return None
        if manifest.get("sha256") != _sha256(path):
            log.warning("ONNX cache: %s is corrupt (checksum mismatch); exporting again", path)
            return None
        return path

    def store(self, fingerprint: str, tower: str, variant: str, write) -> Path:
        """Calls ``write(tmp_path)``, then moves the file and its manifest into place."""
        path, manifest_path = self.paths(fingerprint, tower, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            write(tmp)
            manifest = {**_manifest_key(fingerprint, tower, variant), "sha256": _sha256(tmp)}
            manifest_tmp = manifest_path.with_name(manifest_path.name + f".{os.getpid()}.tmp")
            manifest_tmp.write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, path)
            os.replace(manifest_tmp, manifest_path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def get_or_build(self, fingerprint: str, tower: str, variant: str, write) -> tuple[Path, bool]:
        """(path, True when it was a cache hit)."""
        found = self.lookup(fingerprint, tower, variant)
        if found is not None:
            return found, True
        return self.store(fingerprint, tower, variant, write), False


class _NormalizedImage(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)


def _distinct_qkv(module, args, kwargs):
    """Self-attention called as attn(x, x, x) with three distinct tensors. With one
    object, torch projects q, k and v in one packed matmul whose traced reshapes keep
    the example's sequence length as a constant; with three, every shape stays dynamic."""
    if len(args) >= 3 and args[0] is args[1] is args[2]:
        x = args[0]
        args = (x, x.view_as(x), x.view_as(x), *args[3:])
    return args, kwargs


def _export(module: torch.nn.Module, example: torch.Tensor, axes: dict[int, str], path: Path) -> None:
    import warnings

    # The TorchScript exporter needs no extra packages (the dynamo one needs onnxscript). It
    # cannot export nn.MultiheadAttention's fused inference fast path, so that is off meanwhile.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    hooks = [m.register_forward_pre_hook(_distinct_qkv, with_kwargs=True)
             for m in module.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(path), input_names=["input"], output_names=["vectors"],
                dynamic_axes={"input": axes, "vectors": {0: "batch"}}, opset_version=OPSET, dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for hook in hooks:
            hook.remove()


def _quantize(source: Path, path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


class OnnxTowers:
    """ONNX Runtime sessions for both towers of one ClipModel (CPU)."""

    def __init__(self, clip_model, *, cache_dir: str | Path | None = None, quantize: str = "none",
                 threads: int | None = None):
        import onnxruntime as ort

        if quantize not in QUANTIZE_CHOICES:
            raise OnnxExportError(f"onnx_quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}")
        self.quantize = quantize
        self.cache = ExportCache(cache_dir)
        self.threads = threads or torch.get_num_threads()
        self.trims_text = clip_model.text_tower is not None
        self.cache_hits: dict[str, bool] = {}
        model = clip_model.model  # fp32 on the CPU (load_model checks)
        size = clip_model.image_size
        text_module = clip_model.text_encoder()
        tokens = clip_model.tokenize(["a photo of", "a b"])  # an example batch: 2 x 5 trimmed, 2 x 77 not
        tokens = clip_model.trim(tokens) if self.trims_text else tokens
        length_axis = {0: "batch", 1: "length"} if self.trims_text else {0: "batch"}
        exports = {
            "text": lambda p: _export(text_module, tokens, length_axis, p),
            "image": lambda p: _export(_NormalizedImage(model), torch.zeros(2, 3, size, size), {0: "batch"}, p),
        }
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {}
        self.paths: dict[str, Path] = {}
        for tower, write in exports.items():
            try:
                path, hit = self.cache.get_or_build(clip_model.fingerprint, tower, "fp32", write)
                if quantize == "int8":
                    path, hit = self.cache.get_or_build(clip_model.fingerprint, tower, "int8",
                                                        lambda p, source=path: _quantize(source, p))
                self.sessions[tower] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # export and session errors come in many types
                raise OnnxExportError(f"could not run the {tower} tower on ONNX Runtime: {exc}") from exc
            self.paths[tower], self.cache_hits[tower] = path, hit
            log.info("ONNX %s tower (%s): %s %s", tower, quantize if quantize != "none" else "fp32",
                     "cache hit" if hit else "exported to", path)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.sessions["text"].run(None, {"input": np.ascontiguousarray(tokens, dtype=np.int64)})[0]

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.sessions["image"].run(None, {"input": np.ascontiguousarray(pixels, dtype=np.float32)})[0]
