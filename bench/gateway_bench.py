"""Gateway benchmarks: what the gateway costs on top of the services it calls.

- Text search p50: SearchImages(text) through the gateway (fresh texts, so the
  text cache misses; and one repeated text, so it hits) against the same calls
  made directly: EmbedTexts, then SearchVectors on every shard in parallel and
  a top-k merge in the client.
- Upload throughput (images/s): UploadImages batches (sha256, S3-less local
  storage, embed, index) against EmbedImages batches on the encoder alone.

Everything runs as real subprocesses on this machine (encoder, 2 index shards,
gateway), measured in the same run.

    python -m bench.gateway_bench                      # clipsearch-tiny, fuller run
    python -m bench.gateway_bench --quick              # a few seconds of measuring
    python -m bench.gateway_bench --model ViT-B-32     # random-weight ViT-B-32
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.common import print_table, summarize_ms, write_results
from clipsearch.encoder.v1 import encoder_service_pb2 as epb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.gateway.v1 import gateway_service_pb2_grpc
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.index.v1 import index_service_pb2_grpc

COLLECTION = "bench"
TOP_K = 10


def image_bytes(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(size // 8, 1), max(size // 8, 1), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def start_stack(workdir: Path, model: str, pretrained: str, shards: int, *, collection: str = COLLECTION,
                index_data_dirs: list[Path] | None = None, index_args: tuple[str, ...] = (),
                ready_timeout: float = 300, encoder_args: tuple[str, ...] = ()):
    """Encoder, ``shards`` index shards (on ``index_data_dirs`` when given, else fresh
    folders) and a gateway whose default collection is ``collection``; returns
    (encoder, shards, gateway, every process)."""
    from clipsearch.stack import ServiceProcess

    quiet = ["--log-level", "WARNING", "--drain-delay-seconds", "0"]
    data_dirs = index_data_dirs or [workdir / f"index-{i}" for i in range(shards)]
    encoder = ServiceProcess("encoder_service", ["--model", model, "--pretrained", pretrained, *quiet,
                                                 *encoder_args], workdir, name="bench-encoder").spawn()
    index = [ServiceProcess("index_service", ["--data-dir", str(data_dir), *quiet, *index_args], workdir,
                            name=f"bench-index-{i}").spawn() for i, data_dir in enumerate(data_dirs)]
    children = [encoder, *index]
    try:
        for child in children:
            child.wait_ready(ready_timeout)
        gateway = ServiceProcess("gateway", [
            "--encoder", encoder.address, "--index", ",".join(s.address for s in index),
            "--storage", str(workdir / "images"), "--data-dir", str(workdir / "gateway"),
            "--default-collection", collection, "--page-token-secret", "bench", "--http-port", "0", *quiet,
        ], workdir, name="bench-gateway").start(120)
        children.append(gateway)
    except BaseException:
        for child in children:
            child.kill()
        raise
    return encoder, index, gateway, children


def measure_upload(gw, enc, encoder_batches: list[list[bytes]], gateway_batches: list[list[bytes]],
                   warm_batch: list[bytes], collection: str = "",
                   per_batch: list[tuple[float, float]] | None = None) -> tuple[float, float]:
    """(encoder EmbedImages images/s, gateway UploadImages images/s): batch by batch,
    interleaved and alternating which goes first, so drift on a shared machine (and
    work left behind by the previous call) hits both alike. One untimed batch each
    first, so neither side pays for warm-up. Every upload must be new (created).
    ``per_batch`` receives (encoder images/s, gateway images/s) of each pair of batches."""
    def encoder_batch(datas: list[bytes]) -> float:
        started = time.perf_counter()
        enc.EmbedImages(epb.EmbedImagesRequest(images=[epb.ImageInput(data=d) for d in datas]), timeout=600)
        return time.perf_counter() - started

    def gateway_batch(datas: list[bytes]) -> float:
        started = time.perf_counter()
        response = gw.UploadImages(gpb.UploadImagesRequest(
            collection=collection, items=[gpb.UploadItem(data=d) for d in datas]), timeout=600)
        elapsed = time.perf_counter() - started
        assert all(r.status.code == 0 and r.created for r in response.results), response.results
        return elapsed

    encoder_batch(warm_batch)
    gateway_batch(warm_batch)
    encoder_seconds = gateway_seconds = 0.0
    for b, (to_encoder, to_gateway) in enumerate(zip(encoder_batches, gateway_batches)):
        if b % 2:
            through_gateway = gateway_batch(to_gateway)
            alone = encoder_batch(to_encoder)
        else:
            alone = encoder_batch(to_encoder)
            through_gateway = gateway_batch(to_gateway)
        encoder_seconds += alone
        gateway_seconds += through_gateway
        if per_batch is not None:
            per_batch.append((len(to_encoder) / alone, len(to_gateway) / through_gateway))
    return (sum(map(len, encoder_batches)) / encoder_seconds, sum(map(len, gateway_batches)) / gateway_seconds)


def http_vs_grpc(gateway, collection: str, request: gpb.SearchImagesRequest, calls: int) -> dict:
    """The same SearchImages request ``calls`` times over gRPC and over the HTTP/JSON front
    (proto3 JSON body, keep-alive connection), interleaved and alternating which goes first;
    after a warm-up, so the text cache hits on both and the difference is the front itself."""
    import httpx
    from google.protobuf import json_format

    url = f"http://{gateway.host}:{gateway.http_port}/v1/collections/{collection}/images:search"
    body = json_format.MessageToDict(request)
    with grpc.insecure_channel(gateway.address) as channel, httpx.Client(timeout=60) as client:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)

        def over_grpc() -> int:
            return len(stub.SearchImages(request, timeout=60).hits)

        def over_http() -> int:
            response = client.post(url, json=body)
            response.raise_for_status()
            return len(response.json()["hits"])

        for _ in range(5):
            assert over_grpc() == over_http() > 0
        samples: dict[str, list[float]] = {"grpc": [], "http": []}
        for i in range(calls):
            for name, fn in ((("grpc", over_grpc), ("http", over_http))[::1 if i % 2 else -1]):
                started = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - started)
    return {name: summarize_ms(values) for name, values in samples.items()} | {"calls": calls, "samples": samples}


def measure(fn, texts: list[str]) -> dict[str, float]:
    samples = []
    for text in texts:
        started = time.perf_counter()
        fn(text)
        samples.append(time.perf_counter() - started)
    return summarize_ms(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--model", default="clipsearch-tiny")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)

    preload = 64 if args.quick else 1000
    queries = 30 if args.quick else 300
    uploads = 64 if args.quick else 512
    batch = 16 if args.quick else 32
    size = 64 if args.quick else 224

    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        encoder, index, gateway, children = start_stack(Path(tmp), args.model, args.pretrained, args.shards)
        try:
            channels = [grpc.insecure_channel(p.address) for p in (gateway, encoder, *index)]
            gw = gateway_service_pb2_grpc.GatewayServiceStub(channels[0])
            enc = encoder_service_pb2_grpc.EncoderServiceStub(channels[1])
            shards = [index_service_pb2_grpc.IndexServiceStub(c) for c in channels[2:]]

            seed = 0
            for start in range(0, preload, batch):
                items = [gpb.UploadItem(data=image_bytes(seed + i, size)) for i in range(min(batch, preload - start))]
                seed += len(items)
                gw.UploadImages(gpb.UploadImagesRequest(items=items), timeout=300)

            def through_gateway(text: str) -> None:
                response = gw.SearchImages(gpb.SearchImagesRequest(parts=[gpb.QueryPart(text=text)], top_k=TOP_K),
                                           timeout=60)
                assert len(response.hits) == min(TOP_K, preload)

            def direct(text: str) -> None:
                embedded = enc.EmbedTexts(epb.EmbedTextsRequest(texts=[text]), timeout=60).embeddings
                request = ipb.SearchVectorsRequest(collection=COLLECTION, queries=embedded, k=TOP_K,
                                                   include_metadata=True)
                futures = [s.SearchVectors.future(request, timeout=60) for s in shards]
                hits = [h for f in futures for h in f.result().results[0].hits]
                hits.sort(key=lambda h: (-h.score, h.id))
                assert len(hits[:TOP_K]) == min(TOP_K, preload)

            warm = [f"warm-up query {i}" for i in range(5)]
            measure(direct, warm)
            measure(through_gateway, warm)
            # Interleave the two so drift on a shared machine hits both alike.
            direct_samples, gateway_samples = [], []
            for i in range(queries):
                for fn, samples, tag in ((direct, direct_samples, "d"), (through_gateway, gateway_samples, "g")):
                    text = f"a photo of thing number {i} ({tag})"
                    started = time.perf_counter()
                    fn(text)
                    samples.append(time.perf_counter() - started)
            direct_stats, gateway_stats = summarize_ms(direct_samples), summarize_ms(gateway_samples)
            cached_stats = measure(through_gateway, ["a cached query"] * queries)

            # Text-cache hits, so only the gateway and the shards work: with metadata in the hits
            # (the index reads its store) and without (read_mask; the index answers from memory).
            def cached_search(hit_fields: tuple[str, ...]) -> None:
                response = gw.SearchImages(gpb.SearchImagesRequest(
                    parts=[gpb.QueryPart(text="a cached query")], top_k=TOP_K, read_mask={"paths": list(hit_fields)},
                ), timeout=60)
                assert len(response.hits) == min(TOP_K, preload)

            with_metadata, without_metadata = [], []
            for _ in range(queries):
                for fields, samples in (((), with_metadata), (("id", "score", "url"), without_metadata)):
                    started = time.perf_counter()
                    cached_search(fields)
                    samples.append(time.perf_counter() - started)
            metadata_stats, lean_stats = summarize_ms(with_metadata), summarize_ms(without_metadata)

            upload_batches = [[image_bytes(100_000 + b * batch + i, size) for i in range(batch)]
                              for b in range(uploads // batch)]
            encoder_batches = [[image_bytes(200_000 + b * batch + i, size) for i in range(batch)]
                               for b in range(uploads // batch)]
            warm_batch = [image_bytes(300_000 + i, size) for i in range(batch)]
            encoder_rate, gateway_rate = measure_upload(gw, enc, encoder_batches, upload_batches, warm_batch)
            for channel in channels:
                channel.close()
        finally:
            for child in children:
                child.terminate(10)

    mode = "quick" if args.quick else "full"
    search_rows = [
        ["direct: EmbedTexts + SearchVectors x%d + merge" % args.shards, direct_stats["p50_ms"],
         direct_stats["p99_ms"], 1.0],
        ["gateway SearchImages (text cache miss)", gateway_stats["p50_ms"], gateway_stats["p99_ms"],
         gateway_stats["p50_ms"] / direct_stats["p50_ms"]],
        ["gateway SearchImages (text cache hit)", cached_stats["p50_ms"], cached_stats["p99_ms"],
         cached_stats["p50_ms"] / direct_stats["p50_ms"]],
        ["  cache hit, hits with metadata (interleaved)", metadata_stats["p50_ms"], metadata_stats["p99_ms"],
         metadata_stats["p50_ms"] / direct_stats["p50_ms"]],
        ["  cache hit, read_mask id,score,url (interleaved)", lean_stats["p50_ms"], lean_stats["p99_ms"],
         lean_stats["p50_ms"] / direct_stats["p50_ms"]],
    ]
    print_table(f"Text search, top_k={TOP_K}, {preload} images, {args.shards} shards, {args.model} ({mode})",
                ["path", "p50 ms", "p99 ms", "p50 ratio vs direct"], search_rows)
    upload_rows = [
        [f"encoder EmbedImages alone (batches of {batch})", encoder_rate, 1.0],
        [f"gateway UploadImages (batches of {batch})", gateway_rate, gateway_rate / encoder_rate],
    ]
    print_table(f"Upload throughput, {uploads} images of {size}x{size} JPEG ({mode})",
                ["path", "images/s", "ratio vs encoder"], upload_rows)
    write_results("gateway_bench" + ("_quick" if args.quick else ""), {
        "mode": mode, "model": args.model, "shards": args.shards, "preloaded_images": preload, "queries": queries,
        "search": {"direct": direct_stats, "gateway_cache_miss": gateway_stats, "gateway_cache_hit": cached_stats,
                   "cache_hit_with_metadata": metadata_stats, "cache_hit_without_metadata": lean_stats,
                   "p50_ratio_gateway_vs_direct": gateway_stats["p50_ms"] / direct_stats["p50_ms"]},
        "upload": {"images": uploads, "batch": batch, "image_size": size, "encoder_images_per_s": encoder_rate,
                   "gateway_images_per_s": gateway_rate, "ratio_gateway_vs_encoder": gateway_rate / encoder_rate},
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
