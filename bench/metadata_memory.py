"""Index memory and searchability under hostile metadata, through a real index process.

    python -m bench.metadata_memory [--vectors 8300] [--raise-limits]

Starts ``python -m index_service`` on port 0 in a temporary folder, fills a
collection with small vectors, then:

- **20,000-key case:** upserts one vector whose metadata has 20,000 distinct
  keys and reports the index's RSS delta (and GetCollection memory_bytes).
- **20 MiB case:** upserts four vectors with a 20 MiB string value each, then
  tries SearchVectors(k=50, include_metadata) and ListVectors, reporting the
  status of each and the RSS delta.

It speaks only the index's gRPC API, so the same script measures any version
(run it from an older checkout for the "before" figures). ``--raise-limits``
starts the index with limits high enough to accept both cases, to measure
what the sparse filter columns cost when such metadata is allowed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import grpc
import numpy as np

from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.metadata import metadata_to_proto
from clipsearch.stack import ServiceProcess
from clipsearch.vectors import pack_matrix

DIM = 64
RAISED = ["--max-metadata-keys", "30000", "--max-collection-metadata-keys", "30000",
          "--max-metadata-value-bytes", str(21 << 20), "--max-metadata-bytes", str(21 << 20)]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def call(fn, request):
    try:
        return "OK", fn(request, timeout=120)
    except grpc.RpcError as err:
        return err.code().name, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=8300)
    parser.add_argument("--raise-limits", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--data-dir", str(Path(tmp) / "data"), "--snapshot-interval-seconds", "0",
                 "--max-message-mb", "256", *(RAISED if args.raise_limits else [])]
        proc = ServiceProcess("index_service", flags, Path(tmp), name="index").start()
        channel = grpc.insecure_channel(proc.address, options=[("grpc.max_send_message_length", 256 << 20),
                                                               ("grpc.max_receive_message_length", 64 << 20)])
        stub = index_service_pb2_grpc.IndexServiceStub(channel)
        pid = proc.proc.pid
        stub.CreateCollection(pb.CreateCollectionRequest(name="c", dim=DIM, index_spec="Flat"))  # as in every version
        for start in range(0, args.vectors, 1000):
            n = min(1000, args.vectors - start)
            stub.UpsertVectors(pb.UpsertVectorsRequest(
                collection="c", ids=[f"v{start + i}" for i in range(n)],
                vectors=pack_matrix(rng.standard_normal((n, DIM)).astype(np.float32)),
                metadata=[metadata_to_proto({"group": f"g{i % 10}"}) for i in range(n)]))
        memory = lambda: stub.GetCollection(pb.GetCollectionRequest(name="c")).collection.memory_bytes  # noqa: E731
        report = {"vectors": args.vectors, "raised_limits": args.raise_limits}

        before_rss, before_mem = rss(pid), memory()
        wide = metadata_to_proto({f"key{j}": float(j) for j in range(20_000)})
        code, _ = call(stub.UpsertVectors, pb.UpsertVectorsRequest(
            collection="c", ids=["wide"], vectors=pack_matrix(rng.standard_normal((1, DIM)).astype(np.float32)),
            metadata=[wide]))
        report["keys_20000"] = {"upsert": code, "rss_delta_mb": round((rss(pid) - before_rss) / 2**20, 1),
                                "memory_bytes_delta_mb": round((memory() - before_mem) / 2**20, 2)}

        before_rss = rss(pid)
        codes = []
        for i in range(4):
            code, _ = call(stub.UpsertVectors, pb.UpsertVectorsRequest(
                collection="c", ids=[f"big{i}"],
                vectors=pack_matrix(rng.standard_normal((1, DIM)).astype(np.float32)),
                metadata=[metadata_to_proto({"blob": "x" * (20 << 20)})]))
            codes.append(code)
        search_code, _ = call(stub.SearchVectors, pb.SearchVectorsRequest(
            collection="c", queries=pack_matrix(rng.standard_normal((1, DIM)).astype(np.float32)), k=50,
            include_metadata=True))
        list_code, _ = call(stub.ListVectors, pb.ListVectorsRequest(collection="c", page_size=1000,
                                                                    include_metadata=True))
        report["value_20mib_x4"] = {"upserts": codes, "search_k50_with_metadata": search_code,
                                    "list_with_metadata": list_code,
                                    "rss_delta_mb": round((rss(pid) - before_rss) / 2**20, 1)}
        channel.close()
        proc.terminate()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
