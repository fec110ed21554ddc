"""Helpers shared by the index service tests that talk gRPC."""

from __future__ import annotations

import numpy as np

from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.metadata import filter_to_proto, metadata_from_proto, metadata_to_proto
from clipsearch.vectors import pack_matrix

DIM = 8


def unit_rows(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def upsert_request(collection, ids, vectors, metadata=None, fingerprint=""):
    return pb.UpsertVectorsRequest(
        collection=collection, ids=ids, vectors=pack_matrix(vectors),
        metadata=[metadata_to_proto(m) for m in metadata or []], model_fingerprint=fingerprint,
    )


def search_request(collection, queries, k=10, filter=None, **kwargs):
    return pb.SearchVectorsRequest(
        collection=collection, queries=pack_matrix(queries), k=k, filter=filter_to_proto(filter), **kwargs
    )


def seed_collections(stub, vectors, metadata):
    """Flat (L2, 2 shards), trained IVF (IP) and HNSW collections with the same data."""
    ids = [f"id{i:05d}" for i in range(len(vectors))]
    for name, spec, metric in (("flat", "Flat", pb.METRIC_L2), ("ivf", "IVF32,Flat", pb.METRIC_INNER_PRODUCT),
                               ("hnsw", "HNSW16", pb.METRIC_INNER_PRODUCT)):
        stub.CreateCollection(pb.CreateCollectionRequest(name=name, dim=vectors.shape[1], metric=metric,
                                                         index_spec=spec, num_shards=2))
        for start in range(0, len(ids), 1000):
            stub.UpsertVectors(upsert_request(name, ids[start:start + 1000], vectors[start:start + 1000],
                                              metadata[start:start + 1000]))
        stub.TrainIndex(pb.TrainIndexRequest(collection=name))
    return ids


def observe(stub, queries):
    """Everything a client can see: collection stats, searches (filtered, with metadata), all records."""
    seen = {}
    for name in ("flat", "ivf", "hnsw"):
        info = stub.GetCollection(pb.GetCollectionRequest(name=name)).collection
        results = stub.SearchVectors(search_request(name, queries, k=10, include_metadata=True)).results
        filtered = stub.SearchVectors(search_request(name, queries, k=5, filter={"group": ["g1", "g2"]})).results
        records, token = [], ""
        while True:
            page = stub.ListVectors(pb.ListVectorsRequest(collection=name, page_size=1000, page_token=token,
                                                          include_metadata=True))
            records.extend((r.id, tuple(sorted(metadata_from_proto(r.metadata).items()))) for r in page.records)
            token = page.next_page_token
            if not token:
                break
        seen[name] = (
            (info.vector_count, info.trained, info.sequence),
            [[(h.id, round(h.score, 5), tuple(sorted(metadata_from_proto(h.metadata).items()))) for h in r.hits]
             for r in results],
            [[h.id for h in r.hits] for r in filtered],
            records,
        )
    return seen
