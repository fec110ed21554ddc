"""Text-to-image retrieval accuracy: Recall@1, Recall@5, MRR and NDCG@10.

Every query (a sentence) ranks every image of a dataset, either with a model
run in this process (``--model``, as the encoder service loads it) or through a
running gateway (``--target host:port``). Results are printed as a table and
optionally written as JSON (``--json-out``).

Dataset formats
---------------
``--dataset FILE`` with ``--images DIR`` (default: the folder holding FILE, or its images/ subfolder).

(a) COCO / Flickr30k-style caption file (a JSON object with "images" and
    "annotations")::

        {"images": [{"id": 1, "file_name": "cat.jpg"}, ...],
         "annotations": [{"image_id": 1, "caption": "a cat on a sofa"}, ...]}

    Every caption is a query; its one relevant image is the image it
    describes. Images without a caption still take part, as distractors.

(b) Queries with relevant images: a JSON list, a JSON object with a "queries"
    list, or JSON Lines (``.jsonl``), each entry being::

        {"query": "a red circle", "relevant": ["000012.png", "000031.png"]}
        {"query": "a dog", "relevant": {"dog1.jpg": 2, "dog_far.jpg": 1}}

    Every image file under ``--images`` (searched recursively) takes part. A
    relevant entry names an image by its path relative to ``--images``, its
    file name, or its file name without extension (an id). A list gives
    binary relevance (grade 1); an object gives graded relevance.

``--synthetic`` builds a held-out set in memory instead: ``--n`` images from
``clipsearch.synthetic`` with ``--seed`` (the demo model was trained on other
seeds), and one query per shape and colour present, "a red circle", whose
relevant images are those holding an object of that shape and colour.

Metrics (averaged over queries)
-------------------------------
- Recall@k (Top-k accuracy): 1 when at least one relevant image is among the
  first k results, else 0. With one relevant image per query (captions) it is
  the usual Recall@k.
- MRR: 1 / rank of the first relevant image (0 when none is ranked).
- NDCG@10: DCG@10 / ideal DCG@10, with gain = relevance grade and discount
  log2(rank + 1). Binary relevance (grade 1) unless the dataset gives grades.

In-process, every image is ranked. Through a gateway, the ranking is the
first ``--top-k`` hits (at most 1000), so MRR there is MRR@top-k. Use a
dedicated ``--collection``: other images in it count as irrelevant.

Examples::

    python -m clipsearch.eval --synthetic --seed 1234 --n 500 --model models/demo
    python -m clipsearch.eval --dataset captions.json --images val2017/ --model ViT-B-32 --pretrained openai
    python -m clipsearch.eval --dataset queries.jsonl --images photos/ --target localhost:50051
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from clipsearch.image_formats import FILE_EXTENSIONS, is_image_file_name

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
DEFAULT_SYNTHETIC_SEED = 1234
METRIC_NAMES = ("recall@1", "recall@5", "mrr", "ndcg@10")
METRIC_LABELS = {"recall@1": "Recall@1 (Top-1)", "recall@5": "Recall@5 (Top-5)", "mrr": "MRR", "ndcg@10": "NDCG@10"}


# ---------------------------------------------------------------- metrics

def recall_at_k(ranking: Sequence[str], relevance: dict[str, float], k: int) -> float:
    """1.0 when a relevant item is among the first k of ``ranking`` (Top-k accuracy), else 0.0."""
    return 1.0 if any(relevance.get(key, 0) > 0 for key in ranking[:k]) else 0.0


def reciprocal_rank(ranking: Sequence[str], relevance: dict[str, float]) -> float:
    """1 / (1-based rank of the first relevant item); 0.0 when none is ranked."""
    for rank, key in enumerate(ranking, start=1):
        if relevance.get(key, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranking: Sequence[str], relevance: dict[str, float], k: int) -> float:
    """Normalized DCG with linear gain (the grade) and log2(rank + 1) discount."""
    dcg = sum(relevance.get(key, 0) / math.log2(rank + 1) for rank, key in enumerate(ranking[:k], start=1))
    ideal_grades = sorted((grade for grade in relevance.values() if grade > 0), reverse=True)[:k]
    ideal = sum(grade / math.log2(rank + 1) for rank, grade in enumerate(ideal_grades, start=1))
    return dcg / ideal if ideal > 0 else 0.0


def query_metrics(ranking: Sequence[str], relevance: dict[str, float]) -> dict[str, float]:
    return {
        "recall@1": recall_at_k(ranking, relevance, 1),
        "recall@5": recall_at_k(ranking, relevance, 5),
        "mrr": reciprocal_rank(ranking, relevance),
        "ndcg@10": ndcg_at_k(ranking, relevance, 10),
    }


def mean_metrics(per_query: Sequence[dict[str, float]]) -> dict[str, float]:
    if not per_query:
        raise ValueError("no queries to evaluate")
    return {name: sum(m[name] for m in per_query) / len(per_query) for name in METRIC_NAMES}


# ---------------------------------------------------------------- datasets

@dataclass
class Query:
    text: str
    relevance: dict[str, float]  # image key -> grade (> 0)


@dataclass
class EvalDataset:
    """``images`` maps an image key to a file path or an in-memory PIL image."""

    description: str
    images: dict[str, Any]
    queries: list[Query]
    relevance_note: str = "binary: grade 1 for each listed relevant image"
    extra: dict[str, Any] = field(default_factory=dict)


def open_image(source: Any):
    from PIL import Image

    if isinstance(source, (str, Path)):
        with Image.open(source) as image:
            return image.convert("RGB")
    return source.convert("RGB")


def image_bytes(source: Any) -> bytes:
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_json_or_jsonl(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def load_captions_dataset(data: dict, images_dir: Path, name: str) -> EvalDataset:
    images: dict[str, Any] = {}
    for entry in data["images"]:
        images[str(entry["id"])] = images_dir / entry["file_name"]
    queries = []
    for annotation in data["annotations"]:
        key = str(annotation["image_id"])
        if key not in images:
            raise ValueError(f"{name}: annotation refers to unknown image_id {annotation['image_id']!r}")
        queries.append(Query(annotation["caption"].strip(), {key: 1.0}))
    missing = [str(path) for path in images.values() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image files are missing, e.g. {missing[:3]}; check --images")
    return EvalDataset(f"{name} (captions: {len(images)} images, {len(queries)} captions)", images, queries,
                       "binary: a caption's one relevant image is the image it describes")


def list_image_files(images_dir: Path) -> dict[str, Path]:
    return {
        path.relative_to(images_dir).as_posix(): path
        for path in sorted(images_dir.rglob("*"))
        if path.is_file() and is_image_file_name(path.name)
    }


def load_queries_dataset(entries: list, images_dir: Path, name: str) -> EvalDataset:
    images = list_image_files(images_dir)
    if not images:
        extensions = ", ".join(sorted(FILE_EXTENSIONS))
        raise FileNotFoundError(f"no image files ({extensions}) under {images_dir}; check --images")
    aliases: dict[str, str] = {}
    for key in images:
        aliases.setdefault(Path(key).stem, key)
        aliases.setdefault(Path(key).name, key)
        aliases[key] = key
    graded = False
    queries = []
    for number, entry in enumerate(entries, start=1):
        if "query" not in entry or "relevant" not in entry:
            raise ValueError(f"{name}: entry {number} needs 'query' and 'relevant'; got keys {sorted(entry)}")
        listed = entry["relevant"]
        if isinstance(listed, dict):
            graded = True
            grades = {str(k): float(v) for k, v in listed.items()}
        else:
            grades = {str(k): 1.0 for k in listed}
        relevance = {}
        for ref, grade in grades.items():
            if ref not in aliases:
                raise ValueError(f"{name}: query {entry['query']!r} names {ref!r}, which is not an image under "
                                 f"{images_dir} (use a relative path, a file name or a file stem)")
            if grade > 0:
                relevance[aliases[ref]] = grade
        if not relevance:
            raise ValueError(f"{name}: query {entry['query']!r} has no relevant image")
        queries.append(Query(str(entry["query"]), relevance))
    note = ("graded: the grades given in the file (linear gain)" if graded
            else "binary: grade 1 for each listed relevant image")
    return EvalDataset(f"{name} (queries: {len(images)} images, {len(queries)} queries)", dict(images), queries, note)


def load_dataset(path: str | Path, images_dir: str | Path | None = None) -> EvalDataset:
    """Reads format (a) or (b) above, chosen by the content of ``path``."""
    path = Path(path)
    # Default: the dataset file's folder, or its images/ subfolder (the layout write_dataset makes).
    images = Path(images_dir) if images_dir else path.parent
    if not images_dir and (path.parent / "images").is_dir():
        images = path.parent / "images"
    data = _read_json_or_jsonl(path)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return load_captions_dataset(data, images, path.name)
    if isinstance(data, dict) and "queries" in data:
        data = data["queries"]
    if isinstance(data, list):
        return load_queries_dataset(data, images, path.name)
    raise ValueError(f"{path}: expected a COCO-style caption file (images + annotations) or a list of "
                     "{'query', 'relevant'} entries (JSON list, {'queries': [...]}, or JSON Lines)")


def synthetic_dataset(n: int, seed: int, size: int = 64) -> EvalDataset:
    """Shape+colour queries over ``n`` synthetic images (see ``clipsearch.synthetic``)."""
    from clipsearch import synthetic

    samples = synthetic.generate(n, seed, size)
    keys = [synthetic.image_file_name(i) for i in range(n)]
    queries = [Query(text, {keys[i]: 1.0 for i in relevant})
               for text, relevant in synthetic.shape_colour_queries(samples)]
    return EvalDataset(
        f"synthetic shapes (seed {seed}, {n} images of {size}px, {len(queries)} shape+colour queries)",
        {key: sample.image for key, sample in zip(keys, samples)},
        queries,
        "binary: an image is relevant to 'a <colour> <shape>' when it holds an object of that shape and colour",
        {"seed": seed, "n": n, "size": size},
    )


# ---------------------------------------------------------------- rankers

def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def rank_in_process(dataset: EvalDataset, model_name: str, pretrained: str, device: str = "auto",
                    cache_dir: str = "", batch_size: int = 64, progress: bool = True, runtime: str = "auto",
                    onnx_quantize: str = "none") -> tuple[list[list[str]], dict]:
    """Full rankings (image keys, best first) for every query, from a model loaded in this process."""
    import numpy as np
    from tqdm import tqdm

    # The encoder's model loading code, so results match what the service computes.
    from encoder_service.model import load_model

    model = load_model(model_name, pretrained, device=device, cache_dir=cache_dir, runtime=runtime,
                       onnx_quantize=onnx_quantize)
    keys = list(dataset.images)
    image_vectors = []
    for chunk in tqdm(list(_batches(keys, batch_size)), desc="images", unit="batch", disable=not progress):
        image_vectors.append(model.encode_images([open_image(dataset.images[key]) for key in chunk]))
    texts = [query.text for query in dataset.queries]
    text_vectors = [model.encode_texts(chunk) for chunk in _batches(texts, 256)]
    scores = np.concatenate(text_vectors) @ np.concatenate(image_vectors).T
    order = np.argsort(-scores, axis=1, kind="stable")
    rankings = [[keys[j] for j in row] for row in order]
    info = {"mode": "in-process", "model": model_name, "pretrained": model.pretrained,
            "fingerprint": model.fingerprint, "dim": model.dim, "device": str(model.device),
            "runtime": model.runtime + ("-int8" if model.onnx is not None and model.onnx.quantize == "int8" else "")}
    return rankings, info


def rank_through_gateway(dataset: EvalDataset, target: str, collection: str, top_k: int = 1000,
                         api_key: str = "", batch_size: int = 32, timeout: float = 120.0,
                         progress: bool = True) -> tuple[list[list[str]], dict]:
    """Uploads the images to a gateway collection, then ranks by SearchImages with one text part."""
    import grpc
    from tqdm import tqdm

    from clipsearch.gateway.v1 import gateway_service_pb2 as pb
    from clipsearch.gateway.v1 import gateway_service_pb2_grpc as pb_grpc

    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    limit = 256 * 1024 * 1024
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", limit),
                                                     ("grpc.max_receive_message_length", limit)])
    stub = pb_grpc.GatewayServiceStub(channel)
    try:
        if collection:
            try:
                stub.CreateCollection(pb.CreateCollectionRequest(name=collection), metadata=metadata, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
        keys_by_id: dict[str, list[str]] = {}
        keys = list(dataset.images)
        for chunk in tqdm(list(_batches(keys, batch_size)), desc="upload", unit="batch", disable=not progress):
            payloads = [image_bytes(dataset.images[key]) for key in chunk]
            request = pb.UploadImagesRequest(collection=collection, items=[
                pb.UploadItem(data=data, filename=Path(key).name) for key, data in zip(chunk, payloads)])
            response = stub.UploadImages(request, metadata=metadata, timeout=timeout)
            for key, data, result in zip(chunk, payloads, response.results):
                if result.status.code != 0:
                    raise RuntimeError(f"upload of {key} failed: code {result.status.code}: {result.status.message}")
                image_id = result.id or hashlib.sha256(data).hexdigest()
                keys_by_id.setdefault(image_id, []).append(key)
        top_k = max(1, min(top_k, 1000))
        rankings = []
        for query in tqdm(dataset.queries, desc="search", unit="query", disable=not progress):
            response = stub.SearchImages(pb.SearchImagesRequest(
                collection=collection, parts=[pb.QueryPart(text=query.text)], top_k=top_k,
                page_size=top_k), metadata=metadata, timeout=timeout)
            ranking = []
            for hit in response.hits:
                ranking.extend(keys_by_id.get(hit.id, [f"<other:{hit.id}>"]))
            rankings.append(ranking)
    finally:
        channel.close()
    return rankings, {"mode": "gateway", "target": target, "collection": collection, "top_k": top_k}


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation options; also used by ``clipsearch eval``."""
    source = parser.add_argument_group("dataset (one of)")
    source.add_argument("--dataset", help="caption JSON (COCO/Flickr30k style) or queries JSON/JSONL (formats below)")
    source.add_argument("--images", help="image folder for --dataset (default: the dataset file's folder, or its images/ subfolder)")
    source.add_argument("--synthetic", action="store_true",
                        help="held-out synthetic shapes with shape+colour queries")
    source.add_argument("--seed", type=int, default=DEFAULT_SYNTHETIC_SEED,
                        help=f"--synthetic seed (default {DEFAULT_SYNTHETIC_SEED}; the demo model trains on others)")
    source.add_argument("--n", type=int, default=500, help="--synthetic number of images (default 500)")
    source.add_argument("--size", type=int, default=64, help="--synthetic image side in pixels (default 64)")
    model = parser.add_argument_group("in-process model (default)")
    model.add_argument("--model", default=DEFAULT_MODEL,
                       help="open_clip model name, or a folder with open_clip_config.json and weights "
                            "(e.g. models/demo)")
    model.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                       help="pretrained tag, checkpoint file, or none (ignored for a folder)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    model.add_argument("--model-cache-dir", default="", help="where downloaded weights are kept")
    model.add_argument("--runtime", default="auto", help="auto (onnx on CPU, torch on CUDA), torch or onnx")
    model.add_argument("--onnx-quantize", default="none", help="none or int8 (the onnx runtime's int8 weights)")
    model.add_argument("--batch-size", type=int, default=64, help="images per model call")
    gateway = parser.add_argument_group("through a running gateway")
    gateway.add_argument("--target", help="gateway host:port; uploads the images, then searches")
    gateway.add_argument("--collection", default="clipsearch-eval",
                         help="collection to upload into (created when missing; use a dedicated one)")
    gateway.add_argument("--top-k", type=int, default=1000, help="hits per query (at most 1000)")
    gateway.add_argument("--api-key", default="", help="sent as 'authorization: Bearer <key>'")
    output = parser.add_argument_group("output")
    output.add_argument("--json-out", help="write the results as JSON to this file")
    output.add_argument("--per-query", action="store_true", help="include per-query metrics in the JSON")
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clipsearch.eval",
        description="Text-to-image retrieval accuracy (Recall@1/5, MRR, NDCG@10).",
        epilog=__doc__.split("Dataset formats", 1)[1].join(["Dataset formats", ""]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_arguments(parser)


def dataset_from_args(args: argparse.Namespace) -> EvalDataset:
    if args.synthetic == bool(args.dataset):
        raise ValueError("give exactly one of --dataset FILE or --synthetic")
    if args.synthetic:
        return synthetic_dataset(args.n, args.seed, args.size)
    return load_dataset(args.dataset, args.images)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation described by parsed ``args``; returns the result dict that --json-out writes."""
    started = time.perf_counter()
    dataset = dataset_from_args(args)
    progress = not getattr(args, "quiet", False)
    if args.target:
        rankings, info = rank_through_gateway(dataset, args.target, args.collection, args.top_k, args.api_key,
                                              progress=progress)
    else:
        rankings, info = rank_in_process(dataset, args.model, args.pretrained, args.device, args.model_cache_dir,
                                         args.batch_size, progress=progress, runtime=getattr(args, "runtime", "auto"),
                                         onnx_quantize=getattr(args, "onnx_quantize", "none"))
    per_query = [query_metrics(ranking, query.relevance) for ranking, query in zip(rankings, dataset.queries)]
    result: dict[str, Any] = {
        "dataset": dataset.description,
        "num_images": len(dataset.images),
        "num_queries": len(dataset.queries),
        "relevance": dataset.relevance_note,
        "metrics": mean_metrics(per_query),
        "ranker": info,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if dataset.extra:
        result["synthetic"] = dataset.extra
    if getattr(args, "per_query", False):
        result["per_query"] = [
            {"query": query.text, "num_relevant": len(query.relevance), "top5": ranking[:5], **metrics}
            for query, ranking, metrics in zip(dataset.queries, rankings, per_query)
        ]
    return result


def format_table(result: dict[str, Any]) -> str:
    ranker = result["ranker"]
    if ranker["mode"] == "gateway":
        source = f"gateway {ranker['target']} (collection {ranker['collection']!r}, top_k {ranker['top_k']})"
    else:
        source = f"{ranker['model']} ({ranker['pretrained']}, dim {ranker['dim']}, fingerprint {ranker['fingerprint']})"
    lines = [
        f"dataset   : {result['dataset']}",
        f"model     : {source}",
        f"relevance : {result['relevance']}",
        f"queries   : {result['num_queries']}    images: {result['num_images']}    time: {result['seconds']} s",
        "",
        f"| {'metric':<18} | {'value':>6} |",
        f"|{'-' * 20}|{'-' * 8}|",
    ]
    lines += [f"| {METRIC_LABELS[name]:<18} | {result['metrics'][name]:>6.3f} |" for name in METRIC_NAMES]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run_eval(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    except RuntimeError as exc:
        if type(exc).__name__ != "ModelLoadError":
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
