"""GPU benchmark, prepared for one run on an H100/H200 machine with no network
(torch, open_clip, grpcio, protobuf and prometheus_client there; no faiss, no
boto3). It also runs on CPU at tiny sizes (`--tiny`), which the test suite does.

- P5: images -> vectors through the encoder service, JPEG bytes in, at
  640x480 and 1600x1200, many concurrent clients; baseline: the raw model on
  already-preprocessed tensors at the same batch size (the ceiling).
- P6: one text query's p50 through the service; baseline: the raw model call.
- P6 graphs: the same through a service replaying CUDA graphs for small batches
  (the default on CUDA) vs one with them off (--cuda-graph-max-batch 0); and one
  text / one image in-process, graphs vs eager. On the CPU (--tiny) the same
  bucketed path runs without capture, so the script is exercised end to end.
- Text throughput batched through the service vs the raw model (77 tokens and
  trimmed).

    python -m bench.gpu                      # ViT-B-32, random weights (same compute)
    python -m bench.gpu --tiny               # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from bench.common import print_table, summarize_ms, time_calls, write_results
from clipsearch.encoder.v1 import encoder_service_pb2 as pb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from encoder_service.model import load_model


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, size[1] // 16), max(1, size[0] // 16), 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


async def stream_items(address: str, requests: list, method: str, clients: int) -> float:
    """Items/s with ``clients`` concurrent callers draining a shared list of requests."""
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 28),
                                                           ("grpc.max_send_message_length", 1 << 28)]) as channel:
        call = getattr(encoder_service_pb2_grpc.EncoderServiceStub(channel), method)
        await asyncio.gather(*(call(requests[0]) for _ in range(min(clients, 4))))
        queue = list(requests)
        count = 0

        async def client():
            nonlocal count
            while queue:
                request = queue.pop()
                await call(request)
                count += len(request.images) if method == "EmbedImages" else len(request.texts)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return count / (time.perf_counter() - started)


def in_process_graphs(model, args) -> dict:
    """One text and one image, p50 ms: CUDA graphs (captured here per bucket) vs eager."""
    from encoder_service.cuda_graphs import GraphedTowers

    device = model.device
    one = model.tokenize(["a dog playing in snow"])
    image = torch.randn(1, 3, model.image_size, model.image_size)
    calls = {"text": lambda: (model.encode_tokens(one), synchronize(device)),
             "image": lambda: (model.encode_pixels(image), synchronize(device))}
    eager = {k: summarize_ms(time_calls(fn, args.repeats * 5, warmup=5)) for k, fn in calls.items()}
    model.graphs = GraphedTowers(model, args.graph_max_batch)
    graphed = {k: summarize_ms(time_calls(fn, args.repeats * 5, warmup=5)) for k, fn in calls.items()}
    model.graphs = None
    return {"captured": device.type == "cuda", "eager": eager, "graphs": graphed}


def run(args) -> dict:
    from clipsearch.stack import ServiceProcess

    model = load_model(args.model, args.pretrained, device=args.device)
    device = model.device
    results: dict = {"model": args.model, "device": str(device), "dtype": model.dtype_name}
    size = model.image_size
    batch = args.batch

    # Baselines: the raw model on preprocessed tensors / tokens.
    pixels = torch.randn(batch, 3, size, size)

    def raw_images():
        model.encode_pixels(pixels)
        synchronize(device)

    raw_image_rate = batch / np.median(time_calls(raw_images, args.repeats, warmup=2))
    texts = [f"a photo of object number {i} in a scene" for i in range(batch)]
    tokens = model.tokenize(texts)
    raw_text_full = batch / np.median(time_calls(lambda: (model.encode_tokens(tokens, trim=False), synchronize(device)),
                                                 args.repeats, warmup=2))
    raw_text_trim = batch / np.median(time_calls(lambda: (model.encode_tokens(tokens, trim=True), synchronize(device)),
                                                 args.repeats, warmup=2))
    one = model.tokenize(["a dog playing in snow"])
    raw_one = time_calls(lambda: (model.encode_tokens(one, trim=True), synchronize(device)), args.repeats * 5, warmup=5)
    graphs = in_process_graphs(model, args)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    rows = []
    service_args = [
        "--model", args.model, "--pretrained", args.pretrained, "--device", args.device, "--port", "0",
        "--runtime", "torch", "--max-batch-size", str(batch),
        "--max-items-per-request", str(max(256, args.per_request)),
        "--max-queue-size", str(batch * 64), "--log-level", "WARNING", "--drain-delay-seconds", "0",
        "--max-message-mb", "256",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        encoder = ServiceProcess("encoder_service", [*service_args, "--cuda-graph-max-batch",
                                                     str(args.graph_max_batch)], Path(tmp), name="gpu-encoder"
                                 ).start(timeout=600)
        try:
            for label, image_size in args.image_sizes:
                images = [jpeg(i, image_size) for i in range(args.distinct_images)]
                requests = [pb.EmbedImagesRequest(images=[pb.ImageInput(data=images[(r * args.per_request + j)
                                                                                    % len(images)])
                                                          for j in range(args.per_request)])
                            for r in range(max(1, args.images // args.per_request))]
                rate = asyncio.run(stream_items(encoder.address, requests, "EmbedImages", args.clients))
                results[f"P5_{label}"] = {"images_per_s": rate, "raw_model_images_per_s": raw_image_rate,
                                          "ratio": rate / raw_image_rate}
                rows.append([f"P5 {label}", "JPEG -> vectors through the service (img/s)", rate, raw_image_rate,
                             rate / raw_image_rate, ">= 8000 img/s (640x480)" if label == "640x480" else "-"])
            channel = grpc.insecure_channel(encoder.address)
            stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
            served_one = time_calls(lambda: stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a dog playing in snow"])),
                                    args.repeats * 5, warmup=5)
            channel.close()
            text_requests = [pb.EmbedTextsRequest(texts=texts[:args.per_request])
                             for _ in range(max(1, args.texts // args.per_request))]
            text_rate = asyncio.run(stream_items(encoder.address, text_requests, "EmbedTexts", args.clients))
        finally:
            encoder.terminate()
        eager_encoder = ServiceProcess("encoder_service", [*service_args, "--cuda-graph-max-batch", "0"],
                                       Path(tmp), name="gpu-encoder-eager").start(timeout=600)
        try:
            with grpc.insecure_channel(eager_encoder.address) as channel:
                stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
                served_eager = time_calls(lambda: stub.EmbedTexts(pb.EmbedTextsRequest(
                    texts=["a dog playing in snow"])), args.repeats * 5, warmup=5)
        finally:
            eager_encoder.terminate()

    p6 = summarize_ms(served_one)
    eager_p6 = summarize_ms(served_eager)
    results["P6_graphs"] = {"through_service_graphs": p6, "through_service_eager": eager_p6,
                            "in_process": graphs, "target_ms": 1.5}
    captured = "CUDA graphs" if graphs["captured"] else "bucketed, no capture (CPU)"
    results["P6"] = {"through_service": p6, "raw_model": summarize_ms(raw_one), "target_ms": 1.5}
    results["text_throughput"] = {"service_per_s": text_rate, "raw_77_per_s": raw_text_full,
                                  "raw_trimmed_per_s": raw_text_trim}
    rows += [
        ["P6", "one text query p50 through the service (ms)", p6["p50_ms"], summarize_ms(raw_one)["p50_ms"],
         p6["p50_ms"] / summarize_ms(raw_one)["p50_ms"], "<= 1.5 ms"],
        ["P6 graphs", "one text query p50 through the service (ms): graphs vs eager", p6["p50_ms"],
         eager_p6["p50_ms"], p6["p50_ms"] / eager_p6["p50_ms"], "<= 1.5 ms"],
        ["graphs", f"one text p50 in-process (ms): {captured} vs eager", graphs["graphs"]["text"]["p50_ms"],
         graphs["eager"]["text"]["p50_ms"], graphs["graphs"]["text"]["p50_ms"] / graphs["eager"]["text"]["p50_ms"],
         "-"],
        ["graphs", f"one image p50 in-process (ms): {captured} vs eager", graphs["graphs"]["image"]["p50_ms"],
         graphs["eager"]["image"]["p50_ms"],
         graphs["graphs"]["image"]["p50_ms"] / graphs["eager"]["image"]["p50_ms"], "-"],
        ["text", "texts/s through the service vs raw 77-token model", text_rate, raw_text_full,
         text_rate / raw_text_full, "-"],
        ["text", "raw model: trimmed vs 77 tokens (texts/s)", raw_text_trim, raw_text_full,
         raw_text_trim / raw_text_full, "-"],
    ]
    print_table(f"GPU benchmark: {args.model} on {device} ({results['dtype']})",
                ["id", "what", "ours", "baseline", "ratio", "target"], rows)
    write_results("gpu" + ("-tiny" if args.tiny else ""), results, Path(args.out) if args.out else None)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=512, help="model batch size (service --max-batch-size)")
    parser.add_argument("--per-request", type=int, default=64, help="items per request")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--distinct-images", type=int, default=256)
    parser.add_argument("--texts", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--graph-max-batch", type=int, default=8, help="largest batch replayed from a CUDA graph")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke sizes")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    args.image_sizes = [("640x480", (640, 480)), ("1600x1200", (1600, 1200))]
    if args.tiny:
        args.model, args.device = ("clipsearch-tiny" if args.model == "ViT-B-32" else args.model), "cpu"
        args.batch, args.per_request, args.clients, args.images = 8, 4, 4, 16
        args.distinct_images, args.texts, args.repeats = 4, 16, 3
        args.image_sizes = [("640x480", (640, 480)), ("1600x1200", (160, 120))]
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
