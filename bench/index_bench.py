"""Index benchmark: single-query search latency through the gRPC service
against the same FAISS index searched in-process, recall@10 against exact
search, and memory per vector, for a Flat and an IVF index. Everything is
measured in one run on this machine.

Data: ``index_service.synthetic.GaussianMixture``, unit vectors around
sqrt(n) random centres with overlapping, low-intrinsic-dimension noise
(``--spread 2.0``), so IVF recall depends on nprobe: at 200k x 512 with
IVF1024, nprobe 1 / 16 / 64 give recall@10 0.27 / 0.75 / 0.96 (see that
module for the measurements).

Steps:
1. Generate n base vectors and the queries; exact top-10 from an in-process
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
5. nprobe: the smallest of a sweep reaching recall@10 >= 0.95 in-process
   (``--nprobe`` fixes it instead).

    python -m bench.index_bench                 # 1M x 512, Flat and IVF4096,Flat
    python -m bench.index_bench --n 20000       # tiny: seconds
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import grpc
import numpy as np

from bench.common import print_table, summarize_ms, write_results
from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.vectors import pack_matrix
from index_service.engine import IndexEngine
from index_service.shards import IndexSpec, default_nprobe
from index_service.synthetic import GaussianMixture

K = 10
RECALL_TARGET = 0.95
NPROBE_SWEEP = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
UPSERT_BATCH = 50_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.index_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="base vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--nlist", type=int, default=0,
                        help="IVF lists (0: 4096, or the largest power of two with 39 x nlist <= n)")
    parser.add_argument("--nprobe", type=int, default=0, help="0: smallest of a sweep reaching recall@10 >= 0.95")
    parser.add_argument("--queries", type=int, default=1000,
                        help="single queries per path for IVF (timed, and scored for recall@10)")
    parser.add_argument("--flat-queries", type=int, default=200,
                        help="the same for Flat (~0.1 s each at 1M x 512), the first of the IVF ones")
    parser.add_argument("--spread", type=float, default=2.0, help="noise norm relative to the cluster centre")
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


def make_data(n: int, dim: int, n_queries: int, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(n base vectors, n_queries query vectors) from one mixture of ~sqrt(n) clusters."""
    mixture = GaussianMixture(dim, clusters=max(8, int(math.sqrt(n))), spread=spread, seed=0)
    return mixture.sample(n, seed=1), mixture.sample(n_queries, seed=2)


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


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / len(e) for f, e in zip(found, exact)]))


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


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    nlist = choose_nlist(args.n, args.nlist)
    started = time.perf_counter()
    base, queries = make_data(args.n, args.dim, max(args.queries, args.flat_queries), args.spread)
    print(f"generated {args.n} x {args.dim} in {time.perf_counter() - started:.1f}s; nlist={nlist}", flush=True)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="index-bench-"))
    data_dir = workdir / "index-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    results: dict = {"config": {"n": args.n, "dim": args.dim, "nlist": nlist, "k": K, "spread": args.spread,
                                "ivf_queries": args.queries, "flat_queries": args.flat_queries}}
    service = None
    try:
        results["build"], files = seed_data_dir(data_dir, base, nlist, args.model_fingerprint)
        results["data_dir"] = str(data_dir)
        results["snapshot_files"] = {name: str(path) for name, path in files.items()}
        del base
        indexes = {name: faiss.read_index(str(path)) for name, path in files.items()}
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # batch searches for ground truth and the sweep
        _, exact = indexes["flat"].search(queries, K)

        nprobe, sweep = choose_nprobe(indexes["ivf"], queries, exact, nlist, args.nprobe)
        results["ivf_nprobe_sweep_recall"] = sweep
        results["ivf_default_nprobe"] = default_nprobe(nlist)

        from clipsearch.stack import ServiceProcess

        service = ServiceProcess("index_service", [
            "--data-dir", str(data_dir), "--log-level", "WARNING", "--drain-delay-seconds", "0",
            "--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown", "--metrics-port", "-1",
        ], workdir, name="bench-index").start(timeout=1800)
        rss = rss_bytes(service.proc.pid)
        rows = []
        with grpc.insecure_channel(service.address) as channel:
            stub = index_service_pb2_grpc.IndexServiceStub(channel)
            for name in ("flat", "ivf"):
                index = indexes[name]
                probe = nprobe if name == "ivf" else 0
                count = args.flat_queries if name == "flat" else args.queries
                time_in_process(index, queries[:10], probe)  # warm up
                time_grpc(stub, name, queries[:10], probe)
                (local_samples, local_found), (remote_samples, remote_found) = time_interleaved(
                    index, stub, name, queries[:count], probe)
                local, remote = summarize_ms(local_samples), summarize_ms(remote_samples)
                collection = stub.GetCollection(pb.GetCollectionRequest(name=name)).collection
                entry = {
                    "index_spec": collection.index_spec,
                    "nprobe": probe or None,
                    "in_process": local,
                    "grpc": remote,
                    "grpc_overhead_p50_ms": remote["p50_ms"] - local["p50_ms"],
                    "grpc_overhead_p99_ms": remote["p99_ms"] - local["p99_ms"],
                    "p50_ratio_grpc_vs_in_process": remote["p50_ms"] / local["p50_ms"],
                    "recall_at_10_grpc": recall_at_k(remote_found, exact[:count]),
                    "recall_at_10_in_process": recall_at_k(local_found, exact[:count]),
                    "index_bytes_per_vector": files[name].stat().st_size / args.n,
                    "engine_memory_bytes_per_vector": collection.memory_bytes / args.n,
                }
                results[name] = entry
                rows.append([collection.index_spec, probe or "-", entry["recall_at_10_grpc"],
                             local["p50_ms"], local["p99_ms"], remote["p50_ms"], remote["p99_ms"],
                             entry["grpc_overhead_p50_ms"], entry["p50_ratio_grpc_vs_in_process"],
                             entry["index_bytes_per_vector"]])
        results["service_rss_bytes"] = rss
        results["service_rss_bytes_per_vector"] = rss / (2 * args.n)  # both collections are loaded
    finally:
        if service is not None:
            service.terminate()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(
        f"Index search, {args.n} x {args.dim}, one query per call, k={K} (in-process = same FAISS index, 1 thread)",
        ["index", "nprobe", "recall@10", "in-proc p50 ms", "in-proc p99 ms", "gRPC p50 ms", "gRPC p99 ms",
         "overhead p50 ms", "gRPC/in-proc p50", "index B/vector"],
        rows,
    )
    print_table("IVF recall@10 by nprobe (in-process)", ["nprobe", "recall@10"], list(sweep.items()))
    print(f"service RSS {rss / 2**20:.0f} MiB for {2 * args.n} vectors "
          f"({results['service_rss_bytes_per_vector']:.0f} B/vector, both collections)")
    name = "index_bench" if args.n == 1_000_000 else f"index_bench_n{args.n}"
    write_results(name, results, Path(args.out) if args.out else None)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
