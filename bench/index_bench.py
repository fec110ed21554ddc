"""Index benchmark: single-query search latency through the gRPC service
against the same FAISS index searched in-process, recall@10 against exact
search, and memory per vector, for a Flat and an IVF index. Everything is
measured in one run on this machine.

Data: ``index_service.synthetic.GaussianMixture``, unit vectors around
1024 random centres whatever n is (``BENCH_CLUSTERS``) with overlapping,
low-intrinsic-dimension noise (``--spread 1.5``), so IVF recall depends on
nprobe (see that module for the measurements). Two query settings over the
same vectors:

- ``in-distribution``: queries drawn like the data (image-to-image search);
- ``text-like``: the same kind of queries shifted along one common direction
  and renormalized (CLIP's modality gap: a text query is less similar to its
  nearest image than an image is), which needs a larger nprobe.

Each setting has a tuning query set (nprobe is chosen on it) and a held-out
query set (timed, and scored for recall@10): recall is never reported on
the queries nprobe was tuned on.

Steps:
1. Generate n base vectors and the query sets; exact top-10 from an in-process
   ``IndexFlatIP`` is the ground truth.
2. Seed the service's data dir in-process with ``IndexEngine`` (bulk upserts of
   50k; the IVF collection is trained explicitly once it holds 40 x nlist
   vectors, then filled), then close it, which writes the snapshots.
3. In-process baseline: the snapshot files read back with ``faiss.read_index``,
   i.e. the very index the service serves, searched one query at a time on
   one thread (as the service does).
4. The service (``python -m index_service``) on loopback loads the same data
   dir; one query per ``SearchVectors`` call, sequentially. The two paths
   alternate query by query, so drift on a shared machine hits both alike.
5. nprobe: the smallest of a sweep reaching recall@10 >= 0.95 in-process on
   the tuning queries (``--nprobe`` fixes it instead).
6. Ratios: the interleaved samples are cut into ``ROUNDS`` consecutive rounds;
   a row reports the median of the per-round p50 ratios and their min-max.

    python -m bench.index_bench                 # 1M x 512, Flat and IVF4096,Flat
    python -m bench.index_bench --n 20000       # tiny: seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import grpc
import numpy as np

from bench.common import (compare_rounds, p50_ms_by_round, print_table, recall_at_k, rss_bytes, summarize_ms,
                          time_calls, write_results)
from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.vectors import pack_matrix
from index_service.engine import IndexEngine
from index_service.shards import IndexSpec, default_nprobe
from index_service.synthetic import BENCH_CLUSTERS, TEXT_QUERY_OFFSET, GaussianMixture

K = 10
RECALL_TARGET = 0.95
NPROBE_SWEEP = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
UPSERT_BATCH = 50_000
SPREAD = 1.5
ROUNDS = 5
# Query settings: name -> offset along the common direction (0: queries drawn like the data).
QUERY_SETTINGS = {"in-distribution": 0.0, "text-like": TEXT_QUERY_OFFSET}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.index_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="base vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nlist", type=int, default=0,
                        help="IVF lists (0: 4096, or the largest power of two with 39 x nlist <= n)")
    parser.add_argument("--nprobe", type=int, default=0,
                        help="0: smallest of a sweep reaching recall@10 >= 0.95 on the tuning queries")
    parser.add_argument("--queries", type=int, default=1000,
                        help="held-out single queries per path and setting for IVF (timed, scored for recall@10)")
    parser.add_argument("--flat-queries", type=int, default=200,
                        help="the same for Flat (~0.1 s each at 1M x 512), the first of the IVF ones")
    parser.add_argument("--tune-queries", type=int, default=500, help="queries per setting that nprobe is tuned on")
    parser.add_argument("--spread", type=float, default=SPREAD, help="noise norm relative to the cluster centre")
    parser.add_argument("--model-fingerprint", default="",
                        help="create the collections with this encoder fingerprint (so a gateway serves them)")
    parser.add_argument("--workdir", default="", help="data dir parent (default: a temp dir, removed after)")
    parser.add_argument("--out", default="", help="results directory (default: bench/results)")
    return parser.parse_args(argv)


def choose_nlist(n: int, requested: int) -> int:
    if requested:
        return requested
    nlist = 4096
    while nlist > 16 and 39 * nlist > n:
        nlist //= 2
    return nlist


def make_data(n: int, dim: int, n_queries: int, n_tune: int = 0, spread: float = SPREAD
              ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(n base vectors, {setting: (tuning queries, held-out queries)}) from one mixture of
    ``BENCH_CLUSTERS`` clusters; ``n_tune`` defaults to ``n_queries``."""
    mixture = GaussianMixture(dim, clusters=BENCH_CLUSTERS, spread=spread, seed=0)
    queries = {name: (mixture.sample_queries(n_tune or n_queries, seed=10 + 2 * i, offset=offset),
                      mixture.sample_queries(n_queries, seed=11 + 2 * i, offset=offset))
               for i, (name, offset) in enumerate(QUERY_SETTINGS.items())}
    return mixture.sample(n, seed=1), queries


def seed_data_dir(data_dir: Path, base: np.ndarray, nlist: int, model_fingerprint: str = "",
                  specs: dict[str, str] | None = None) -> tuple[dict[str, float], dict[str, Path]]:
    """Fills a Flat and an IVF collection (or ``specs``: name -> index spec) through the
    engine and snapshots them; returns (build seconds, snapshot file of each collection)."""
    n, dim = base.shape
    ids = [f"v{i}" for i in range(n)]
    timings, files = {}, {}
    engine = IndexEngine(data_dir, auto_train=False)
    engine.open()
    try:
        for name, spec in (specs or {"flat": "Flat", "ivf": f"IVF{nlist},Flat"}).items():
            started = time.perf_counter()
            engine.create_collection(name, dim, "ip", spec, model_fingerprint=model_fingerprint)
            parsed = IndexSpec.parse(spec, dim, "ip")
            # Train once the engine's k-means sample (40 points per centroid) is there, then fill.
            train_at = min(n, 40 * parsed.min_train_vectors) if parsed.needs_training else n + 1
            for start in range(0, n, UPSERT_BATCH):
                end = min(n, start + UPSERT_BATCH)
                engine.upsert(name, ids[start:end], base[start:end], model_fingerprint=model_fingerprint)
                if start < train_at <= end:
                    trained = time.perf_counter()
                    engine.train(name)
                    timings[f"{name}_train_s"] = time.perf_counter() - trained
            engine.snapshot(name)
            (files[name],) = engine.snapshot_files(name)
            timings[f"{name}_build_s"] = time.perf_counter() - started
            print(f"seeded {name} ({spec}) in {timings[f'{name}_build_s']:.1f}s", flush=True)
    finally:
        engine.close()
    return timings, files


def choose_nprobe(index: faiss.Index, queries: np.ndarray, exact: np.ndarray, nlist: int,
                  requested: int = 0) -> tuple[int, dict[int, float]]:
    """(the smallest nprobe of the sweep reaching recall@10 >= 0.95, or ``requested``;
    recall@10 by nprobe), from batch searches on the caller's FAISS threads."""
    sweep = {}
    for nprobe in NPROBE_SWEEP:
        if nprobe > nlist:
            break
        found = index.search(queries, K, params=search_params(index, nprobe))[1]
        sweep[nprobe] = recall_at_k(found, exact)
        if sweep[nprobe] >= 0.999:
            break
    chosen = requested or next((p for p, r in sweep.items() if r >= RECALL_TARGET), max(sweep))
    return chosen, sweep



def search_params(index: faiss.Index, nprobe: int):
    return faiss.SearchParametersIVF(nprobe=nprobe) if isinstance(index, faiss.IndexIVF) else None


def time_in_process(index: faiss.Index, queries: np.ndarray, nprobe: int) -> tuple[list[float], np.ndarray]:
    """Seconds per ``index.search`` of one query on one thread (as the service searches), and the labels."""
    faiss.omp_set_num_threads(1)
    params = search_params(index, nprobe)
    samples, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, labels = index.search(query[None, :], K, params=params)
        samples.append(time.perf_counter() - started)
        found.append(labels[0])
    return samples, np.array(found, dtype=np.int64)


def time_grpc(stub, collection: str, queries: np.ndarray, nprobe: int) -> tuple[list[float], np.ndarray]:
    """Seconds per SearchVectors call (one query, k=10), and the hits as int ids."""
    samples, found = [], []
    for query in queries:
        started = time.perf_counter()
        reply = stub.SearchVectors(pb.SearchVectorsRequest(
            collection=collection, queries=pack_matrix(query[None, :]), k=K, params={"nprobe": nprobe}))
        samples.append(time.perf_counter() - started)
        found.append([int(hit.id[1:]) for hit in reply.results[0].hits])
    return samples, np.array(found, dtype=np.int64)


def time_interleaved(index: faiss.Index, stub, collection: str, queries: np.ndarray, nprobe: int):
    """``time_in_process`` and ``time_grpc`` query by query, alternating which goes first,
    so drift on a shared machine hits both alike; ((samples, labels), (samples, labels))."""
    local: tuple[list, list] = ([], [])
    remote: tuple[list, list] = ([], [])
    for i in range(len(queries)):
        one = queries[i:i + 1]
        for path in ((0, 1) if i % 2 else (1, 0)):
            samples, found = time_in_process(index, one, nprobe) if path == 0 else time_grpc(
                stub, collection, one, nprobe)
            target = local if path == 0 else remote
            target[0].extend(samples)
            target[1].extend(found)
    return ((local[0], np.array(local[1], dtype=np.int64)), (remote[0], np.array(remote[1], dtype=np.int64)))


def time_health_checks(channel, calls: int = 500) -> dict:
    """p50/p99 of a bare ``grpc.health.v1`` Check on ``channel``: the transport's own cost per
    call (client stub, loopback, server dispatch), the floor under any SearchVectors."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    return summarize_ms(time_calls(lambda: health.Check(health_pb2.HealthCheckRequest()), calls, warmup=20))



def measure_through_service(stub, collection: str, index: faiss.Index, queries: np.ndarray, exact: np.ndarray,
                            nprobe: int) -> dict:
    """One query per call through gRPC and in-process, interleaved: p50/p99 of each, the ratio
    over ``ROUNDS`` rounds (median and min-max), and recall@10 of both against ``exact``."""
    time_in_process(index, queries[:10], nprobe)  # warm up
    time_grpc(stub, collection, queries[:10], nprobe)
    (local_samples, local_found), (remote_samples, remote_found) = time_interleaved(
        index, stub, collection, queries, nprobe)
    local, remote = summarize_ms(local_samples), summarize_ms(remote_samples)
    rounds = compare_rounds(p50_ms_by_round(remote_samples, ROUNDS), p50_ms_by_round(local_samples, ROUNDS))
    overheads = [o - b for o, b in zip(rounds["ours_by_round"], rounds["baseline_by_round"])]
    return {"nprobe": nprobe or None, "in_process": local, "grpc": remote, "p50_rounds": rounds,
            "grpc_overhead_p50_ms": remote["p50_ms"] - local["p50_ms"],
            "grpc_overhead_p50_ms_by_round": overheads,
            "grpc_overhead_p99_ms": remote["p99_ms"] - local["p99_ms"],
            "p50_ratio_grpc_vs_in_process": rounds["ratio"],
            "recall_at_10_grpc": recall_at_k(remote_found, exact),
            "recall_at_10_in_process": recall_at_k(local_found, exact)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    nlist = choose_nlist(args.n, args.nlist)
    started = time.perf_counter()
    n_report = max(args.queries, args.flat_queries)
    base, query_sets = make_data(args.n, args.dim, n_report, args.tune_queries, args.spread)
    print(f"generated {args.n} x {args.dim} in {time.perf_counter() - started:.1f}s; nlist={nlist}", flush=True)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="index-bench-"))
    data_dir = workdir / "index-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    results: dict = {"config": {"n": args.n, "dim": args.dim, "nlist": nlist, "k": K, "spread": args.spread,
                                "clusters": BENCH_CLUSTERS, "query_offsets": QUERY_SETTINGS,
                                "ivf_queries": args.queries, "flat_queries": args.flat_queries,
                                "tune_queries": args.tune_queries, "rounds": ROUNDS}}
    service = None
    try:
        results["build"], files = seed_data_dir(data_dir, base, nlist, args.model_fingerprint)
        results["data_dir"] = str(data_dir)
        results["snapshot_files"] = {name: str(path) for name, path in files.items()}
        del base
        indexes = {name: faiss.read_index(str(path)) for name, path in files.items()}
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # batch searches for ground truth and the sweep
        settings = {}
        for setting, (tune, report) in query_sets.items():
            tune_scores, tune_exact = indexes["flat"].search(tune, K)
            report_scores, report_exact = indexes["flat"].search(report, K)
            nprobe, sweep = choose_nprobe(indexes["ivf"], tune, tune_exact, nlist, args.nprobe)
            settings[setting] = {"nprobe": nprobe, "tuning_sweep_recall": sweep, "exact": report_exact,
                                 "nn_similarity": float(report_scores[:, 0].mean())}
            print(f"{setting} queries: nearest-neighbour similarity {settings[setting]['nn_similarity']:.3f}; "
                  f"nprobe {nprobe} tuned on {len(tune)} queries", flush=True)
        results["settings"] = {name: {k: v for k, v in entry.items() if k != "exact"}
                               for name, entry in settings.items()}
        results["ivf_default_nprobe"] = default_nprobe(nlist)

        from clipsearch.stack import ServiceProcess

        service = ServiceProcess("index_service", [
            "--data-dir", str(data_dir), "--log-level", "WARNING", "--drain-delay-seconds", "0",
            "--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown", "--metrics-port", "-1",
        ], workdir, name="bench-index").start(timeout=1800)
        rss = rss_bytes(service.proc.pid)
        rows = []
        # (result key, collection, query setting, queries)
        runs = [("flat", "flat", "in-distribution", args.flat_queries),
                ("ivf", "ivf", "in-distribution", args.queries), ("ivf_text", "ivf", "text-like", args.queries)]
        with grpc.insecure_channel(service.address) as channel:
            stub = index_service_pb2_grpc.IndexServiceStub(channel)
            for key, name, setting, count in runs:
                probe = settings[setting]["nprobe"] if name == "ivf" else 0
                queries = query_sets[setting][1][:count]
                entry = measure_through_service(stub, name, indexes[name], queries,
                                                settings[setting]["exact"][:count], probe)
                collection = stub.GetCollection(pb.GetCollectionRequest(name=name)).collection
                entry.update({"index_spec": collection.index_spec, "queries": setting,
                              "index_bytes_per_vector": files[name].stat().st_size / args.n,
                              "engine_memory_bytes_per_vector": collection.memory_bytes / args.n})
                results[key] = entry
                spread = entry["p50_rounds"]
                rows.append([collection.index_spec, setting, probe or "-", entry["recall_at_10_grpc"],
                             entry["in_process"]["p50_ms"], entry["grpc"]["p50_ms"], entry["grpc"]["p99_ms"],
                             entry["grpc_overhead_p50_ms"], spread["ratio"],
                             f"{spread['ratio_min']:.2f}-{spread['ratio_max']:.2f}"])
            results["grpc_floor"] = time_health_checks(channel)
        results["service_rss_bytes"] = rss
        results["service_rss_bytes_per_vector"] = rss / (2 * args.n)  # both collections are loaded
    finally:
        if service is not None:
            service.terminate()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(
        f"Index search, {args.n} x {args.dim}, one query per call, k={K} (in-process = same FAISS index, 1 thread; "
        f"held-out queries; ratio = median of {ROUNDS} rounds)",
        ["index", "queries", "nprobe", "recall@10", "in-proc p50 ms", "gRPC p50 ms", "gRPC p99 ms",
         "overhead p50 ms", "gRPC/in-proc p50", "min-max"],
        rows,
    )
    print_table("IVF recall@10 by nprobe (in-process, tuning queries)", ["nprobe", *settings],
                [[p, *(settings[s]["tuning_sweep_recall"].get(p, "-") for s in settings)]
                 for p in sorted({p for s in settings.values() for p in s["tuning_sweep_recall"]})])
    print(f"gRPC floor: a bare health check on the same channel takes {results['grpc_floor']['p50_ms']:.3f} ms p50")
    print(f"service RSS {rss / 2**20:.0f} MiB for {2 * args.n} vectors "
          f"({results['service_rss_bytes_per_vector']:.0f} B/vector, both collections)")
    name = "index_bench" if args.n == 1_000_000 else f"index_bench_n{args.n}"
    write_results(name, results, Path(args.out) if args.out else None)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
