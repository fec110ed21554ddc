"""Loading an open_clip model and running it: text (trimmed to the longest
prompt of the batch) and image towers, L2-normalized outputs.

No gRPC here: this module is used by the service, the evaluation harness and
the benchmarks alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
LOCAL_DIR_CONFIG = "open_clip_config.json"
# Model configs shipped with clipsearch (the demo model's, tiny test ones) live here.
MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do instead."""


def resolve_device(device: str) -> torch.device:
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


RUNTIMES = ("auto", "torch", "onnx")


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``auto`` is onnx on the CPU and torch on CUDA."""
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    if runtime == "auto":
        return "onnx" if device.type == "cpu" else "torch"
    if runtime == "onnx" and device.type != "cpu":
        raise ModelLoadError(f"the onnx runtime runs on the CPU only; use --runtime torch on {device}")
    return runtime


def _register_bundled_configs() -> None:
    import open_clip

    if MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


DOWNLOAD_PROBE_SECONDS = 3.0  # how long a start waits to learn that the weights' host is unreachable


def _is_local_dir(model_name: str) -> bool:
    path = Path(model_name.removeprefix("local-dir:"))
    return path.is_dir() and (path / LOCAL_DIR_CONFIG).is_file()


def _offline_hint(model_name: str, pretrained: str) -> str:
    return (
        f"could not download weights for {model_name!r} / {pretrained!r} (no network?). "
        "Offline options: (1) --pretrained /path/to/checkpoint.pt with the matching --model name; "
        "(2) --model /path/to/folder holding open_clip_config.json and the weights "
        "(e.g. the bundled demo model: --model models/demo); "
        "(3) pre-fill --model-cache-dir on a machine with internet and copy it over; "
        "(4) --pretrained none for random weights (tests only)."
    )


HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _check_downloadable(model_name: str, pretrained: str, cache_dir: str | None) -> None:
    """Weights of a pretrained tag that are neither cached nor reachable fail at once with the
    offline options, instead of after the hub client's retries (a minute and more)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    hf_hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id = hf_hub.rstrip("/")
        if any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir), str)
               for name in HF_WEIGHT_FILES):
            return
        host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    elif url:
        folder = Path(cache_dir or Path.home() / ".cache" / "clip").expanduser()
        if (folder / os.path.basename(urllib.parse.urlparse(url).path)).is_file():
            return
        host = urllib.parse.urlparse(url).hostname
    else:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelLoadError(_offline_hint(model_name, pretrained))
    try:
        socket.create_connection((host, 443), timeout=DOWNLOAD_PROBE_SECONDS).close()
    except OSError:
        raise ModelLoadError(_offline_hint(model_name, pretrained)) from None


def weights_fingerprint(model: torch.nn.Module, preprocess_config: dict[str, Any]) -> str:
    """sha256 over every parameter/buffer (name, dtype, shape, bytes) and the preprocessing config."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(array.dtype).encode())
        digest.update(str(tuple(array.shape)).encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(preprocess_config, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


@dataclass
class TextTower:
    """The pieces of a causal CLIP text tower that trimmed encoding needs."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    attn_mask: torch.Tensor
    ln_final: torch.nn.Module
    text_projection: Any
    pool_type: str
    eos_id: int | None


def causal_text_tower(model: torch.nn.Module) -> TextTower | None:
    """The text tower when it is causal and pads with 0 (so trimming is exact), else None."""
    import open_clip
    from open_clip.transformer import TextTransformer

    if isinstance(model, open_clip.CLIP):
        owner, pool_type, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(getattr(model, "text", None), TextTransformer):
        owner = model.text
        if owner.cls_emb is not None or getattr(owner, "use_pad_mask", False):
            return None
        pool_type, eos = owner.pool_type, getattr(owner, "eos_id", None)
    else:
        return None
    if getattr(owner, "attn_mask", None) is None or pool_type not in ("argmax", "eos"):
        return None
    return TextTower(
        owner.token_embedding, owner.positional_embedding, owner.transformer, owner.attn_mask,
        owner.ln_final, owner.text_projection, pool_type, eos,
    )


class TrimmedText(torch.nn.Module):
    """A causal text tower on tokens already trimmed to any length <= the context:
    position embeddings and the causal mask are cut to the input's length. The torch
    path runs it and the ONNX export traces it (with dynamic batch and length axes)."""

    def __init__(self, tower: TextTower):
        super().__init__()
        self.token_embedding, self.transformer, self.ln_final = tower.token_embedding, tower.transformer, tower.ln_final
        self.positional_embedding = tower.positional_embedding
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.text_projection = tower.text_projection
        self.pool_type, self.eos_id = tower.pool_type, tower.eos_id

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        length = text.shape[1]
        transformer = self.transformer
        cast = transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") \
            else self.token_embedding.weight.dtype
        x = self.token_embedding(text).to(cast) + self.positional_embedding[:length].to(cast)
        x = transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        pooled = text_global_pool(x, text, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, torch.nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return F.normalize(pooled.float(), dim=-1)


class _FullText(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(text).float(), dim=-1)


class ClipModel:
    """A loaded open_clip model with its tokenizer and image preprocessing."""

    def __init__(self, model, preprocess, tokenizer, *, name: str, pretrained: str, device: torch.device,
                 dtype: torch.dtype, fingerprint: str, preprocess_config: dict[str, Any]):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        self.device = device
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.preprocess_config = preprocess_config
        self.text_tower = causal_text_tower(model)
        self._text = self.text_encoder()
        self.runtime = "torch"
        self.onnx = None  # OnnxTowers when the runtime is onnx
        self.graphs = None  # GraphedTowers: CUDA graphs for small batches (torch on CUDA)
        self.context_length = int(getattr(tokenizer, "context_length", 77))
        size = preprocess_config.get("size", 224)
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        with torch.inference_mode():
            probe = self.encode_texts(["a"])
        self.dim = int(probe.shape[1])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def text_encoder(self) -> torch.nn.Module:
        """The text tower as one module, tokens [batch, length] -> unit vectors: trimmed
        (any length up to the context) when the tower is causal, else open_clip's own."""
        return TrimmedText(self.text_tower) if self.text_tower is not None else _FullText(self.model)

    def trim(self, tokens: torch.Tensor) -> torch.Tensor:
        """The batch cut to its longest prompt (tokens pad with 0)."""
        length = max(int((tokens != 0).sum(dim=1).max()), 1)
        return tokens[:, :length]

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor, trim: bool = True) -> np.ndarray:
        """Unit vectors for a [batch, context_length] token tensor.

        With ``trim`` the batch is cut to its longest prompt. The tower is causal, so
        every position up to the end-of-text token sees exactly the same inputs, and
        the pooled output equals the full-length one (tests/encoder check this).
        """
        trimmed = trim and self.text_tower is not None
        if self.onnx is not None and (trimmed or not self.onnx.trims_text):
            return self.onnx.encode_tokens((self.trim(tokens) if trimmed else tokens).numpy())
        tokens = tokens.to(self.device)
        if not trimmed:
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()
        tokens = self.trim(tokens)
        graphed = self.graphs.encode_tokens(tokens) if self.graphs is not None else None
        return graphed if graphed is not None else self._text(tokens).cpu().numpy()

    def encode_texts(self, texts: Sequence[str], trim: bool = True) -> np.ndarray:
        return self.encode_tokens(self.tokenize(texts), trim=trim)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Unit vectors for a preprocessed [batch, 3, H, W] float tensor."""
        if self.onnx is not None:
            return self.onnx.encode_pixels(pixels.float().cpu().numpy())
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        graphed = self.graphs.encode_pixels(pixels) if self.graphs is not None else None
        if graphed is not None:
            return graphed
        features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """Unit vectors for PIL images (preprocessed here, in the calling thread)."""
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))


def load_model(
    model_name: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    *,
    device: str = "auto",
    cache_dir: str = "",
    precision: str = "auto",
    runtime: str = "torch",
    onnx_quantize: str = "none",
    onnx_cache_dir: str = "",
    cuda_graph_max_batch: int = 0,
) -> ClipModel:
    """Loads any open_clip model.

    - ``model_name`` + ``pretrained`` tag: open_clip's registry (downloads into ``cache_dir``).
    - ``model_name`` + ``pretrained=/path/to/checkpoint``: a local checkpoint file.
    - ``model_name`` = a folder with ``open_clip_config.json`` and weights (``pretrained`` ignored).
    - ``pretrained`` = ``none``: random weights, with a loud warning (tests only).

    ``runtime``: ``torch`` (the default of this function; the service's setting is ``auto``),
    ``onnx`` (ONNX Runtime on the CPU: the towers are exported
    once into ``onnx_cache_dir``, keyed by the fingerprint; ``onnx_quantize=int8`` for
    int8 weights) or ``auto`` (onnx on the CPU, torch on CUDA). The fingerprint is the
    weights' whatever the runtime. ``cuda_graph_max_batch`` > 0 (torch on CUDA): batches
    up to that size replay CUDA graphs captured here, per batch and length bucket.
    """
    import open_clip

    _register_bundled_configs()
    torch_device = resolve_device(device)
    runtime = resolve_runtime(runtime, torch_device)
    if runtime == "onnx" and precision not in ("auto", "fp32"):
        raise ModelLoadError(f"the onnx runtime runs fp32 (or --onnx-quantize int8); got precision {precision!r}")
    if onnx_quantize not in ("", "none") and runtime != "onnx":
        log.warning("onnx_quantize=%s is ignored: the runtime is %s", onnx_quantize, runtime)
    if precision == "auto":
        precision = "fp16" if torch_device.type == "cuda" else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ModelLoadError(f"precision must be auto, fp32, fp16 or bf16; got {precision!r}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    pretrained_arg: str | None = pretrained
    if _is_local_dir(model_name):
        identifier = "local-dir:" + str(Path(model_name.removeprefix("local-dir:")).resolve())
        pretrained_label = str(Path(model_name.removeprefix("local-dir:")))
        pretrained_arg = None
    else:
        identifier = model_name
        if model_name not in open_clip.list_models():
            raise ModelLoadError(
                f"unknown model {model_name!r}. Use an open_clip name ({', '.join(open_clip.list_models()[:12])}, ... "
                f"{len(open_clip.list_models())} in all), or a folder holding {LOCAL_DIR_CONFIG} and weights"
            )
        pretrained_label = pretrained
        if pretrained.lower() in ("", "none"):
            pretrained_arg = None
            log.warning(
                "!!! %s is running with RANDOM WEIGHTS (--pretrained none). Its embeddings are meaningless; "
                "use this for tests and benchmarks only. !!!", model_name,
            )
        elif os.path.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
            if not Path(pretrained).is_file():
                raise ModelLoadError(f"checkpoint file {pretrained} does not exist")
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise ModelLoadError(
                    f"unknown pretrained tag {pretrained!r} for {model_name}; valid tags: {tags}, "
                    "a checkpoint file path, or none"
                )
            _check_downloadable(model_name, pretrained, cache_dir or None)
    if pretrained_arg is None and not identifier.startswith("local-dir:"):
        torch.manual_seed(0)  # random weights, but the same in every process (same fingerprint)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            identifier,
            pretrained=pretrained_arg,
            precision="fp32",
            device="cpu",
            cache_dir=cache_dir or None,
        )
    except (RuntimeError, OSError) as exc:
        text = str(exc)
        if "download" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
            raise ModelLoadError(_offline_hint(model_name, pretrained)) from exc
        raise ModelLoadError(f"could not load {model_name!r} / {pretrained!r}: {text}") from exc
    model.eval()
    preprocess_config = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    preprocess_config.setdefault("transform", repr(preprocess))
    fingerprint = weights_fingerprint(model, preprocess_config)
    model = model.to(torch_device, dtype=dtype)
    tokenizer = open_clip.get_tokenizer(identifier)
    log.info("loaded %s (%s) on %s as %s, fingerprint %s", model_name, pretrained_label, torch_device, dtype,
             fingerprint)
    clip = ClipModel(model, preprocess, tokenizer, name=model_name, pretrained=pretrained_label, device=torch_device,
                     dtype=dtype, fingerprint=fingerprint, preprocess_config=preprocess_config)
    if runtime == "onnx":
        from encoder_service.onnx_runtime import OnnxExportError, OnnxTowers

        try:
            clip.onnx = OnnxTowers(clip, cache_dir=onnx_cache_dir or None, quantize=onnx_quantize or "none")
        except OnnxExportError as exc:
            raise ModelLoadError(f"{exc}; --runtime torch avoids ONNX Runtime") from exc
        clip.runtime = "onnx"
    elif cuda_graph_max_batch > 0 and torch_device.type == "cuda":
        from encoder_service.cuda_graphs import GraphedTowers

        clip.graphs = GraphedTowers(clip, cuda_graph_max_batch)
    return clip


def save_model_dir(model: torch.nn.Module, model_cfg: dict[str, Any], folder: str | Path,
                   preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Saves ``model`` as a folder that ``load_model(model_name=folder)`` loads:
    open_clip_config.json plus open_clip_model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / LOCAL_DIR_CONFIG).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / "open_clip_model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, folder / "open_clip_model.safetensors")
    return folder
