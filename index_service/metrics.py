"""Prometheus metrics of the index service (the gRPC server metrics come from
the shared interceptor)."""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

VECTORS = Gauge(
    "clipsearch_index_vectors", "Live vectors per collection and in-process shard.", ["collection", "shard"]
)
SEARCH_SECONDS = Histogram(
    "clipsearch_index_search_seconds",
    "Time of one engine search call (all queries and shards), by index type.",
    ["index_type"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
STORE_WRITE_SECONDS = Histogram(
    "clipsearch_index_store_write_seconds",
    "Time of one durable store write transaction (commit included), by operation.",
    ["op"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
SNAPSHOT_AGE_SECONDS = Gauge(
    "clipsearch_index_snapshot_age_seconds",
    "Seconds since the collection's last snapshot (-1 when it has none).",
    ["collection"],
)
HNSW_EF_SEARCH = Gauge(
    "clipsearch_index_hnsw_ef_search",
    "efSearch an HNSW collection searches with when a request sets none: the spec's, or calibrated on the "
    "collection's own vectors (recall@10 0.97 on a sample of them) when the spec sets none.",
    ["collection"],
)
BUILD_SECONDS = Histogram(
    "clipsearch_index_build_seconds",
    "Time of a background index build (training or HNSW compaction), by index type.",
    ["index_type"],
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
MEMORY_BYTES = Gauge(
    "clipsearch_index_memory_bytes",
    "Memory a collection holds on this process, by part: faiss (the indexes of every in-process shard), "
    "id_maps (string ids <-> internal ids), filter_columns (the metadata that filters read). Computed on scrape.",
    ["collection", "part"],
)
PROCESS_MEMORY_BYTES = Gauge(
    "clipsearch_index_process_memory_bytes",
    "Memory of the whole index process, by part: rss (resident set), store_cache (SQLite's page caches "
    "and statements). Computed on scrape.",
    ["part"],
)
