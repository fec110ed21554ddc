"""Encoder benchmarks (P3, P4 and the encoder service's own figures).

- P4: one text query's encode latency, trimmed to the prompt vs the full
  77-token path (in-process model, same run).
- Runtimes: one text query's p50 on ONNX Runtime vs torch (same trimmed input),
  and images/s at batch 32 (preprocessed tensors) on ONNX Runtime vs torch.
- Service overhead: p50 of one text query through the gRPC service vs the
  model call alone.
- P3: throughput with 16 concurrent one-item clients through the service
  (texts; images) vs one in-process batched model call over the same items.
  Both sides decode JPEGs the same way: the service's ``decode_image`` with
  DCT scaling to the model's input size (PIL draft mode).

Every ours-vs-baseline figure is taken in ``ROUNDS`` alternating rounds (or
cut into that many rounds where calls are interleaved one by one); a ratio
is the median of the per-round ratios, with their min-max.

    python -m bench.encoder_bench                      # ViT-B-32, random weights
    python -m bench.encoder_bench --model clipsearch-tiny --quick
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from bench.common import (alternate, compare_rounds, p50_ms_by_round, print_table, summarize_ms, time_calls,
                          write_results)
from clipsearch.encoder.v1 import encoder_service_pb2 as pb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from encoder_service.engine import EncoderConfig
from encoder_service.images import decode_image
from encoder_service.model import load_model

QUERY = "a dog playing in snow"
ROUNDS = 3


def jpeg(seed: int, size=(640, 480)) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def start_encoder(model: str, pretrained: str, workdir: Path):
    from clipsearch.stack import ServiceProcess

    return ServiceProcess(
        "encoder_service",
        ["--model", model, "--pretrained", pretrained, "--port", "0",
         "--max-batch-size", "64", "--log-level", "WARNING", "--drain-delay-seconds", "0"],
        workdir, name="bench-encoder",
    ).start(timeout=300)


async def concurrent_throughput(address: str, make_request, method: str, items: list, clients: int) -> float:
    """Items/s with ``clients`` concurrent callers, each sending one item at a time (after one warm-up call each)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
        call = getattr(stub, method)
        queue = list(items)

        async def client():
            while queue:
                await call(make_request(queue.pop()))

        await asyncio.gather(*(call(make_request(items[0])) for _ in range(clients)))  # warm up
        queue = list(items)
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return len(items) / (time.perf_counter() - started)


def interleaved(calls: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call for each of ``calls``, taken in turn, so drift hits every one alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            samples[name] += time_calls(fn, 1, warmup=0)
    return samples


def run_runtimes(torch_model, onnx_model, repeats: int, image_batch: int = 32) -> dict:
    """ONNX Runtime vs torch on the same weights and inputs: one trimmed text query, and batches of images."""
    tokens = torch_model.tokenize([QUERY])
    one = interleaved({"onnx": lambda: onnx_model.encode_tokens(tokens),
                       "torch": lambda: torch_model.encode_tokens(tokens)}, repeats)
    pixels = torch.randn(image_batch, 3, torch_model.image_size, torch_model.image_size)
    images = interleaved({"onnx": lambda: onnx_model.encode_pixels(pixels),
                          "torch": lambda: torch_model.encode_pixels(pixels)}, max(ROUNDS, repeats // 10), warmup=1)
    text_rounds = compare_rounds(p50_ms_by_round(one["onnx"], ROUNDS), p50_ms_by_round(one["torch"], ROUNDS))
    # One batch each per round, interleaved: images/s per round.
    image_rounds = compare_rounds([image_batch / t for t in images["onnx"]], [image_batch / t for t in images["torch"]])
    return {"text_query": {"onnx": summarize_ms(one["onnx"]), "torch": summarize_ms(one["torch"]),
                           "ratio": text_rounds["ratio"], "rounds": text_rounds, "target": 0.5},
            "images": {"batch": image_batch, "onnx_per_s": image_rounds["ours"],
                       "torch_per_s": image_rounds["baseline"], "ratio": image_rounds["ratio"],
                       "rounds": image_rounds, "target": 1.3},
            "threads": onnx_model.onnx.threads}


def run(args) -> dict:
    model = load_model(args.model, args.pretrained, device="cpu", runtime="torch")
    onnx_model = load_model(args.model, args.pretrained, device="cpu", runtime="onnx")
    repeats = 10 if args.quick else 50
    results: dict = {"model": args.model, "pretrained": args.pretrained}

    # P4: trimmed and full encodes interleaved call by call.
    p4_samples = interleaved({"trimmed": lambda: model.encode_texts([QUERY], trim=True),
                              "full_77": lambda: model.encode_texts([QUERY], trim=False)}, repeats)
    p4 = compare_rounds(p50_ms_by_round(p4_samples["trimmed"], ROUNDS), p50_ms_by_round(p4_samples["full_77"], ROUNDS))
    results["P4"] = {"trimmed": summarize_ms(p4_samples["trimmed"]), "full_77": summarize_ms(p4_samples["full_77"]),
                     "ratio": p4["ratio"], "rounds": p4, "target": 0.35}
    runtimes = results["runtimes"] = run_runtimes(model, onnx_model, repeats, 8 if args.quick else 32)
    model = onnx_model  # the service runs onnx on the CPU (runtime auto): the baselines below do too

    n_texts = 32 if args.quick else 256
    n_images = 16 if args.quick else 128
    texts = [f"photo number {i} of a {['red', 'blue', 'green'][i % 3]} car on a street" for i in range(n_texts)]
    images = [jpeg(i) for i in range(n_images)]
    limits = EncoderConfig()

    def batched_texts():
        for start in range(0, n_texts, 64):
            model.encode_texts(texts[start:start + 64])

    pool = ThreadPoolExecutor(os.cpu_count() or 1)

    def preprocess(data: bytes):
        # The service's own decode: DCT scaling to the model's input size (PIL draft mode).
        image = decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                             target_size=model.image_size)
        return model.preprocess(image)

    def batched_images():
        # The strongest in-process baseline: decode + preprocess on every core, then batched model calls.
        for start in range(0, n_images, 64):
            model.encode_pixels(torch.stack(list(pool.map(preprocess, images[start:start + 64]))))

    batched_texts()  # warm up
    batched_images()
    with tempfile.TemporaryDirectory() as tmp:
        encoder = start_encoder(args.model, args.pretrained, Path(tmp))
        try:
            channel = grpc.insecure_channel(encoder.address)
            stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
            served = time_calls(lambda: stub.EmbedTexts(pb.EmbedTextsRequest(texts=[QUERY])), repeats)
            channel.close()

            def service_texts(_round: int) -> float:
                return asyncio.run(concurrent_throughput(
                    encoder.address, lambda t: pb.EmbedTextsRequest(texts=[t]), "EmbedTexts", texts, args.clients))

            def service_images(_round: int) -> float:
                return asyncio.run(concurrent_throughput(
                    encoder.address, lambda d: pb.EmbedImagesRequest(images=[pb.ImageInput(data=d)]), "EmbedImages",
                    images, args.clients))

            def baseline_texts(_round: int) -> float:
                return n_texts / time_calls(batched_texts, 1, warmup=0)[0]

            def baseline_images(_round: int) -> float:
                return n_images / time_calls(batched_images, 1, warmup=0)[0]

            # Alternating rounds: the service and the in-process baseline take turns going first.
            texts_rounds = compare_rounds(*alternate(ROUNDS, service_texts, baseline_texts))
            images_rounds = compare_rounds(*alternate(ROUNDS, service_images, baseline_images))
        finally:
            encoder.terminate()
    pool.shutdown()

    results["service_text_query"] = {
        "through_service": summarize_ms(served), "model_call": runtimes["text_query"]["onnx"],
        "overhead_ms": summarize_ms(served)["p50_ms"] - runtimes["text_query"]["onnx"]["p50_ms"],
    }
    text_rate, base_text_rate = texts_rounds["ours"], texts_rounds["baseline"]
    image_rate, base_image_rate = images_rounds["ours"], images_rounds["baseline"]
    results["P3"] = {
        "clients": args.clients, "rounds": ROUNDS, "decode": "decode_image with DCT scaling, both sides",
        "texts_per_s": text_rate, "texts_baseline_per_s": base_text_rate, "texts_ratio": texts_rounds["ratio"],
        "texts_rounds": texts_rounds,
        "images_per_s": image_rate, "images_baseline_per_s": base_image_rate,
        "images_ratio": images_rounds["ratio"], "images_rounds": images_rounds, "target": 0.85,
    }

    def spread(rounds: dict) -> str:
        return f"{rounds['ratio_min']:.2f}-{rounds['ratio_max']:.2f} ({rounds['rounds']})"

    print_table(f"Encoder ({args.model}, pretrained={args.pretrained}; ONNX Runtime {runtimes['threads']} threads; "
                f"ratio = median over rounds, min-max (rounds))",
                ["id", "what", "ours", "baseline", "ratio", "min-max", "target"], [
        ["P4", "one text query encode p50 (ms): trimmed vs 77 tokens (torch)", p4["ours"], p4["baseline"],
         p4["ratio"], spread(p4), "<= 0.35"],
        ["P4", "one text query encode p50 (ms): onnx vs torch, same trimmed input",
         runtimes["text_query"]["onnx"]["p50_ms"], runtimes["text_query"]["torch"]["p50_ms"],
         runtimes["text_query"]["ratio"], spread(runtimes["text_query"]["rounds"]), "<= 0.5"],
        ["img", f"images/s at batch {runtimes['images']['batch']}, preprocessed: onnx vs torch",
         runtimes["images"]["onnx_per_s"], runtimes["images"]["torch_per_s"], runtimes["images"]["ratio"],
         spread(runtimes["images"]["rounds"]), ">= 1.3"],
        ["-", "one text query p50 (ms): service vs onnx model call", results["service_text_query"]["through_service"]["p50_ms"],
         results["service_text_query"]["model_call"]["p50_ms"],
         results["service_text_query"]["through_service"]["p50_ms"] / results["service_text_query"]["model_call"]["p50_ms"],
         "1 run", "-"],
        ["P3", f"texts/s, {args.clients} concurrent 1-item clients vs one batched call", text_rate, base_text_rate,
         results["P3"]["texts_ratio"], spread(texts_rounds), ">= 0.85"],
        ["P3", f"images/s (640x480 JPEG), {args.clients} clients vs one batched call", image_rate, base_image_rate,
         results["P3"]["images_ratio"], spread(images_rounds), ">= 0.85"],
    ])
    write_results("encoder" + ("-quick" if args.quick else ""), results, Path(args.out) if args.out else None)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="few items and repeats (smoke test)")
    parser.add_argument("--out", default="", help="results folder (default bench/results)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
