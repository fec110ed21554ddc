"""Init step of the encoder pods: put the pretrained weights into the shared
model cache (the PVC mounted at the cache dir), so encoder pods load them from
disk instead of each downloading them.

It reads the same settings as the encoder: the YAML file named by
CLIPSEARCH_CONFIG (top-level keys, then the ``encoder:`` section), then the
CLIPSEARCH_MODEL / CLIPSEARCH_PRETRAINED / CLIPSEARCH_MODEL_CACHE_DIR
environment variables. It downloads with open_clip's own functions and the
same ``cache_dir``, so the files land where the encoder looks for them.

Nothing is downloaded when:
- the model or the pretrained tag is a local path (a checkpoint baked into the
  image or on a volume), or the tag is ``none``;
- a marker file shows that this model and tag were fetched before.

Exit status 0 means the cache is ready; anything else fails the init container,
so the pod retries instead of starting without weights.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml

ENV_PREFIX = "CLIPSEARCH_"
SECTIONS = ("encoder", "index", "gateway", "cli")
DEFAULTS = {"model": "ViT-B-32", "pretrained": "openai", "model_cache_dir": "/models"}


def load_settings(environ=os.environ) -> dict:
    values = dict(DEFAULTS)
    config = environ.get(ENV_PREFIX + "CONFIG", "")
    if config:
        document = yaml.safe_load(Path(config).read_text()) or {}
        values.update({k: v for k, v in document.items() if k not in SECTIONS})
        values.update(document.get("encoder") or {})
    for name in DEFAULTS:
        if ENV_PREFIX + name.upper() in environ:
            values[name] = environ[ENV_PREFIX + name.upper()]
    return {name: str(values[name]) for name in DEFAULTS}


def is_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "file:", "local-dir:")) or os.path.exists(value)


def marker_path(cache_dir: str, model: str, pretrained: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}__{pretrained}")
    return Path(cache_dir) / ".clipsearch-fetched" / safe


def fetch(model: str, pretrained: str, cache_dir: str) -> str:
    """Downloads the weights into ``cache_dir``; returns the local file or folder."""
    import open_clip

    if model.startswith("hf-hub:"):
        # The repo holds the config and the weights; pretrained is ignored.
        from huggingface_hub import snapshot_download

        return snapshot_download(model[len("hf-hub:"):], cache_dir=cache_dir)
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise SystemExit(
            f"fetch-model: open_clip has no pretrained weights {pretrained!r} for model {model!r}. "
            f"Valid tags for {model!r}: {tags or 'none (unknown model name)'}. "
            "Use a local checkpoint path for your own weights."
        )
    return open_clip.download_pretrained(cfg, cache_dir=cache_dir)


def main() -> int:
    settings = load_settings()
    model, pretrained, cache_dir = settings["model"], settings["pretrained"], settings["model_cache_dir"]
    if is_local(model) or is_local(pretrained) or pretrained.lower() in ("", "none"):
        print(f"fetch-model: nothing to download for model={model!r} pretrained={pretrained!r}", flush=True)
        return 0
    marker = marker_path(cache_dir, model, pretrained)
    if marker.exists():
        print(f"fetch-model: {model}/{pretrained} already in {cache_dir}", flush=True)
        return 0
    print(f"fetch-model: downloading {model}/{pretrained} into {cache_dir}", flush=True)
    try:
        target = fetch(model, pretrained, cache_dir)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - report any download failure plainly
        print(
            f"fetch-model: download of {model}/{pretrained} failed: {type(exc).__name__}: {exc}\n"
            "Offline or air-gapped cluster? Copy the weights onto the model-cache volume, or point "
            "the encoder's model/pretrained settings at a local checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(f"{target}\n")
    os.replace(tmp, marker)
    print(f"fetch-model: ready: {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
