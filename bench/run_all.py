"""Every benchmark of the suite in one run, each figure beside a baseline measured
in the same run, then one summary table (bench/results/summary.json).

    python -m bench.run_all            # quick (make bench): 100k vectors, ~3 min on 2 cores
    python -m bench.run_all --full     # make bench-full: 1M vectors, ~9 min and ~10 GiB on 2 cores
    python -m bench.run_all --tiny     # ~20 s: the smoke test (tests/bench)

| id | what                                           | baseline (same run)                | target             |
|----|------------------------------------------------|------------------------------------|--------------------|
| P1 | text search through the gateway, IVF, p50/p99, | the same queries with in-process   | p50 <= 30 ms,      |
|    | 1 and 8 concurrent clients                     | open_clip + FAISS (no gRPC)        | p99 <= 60 ms       |
| P2 | index service single-query search, Flat, IVF   | the same FAISS index, in-process   | +0.5 ms; recall@10 |
|    | (bench.index_bench)                            |                                    | >= 0.95 (IVF)      |
| P3 | encoder throughput, 16 concurrent 1-item calls | one in-process batched model call  | >= 0.85x           |
| P4 | one text query's encode (bench.encoder_bench)  | the untrimmed 77-token encode      | <= 0.35x           |
| P10| 32 text queries in one BatchSearchImages, q/s  | 32 sequential SearchImages, same   | >= 3x              |
|    |                                                | stack (the P1 one)                 |                    |
| P7 | ingest via the gateway: store, encode, upsert  | the encoder alone, same images     | >= 0.8x            |
| P8 | index memory per vector, Flat and IVF-PQ       | raw float32 bytes                  | <= 1.1x / <= 100 B |
| P11| text search p50 over the HTTP/JSON front       | the same request over gRPC, same   | <= +2 ms           |
|    | (same query, text cache warm, P1 stack)        | stack, interleaved                 |                    |
| -- | scaling: index size, build time, query p50    | --                                 | --                 |

Vectors are synthetic (``index_service.synthetic.GaussianMixture``): unit vectors
around sqrt(n) random centres plus noise of norm ~2x the centre with a power-law
spectrum (j-th direction variance ~ 1/j) in a random rotation. Clusters overlap,
so IVF recall@10 grows with nprobe (see the sweep in P2) instead of being ~1 at
nprobe 1. The model is ``ViT-B-32`` with ``--pretrained none`` (random weights:
the same compute as the real ones; these machines cannot download weights).

One IVF data dir serves P1 and P2: P2 builds it (with the encoder's fingerprint,
so the gateway accepts the collection), P1 serves it through one index shard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import encoder_bench, gateway_bench, index_bench, overload
from bench.common import RESULTS_DIR, machine, print_table, summarize_ms, write_results


@dataclass(frozen=True)
class Mode:
    name: str
    model: str
    n: int  # vectors in the P1/P2 collections
    p2_queries: int  # IVF single queries per path (Flat: p2_flat_queries)
    p2_flat_queries: int
    scaling: tuple[int, ...]  # sizes built here; n itself comes from P2
    scaling_queries: int
    p1_queries: int  # per path, 1 client
    p1_concurrent_queries: int  # per path, 8 clients in all
    p1_clients: int
    encoder_quick: bool
    p7_batches: int
    p7_batch: int
    p8_spec: str


MODES = {
    "tiny": Mode("tiny", "clipsearch-tiny", 3000, 30, 20, (500, 1000), 50, 12, 24, 8, True, 2, 4, "IVF16,PQ8"),
    "quick": Mode("quick", "ViT-B-32", 100_000, 1000, 200, (1000, 10_000), 200, 200, 400, 8, False, 8, 16,
                  "IVF256,PQ64"),
    "full": Mode("full", "ViT-B-32", 1_000_000, 1000, 200, (1000, 10_000, 100_000), 200, 400, 800, 8, False,
                 8, 32, "IVF4096,PQ64"),
}
PRETRAINED = "none"
TOP_K = 10
P1_P50_MS, P1_P99_MS = 30.0, 60.0
P2_OVERHEAD_MS = 0.5
HTTP_OVERHEAD_MS = 2.0
RECALL_TARGET = 0.95
P3_RATIO, P4_RATIO, P7_RATIO = 0.85, 0.35, 0.8
ONNX_P4_RATIO, ONNX_IMAGES_RATIO, ONNX_P1_RATIO, ONNX_P1_RATE_RATIO = 0.5, 1.3, 0.5, 2.0
P8_FLAT_RATIO, P8_PQ_BYTES = 1.1, 100.0
BATCH_QUERIES, BATCH_ROUNDS, P10_RATIO = 32, 3, 3.0

ADJECTIVES = ["red", "old", "small", "wooden", "shiny", "broken", "giant", "striped", "sleepy", "vintage"]
NOUNS = ["bicycle", "dog", "lighthouse", "teapot", "sailboat", "guitar", "owl", "tractor", "umbrella", "castle"]
PLACES = ["on a beach at sunset", "in the snow", "on a city street", "in a forest", "next to a window",
          "under a bridge", "in a kitchen", "on a mountain top"]


def query_text(i: int, tag: str) -> str:
    """A distinct, caption-like query (distinct so the gateway's text cache never hits)."""
    return (f"a photo of a {ADJECTIVES[i % 10]} {NOUNS[(i // 10) % 10]} {PLACES[(i // 100) % 8]}, "
            f"{tag} {i}")


def row(pid: str, what: str, ours: float, baseline: float, target: str, met: bool, note: str = "") -> dict:
    ratio = ours / baseline if baseline else float("nan")
    return {"id": pid, "what": what, "ours": float(ours), "baseline": float(baseline), "ratio": float(ratio),
            "target": target, "met": bool(met), "note": note}


def print_rows(title: str, rows: list[dict]) -> str:
    return print_table(title, ["id", "what", "ours", "baseline", "ratio", "target", "met?", "note"],
                       [[r["id"], r["what"], r["ours"], r["baseline"], r["ratio"], r["target"],
                         "yes" if r["met"] else "NO", r["note"]] for r in rows])


# ---------------------------------------------------------------- P2 (and the data P1 serves)

def run_p2(mode: Mode, dim: int, fingerprint: str, workdir: Path, out: Path) -> tuple[list[dict], dict]:
    results = index_bench.main([
        "--n", str(mode.n), "--dim", str(dim), "--queries", str(mode.p2_queries),
        "--flat-queries", str(mode.p2_flat_queries), "--model-fingerprint", fingerprint,
        "--workdir", str(workdir), "--out", str(out),
    ])
    rows = []
    for name in ("flat", "ivf"):
        entry = results[name]
        grpc_ms, local_ms = entry["grpc"]["p50_ms"], entry["in_process"]["p50_ms"]
        probe = f" nprobe {entry['nprobe']}" if entry["nprobe"] else ""
        rows.append(row("P2", f"{entry['index_spec']}{probe}: search p50 ms, gRPC vs in-process",
                        grpc_ms, local_ms, f"+{P2_OVERHEAD_MS} ms", grpc_ms - local_ms <= P2_OVERHEAD_MS,
                        f"{mode.n:,}x{dim}; overhead {grpc_ms - local_ms:+.3f} ms"))
    recall = results["ivf"]["recall_at_10_grpc"]
    rows.append(row("P2", f"{results['ivf']['index_spec']} nprobe {results['ivf']['nprobe']}: recall@10 vs exact",
                    recall, 1.0, f">= {RECALL_TARGET}", recall >= RECALL_TARGET, "through gRPC"))
    return rows, results


# ---------------------------------------------------------------- P1

def _p1_requests(texts: list[str], nprobe: int, hit_fields: tuple[str, ...] = ()):
    """SearchImages requests; ``hit_fields`` is the read mask (empty: every field, metadata included)."""
    from clipsearch.gateway.v1 import gateway_service_pb2 as gpb

    return [gpb.SearchImagesRequest(parts=[gpb.QueryPart(text=t)], top_k=TOP_K, params={"nprobe": nprobe},
                                    read_mask={"paths": list(hit_fields)})
            for t in texts]


async def _gateway_concurrent(address: str, requests: list, clients: int) -> tuple[list[float], float]:
    """Seconds per SearchImages with ``clients`` callers each sending one query at a time; and wall seconds."""
    import grpc

    from clipsearch.gateway.v1 import gateway_service_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        pending = list(reversed(requests))
        samples: list[float] = []

        async def client() -> None:
            while pending:
                request = pending.pop()
                started = time.perf_counter()
                response = await stub.SearchImages(request, timeout=120)
                samples.append(time.perf_counter() - started)
                assert len(response.hits) == TOP_K, len(response.hits)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return samples, time.perf_counter() - started


def _baseline_concurrent(model, index, texts: list[str], clients: int, nprobe: int) -> tuple[list[float], float]:
    """In-process: each group of ``clients`` queries encoded in one batch and searched in one
    call (the best an in-process server could do with that many queries at once); every
    query of a group counts the group's time."""
    params = index_bench.search_params(index, nprobe)
    samples: list[float] = []
    started_all = time.perf_counter()
    for start in range(0, len(texts), clients):
        group = texts[start:start + clients]
        started = time.perf_counter()
        vectors = model.encode_texts(group)
        _, labels = index.search(vectors, TOP_K, params=params)
        assert labels.shape == (len(group), TOP_K)
        samples += [time.perf_counter() - started] * len(group)
    return samples, time.perf_counter() - started_all


def run_p1(mode: Mode, model, p2: dict, workdir: Path) -> tuple[list[dict], dict, Any]:
    """Returns (rows, details, the running stack for P7: (encoder, gateway, children))."""
    import faiss
    import grpc

    from clipsearch.encoder.v1 import encoder_service_pb2 as epb
    from clipsearch.encoder.v1 import encoder_service_pb2_grpc
    from clipsearch.gateway.v1 import gateway_service_pb2_grpc
    from clipsearch.index.v1 import index_service_pb2 as ipb
    from clipsearch.index.v1 import index_service_pb2_grpc

    nprobe = int(p2["ivf"]["nprobe"])
    index = faiss.read_index(p2["snapshot_files"]["ivf"])
    faiss.omp_set_num_threads(1)  # as the index service searches
    params = index_bench.search_params(index, nprobe)
    started = time.perf_counter()
    encoder, shards, gateway, children = gateway_bench.start_stack(
        workdir, mode.model, PRETRAINED, 1, collection="ivf", index_data_dirs=[Path(p2["data_dir"])],
        index_args=("--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown"), ready_timeout=1800)
    print(f"P1 stack up in {time.perf_counter() - started:.1f}s (encoder, 1 index shard with "
          f"{mode.n:,} vectors, gateway)", flush=True)
    channels = [grpc.insecure_channel(p.address) for p in (gateway, encoder, shards[0])]
    try:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channels[0])
        encoder_stub = encoder_service_pb2_grpc.EncoderServiceStub(channels[1])
        shard_stub = index_service_pb2_grpc.IndexServiceStub(channels[2])
        parts: dict[str, list[float]] = {"encode_in_process": [], "search_in_process": [],
                                         "embed_texts_rpc": [], "search_vectors_rpc": []}

        def through_gateway(request) -> None:
            response = stub.SearchImages(request, timeout=120)
            assert len(response.hits) == TOP_K, len(response.hits)

        def in_process(text: str) -> None:
            started = time.perf_counter()
            vectors = model.encode_texts([text])
            encoded = time.perf_counter()
            _, labels = index.search(vectors, TOP_K, params=params)
            parts["encode_in_process"].append(encoded - started)
            parts["search_in_process"].append(time.perf_counter() - encoded)
            assert (labels >= 0).sum() == TOP_K

        def direct(text: str) -> None:
            """The gateway's two downstream calls made by hand (where the gateway's time goes)."""
            started = time.perf_counter()
            embedded = encoder_stub.EmbedTexts(epb.EmbedTextsRequest(texts=[text]), timeout=120).embeddings
            encoded = time.perf_counter()
            response = shard_stub.SearchVectors(ipb.SearchVectorsRequest(
                collection="ivf", queries=embedded, k=TOP_K, params={"nprobe": nprobe}, include_metadata=True),
                timeout=120)
            parts["embed_texts_rpc"].append(encoded - started)
            parts["search_vectors_rpc"].append(time.perf_counter() - encoded)
            assert len(response.results[0].hits) == TOP_K

        for i, request in enumerate(_p1_requests([query_text(i, "warm-up") for i in range(5)], nprobe)):
            through_gateway(request)
            in_process(query_text(i, "warm-up"))
            direct(query_text(i, "warm-up-d"))
        for samples in parts.values():
            samples.clear()
        # One client: interleaved query by query, so drift on a shared machine hits both alike.
        texts = [query_text(i, "q1") for i in range(mode.p1_queries)]
        requests = _p1_requests(texts, nprobe)
        # The same queries, other texts (so the text cache misses), without metadata in the hits.
        lean_requests = _p1_requests([query_text(i, "q1m") for i in range(mode.p1_queries)], nprobe,
                                     ("id", "score", "url"))
        ours, base, by_hand, lean = [], [], [], []
        for i, (text, request) in enumerate(zip(texts, requests)):
            for fn, arg, samples in ((through_gateway, request, ours), (in_process, text, base),
                                     (direct, query_text(i, "q1d"), by_hand),
                                     (through_gateway, lean_requests[i], lean)):
                started = time.perf_counter()
                fn(arg)
                samples.append(time.perf_counter() - started)
        one = {"gateway": summarize_ms(ours), "gateway_without_metadata": summarize_ms(lean),
               "in_process": summarize_ms(base),
               "direct_calls": summarize_ms(by_hand), "parts": {k: summarize_ms(v) for k, v in parts.items()}}
        print_table("P1 breakdown, 1 client (p50 ms)", ["path", "p50 ms", "p99 ms"], [
            ["gateway SearchImages", one["gateway"]["p50_ms"], one["gateway"]["p99_ms"]],
            ["gateway SearchImages, read_mask without metadata", one["gateway_without_metadata"]["p50_ms"],
             one["gateway_without_metadata"]["p99_ms"]],
            ["direct: EmbedTexts + SearchVectors (with metadata)", one["direct_calls"]["p50_ms"],
             one["direct_calls"]["p99_ms"]],
            ["  EmbedTexts (encoder service)", one["parts"]["embed_texts_rpc"]["p50_ms"],
             one["parts"]["embed_texts_rpc"]["p99_ms"]],
            ["  SearchVectors (index service)", one["parts"]["search_vectors_rpc"]["p50_ms"],
             one["parts"]["search_vectors_rpc"]["p99_ms"]],
            ["in-process: encode + search", one["in_process"]["p50_ms"], one["in_process"]["p99_ms"]],
            ["  encode_texts", one["parts"]["encode_in_process"]["p50_ms"],
             one["parts"]["encode_in_process"]["p99_ms"]],
            ["  index.search", one["parts"]["search_in_process"]["p50_ms"],
             one["parts"]["search_in_process"]["p99_ms"]],
        ])

        clients = mode.p1_clients
        texts = [query_text(i, "q8") for i in range(mode.p1_concurrent_queries)]
        base_samples, base_wall = _baseline_concurrent(model, index, texts, clients, nprobe)
        ours_samples, ours_wall = asyncio.run(_gateway_concurrent(gateway.address, _p1_requests(texts, nprobe),
                                                                   clients))
        many = {"gateway": summarize_ms(ours_samples), "in_process_batched": summarize_ms(base_samples),
                "gateway_qps": len(texts) / ours_wall, "in_process_qps": len(texts) / base_wall}
        batched = batch_search_figures(stub, nprobe)
    except BaseException:
        for child in children:
            child.terminate(10)
        raise
    finally:
        for channel in channels:
            channel.close()
    details = {"n": mode.n, "index_spec": p2["ivf"]["index_spec"], "nprobe": nprobe,
               "recall_at_10": p2["ivf"]["recall_at_10_grpc"], "model": mode.model, "pretrained": PRETRAINED,
               "shards": 1, "one_client": one, f"{clients}_clients": many, "batch_search": batched}
    where = f"{mode.n:,} vectors {p2['ivf']['index_spec']} nprobe {nprobe}"
    rows = []
    for label, stats, baseline, note in (
        ("1 client", one["gateway"], one["in_process"], where),
        ("1 client, no metadata", one["gateway_without_metadata"], one["in_process"],
         where + "; read_mask id,score,url: the index answers from memory"),
        (f"{clients} clients", many["gateway"], many["in_process_batched"],
         f"baseline: {clients} queries per batch; {many['gateway_qps']:.0f} vs {many['in_process_qps']:.0f} q/s"),
    ):
        for q, target in (("p50", P1_P50_MS), ("p99", P1_P99_MS)):
            value = stats[f"{q}_ms"]
            rows.append(row("P1", f"gateway text search, {label}: {q} ms", value, baseline[f"{q}_ms"],
                            f"<= {target:g} ms", value <= target, note))
    rows.append(row("P10", f"{BATCH_QUERIES} text queries: q/s, one BatchSearchImages vs {BATCH_QUERIES} "
                    "sequential SearchImages", batched["batch_qps"], batched["sequential_qps"], f">= {P10_RATIO:g}x",
                    batched["batch_qps"] >= P10_RATIO * batched["sequential_qps"],
                    f"same stack; best of {BATCH_ROUNDS} rounds each, fresh texts"))
    return rows, details, (encoder, gateway, children)


def batch_search_figures(stub, nprobe: int) -> dict:
    """Queries per second: BATCH_QUERIES fresh texts in one BatchSearchImages, and the same number of
    other fresh texts as sequential SearchImages calls; rounds interleaved, best round of each."""
    from clipsearch.gateway.v1 import gateway_service_pb2 as gpb

    batch, sequential = [], []
    for r in range(BATCH_ROUNDS):
        requests = _p1_requests([query_text(i, f"seq{r}") for i in range(BATCH_QUERIES)], nprobe)
        started = time.perf_counter()
        for request in requests:
            assert len(stub.SearchImages(request, timeout=120).hits) == TOP_K
        sequential.append(time.perf_counter() - started)
        queries = _p1_requests([query_text(i, f"batch{r}") for i in range(BATCH_QUERIES)], nprobe)
        started = time.perf_counter()
        response = stub.BatchSearchImages(gpb.BatchSearchImagesRequest(queries=queries), timeout=120)
        batch.append(time.perf_counter() - started)
        assert all(len(result.hits) == TOP_K for result in response.results), response.results[0].status
    return {"queries": BATCH_QUERIES, "batch_qps": BATCH_QUERIES / min(batch),
            "sequential_qps": BATCH_QUERIES / min(sequential), "batch_s": batch, "sequential_s": sequential}


def gateway_figures(address: str, nprobe: int, tag: str, queries: int, concurrent: int, clients: int) -> dict:
    """One client's SearchImages p50 (fresh texts, no metadata) and the ``clients``-client rate."""
    import grpc

    from clipsearch.gateway.v1 import gateway_service_pb2_grpc

    lean = ("id", "score", "url")
    with grpc.insecure_channel(address) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        requests = _p1_requests([query_text(i, tag) for i in range(queries + 5)], nprobe, lean)
        samples = []
        for request in requests:
            started = time.perf_counter()
            assert len(stub.SearchImages(request, timeout=120).hits) == TOP_K
            samples.append(time.perf_counter() - started)
    _, wall = asyncio.run(_gateway_concurrent(
        address, _p1_requests([query_text(i, tag + "-c") for i in range(concurrent)], nprobe, lean), clients))
    return {"one_client": summarize_ms(samples[5:]), f"{clients}_clients_qps": concurrent / wall}


def run_p1_runtimes(mode: Mode, p2: dict, workdir: Path, onnx_figures: dict) -> tuple[list[dict], dict]:
    """The same gateway and shard over a torch-runtime encoder (the baseline for the onnx one,
    whose figures ``onnx_figures`` were taken on the P1 stack just before)."""
    nprobe = int(p2["ivf"]["nprobe"])
    _, _, gateway, children = gateway_bench.start_stack(
        workdir, mode.model, PRETRAINED, 1, collection="ivf", index_data_dirs=[Path(p2["data_dir"])],
        index_args=("--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown"), ready_timeout=1800,
        encoder_args=("--runtime", "torch"))
    try:
        torch_figures = gateway_figures(gateway.address, nprobe, "rt-torch", mode.p1_queries // 2,
                                        mode.p1_concurrent_queries // 2, mode.p1_clients)
    finally:
        for child in children:
            child.terminate(30)
    clients = mode.p1_clients
    ours, base = onnx_figures["one_client"]["p50_ms"], torch_figures["one_client"]["p50_ms"]
    rate, base_rate = onnx_figures[f"{clients}_clients_qps"], torch_figures[f"{clients}_clients_qps"]
    where = f"{mode.n:,} vectors, read_mask id,score,url"
    rows = [
        row("P1", "gateway text search, 1 client: p50 ms, onnx vs torch encoder", ours, base,
            f"<= {ONNX_P1_RATIO}x", ours / base <= ONNX_P1_RATIO, where),
        row("P1", f"gateway text search, {clients} clients: q/s, onnx vs torch encoder", rate, base_rate,
            f">= {ONNX_P1_RATE_RATIO}x", rate / base_rate >= ONNX_P1_RATE_RATIO, where),
    ]
    return rows, {"onnx": onnx_figures, "torch": torch_figures}


# ---------------------------------------------------------------- P7

def run_p7(mode: Mode, stack) -> tuple[list[dict], dict]:
    import grpc

    from clipsearch.encoder.v1 import encoder_service_pb2_grpc
    from clipsearch.gateway.v1 import gateway_service_pb2_grpc

    encoder, gateway, _ = stack
    batch, batches = mode.p7_batch, mode.p7_batches
    make = encoder_bench.jpeg  # 640x480 JPEG, ~photo-sized
    to_encoder = [[make(500_000 + b * batch + i) for i in range(batch)] for b in range(batches)]
    to_gateway = [[make(600_000 + b * batch + i) for i in range(batch)] for b in range(batches)]
    warm = [make(700_000 + i) for i in range(batch)]
    with grpc.insecure_channel(gateway.address) as gw_channel, grpc.insecure_channel(encoder.address) as enc_channel:
        encoder_rate, gateway_rate = gateway_bench.measure_upload(
            gateway_service_pb2_grpc.GatewayServiceStub(gw_channel),
            encoder_service_pb2_grpc.EncoderServiceStub(enc_channel), to_encoder, to_gateway, warm)
    images = batch * batches
    details = {"images": images, "batch": batch, "image": "640x480 JPEG", "encoder_images_per_s": encoder_rate,
               "gateway_images_per_s": gateway_rate, "ratio": gateway_rate / encoder_rate,
               "collection": f"the P1 collection ({mode.n:,} vectors)"}
    rows = [row("P7", "ingest images/s: gateway UploadImages vs encoder alone", gateway_rate, encoder_rate,
                f">= {P7_RATIO}x", gateway_rate / encoder_rate >= P7_RATIO,
                f"{images} 640x480 JPEG in batches of {batch}")]
    return rows, details


# ---------------------------------------------------------------- P11

def run_p11(mode: Mode, stack, nprobe: int) -> tuple[list[dict], dict]:
    """One SearchImages request (text, top_k 10, hits with metadata) over HTTP/JSON and over
    gRPC on the P1 stack's gateway, interleaved."""
    from clipsearch.gateway.v1 import gateway_service_pb2 as gpb

    _, gateway, _ = stack
    request = gpb.SearchImagesRequest(parts=[gpb.QueryPart(text=query_text(0, "http"))], top_k=TOP_K,
                                      params={"nprobe": nprobe})
    figures = gateway_bench.http_vs_grpc(gateway, "ivf", request, max(mode.p1_queries, 20))
    ours, base = figures["http"]["p50_ms"], figures["grpc"]["p50_ms"]
    rows = [row("P11", "text search p50 ms: HTTP/JSON vs gRPC, same request", ours, base,
                f"<= +{HTTP_OVERHEAD_MS:g} ms", ours - base <= HTTP_OVERHEAD_MS,
                f"{figures['calls']} calls each, interleaved; text cache warm; overhead {ours - base:+.2f} ms")]
    return rows, figures


# ---------------------------------------------------------------- P3, P4

def run_encoder(mode: Mode, out: Path) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # P1 left faiss at 1 OpenMP thread; the service uses every core
    results = encoder_bench.main(["--model", mode.model, "--pretrained", PRETRAINED, "--out", str(out),
                                  *(["--quick"] if mode.encoder_quick else [])])
    p3, p4 = results["P3"], results["P4"]
    clients = p3["clients"]
    rows = [
        row("P3", f"encoder texts/s, {clients} 1-item clients vs one batched call",
            p3["texts_per_s"], p3["texts_baseline_per_s"], f">= {P3_RATIO}x", p3["texts_ratio"] >= P3_RATIO,
            "caption-like texts"),
        row("P3", f"encoder images/s, {clients} 1-item clients vs one batched call",
            p3["images_per_s"], p3["images_baseline_per_s"], f">= {P3_RATIO}x", p3["images_ratio"] >= P3_RATIO,
            "640x480 JPEG"),
        row("P4", "one text query encode p50 ms: trimmed vs 77 tokens", p4["trimmed"]["p50_ms"],
            p4["full_77"]["p50_ms"], f"<= {P4_RATIO}x", p4["ratio"] <= P4_RATIO, "in-process model, torch"),
    ]
    runtimes = results["runtimes"]
    text, images = runtimes["text_query"], runtimes["images"]
    rows += [
        row("P4", "one text query encode p50 ms: onnx vs torch runtime", text["onnx"]["p50_ms"],
            text["torch"]["p50_ms"], f"<= {ONNX_P4_RATIO}x", text["ratio"] <= ONNX_P4_RATIO,
            f"same trimmed input; ONNX Runtime {runtimes['threads']} threads"),
        row("P4", f"images/s at batch {images['batch']}: onnx vs torch runtime", images["onnx_per_s"],
            images["torch_per_s"], f">= {ONNX_IMAGES_RATIO}x", images["ratio"] >= ONNX_IMAGES_RATIO,
            "preprocessed tensors, in-process"),
    ]
    return rows, results


# ---------------------------------------------------------------- P8

_MEASURE_INDEX = """
import json, sys
from pathlib import Path
import faiss
from index_service.shards import index_memory_bytes
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
index = faiss.read_index(sys.argv[1])
print(json.dumps({"rss_bytes": rss() - before, "estimate_bytes": index_memory_bytes(index), "ntotal": index.ntotal}))
"""


def index_memory(path: str) -> dict:
    """Resident memory the index takes once loaded (RSS growth of a fresh process reading the
    snapshot), and the engine's own estimate (``CollectionInfo.memory_bytes``)."""
    done = subprocess.run([sys.executable, "-c", _MEASURE_INDEX, path], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_p8(mode: Mode, dim: int, p2: dict, workdir: Path) -> tuple[list[dict], dict]:
    base, _ = index_bench.make_data(mode.n, dim, 1)
    timings, files = index_bench.seed_data_dir(workdir / "p8-data", base, 0, specs={"ivfpq": mode.p8_spec})
    del base
    raw = 4 * dim
    measured = {"flat": index_memory(p2["snapshot_files"]["flat"]), "ivf": index_memory(p2["snapshot_files"]["ivf"]),
                "ivfpq": index_memory(str(files["ivfpq"]))}
    per_vector = {name: {"rss_bytes_per_vector": m["rss_bytes"] / m["ntotal"],
                         "estimate_bytes_per_vector": m["estimate_bytes"] / m["ntotal"],
                         "snapshot_bytes_per_vector": Path(path).stat().st_size / m["ntotal"]}
                  for name, m, path in ((k, measured[k], p) for k, p in (
                      ("flat", p2["snapshot_files"]["flat"]), ("ivf", p2["snapshot_files"]["ivf"]),
                      ("ivfpq", str(files["ivfpq"]))))}
    details = {"n": mode.n, "dim": dim, "raw_float32_bytes": raw, "ivfpq_spec": mode.p8_spec,
               "ivfpq_build_s": timings["ivfpq_build_s"], "per_vector": per_vector,
               "service_rss_bytes_per_vector_p2": p2.get("service_rss_bytes_per_vector")}
    flat = per_vector["flat"]["rss_bytes_per_vector"]
    pq = per_vector["ivfpq"]["rss_bytes_per_vector"]
    where = f"{mode.n:,}x{dim}; resident, measured"
    rows = [
        row("P8", "Flat: index bytes/vector vs raw float32", flat, raw, f"<= {P8_FLAT_RATIO}x",
            flat / raw <= P8_FLAT_RATIO, where),
        row("P8", f"{mode.p8_spec}: index bytes/vector vs raw float32", pq, raw, f"<= {P8_PQ_BYTES:g} B",
            pq <= P8_PQ_BYTES, where),
    ]
    return rows, details


# ---------------------------------------------------------------- scaling

def scaling_entry(n: int, dim: int, queries: int, workdir: Path) -> list[dict]:
    import faiss

    base, query_vectors = index_bench.make_data(n, dim, queries)
    nlist = index_bench.choose_nlist(n, 0)
    data_dir = workdir / f"scaling-{n}"
    timings, files = index_bench.seed_data_dir(data_dir, base, nlist)
    del base
    indexes = {name: faiss.read_index(str(path)) for name, path in files.items()}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, exact = indexes["flat"].search(query_vectors, index_bench.K)
    nprobe, _ = index_bench.choose_nprobe(indexes["ivf"], query_vectors, exact, nlist)
    entries = []
    for name in ("flat", "ivf"):
        probe = nprobe if name == "ivf" else 0
        index_bench.time_in_process(indexes[name], query_vectors[:10], probe)
        samples, found = index_bench.time_in_process(indexes[name], query_vectors, probe)
        entries.append({"n": n, "index": "Flat" if name == "flat" else f"IVF{nlist},Flat", "nprobe": probe or None,
                        "recall_at_10": index_bench.recall_at_k(found, exact),
                        "index_mb": files[name].stat().st_size / 2**20,
                        "build_s": timings[f"{name}_build_s"], "query_p50_ms": summarize_ms(samples)["p50_ms"]})
    shutil.rmtree(data_dir, ignore_errors=True)
    return entries


def scaling_from_p2(p2: dict) -> list[dict]:
    n = p2["config"]["n"]
    return [{"n": n, "index": p2[name]["index_spec"], "nprobe": p2[name]["nprobe"],
             "recall_at_10": p2[name]["recall_at_10_in_process"],
             "index_mb": p2[name]["index_bytes_per_vector"] * n / 2**20, "build_s": p2["build"][f"{name}_build_s"],
             "query_p50_ms": p2[name]["in_process"]["p50_ms"]} for name in ("flat", "ivf")]


# ---------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="1M vectors, fuller repeats (make bench-full)")
    size.add_argument("--tiny", action="store_true", help="tiny sizes and the tiny model: a smoke run")
    parser.add_argument("--out", default="", help="results folder (default bench/results)")
    parser.add_argument("--workdir", default="", help="scratch folder (default: a temp dir, removed after)")
    args = parser.parse_args(argv)
    mode = MODES["full" if args.full else "tiny" if args.tiny else "quick"]
    out = Path(args.out) if args.out else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-run-all-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"bench.run_all: {mode.name} mode on {json.dumps(machine())}; load average {load_start}", flush=True)
    if load_start[0] > 1.5:
        print(f"!!! load average {load_start[0]:.1f}: something else is running; with 2 cores, CPU-bound "
              "timings (torch and FAISS threads) can be several times slower than on a quiet machine !!!",
              flush=True)

    from encoder_service.model import load_model

    model = load_model(mode.model, PRETRAINED, device="cpu", runtime="auto")  # as the encoder service runs it
    dim = model.dim
    sections: dict[str, Any] = {}
    rows: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        print(f"\n=== {name} ({time.perf_counter() - started:.0f}s into the run) ===", flush=True)
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - report it, run the rest, fail at the end
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            return None
        finally:
            timings[name] = time.perf_counter() - began

    try:
        p2 = section("P2", lambda: run_p2(mode, dim, model.fingerprint, workdir / "p2", out))
        if p2:
            rows["P2"], sections["P2"] = p2
            print_rows("P2: index service search vs the same FAISS index in-process", rows["P2"])
            p2_results = p2[1]
            p1 = section("P1", lambda: run_p1(mode, model, p2_results, workdir / "p1"))
            if p1:
                rows["P1"], sections["P1"], stack = p1
                print_rows("P1: end-to-end text search vs in-process open_clip + FAISS", rows["P1"])
                try:
                    p7 = section("P7", lambda: run_p7(mode, stack))
                    p11 = section("P11", lambda: run_p11(mode, stack, int(p2_results["ivf"]["nprobe"])))
                    if p11:
                        rows["P11"], sections["P11"] = p11
                        print_rows("P11: HTTP/JSON front vs gRPC, same request", rows["P11"])
                    onnx_figures = section("P1 onnx encoder", lambda: gateway_figures(
                        stack[1].address, int(p2_results["ivf"]["nprobe"]), "rt-onnx", mode.p1_queries // 2,
                        mode.p1_concurrent_queries // 2, mode.p1_clients))
                finally:
                    for child in stack[2]:
                        child.terminate(30)
                if p7:
                    rows["P7"], sections["P7"] = p7
                    print_rows("P7: ingest through the gateway vs the encoder alone", rows["P7"])
                p1_runtimes = onnx_figures and section("P1 torch encoder", lambda: run_p1_runtimes(
                    mode, p2_results, workdir / "p1-torch", onnx_figures))
                if p1_runtimes:
                    rows["P1"] += p1_runtimes[0]
                    sections["P1"]["runtimes"] = p1_runtimes[1]
                    print_rows("P1: gateway over the onnx encoder vs over the torch encoder", p1_runtimes[0])
            p8 = section("P8", lambda: run_p8(mode, dim, p2_results, workdir))
            if p8:
                rows["P8"], sections["P8"] = p8
                print_rows("P8: index memory per vector vs raw float32", rows["P8"])

            def scaling() -> list[dict]:
                entries = [e for n in mode.scaling if n < mode.n
                           for e in scaling_entry(n, dim, mode.scaling_queries, workdir)]
                return entries + scaling_from_p2(p2_results)

            table = section("scaling", scaling)
            if table:
                sections["scaling"] = table
        model = None  # the encoder benchmark loads its own
        enc = section("P3/P4", lambda: run_encoder(mode, out))
        if enc:
            rows["P3/P4"], sections["P3/P4"] = enc
            print_rows("P3/P4: encoder service vs in-process model", rows["P3/P4"])
        if mode.name != "tiny":  # its own stacks and 2 x 3 loads; the tiny smoke run stays short
            seconds = 60.0 if mode.name == "full" else 5.0
            p9 = section("P9", lambda: overload.main(["--model", mode.model, "--seconds", str(seconds),
                                                       "--out", str(out)]))
            if p9:
                rows["P9"], sections["P9"] = p9["rows"], p9
                print_rows("P9: overload at 4x capacity (bench.overload)", rows["P9"])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    ordered = [r for key in ("P1", "P2", "P3/P4", "P7", "P8", "P9", "P11") for r in rows.get(key, [])]
    if "scaling" in sections:
        print_table(f"Scaling: synthetic {dim}-d vectors, one query per search on 1 FAISS thread "
                    "(IVF at the nprobe reaching recall@10 >= 0.95)",
                    ["vectors", "index", "nprobe", "recall@10", "index MB", "build s", "query p50 ms"],
                    [[f"{e['n']:,}", e["index"], e["nprobe"] or "-", e["recall_at_10"], e["index_mb"], e["build_s"],
                      e["query_p50_ms"]] for e in sorted(sections["scaling"], key=lambda e: (e["index"] != "Flat",
                                                                                            e["n"]))])
    print_rows(f"Summary ({mode.name} mode, {mode.model} pretrained={PRETRAINED}, {os.cpu_count()} CPUs)", ordered)
    summary = {"mode": mode.name, "config": asdict(mode), "wall_s": time.perf_counter() - started,
               "section_seconds": timings, "load_average_start": load_start, "load_average_end": os.getloadavg(), "rows": ordered,
               "scaling": sections.get("scaling", []), "errors": errors,
               "details": {k: v for k, v in sections.items() if k in ("P1", "P7", "P8", "P11")}}
    write_results("summary", summary, out)
    shutil.copyfile(out / "summary.json", out / f"summary-{mode.name}.json")
    print(f"\n{len(ordered)} rows in {summary['wall_s']:.0f}s; targets met: {sum(r['met'] for r in ordered)}"
          f"/{len(ordered)}" + (f"; FAILED sections: {sorted(errors)}" if errors else ""), flush=True)
    if errors:
        raise SystemExit(f"benchmark sections failed: {errors}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
