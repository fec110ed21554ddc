"""The default index, measured: recall@10 and single-query latency of HNSW
(per efSearch), IVF and Flat on clustered synthetic vectors, with efSearch
tuned on one query set and verified on held-out and shifted ones.

Data: ``index_service.synthetic.GaussianMixture`` (sqrt(n) clusters, spread
2.0, 512-d unit vectors) as in ``bench.index_bench``. Query sets, each 1000:
- ``tune``: fresh points of the mixture; the recall of every efSearch of a
  sweep is measured on these, and rows are printed for the smallest reaching
  0.95, for 64, 128 and for the index service's default;
- ``held-out``: other fresh points of the mixture, never used for choosing;
- ``shifted +s``: held-out queries plus a common offset vector of norm ``s``
  (a random direction), renormalized: out-of-distribution queries, like text
  queries against image vectors (CLIP's "modality gap").

Indexes are built in-process through ``IndexSpec`` (what a shard holds), with
every core; searches run one query at a time on one FAISS thread, as the
service runs them. Exact top-10 from ``IndexFlatIP`` is the ground truth.

Ingest (``--ingest``): the real service (``python -m index_service``) on
loopback, one client sending ``UpsertVectors`` batches of ``--batch`` vectors
into a Flat and an HNSW collection in turn; vectors/s is the rate over the
whole fill, and "searchable" is the time from sending the last batch until a
search for its last vector finds it.

    python -m bench.index_defaults --n 100000
    python -m bench.index_defaults --n 20000 --specs HNSW32 --queries 200   # seconds
    python -m bench.index_defaults --ingest --n 100000 --batch 1000
    python -m bench.index_defaults --n 100000 --clusters 1024 --specs HNSW32 --calibrated

Calibrated (``--calibrated``): each spec is filled through ``IndexEngine`` in
batches of 5000 (so the collection calibrates its own efSearch in the
background as it grows, the last time at 80k of 100k), then calibrated once
more over every vector (timed); rows are printed at the efSearch it served at
the end of the fill and at the one it serves after that last calibration, with
the held-out and shifted recall and p50 of searches through the engine that set
no efSearch.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import faiss
import grpc
import numpy as np

from bench.common import percentile, print_table, recall_at_k, write_results
from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.vectors import pack_matrix
from index_service.shards import HNSW_DEFAULT_EF, IndexSpec, default_nprobe
from index_service.synthetic import GaussianMixture

K = 10
RECALL_TARGET = 0.95
EF_SWEEP = (32, 48, 64, 80, 96, 128, 160, 192, 256, 384)
SHIFTS = (0.5, 1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.index_defaults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="base vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="queries per set")
    parser.add_argument("--spread", type=float, default=2.0)
    parser.add_argument("--clusters", type=int, default=0, help="mixture components (0: sqrt(n))")
    parser.add_argument("--ef", type=int, nargs="*", default=[], help="also print rows for these efSearch values")
    parser.add_argument("--specs", default="HNSW32;HNSW32,efConstruction=80",
                        help="';'-separated HNSW specs to sweep efSearch on")
    parser.add_argument("--ivf", action="store_true", help="also an IVF index at its tuned nprobe")
    parser.add_argument("--threads", type=int, default=0, help="build threads (0: every core)")
    parser.add_argument("--out", default="", help="results directory (default: bench/results)")
    parser.add_argument("--calibrated", action="store_true",
                        help="build through IndexEngine and measure at the efSearch it calibrates")
    parser.add_argument("--ingest", action="store_true", help="measure ingest through the service instead")
    parser.add_argument("--batch", type=int, default=1000, help="--ingest: vectors per UpsertVectors call")
    parser.add_argument("--ingest-specs", default="Flat;HNSW32", help="--ingest: ';'-separated specs")
    parser.add_argument("--service-flags", default="", help="--ingest: extra index_service flags")
    parser.add_argument("--with-searches", action="store_true",
                        help="--ingest: a second client searches the collection being filled, one query at a time")
    return parser.parse_args(argv)


def query_sets(mixture: GaussianMixture, n_queries: int) -> dict[str, np.ndarray]:
    held_out = mixture.sample(n_queries, seed=3)
    sets = {"tune": mixture.sample(n_queries, seed=2), "held-out": held_out}
    direction = np.random.default_rng(4).standard_normal(mixture.dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    for shift in SHIFTS:
        shifted = held_out + np.float32(shift) * direction
        sets[f"shifted +{shift}"] = shifted / np.linalg.norm(shifted, axis=1, keepdims=True)
    return sets



def one_at_a_time(index: faiss.Index, queries: np.ndarray, params) -> tuple[np.ndarray, list[float]]:
    """Labels and per-query seconds, one query per search call on one thread."""
    faiss.omp_set_num_threads(1)
    labels, seconds = np.empty((len(queries), K), dtype=np.int64), []
    for row in range(len(queries)):
        started = time.perf_counter()
        _, labels[row:row + 1] = index.search(queries[row:row + 1], K, params=params)
        seconds.append(time.perf_counter() - started)
    return labels, seconds


def build(spec: IndexSpec, base: np.ndarray, threads: int) -> tuple[faiss.Index, float]:
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    if spec.needs_training:
        sample = base[np.random.default_rng(0).choice(len(base), min(len(base), 40 * spec.nlist), replace=False)]
        shard = spec.shard_from_template(spec.train(sample, threads))
    else:
        shard = spec.new_shard()
    faiss.omp_set_num_threads(threads)
    shard.add(np.arange(len(base), dtype=np.int64), base)
    return shard.index, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.ingest:
        return ingest(args)
    threads = args.threads or faiss.omp_get_max_threads()
    mixture = GaussianMixture(args.dim, clusters=args.clusters or max(8, int(math.sqrt(args.n))),
                              spread=args.spread, seed=0)
    base = mixture.sample(args.n, seed=1)
    sets = query_sets(mixture, args.queries)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    faiss.omp_set_num_threads(threads)
    truth = {name: exact.search(queries, K)[1] for name, queries in sets.items()}
    _, flat_seconds = one_at_a_time(exact, sets["held-out"][:200], None)
    rows = [["Flat", "-", "-", 1.0, 1.0, *([1.0] * len(SHIFTS)), percentile(flat_seconds, 50) * 1000, "-"]]
    results: dict = {"n": args.n, "dim": args.dim, "clusters": len(mixture.centers), "queries": args.queries,
                     "threads": threads, "rows": []}

    for text in [s for s in args.specs.split(";") if s.strip()] if args.calibrated else []:
        rows.extend(calibrated_rows(text, base, sets, truth, args, results))

    for text in [s for s in args.specs.split(";") if s.strip()] if not args.calibrated else []:
        spec = IndexSpec.parse(text, args.dim, "ip")
        index, build_seconds = build(spec, base, threads)
        sweep = {}
        for ef in EF_SWEEP:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            tune_labels, _ = one_at_a_time(index, sets["tune"], params)
            sweep[ef] = recall_at_k(tune_labels, truth["tune"])
        reaching = [ef for ef in EF_SWEEP if sweep[ef] >= RECALL_TARGET] or [EF_SWEEP[-1]]
        for ef in sorted({64, reaching[0], 128, HNSW_DEFAULT_EF, *args.ef}):
            params = faiss.SearchParametersHNSW(efSearch=ef)
            measured = {}
            for name in sets:
                if name == "tune":
                    continue
                labels, seconds = one_at_a_time(index, sets[name], params)
                measured[name] = (recall_at_k(labels, truth[name]), percentile(seconds, 50) * 1000)
            row = [spec.spec, ef, f"{args.n / build_seconds:,.0f}", sweep[ef],
                   *(measured[name][0] for name in measured), measured["held-out"][1], f"{build_seconds:.1f}"]
            rows.append(row)
            results["rows"].append({"spec": spec.spec, "ef_search": ef, "tune_recall": sweep[ef],
                                    "recall": {name: value[0] for name, value in measured.items()},
                                    "p50_ms": measured["held-out"][1], "build_seconds": build_seconds,
                                    "build_vectors_per_second": args.n / build_seconds})
        results["rows"].append({"spec": spec.spec, "tune_sweep": sweep})
        print(f"{spec.spec}: recall@10 on tune by efSearch: "
              + ", ".join(f"{ef}: {value:.3f}" for ef, value in sweep.items()), flush=True)
        del index

    if args.ivf:
        nlist = 4096
        while nlist > 16 and 39 * nlist > args.n:
            nlist //= 2
        spec = IndexSpec.parse(f"IVF{nlist},Flat", args.dim, "ip")
        index, build_seconds = build(spec, base, threads)
        for nprobe in sorted({default_nprobe(nlist), 2 * default_nprobe(nlist)}):
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            tune_labels, _ = one_at_a_time(index, sets["tune"], params)
            measured = {name: one_at_a_time(index, sets[name], params) for name in sets if name != "tune"}
            rows.append([spec.spec, f"nprobe {nprobe}", f"{args.n / build_seconds:,.0f}",
                         recall_at_k(tune_labels, truth["tune"]),
                         *(recall_at_k(labels, truth[name]) for name, (labels, _) in measured.items()),
                         percentile(measured["held-out"][1], 50) * 1000, f"{build_seconds:.1f}"])

    columns = ["index", "efSearch", "build vec/s", "recall tune", "recall held-out",
               *(f"recall shifted +{s}" for s in SHIFTS), "p50 ms (held-out)", "build s"]
    results["table"] = print_table(f"{args.n:,} x {args.dim} ({len(mixture.centers)} clusters), recall@10 vs exact, "
                                   "one query per search on 1 thread",
                                   columns, rows)
    write_results("index_defaults", results, Path(args.out) if args.out else None)
    return results


def calibrated_rows(spec: str, base: np.ndarray, sets: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                    args: argparse.Namespace, results: dict) -> list[list]:
    """Rows for ``spec`` filled through ``IndexEngine``, at the efSearch it calibrated (see the module doc)."""
    from index_service.engine import IndexEngine

    rows = []
    with tempfile.TemporaryDirectory(prefix="calibrated-bench-") as workdir, \
            IndexEngine(workdir, snapshot_on_close=False, build_threads=args.threads or None) as engine:
        engine.create_collection("bench", dim=args.dim, index_spec=spec)
        started = time.perf_counter()
        for start in range(0, len(base), 5000):
            engine.upsert("bench", [str(i) for i in range(start, min(start + 5000, len(base)))],
                          base[start:start + 5000])
        engine.wait_for_builds()
        fill_seconds = time.perf_counter() - started
        after_fill = engine.get_collection("bench").hnsw_ef_search
        started = time.perf_counter()
        final = engine.calibrate_ef_search("bench").hnsw_ef_search
        calibration_seconds = time.perf_counter() - started
        print(f"{spec}: efSearch {after_fill} after the fill ({fill_seconds:.1f}s), {final} calibrated over "
              f"{len(base):,} vectors in {calibration_seconds:.2f}s", flush=True)
        labels_by_ef = {after_fill: "after the fill", final: f"calibrated at {len(base):,}"}
        if after_fill == final:
            labels_by_ef[final] = f"calibrated, after the fill and at {len(base):,}"
        for ef, label in sorted(labels_by_ef.items()):
            measured = {}
            for name, queries in sets.items():
                labels, seconds = np.empty((len(queries), K), dtype=np.int64), []
                for row in range(len(queries)):
                    started = time.perf_counter()
                    hits = engine.search("bench", queries[row:row + 1], K, ef_search=0 if ef == final else ef)
                    seconds.append(time.perf_counter() - started)
                    labels[row] = [int(hit.id) for hit in hits[0]] + [-1] * (K - len(hits[0]))
                measured[name] = (recall_at_k(labels, truth[name]), percentile(seconds, 50) * 1000)
            rows.append([f"{spec} ({label})", ef, f"{len(base) / fill_seconds:,.0f} (engine)",
                         *(measured[name][0] for name in measured), measured["held-out"][1],
                         f"calibration {calibration_seconds:.2f}"])
            results["rows"].append({"spec": spec, "calibrated": label, "ef_search": ef,
                                    "recall": {name: value[0] for name, value in measured.items()},
                                    "p50_ms": measured["held-out"][1], "calibration_seconds": calibration_seconds,
                                    "fill_seconds": fill_seconds})
    return rows


def search_until(stub, name: str, queries: np.ndarray, done: threading.Event, seconds: list[float]) -> None:
    """One query per SearchVectors call, back to back, until ``done``; appends each call's time."""
    packed = [pack_matrix(queries[i:i + 1]) for i in range(len(queries))]
    while not done.is_set():
        started = time.perf_counter()
        stub.SearchVectors(pb.SearchVectorsRequest(collection=name, queries=packed[len(seconds) % len(packed)], k=K))
        seconds.append(time.perf_counter() - started)


def ingest(args: argparse.Namespace) -> dict:
    """Vectors/s of UpsertVectors batches through a real index service, per spec."""
    from clipsearch.stack import ServiceProcess

    mixture = GaussianMixture(args.dim, clusters=max(8, int(math.sqrt(args.n))), spread=args.spread, seed=0)
    base = mixture.sample(args.n, seed=1)
    ids = [f"v{i}" for i in range(args.n)]
    rows, results = [], {"n": args.n, "batch": args.batch, "service_flags": args.service_flags, "rows": []}
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as workdir:
        service = ServiceProcess("index_service", [
            "--data-dir", str(Path(workdir) / "data"), "--log-level", "WARNING", "--drain-delay-seconds", "0",
            "--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown", "--metrics-port", "-1",
            *args.service_flags.split()], Path(workdir), name="bench-index").start()
        try:
            with grpc.insecure_channel(service.address, options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
                stub = index_service_pb2_grpc.IndexServiceStub(ch)
                for number, spec in enumerate(s for s in args.ingest_specs.split(";") if s.strip()):
                    name = f"c{number}"
                    stub.CreateCollection(pb.CreateCollectionRequest(name=name, dim=args.dim, index_spec=spec))
                    stub.UpsertVectors(pb.UpsertVectorsRequest(collection=name, ids=["seed"],  # for the searcher
                                                               vectors=pack_matrix(mixture.sample(1, seed=5))))
                    done, searches = threading.Event(), []
                    searcher = threading.Thread(target=search_until, args=(stub, name, base[:1000], done, searches))
                    if args.with_searches:
                        searcher.start()
                    started = time.perf_counter()
                    for start in range(0, args.n, args.batch):
                        last_sent = time.perf_counter()
                        stub.UpsertVectors(pb.UpsertVectorsRequest(
                            collection=name, ids=ids[start:start + args.batch],
                            vectors=pack_matrix(base[start:start + args.batch])))
                    seconds = time.perf_counter() - started
                    done.set()
                    if args.with_searches:
                        searcher.join()
                    hit = stub.SearchVectors(pb.SearchVectorsRequest(
                        collection=name, queries=pack_matrix(base[-1:]), k=1)).results[0].hits[0].id
                    searchable = time.perf_counter() - last_sent
                    assert hit == ids[-1], hit
                    info = stub.GetCollection(pb.GetCollectionRequest(name=name)).collection
                    search_p50 = percentile(searches, 50) * 1000 if searches else float("nan")
                    rows.append([info.index_spec, f"{args.n / seconds:,.0f}", seconds, searchable * 1000,
                                 len(searches), search_p50])
                    results["rows"].append({"spec": info.index_spec, "vectors_per_second": args.n / seconds,
                                            "seconds": seconds, "searchable_ms": searchable * 1000,
                                            "searches_during_fill": len(searches), "search_p50_ms": search_p50})
        finally:
            service.terminate()
    results["table"] = print_table(
        f"Ingest through the index service: {args.n:,} x {args.dim} in UpsertVectors batches of {args.batch}"
        f" ({args.service_flags or 'default flags'}{', a client searching meanwhile' if args.with_searches else ''};"
        f" {os.cpu_count()} cores)",
        ["index", "vectors/s", "fill s", "last batch to searchable ms", "searches meanwhile", "search p50 ms"],
        rows)
    write_results("index_ingest", results, Path(args.out) if args.out else None)
    return results


if __name__ == "__main__":
    main()
