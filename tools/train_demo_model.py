"""Trains the bundled demo CLIP (``models/demo``) on synthetic shapes, on CPU.

The model is open_clip's ``CLIP`` with the ``clipsearch-demo`` config
(``encoder_service/model_configs/clipsearch-demo.json``): a small ResNet
vision tower (open_clip's ModifiedResNet, the CLIP RN50 design with one block
per stage and base width 32, attention pooling) over 64x64 images, and a small
causal text tower with the standard CLIP tokenizer (vocabulary 49408, context
77), both projected to 512-d like the production ViT-B/32.

Why a ResNet and not a small ViT: in the same 5 CPU-minutes a ViT (width 128,
4 layers, 8x8 patches) learned colours but not shapes (NDCG@10 0.18 on the
held-out set, shape right in 19% of the top 10), while this ResNet reached
NDCG@10 0.86. Convolutions learn shapes from little data; a ViT needs far more
steps than a 2-core CPU gives in 15 minutes.

Data: a pool of images from ``clipsearch.synthetic`` (training seed, default
0; evaluation uses other seeds). Every step draws a batch from the pool and
writes a fresh caption for each image, so the paraphrases vary across epochs.

Loss: CLIP's symmetric contrastive loss, with every caption that truthfully
describes an image counted as a positive for it (a batch of 256 holds many
"a red circle" images; treating them as negatives would teach noise).

The schedule runs for ``--steps`` steps or ``--max-minutes`` of training,
whichever ends first: warmup, then a cosine decay over progress =
max(step / steps, elapsed / max time). On a busy machine it stops early on
time with a fully decayed learning rate.

The result is written with ``encoder_service.model.save_model_dir`` (weights
stored as float16 to keep the folder small; open_clip loads them into float32),
then reloaded through ``load_model(model_name=<folder>)``, the path every
user checkpoint takes, and evaluated on a held-out synthetic set.

    python tools/train_demo_model.py                  # writes models/demo
    python tools/train_demo_model.py --out /tmp/demo --max-minutes 3
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from tqdm import tqdm

from clipsearch import eval as clip_eval
from clipsearch import synthetic
from encoder_service.model import MODEL_CONFIG_DIR, load_model, save_model_dir

REPO = Path(__file__).resolve().parent.parent
CONFIG_NAME = "clipsearch-demo"
NO_VALUE = -1  # a caption that does not mention this attribute / an absent second object
ATTRIBUTE_VALUES = (synthetic.SHAPES, tuple(synthetic.COLOURS), synthetic.SIZES, synthetic.POSITIONS)


def default_threads() -> int:
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "models" / "demo"), help="output folder (default models/demo)")
    parser.add_argument("--seed", type=int, default=0, help="training data and init seed (default 0)")
    parser.add_argument("--pool-size", type=int, default=40000, help="synthetic training images (default 40000)")
    parser.add_argument("--steps", type=int, default=2000, help="most optimizer steps (default 2000)")
    parser.add_argument("--max-minutes", type=float, default=12.0,
                        help="most minutes of training, data generation excluded (default 12)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    parser.add_argument("--warmup", type=int, default=60, help="warmup steps (default 60)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch threads (default: the idle cores this process may use, at least 1; on a "
                             "busy machine fewer threads run faster than oversubscribed ones)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bfloat16 autocast")
    parser.add_argument("--eval-seed", type=int, default=clip_eval.DEFAULT_SYNTHETIC_SEED,
                        help="held-out seed for the final evaluation")
    parser.add_argument("--eval-n", type=int, default=500, help="held-out images for the final evaluation")
    args = parser.parse_args(argv)
    if args.eval_seed == args.seed:
        parser.error("--eval-seed must differ from --seed (held-out data)")
    return args


def encode_objects(object_lists, slots: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """[n, slots, 4] attribute indexes (NO_VALUE where unknown) and a [n, slots] "present" mask."""
    codes = np.full((len(object_lists), slots, 4), NO_VALUE, dtype=np.int16)
    present = np.zeros((len(object_lists), slots), dtype=bool)
    for row, objects in enumerate(object_lists):
        for slot, obj in enumerate(objects):
            present[row, slot] = True
            for attribute, value in enumerate(obj):
                if value is not None:
                    codes[row, slot, attribute] = ATTRIBUTE_VALUES[attribute].index(value)
    return codes, present


def caption_match_matrix(objects, objects_present, mentions, mentions_present) -> np.ndarray:
    """[images, captions] True where the caption is true of the image (``synthetic.caption_matches``, vectorized)."""
    want = mentions[None, :, :, None, :]  # image, caption, mention, object, attribute
    have = objects[:, None, None, :, :]
    fits = ((want == NO_VALUE) | (want == have)).all(-1) & objects_present[:, None, None, :]
    return (fits.any(-1) | ~mentions_present[None]).all(-1)


def encode_text_trimmed(model: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut to the batch's longest caption (exact: the tower is causal)."""
    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return x @ model.text_projection


def multi_positive_clip_loss(image_features, text_features, logit_scale, match: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against targets spread evenly over every true caption/image."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    targets = match.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    targets = targets.T
    text_to_image = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def build_pool(count: int, seed: int, size: int):
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    object_lists = []
    for index in tqdm(range(count), desc="render pool", unit="img", mininterval=2):
        sample = synthetic.generate_one(seed, index, size)
        images[index] = np.asarray(sample.image)
        object_lists.append(sample.objects)
    return images, object_lists


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        (no_decay if skip else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def write_readme(out: Path, metadata: dict) -> None:
    metrics = metadata["held_out_eval"]["metrics"]
    table = "\n".join(f"| {clip_eval.METRIC_LABELS[name]} | {metrics[name]:.3f} |" for name in clip_eval.METRIC_NAMES)
    text = f"""# clipsearch demo model

A small CLIP trained from scratch in this repository on synthetic images of
coloured shapes (`clipsearch.synthetic`). It lets clipsearch run and be tested
offline, where no pretrained CLIP weights can be downloaded. It knows only its
synthetic domain: {len(synthetic.SHAPES)} shapes ({", ".join(synthetic.SHAPES)}), {len(synthetic.COLOURS)} colours
({", ".join(synthetic.COLOURS)}), two sizes and five positions, over
plain, gradient, noise, striped and checkered backgrounds. It is not a model of photos.

- Architecture: open_clip `CLIP`, config `{CONFIG_NAME}`
  (`encoder_service/model_configs/{CONFIG_NAME}.json`): a small ResNet vision tower (open_clip's
  ModifiedResNet, `{json.dumps(metadata["model_cfg"]["vision_cfg"])}`) and a causal text
  transformer (`{json.dumps(metadata["model_cfg"]["text_cfg"])}`); embeddings of dim
  {metadata["model_cfg"]["embed_dim"]}, like ViT-B/32. Standard CLIP tokenizer (vocabulary 49408, context 77).
  A small ViT learned colours but not shapes within the CPU budget; see the docstring of
  `tools/train_demo_model.py`.
- Files: `open_clip_config.json` (model and preprocessing config) and
  `open_clip_model.safetensors` (weights stored as float16, loaded into float32),
  `metadata.json` (how it was made).
- Parameters: {metadata["parameters"]:,}; folder size about {metadata["folder_bytes"] / 1e6:.1f} MB.

## Use

Pass `--model models/demo` wherever a model is chosen (the encoder service,
`python -m clipsearch.eval`). In Python:
`encoder_service.model.load_model(model_name="models/demo")`, the same
local-folder path as any user checkpoint. Reproduce the numbers below with:

```
{metadata["held_out_eval"]["command"]}
```

## Held-out accuracy

Synthetic seed {metadata["held_out_eval"]["seed"]} ({metadata["held_out_eval"]["n"]} images; training used seed {metadata["seed"]}),
{metadata["held_out_eval"]["num_queries"]} queries "a <colour> <shape>"; an image is relevant when it
holds an object of that shape and colour (binary relevance). Recall@k is
Top-k accuracy: a relevant image among the first k.

| metric | value |
|---|---|
{table}

## Retrain

```
{metadata["command"]}
```

Trained in {metadata["train_seconds"] / 60:.1f} minutes ({metadata["steps_done"]} steps of batch {metadata["batch_size"]},
CPU threads: {metadata["threads"]}, bfloat16 autocast: {metadata["bf16"]}) plus {metadata["pool_seconds"]:.0f} s to render
{metadata["pool_size"]} training images; {metadata["total_seconds"] / 60:.1f} minutes in all. Training stops at
`--steps` or `--max-minutes`, whichever comes first, so a busier or slower
machine makes fewer steps; `python tools/train_demo_model.py --help` lists the knobs.
"""
    (out / "README.md").write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    model_cfg = json.loads((MODEL_CONFIG_DIR / f"{CONFIG_NAME}.json").read_text())
    model = open_clip.create_model(CONFIG_NAME, pretrained=None)
    assert isinstance(model, open_clip.CLIP), "the demo config must build open_clip.CLIP (causal text tower)"
    tokenizer = open_clip.get_tokenizer(CONFIG_NAME)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    image_size = model_cfg["vision_cfg"]["image_size"]
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model {CONFIG_NAME}: {parameters / 1e6:.2f}M parameters, {args.threads} threads", flush=True)

    pool_images, pool_objects = build_pool(args.pool_size, args.seed, image_size)
    pool_codes, pool_present = encode_objects(pool_objects)
    pool_seconds = time.perf_counter() - started
    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    order_rng = np.random.default_rng(args.seed)
    caption_rng = random.Random(f"captions:{args.seed}")
    order = order_rng.permutation(args.pool_size)
    cursor = 0
    max_seconds = args.max_minutes * 60
    train_started = time.perf_counter()
    model.train()
    step, loss_ema = 0, None
    bar = tqdm(total=args.steps, desc="train", unit="step")
    while True:
        progress = max(step / args.steps, (time.perf_counter() - train_started) / max_seconds)
        if progress >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + args.batch_size > args.pool_size:
            order, cursor = order_rng.permutation(args.pool_size), 0
        batch = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size

        captions, mentions = zip(*(synthetic.describe(pool_objects[i], caption_rng) for i in batch))
        mention_codes, mention_present = encode_objects(mentions)
        match = torch.from_numpy(caption_match_matrix(pool_codes[batch], pool_present[batch], mention_codes,
                                                      mention_present))
        pixels = torch.from_numpy(pool_images[batch]).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
        tokens = tokenizer(list(captions))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            image_features = model.encode_image(pixels)
            text_features = encode_text_trimmed(model, tokens)
        loss = multi_positive_clip_loss(image_features.float(), text_features.float(), model.logit_scale.exp(), match)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr:.2e}", scale=f"{model.logit_scale.exp().item():.1f}",
                        refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - train_started
    model.eval()

    out = Path(args.out)
    save_model_dir(copy.deepcopy(model).half(), model_cfg, out, preprocess_cfg)

    # Reload through the path every user checkpoint takes, and check it against the trained model.
    loaded = load_model(model_name=str(out), device="cpu")
    probe = ["a red circle", "a small blue star on the left", "a yellow star and a blue square"]
    with torch.no_grad():
        reference = F.normalize(model.encode_text(tokenizer(probe)), dim=-1).numpy()
    agreement = float((loaded.encode_texts(probe) * reference).sum(1).min())
    assert agreement > 0.999, f"reloaded model disagrees with the trained one (cosine {agreement:.4f})"

    eval_args = clip_eval.build_parser().parse_args(
        ["--synthetic", "--seed", str(args.eval_seed), "--n", str(args.eval_n), "--model", str(out),
         "--device", "cpu", "--quiet"])
    result = clip_eval.run_eval(eval_args)
    print(clip_eval.format_table(result))

    total_seconds = time.perf_counter() - started
    shown_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    command = "python tools/train_demo_model.py" + ("" if not shown_args else " " + shlex.join(shown_args))
    metadata = {
        "name": CONFIG_NAME,
        "command": command,
        "seed": args.seed,
        "data": {"generator": "clipsearch.synthetic", "seed": args.seed, "pool_size": args.pool_size,
                 "image_size": image_size, "shapes": list(synthetic.SHAPES), "colours": list(synthetic.COLOURS),
                 "sizes": list(synthetic.SIZES), "positions": list(synthetic.POSITIONS),
                 "backgrounds": list(synthetic.BACKGROUND_KINDS),
                 "captions": "templates with paraphrases, re-drawn every time an image is used"},
        "pool_size": args.pool_size,
        "steps_requested": args.steps,
        "steps_done": step,
        "max_minutes": args.max_minutes,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "bf16": not args.no_bf16,
        "threads": args.threads,
        "final_loss_ema": round(loss_ema or float("nan"), 4),
        "logit_scale": round(model.logit_scale.exp().item(), 2),
        "pool_seconds": round(pool_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "parameters": parameters,
        "weights_dtype": "float16",
        "model_cfg": model_cfg,
        "fingerprint": loaded.fingerprint,
        "held_out_eval": {"seed": args.eval_seed, "n": args.eval_n, "num_queries": result["num_queries"],
                          "metrics": {k: round(v, 4) for k, v in result["metrics"].items()},
                          "command": f"python -m clipsearch.eval --synthetic --seed {args.eval_seed} "
                                     f"--n {args.eval_n} --model models/demo"},
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version()},
    }
    metadata["folder_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    write_readme(out, metadata)
    metadata["folder_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"saved {out} ({metadata['folder_bytes'] / 1e6:.1f} MB); {step} steps, train {train_seconds / 60:.1f} min, "
          f"total {total_seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
