"""Gateway metrics (per-method RED comes from the shared server interceptor)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

UPLOAD_BYTES = Counter("clipsearch_gateway_upload_bytes_total", "Bytes of images received for upload or import.")
UPLOADED_IMAGES = Counter(
    "clipsearch_gateway_uploaded_images_total",
    "Images handled by uploads and imports, by result (created, existing, failed).",
    ["result"],
)
STORAGE_OP_SECONDS = Histogram(
    "clipsearch_gateway_storage_op_seconds",
    "Time of one object-storage operation.",
    ["backend", "op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STORAGE_ERRORS = Counter(
    "clipsearch_gateway_storage_errors_total", "Failed object-storage operations.", ["backend", "op"]
)
TEXT_CACHE_HITS = Counter("clipsearch_gateway_text_cache_hits_total", "Text embeddings served from the cache.")
TEXT_CACHE_MISSES = Counter("clipsearch_gateway_text_cache_misses_total", "Text embeddings not in the cache.")
TEXT_CACHE_SIZE = Gauge("clipsearch_gateway_text_cache_entries", "Text embeddings held in the cache.")
SHARD_ERRORS = Counter(
    "clipsearch_gateway_shard_errors_total", "Failed calls to an index shard.", ["shard", "method", "code"]
)
PARTIAL_SEARCHES = Counter(
    "clipsearch_gateway_partial_searches_total", "Searches answered without some shards (policy partial)."
)
DOWNSTREAM_SECONDS = Histogram(
    "clipsearch_gateway_downstream_seconds",
    "Time of calls to the encoder and the index (fan-outs count once).",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IMPORTED_IMAGES = Counter(
    "clipsearch_gateway_import_images_total", "Images handled by import jobs, by result.", ["result"]
)
IMPORT_JOBS_RUNNING = Gauge("clipsearch_gateway_import_jobs_running", "Import jobs running now.")
REPAIRED_IDS = Counter(
    "clipsearch_gateway_repair_ids_total", "Ids fixed or found broken by repair jobs, by action.", ["action"]
)
PENDING_COLLECTION_DELETIONS = Gauge(
    "clipsearch_gateway_pending_collection_deletions", "Collection deletions waiting for a shard to return."
)
HTTP_REQUESTS = Counter(
    "clipsearch_gateway_http_requests_total", "HTTP/JSON API calls, by RPC and gRPC status code.", ["method", "code"]
)
HTTP_SECONDS = Histogram(
    "clipsearch_gateway_http_handling_seconds",
    "Time to handle an HTTP/JSON API call, by RPC.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
