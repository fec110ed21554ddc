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
| P8 | index service RSS growth per vector (Flat,     | raw float32 bytes                  | <= 1.3x / <= 100 B |
|    | IVF-Flat, IVF-PQ, HNSW), ingest through gRPC   |                                    | (IVF-PQ)           |
| P11| text search p50 over the HTTP/JSON front       | the same request over gRPC, same   | <= +2 ms           |
|    | (same query, text cache warm, P1 stack)        | stack, interleaved                 |                    |
| -- | scaling: index size, build time, query p50     | --                                 | --                 |
|    | in-process and through the index service       |                                    |                    |

Method:
- Every timed row runs in alternating rounds (ours and the baseline take turns;
  interleaved one-by-one samples are cut into ``ROUNDS`` rounds) and reports the
  median of the per-round ratios with their min-max. Recall, memory and P9 are
  measured once (one round).
- Vectors are synthetic (``index_service.synthetic.GaussianMixture``): unit
  vectors around a fixed number of random centres (``BENCH_CLUSTERS``, whatever
  n is) plus noise of norm ~1.5x the centre with a power-law spectrum in a random
  rotation. Two query settings: in-distribution, and text-like (shifted by a
  common offset like CLIP's modality gap). IVF's nprobe is tuned on one query
  set and recall is reported on another; P1 uses the text-like nprobe.
- Results and table headers name the machine (``bench.common.machine``).

The model is ``ViT-B-32`` with ``--pretrained none`` (random weights: the same
compute as the real ones; these machines cannot download weights).

One IVF data dir serves P1 and P2: P2 builds it (with the encoder's fingerprint,
so the gateway accepts the collection), P1 serves it through one index shard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import encoder_bench, gateway_bench, index_bench, overload
from bench.common import (RESULTS_DIR, alternate, compare_rounds, machine_line, percentile, print_table, rss_bytes,
                          split_rounds, summarize_ms, write_results)


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
    p8_n: int  # vectors ingested into each P8 index service


MODES = {
    "tiny": Mode("tiny", "clipsearch-tiny", 3000, 30, 20, (500, 1000), 50, 12, 24, 8, True, 4, 2, "IVF16,PQ8", 2000),
    "quick": Mode("quick", "ViT-B-32", 100_000, 1000, 200, (1000, 10_000), 200, 200, 400, 8, False, 8, 16,
                  "IVF256,PQ64", 50_000),
    "full": Mode("full", "ViT-B-32", 1_000_000, 1000, 200, (1000, 10_000, 100_000), 200, 400, 800, 8, False,
                 8, 32, "IVF4096,PQ64", 200_000),
}
PRETRAINED = "none"
TOP_K = 10
P1_P50_MS, P1_P99_MS = 30.0, 60.0
P2_OVERHEAD_MS = 0.5
HTTP_OVERHEAD_MS = 2.0
RECALL_TARGET = 0.95
P3_RATIO, P4_RATIO, P7_RATIO = 0.85, 0.35, 0.8
ONNX_P4_RATIO, ONNX_IMAGES_RATIO, ONNX_P1_RATIO, ONNX_P1_RATE_RATIO = 0.5, 1.3, 0.5, 2.0
# The serving process, index and id maps and store cache and heap, per vector (IVF-PQ: the index's own target).
P8_SERVING_RATIO, P8_PQ_BYTES = 1.3, 100.0
BATCH_QUERIES, BATCH_ROUNDS, P10_RATIO = 32, 3, 3.0

ADJECTIVES = ["red", "old", "small", "wooden", "shiny", "broken", "giant", "striped", "sleepy", "vintage"]
NOUNS = ["bicycle", "dog", "lighthouse", "teapot", "sailboat", "guitar", "owl", "tractor", "umbrella", "castle"]
PLACES = ["on a beach at sunset", "in the snow", "on a city street", "in a forest", "next to a window",
          "under a bridge", "in a kitchen", "on a mountain top"]


def query_text(i: int, tag: str) -> str:
    """A distinct, caption-like query (distinct so the gateway's text cache never hits)."""
    return (f"a photo of a {ADJECTIVES[i % 10]} {NOUNS[(i // 10) % 10]} {PLACES[(i // 100) % 8]}, "
            f"{tag} {i}")


ROUNDS = 5  # rounds that interleaved one-by-one samples are cut into (ratio = median of per-round ratios)


def row(pid: str, what: str, compared: dict, target: str, met: bool, note: str = "") -> dict:
    """A summary row from ``compare_rounds`` (ours and baseline: medians over rounds; ratio: the
    median of the per-round ratios, with its min and max)."""
    return {"id": pid, "what": what, "ours": float(compared["ours"]), "baseline": float(compared["baseline"]),
            "ratio": float(compared["ratio"]), "ratio_min": float(compared["ratio_min"]),
            "ratio_max": float(compared["ratio_max"]), "rounds": int(compared["rounds"]),
            "target": target, "met": bool(met), "note": note}


def measured_once(ours: float, baseline: float) -> dict:
    """A figure that is not a timing (memory, recall): one 'round'."""
    return compare_rounds([ours], [baseline])


def by_round(samples: list[float], q: float) -> list[float]:
    """The q-th percentile in ms of each of ``ROUNDS`` consecutive rounds of interleaved samples."""
    return [percentile(chunk, q) * 1000 for chunk in split_rounds(samples, ROUNDS)]


def print_rows(title: str, rows: list[dict]) -> str:
    return print_table(title, ["id", "what", "ours", "baseline", "ratio", "min-max", "rounds", "target", "met?",
                               "note"],
                       [[r["id"], r["what"], r["ours"], r["baseline"], r["ratio"],
                         f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", r["rounds"], r["target"],
                         "yes" if r["met"] else "NO", r["note"]] for r in rows])


# ---------------------------------------------------------------- P2 (and the data P1 serves)

def run_p2(mode: Mode, dim: int, fingerprint: str, workdir: Path, out: Path) -> tuple[list[dict], dict]:
    results = index_bench.main([
        "--n", str(mode.n), "--dim", str(dim), "--queries", str(mode.p2_queries),
        "--flat-queries", str(mode.p2_flat_queries), "--tune-queries", str(mode.p2_queries),
        "--model-fingerprint", fingerprint, "--workdir", str(workdir), "--out", str(out),
    ])
    rows = []
    for name in ("flat", "ivf", "ivf_text"):
        entry = results[name]
        overhead = float(np.median(entry["grpc_overhead_p50_ms_by_round"]))
        probe = f" nprobe {entry['nprobe']}" if entry["nprobe"] else ""
        rows.append(row("P2", f"{entry['index_spec']}{probe}, {entry['queries']} queries: search p50 ms, "
                        "gRPC vs in-process", entry["p50_rounds"], f"+{P2_OVERHEAD_MS} ms", overhead <= P2_OVERHEAD_MS,
                        f"{mode.n:,}x{dim}; overhead {overhead:+.3f} ms (median of rounds); gRPC floor "
                        f"{results['grpc_floor']['p50_ms']:.3f} ms (a bare health check, same channel)"))
    for name in ("ivf", "ivf_text"):
        entry = results[name]
        recall = entry["recall_at_10_grpc"]
        rows.append(row("P2", f"{entry['index_spec']} nprobe {entry['nprobe']}, {entry['queries']} queries: "
                        "recall@10 vs exact", measured_once(recall, 1.0), f">= {RECALL_TARGET}",
                        recall >= RECALL_TARGET, "through gRPC, held-out queries (nprobe tuned on others)"))
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


def p1_nprobe(p2: dict) -> int:
    """Text queries search at the nprobe tuned for text-like (shifted) queries."""
    return int(p2["ivf_text"]["nprobe"])


def run_p1(mode: Mode, model, p2: dict, workdir: Path) -> tuple[list[dict], dict, Any]:
    """Returns (rows, details, the running stack for P7: (encoder, gateway, children))."""
    import faiss
    import grpc

    from clipsearch.encoder.v1 import encoder_service_pb2 as epb
    from clipsearch.encoder.v1 import encoder_service_pb2_grpc
    from clipsearch.gateway.v1 import gateway_service_pb2_grpc
    from clipsearch.index.v1 import index_service_pb2 as ipb
    from clipsearch.index.v1 import index_service_pb2_grpc

    nprobe = p1_nprobe(p2)
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
        round_texts = split_rounds(texts, ROUNDS)

        def through_gateway_concurrent(r: int) -> tuple[list[float], float]:
            return asyncio.run(_gateway_concurrent(gateway.address, _p1_requests(round_texts[r], nprobe), clients))

        def in_process_batched(r: int) -> tuple[list[float], float]:
            return _baseline_concurrent(model, index, round_texts[r], clients, nprobe)

        # Alternating rounds: the gateway and the in-process batches take turns going first.
        ours_rounds, base_rounds = alternate(ROUNDS, through_gateway_concurrent, in_process_batched)
        qps = {name: [len(chunk) / wall for chunk, (_, wall) in zip(round_texts, measured)]
               for name, measured in (("gateway_qps", ours_rounds), ("in_process_qps", base_rounds))}
        many = {"gateway": summarize_ms([x for samples, _ in ours_rounds for x in samples]),
                "in_process_batched": summarize_ms([x for samples, _ in base_rounds for x in samples]),
                "gateway_qps": float(np.median(qps["gateway_qps"])),
                "in_process_qps": float(np.median(qps["in_process_qps"])),
                "by_round": {q: compare_rounds([percentile(samples, q) * 1000 for samples, _ in ours_rounds],
                                               [percentile(samples, q) * 1000 for samples, _ in base_rounds])
                             for q in (50, 99)}}
        one["by_round"] = {label: {q: compare_rounds(by_round(samples, q), by_round(base, q)) for q in (50, 99)}
                           for label, samples in (("gateway", ours), ("gateway_without_metadata", lean))}
        batched = batch_search_figures(stub, nprobe)
    except BaseException:
        for child in children:
            child.terminate(10)
        raise
    finally:
        for channel in channels:
            channel.close()
    details = {"n": mode.n, "index_spec": p2["ivf"]["index_spec"], "nprobe": nprobe,
               "recall_at_10_text_like": p2["ivf_text"]["recall_at_10_grpc"], "model": mode.model,
               "pretrained": PRETRAINED,
               "shards": 1, "one_client": one, f"{clients}_clients": many, "batch_search": batched}
    where = f"{mode.n:,} vectors {p2['ivf']['index_spec']} nprobe {nprobe} (tuned for text-like queries)"
    rows = []
    for label, compared, note in (
        ("1 client", one["by_round"]["gateway"], where),
        ("1 client, no metadata", one["by_round"]["gateway_without_metadata"],
         where + "; read_mask id,score,url: the index answers from memory"),
        (f"{clients} clients", many["by_round"],
         f"baseline: {clients} queries per batch; {many['gateway_qps']:.0f} vs {many['in_process_qps']:.0f} q/s"),
    ):
        for q, target in ((50, P1_P50_MS), (99, P1_P99_MS)):
            rows.append(row("P1", f"gateway text search, {label}: p{q} ms", compared[q], f"<= {target:g} ms",
                            compared[q]["ours"] <= target, note))
    p10 = compare_rounds(batched["batch_qps_by_round"], batched["sequential_qps_by_round"])
    rows.append(row("P10", f"{BATCH_QUERIES} text queries: q/s, one BatchSearchImages vs {BATCH_QUERIES} "
                    "sequential SearchImages", p10, f">= {P10_RATIO:g}x", p10["ratio"] >= P10_RATIO,
                    "same stack; alternating rounds, fresh texts"))
    return rows, details, (encoder, gateway, children)


def batch_search_figures(stub, nprobe: int) -> dict:
    """Queries per second: BATCH_QUERIES fresh texts in one BatchSearchImages, and the same number of
    other fresh texts as sequential SearchImages calls; rounds alternate which goes first."""
    from clipsearch.gateway.v1 import gateway_service_pb2 as gpb

    def sequential_qps(r: int) -> float:
        requests = _p1_requests([query_text(i, f"seq{r}") for i in range(BATCH_QUERIES)], nprobe)
        started = time.perf_counter()
        for request in requests:
            assert len(stub.SearchImages(request, timeout=120).hits) == TOP_K
        return BATCH_QUERIES / (time.perf_counter() - started)

    def batch_qps(r: int) -> float:
        queries = _p1_requests([query_text(i, f"batch{r}") for i in range(BATCH_QUERIES)], nprobe)
        started = time.perf_counter()
        response = stub.BatchSearchImages(gpb.BatchSearchImagesRequest(queries=queries), timeout=120)
        elapsed = time.perf_counter() - started
        assert all(len(result.hits) == TOP_K for result in response.results), response.results[0].status
        return BATCH_QUERIES / elapsed

    sequential, batch = alternate(BATCH_ROUNDS, sequential_qps, batch_qps)
    return {"queries": BATCH_QUERIES, "batch_qps_by_round": batch, "sequential_qps_by_round": sequential}


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


def run_p1_runtimes(mode: Mode, stack, nprobe: int, workdir: Path) -> tuple[list[dict], dict]:
    """The P1 gateway (onnx encoder) against a second gateway over a torch-runtime encoder and the
    same index shard, both up at once, in alternating rounds."""
    from clipsearch.stack import ServiceProcess

    _, gateway, children = stack
    shard = children[1]
    quiet = ["--log-level", "WARNING", "--drain-delay-seconds", "0"]
    torch_encoder = ServiceProcess("encoder_service", ["--model", mode.model, "--pretrained", PRETRAINED,
                                                       "--runtime", "torch", *quiet], workdir,
                                   name="bench-encoder-torch").start(300)
    started = [torch_encoder]
    try:
        torch_gateway = ServiceProcess("gateway", [
            "--encoder", torch_encoder.address, "--index", shard.address, "--storage", str(workdir / "images"),
            "--data-dir", str(workdir / "gateway"), "--default-collection", "ivf", "--page-token-secret", "bench",
            *quiet], workdir, name="bench-gateway-torch").start(120)
        started.append(torch_gateway)
        clients = mode.p1_clients
        queries = max(2, mode.p1_queries // 2 // BATCH_ROUNDS)
        concurrent = max(clients, mode.p1_concurrent_queries // 2 // BATCH_ROUNDS)
        figures = dict(zip(("onnx", "torch"), alternate(
            BATCH_ROUNDS,
            lambda r: gateway_figures(gateway.address, nprobe, f"rt-onnx-{r}", queries, concurrent, clients),
            lambda r: gateway_figures(torch_gateway.address, nprobe, f"rt-torch-{r}", queries, concurrent, clients))))
    finally:
        for child in reversed(started):
            child.terminate(30)
    latency = compare_rounds([f["one_client"]["p50_ms"] for f in figures["onnx"]],
                             [f["one_client"]["p50_ms"] for f in figures["torch"]])
    rate = compare_rounds([f[f"{clients}_clients_qps"] for f in figures["onnx"]],
                          [f[f"{clients}_clients_qps"] for f in figures["torch"]])
    where = f"{mode.n:,} vectors, read_mask id,score,url; both gateways up at once"
    rows = [
        row("P1", "gateway text search, 1 client: p50 ms, onnx vs torch encoder", latency,
            f"<= {ONNX_P1_RATIO}x", latency["ratio"] <= ONNX_P1_RATIO, where),
        row("P1", f"gateway text search, {clients} clients: q/s, onnx vs torch encoder", rate,
            f">= {ONNX_P1_RATE_RATIO}x", rate["ratio"] >= ONNX_P1_RATE_RATIO, where),
    ]
    return rows, {"onnx": figures["onnx"], "torch": figures["torch"], "p50": latency, "qps": rate}


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
    per_batch: list[tuple[float, float]] = []
    with grpc.insecure_channel(gateway.address) as gw_channel, grpc.insecure_channel(encoder.address) as enc_channel:
        encoder_rate, gateway_rate = gateway_bench.measure_upload(
            gateway_service_pb2_grpc.GatewayServiceStub(gw_channel),
            encoder_service_pb2_grpc.EncoderServiceStub(enc_channel), to_encoder, to_gateway, warm,
            per_batch=per_batch)
    images = batch * batches
    # Each pair of batches (alternating which goes first) is a round.
    compared = compare_rounds([g for _, g in per_batch], [e for e, _ in per_batch])
    details = {"images": images, "batch": batch, "image": "640x480 JPEG", "encoder_images_per_s": encoder_rate,
               "gateway_images_per_s": gateway_rate, "ratio": compared["ratio"], "rounds": compared,
               "collection": f"the P1 collection ({mode.n:,} vectors)"}
    rows = [row("P7", "ingest images/s: gateway UploadImages vs encoder alone", compared,
                f">= {P7_RATIO}x", compared["ratio"] >= P7_RATIO,
                f"{images} 640x480 JPEG in batches of {batch}; a round = one batch each")]
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
    samples = figures.pop("samples")
    compared = compare_rounds(by_round(samples["http"], 50), by_round(samples["grpc"], 50))
    overhead = float(np.median([h - g for h, g in zip(compared["ours_by_round"], compared["baseline_by_round"])]))
    rows = [row("P11", "text search p50 ms: HTTP/JSON vs gRPC, same request", compared,
                f"<= +{HTTP_OVERHEAD_MS:g} ms", overhead <= HTTP_OVERHEAD_MS,
                f"{figures['calls']} calls each, interleaved; text cache warm; overhead {overhead:+.2f} ms")]
    return rows, figures | {"rounds": compared}


# ---------------------------------------------------------------- P3, P4

def run_encoder(mode: Mode, out: Path) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # P1 left faiss at 1 OpenMP thread; the service uses every core
    results = encoder_bench.main(["--model", mode.model, "--pretrained", PRETRAINED, "--out", str(out),
                                  *(["--quick"] if mode.encoder_quick else [])])
    p3, p4 = results["P3"], results["P4"]
    clients = p3["clients"]
    rows = [
        row("P3", f"encoder texts/s, {clients} 1-item clients vs one batched call", p3["texts_rounds"],
            f">= {P3_RATIO}x", p3["texts_ratio"] >= P3_RATIO, "caption-like texts"),
        row("P3", f"encoder images/s, {clients} 1-item clients vs one batched call", p3["images_rounds"],
            f">= {P3_RATIO}x", p3["images_ratio"] >= P3_RATIO,
            "640x480 JPEG; both sides decode with DCT scaling (the service's decode_image)"),
        row("P4", "one text query encode p50 ms: trimmed vs 77 tokens", p4["rounds"], f"<= {P4_RATIO}x",
            p4["ratio"] <= P4_RATIO, "in-process model, torch; interleaved"),
    ]
    runtimes = results["runtimes"]
    text, images = runtimes["text_query"], runtimes["images"]
    rows += [
        row("P4", "one text query encode p50 ms: onnx vs torch runtime", text["rounds"], f"<= {ONNX_P4_RATIO}x",
            text["ratio"] <= ONNX_P4_RATIO, f"same trimmed input; ONNX Runtime {runtimes['threads']} threads"),
        row("P4", f"images/s at batch {images['batch']}: onnx vs torch runtime", images["rounds"],
            f">= {ONNX_IMAGES_RATIO}x", images["ratio"] >= ONNX_IMAGES_RATIO, "preprocessed tensors, in-process"),
    ]
    return rows, results


# ---------------------------------------------------------------- P8

P8_HNSW_SPEC = "HNSW32"
P8_UPSERT_BATCH = 5000
MEMORY_PARTS = ("faiss", "id_maps", "filter_columns", "store_cache")


def memory_gauges(metrics_port: int | None) -> dict[str, float] | None:
    """The index service's memory gauges, summed over collections:
    ``clipsearch_index_memory_bytes{collection, part}`` (faiss, id_maps, filter_columns) and
    ``clipsearch_index_process_memory_bytes{part}`` (rss, store_cache); None where it has none."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    if not metrics_port:
        return None
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    parts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("clipsearch_index_memory_bytes", "clipsearch_index_process_memory_bytes"):
            for sample in family.samples:
                part = sample.labels.get("part", "")
                parts[part] = parts.get(part, 0.0) + sample.value
    return parts or None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_settled(stub, collection: str, pid: int, expect_training: bool, timeout: float = 1800) -> float:
    """Waits until the collection is trained (when it holds enough vectors to train by itself)
    and the service process has stopped using CPU (background build finished); returns the
    seconds waited."""
    from clipsearch.index.v1 import index_service_pb2 as ipb

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        trained = stub.GetCollection(ipb.GetCollectionRequest(name=collection)).collection.trained
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if (trained or not expect_training) and cpu_seconds(pid) - before < 0.05:
            break
    return time.perf_counter() - started


def service_memory(spec: str, vectors: np.ndarray, queries: np.ndarray, workdir: Path) -> dict:
    """RSS growth of a real index service process (/proc/<pid>/status) per vector, after ingest
    through gRPC and queries, and again once background builds settle; with the service's
    own memory gauges where it exports them."""
    import grpc

    from clipsearch.index.v1 import index_service_pb2 as ipb
    from clipsearch.index.v1 import index_service_pb2_grpc
    from clipsearch.stack import ServiceProcess
    from clipsearch.vectors import pack_matrix
    from index_service.shards import IndexSpec

    n, dim = vectors.shape
    name = "mem"
    service = ServiceProcess("index_service", [
        "--data-dir", str(workdir / "data"), "--log-level", "WARNING", "--drain-delay-seconds", "0",
        "--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown", "--metrics-port", "0",
    ], workdir, name="bench-p8").start(300)
    pid = service.proc.pid
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = index_service_pb2_grpc.IndexServiceStub(channel)
            stub.CreateCollection(ipb.CreateCollectionRequest(name=name, dim=dim, metric=ipb.METRIC_INNER_PRODUCT,
                                                              index_spec=spec))

            def search(count: int) -> None:
                for query in queries[:count]:
                    stub.SearchVectors(ipb.SearchVectorsRequest(collection=name, queries=pack_matrix(query[None, :]),
                                                                k=index_bench.K), timeout=120)

            search(5)
            empty = {"rss": rss_bytes(pid), "gauges": memory_gauges(service.metrics_port)}
            started = time.perf_counter()
            for start in range(0, n, P8_UPSERT_BATCH):
                end = min(n, start + P8_UPSERT_BATCH)
                stub.UpsertVectors(ipb.UpsertVectorsRequest(
                    collection=name, ids=[f"v{i}" for i in range(start, end)],
                    vectors=pack_matrix(vectors[start:end])), timeout=600)
            ingest_s = time.perf_counter() - started
            search(len(queries))
            ingested = {"rss": rss_bytes(pid), "gauges": memory_gauges(service.metrics_port)}
            parsed = IndexSpec.parse(spec, dim, "ip")
            settle_s = wait_until_settled(stub, name, pid, parsed.needs_training and n >= parsed.auto_train_vectors)
            search(len(queries))
            settled = {"rss": rss_bytes(pid), "gauges": memory_gauges(service.metrics_port)}
            # What the service does by itself within --snapshot-interval-seconds of the last write
            # (and at shutdown); a snapshot also gives IVF lists back their growth slack.
            stub.CreateSnapshot(ipb.CreateSnapshotRequest(collection=name), timeout=600)
            search(len(queries))
            snapshotted = {"rss": rss_bytes(pid), "gauges": memory_gauges(service.metrics_port)}
            engine_estimate = stub.GetCollection(ipb.GetCollectionRequest(name=name)).collection.memory_bytes
    finally:
        service.terminate()

    def per_vector(state: dict) -> dict:
        figures = {"rss_growth": (state["rss"] - empty["rss"]) / n}
        if state["gauges"] is None or empty["gauges"] is None:
            figures["breakdown"] = "unavailable: the service exports no memory gauges"
            return figures
        parts = {part: (state["gauges"].get(part, 0.0) - empty["gauges"].get(part, 0.0)) / n for part in MEMORY_PARTS}
        parts["python_and_rest"] = figures["rss_growth"] - sum(parts.values())
        figures["breakdown"] = parts
        return figures

    return {"spec": spec, "n": n, "ingest_s": ingest_s, "settle_s": settle_s,
            "after_ingest": per_vector(ingested), "settled": per_vector(settled),
            "after_snapshot": per_vector(snapshotted),
            "engine_estimate_bytes_per_vector": engine_estimate / n}


def run_p8(mode: Mode, dim: int, workdir: Path) -> tuple[list[dict], dict]:
    base, query_sets = index_bench.make_data(mode.p8_n, dim, 20)
    queries = query_sets["in-distribution"][1]
    nlist = index_bench.choose_nlist(mode.p8_n, 0)
    raw = 4 * dim
    serving = (f"<= {P8_SERVING_RATIO}x", lambda b: b / raw <= P8_SERVING_RATIO)
    specs = {"Flat": serving, f"IVF{nlist},Flat": serving, P8_HNSW_SPEC: serving,
             mode.p8_spec: (f"<= {P8_PQ_BYTES:g} B", lambda b: b <= P8_PQ_BYTES)}
    measured = {}
    rows = []
    for i, (spec, (target, meets)) in enumerate(specs.items()):
        entry = measured[spec] = service_memory(spec, base, queries, workdir / f"p8-{i}")
        snapshotted = entry["after_snapshot"]
        growth = snapshotted["rss_growth"]
        breakdown = snapshotted["breakdown"]
        parts = (", ".join(f"{k} {v:.0f}" for k, v in breakdown.items()) if isinstance(breakdown, dict)
                 else "breakdown unavailable (no memory gauges)")
        rows.append(row("P8", f"{spec}: index service RSS growth bytes/vector vs raw float32",
                        measured_once(growth, raw), target, meets(growth),
                        f"{mode.p8_n:,}x{dim} via gRPC; after ingest {entry['after_ingest']['rss_growth']:.0f}, "
                        f"builds done {entry['settled']['rss_growth']:.0f}, after the first snapshot "
                        f"{growth:.0f} B/vector; {parts}"))
        print(f"P8 {spec}: {json.dumps(entry)}", flush=True)
    del base
    return rows, {"n": mode.p8_n, "dim": dim, "raw_float32_bytes": raw, "per_spec": measured}


# ---------------------------------------------------------------- scaling

def scaling_entry(n: int, dim: int, queries: int, workdir: Path) -> list[dict]:
    """Flat and IVF at ``n`` vectors: query p50 in-process and through the index service
    (interleaved), IVF at the nprobe tuned on one query set per setting and scored on another."""
    import faiss
    import grpc

    from clipsearch.index.v1 import index_service_pb2_grpc
    from clipsearch.stack import ServiceProcess

    base, query_sets = index_bench.make_data(n, dim, queries)
    nlist = index_bench.choose_nlist(n, 0)
    data_dir = workdir / f"scaling-{n}" / "data"
    timings, files = index_bench.seed_data_dir(data_dir, base, nlist)
    del base
    indexes = {name: faiss.read_index(str(path)) for name, path in files.items()}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    runs = [("flat", "in-distribution", 0)]
    for setting, (tune, _) in query_sets.items():
        nprobe, _ = index_bench.choose_nprobe(indexes["ivf"], tune, indexes["flat"].search(tune, index_bench.K)[1],
                                              nlist)
        runs.append(("ivf", setting, nprobe))
    service = ServiceProcess("index_service", [
        "--data-dir", str(data_dir), "--log-level", "WARNING", "--drain-delay-seconds", "0",
        "--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown", "--metrics-port", "-1",
    ], data_dir.parent, name="bench-scaling").start(600)
    entries = []
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = index_service_pb2_grpc.IndexServiceStub(channel)
            for name, setting, nprobe in runs:
                report = query_sets[setting][1]
                faiss.omp_set_num_threads(os.cpu_count() or 1)
                exact = indexes["flat"].search(report, index_bench.K)[1]
                measured = index_bench.measure_through_service(stub, name, indexes[name], report, exact, nprobe)
                entries.append(scaling_row(n, "Flat" if name == "flat" else f"IVF{nlist},Flat", setting, measured,
                                           files[name].stat().st_size / 2**20, timings[f"{name}_build_s"]))
    finally:
        service.terminate()
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    return entries


def scaling_row(n: int, index: str, setting: str, measured: dict, index_mb: float, build_s: float) -> dict:
    return {"n": n, "index": index, "queries": setting, "nprobe": measured["nprobe"],
            "recall_at_10": measured["recall_at_10_grpc"], "index_mb": index_mb, "build_s": build_s,
            "query_p50_ms": measured["in_process"]["p50_ms"], "grpc_p50_ms": measured["grpc"]["p50_ms"],
            "grpc_vs_in_process": measured["p50_rounds"]["ratio"]}


def scaling_from_p2(p2: dict) -> list[dict]:
    n = p2["config"]["n"]
    return [scaling_row(n, p2[key]["index_spec"], p2[key]["queries"], p2[key],
                        p2[key]["index_bytes_per_vector"] * n / 2**20, p2["build"][f"{name}_build_s"])
            for key, name in (("flat", "flat"), ("ivf", "ivf"), ("ivf_text", "ivf"))]


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
    print(f"bench.run_all: {mode.name} mode on {machine_line()}; load average {load_start}", flush=True)
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
                    p11 = section("P11", lambda: run_p11(mode, stack, p1_nprobe(p2_results)))
                    if p11:
                        rows["P11"], sections["P11"] = p11
                        print_rows("P11: HTTP/JSON front vs gRPC, same request", rows["P11"])
                    p1_runtimes = section("P1 onnx vs torch encoder", lambda: run_p1_runtimes(
                        mode, stack, p1_nprobe(p2_results), workdir / "p1-torch"))
                finally:
                    for child in stack[2]:
                        child.terminate(30)
                if p7:
                    rows["P7"], sections["P7"] = p7
                    print_rows("P7: ingest through the gateway vs the encoder alone", rows["P7"])
                if p1_runtimes:
                    rows["P1"] += p1_runtimes[0]
                    sections["P1"]["runtimes"] = p1_runtimes[1]
                    print_rows("P1: gateway over the onnx encoder vs over the torch encoder", p1_runtimes[0])
            p8 = section("P8", lambda: run_p8(mode, dim, workdir))
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
                # One run each (its baseline, the capacity, comes from the same run): one round.
                rows["P9"] = [row(r["id"], r["what"], measured_once(r["ours"], r["baseline"]), r["target"], r["met"],
                                  r["note"]) for r in p9["rows"]]
                sections["P9"] = p9
                print_rows("P9: overload at 4x capacity (bench.overload)", rows["P9"])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    ordered = [r for key in ("P1", "P2", "P3/P4", "P7", "P8", "P9", "P11") for r in rows.get(key, [])]
    if "scaling" in sections:
        print_table(f"Scaling: synthetic {dim}-d vectors, one query per search on 1 FAISS thread, in-process and "
                    "through the index service (IVF at the nprobe reaching recall@10 >= 0.95 on tuning queries; "
                    "recall on held-out ones)",
                    ["vectors", "index", "queries", "nprobe", "recall@10", "index MB", "build s", "in-process p50 ms",
                     "gRPC p50 ms", "gRPC/in-process"],
                    [[f"{e['n']:,}", e["index"], e["queries"], e["nprobe"] or "-", e["recall_at_10"], e["index_mb"],
                      e["build_s"], e["query_p50_ms"], e["grpc_p50_ms"], e["grpc_vs_in_process"]]
                     for e in sorted(sections["scaling"], key=lambda e: (e["index"] != "Flat", e["queries"], e["n"]))])
    print_rows(f"Summary ({mode.name} mode, {mode.model} pretrained={PRETRAINED}; ratio = median over rounds, "
               f"min-max)", ordered)
    summary = {"mode": mode.name, "config": asdict(mode), "wall_s": time.perf_counter() - started,
               "section_seconds": timings, "load_average_start": load_start, "load_average_end": os.getloadavg(),
               "rows": ordered,
               "scaling": sections.get("scaling", []), "errors": errors,
               "details": {k: v for k, v in sections.items() if k in ("P1", "P7", "P8", "P11")},
               "p2": {k: v for k, v in (sections.get("P2") or {}).items() if k in ("config", "settings")}}
    write_results("summary", summary, out)
    shutil.copyfile(out / "summary.json", out / f"summary-{mode.name}.json")
    print(f"\n{len(ordered)} rows in {summary['wall_s']:.0f}s; targets met: {sum(r['met'] for r in ordered)}"
          f"/{len(ordered)}" + (f"; FAILED sections: {sorted(errors)}" if errors else ""), flush=True)
    if errors:
        raise SystemExit(f"benchmark sections failed: {errors}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
