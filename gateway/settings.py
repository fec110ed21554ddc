"""Gateway settings: every field is a ``--flag``, an env var ``CLIPSEARCH_<NAME>`` and a YAML key."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Sequence

from clipsearch.metadata import MetadataLimits
from clipsearch.server.settings import ServerSettings, SettingsError, load_settings

SHARD_FAILURE_POLICIES = ("fail", "partial")
REFLECTION_POLICIES = ("open", "auth", "off")


@dataclasses.dataclass
class GatewaySettings(ServerSettings):
    encoder: str = field(default="127.0.0.1:50051", metadata={"help": "encoder service HOST:PORT"})
    index: list[str] = field(
        default_factory=lambda: ["127.0.0.1:50052"],
        metadata={"help": "index shards, HOST:PORT[,HOST:PORT...]; the order decides which shard holds which id"},
    )
    storage: str = field(
        default="./data/images",
        metadata={"help": "where images are stored: s3://bucket/prefix, or a local folder"},
    )
    s3_endpoint_url: str = field(default="", metadata={"help": "S3 endpoint (MinIO, a test server); empty = AWS"})
    s3_region: str = field(default="", metadata={"help": "S3 region; empty = boto3's default chain"})
    url_ttl_seconds: int = field(default=3600, metadata={"help": "lifetime of presigned S3 URLs in results"})
    max_url_ttl_seconds: int = field(
        default=24 * 3600, metadata={"help": "longest URL lifetime a request may ask for (url_ttl_seconds field)"}
    )
    data_dir: str = field(default="./data/gateway", metadata={"help": "gateway state (import and repair jobs)"})
    api_keys_file: str = field(
        default="",
        metadata={"help": "YAML keys file (ids, sha256 of secrets, scopes, import sources; see README Security); "
                          "re-read when it changes or on SIGHUP; missing or invalid = no key valid. Empty = auth off"},
    )
    api_keys_reload_seconds: float = field(
        default=2.0, metadata={"help": "how often a call checks whether api_keys_file changed"}
    )
    reflection: str = field(
        default="open",
        metadata={"help": "gRPC server reflection: 'open', 'auth' (any valid API key) or 'off'"},
    )
    http_port: int = field(
        default=-1,
        metadata={"help": "HTTP/JSON API (routes from the proto's google.api.http options), OpenAPI document and "
                          "web page at /; 0 picks a free port, -1 disables. Same keys, TLS and host as gRPC"},
    )
    default_collection: str = field(default="images", metadata={"help": "collection used when a request names none"})
    default_index_spec: str = field(
        default="",
        metadata={"help": "FAISS spec of collections created without one (the auto-created default collection, "
                          "CreateCollection with an empty index_spec); empty: the index service's default (HNSW32, "
                          "see README Choosing an index)"},
    )
    create_default_collection: bool = field(
        default=True, metadata={"help": "create the default collection on startup with the encoder's dim/fingerprint"}
    )
    shard_failure_policy: str = field(
        default="fail",
        metadata={"help": "when an index shard fails a search: 'fail' (UNAVAILABLE) or 'partial' (partial=true)"},
    )
    encoder_timeout_seconds: float = field(default=30.0, metadata={"help": "deadline of one encoder call"})
    index_timeout_seconds: float = field(
        default=10.0,
        metadata={"help": "deadline of one index call (all shards); a shard slower than this is reported missing"},
    )
    storage_timeout_seconds: float = field(default=30.0, metadata={"help": "deadline of one storage operation"})
    startup_timeout_seconds: float = field(
        default=120.0, metadata={"help": "how long startup waits for the encoder and index shards"}
    )
    internal_retries: int = field(
        default=3,
        metadata={"help": "retries of encoder and index calls that found the service unavailable (gRPC retryPolicy)"},
    )
    retry_backoff_seconds: float = field(default=0.05, metadata={"help": "first retry delay (doubles each time)"})
    reconcile_interval_seconds: float = field(
        default=10.0,
        metadata={"help": "how often unfinished collection deletions are retried (a shard was down)"},
    )
    encoder_batch_size: int = field(default=32, metadata={"help": "images per EmbedImages call"})
    text_cache_size: int = field(default=4096, metadata={"help": "text embeddings kept in the LRU cache (0 = off)"})
    max_image_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "largest image accepted, in bytes"})
    max_upload_items: int = field(default=256, metadata={"help": "most images in one UploadImages call"})
    max_batch_queries: int = field(default=64, metadata={"help": "most queries in one BatchSearchImages call"})
    max_in_flight_mb: int = field(
        default=256,
        metadata={"help": "budget of request bytes (images, query parts) held by admitted searches and uploads, in "
                          "MiB; a request that would pass it gets RESOURCE_EXHAUSTED with a retry hint (0 = none)"},
    )
    max_queue_wait_ms: float = field(
        default=0.0,
        metadata={"help": "most time the searches/uploads in flight plus a new one may be expected to take; longer "
                          "gets RESOURCE_EXHAUSTED with a retry hint (0 = only the caller's deadline bounds it)"},
    )
    max_metadata_keys: int = field(
        default=MetadataLimits.max_keys_per_item,
        metadata={"help": "most metadata keys on one image, counting the 3-4 the gateway sets (filename, ...)"},
    )
    max_metadata_key_bytes: int = field(
        default=MetadataLimits.max_key_bytes, metadata={"help": "longest metadata key, in UTF-8 bytes"}
    )
    max_metadata_value_bytes: int = field(
        default=MetadataLimits.max_value_bytes,
        metadata={"help": "largest metadata value, in UTF-8 bytes (a number or timestamp counts 8)"},
    )
    max_metadata_bytes: int = field(
        default=MetadataLimits.max_item_bytes,
        metadata={"help": "most metadata bytes (keys + values) on one image; keep the index's limits at least this"},
    )
    max_response_metadata_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={"help": "metadata bytes in one SearchImages or ListImages response; a page that would pass "
                          "it ends early with a next_page_token"},
    )
    mmr_candidates: int = field(
        default=4, metadata={"help": "MMR re-ranks top_k * this many candidates (at most 1000)"}
    )
    page_token_secret: str = field(
        default="",
        metadata={"help": "HMAC key for page tokens; empty = random per process (set it when running replicas)"},
    )
    import_sources: list[str] = field(
        default_factory=list,
        metadata={"help": "where ImportImages may read from: s3://bucket/prefix and local folders (comma "
                          "separated); empty = no imports. Each API key's import sources must lie inside"},
    )
    import_batch_size: int = field(default=32, metadata={"help": "images per import step"})
    import_max_images_per_second: float = field(
        default=0.0, metadata={"help": "throttle for imports, to spare the encoder (0 = no limit)"}
    )
    import_resume_on_start: bool = field(
        default=True, metadata={"help": "resume import jobs that were running when the gateway stopped"}
    )
    internal_tls_ca: str = field(
        default="", metadata={"help": "PEM CA bundle; when set, encoder and index calls use TLS"}
    )
    internal_tls_cert: str = field(default="", metadata={"help": "PEM client certificate for mTLS to internal services"})
    internal_tls_key: str = field(default="", metadata={"help": "PEM client key for mTLS to internal services"})
    internal_tls_server_name: str = field(
        default="", metadata={"help": "expected server name in internal certificates (overrides the host)"}
    )

    def metadata_limits(self) -> MetadataLimits:
        return MetadataLimits(
            max_keys_per_item=self.max_metadata_keys, max_key_bytes=self.max_metadata_key_bytes,
            max_value_bytes=self.max_metadata_value_bytes, max_item_bytes=self.max_metadata_bytes,
        )

    def validate(self) -> "GatewaySettings":
        if self.shard_failure_policy not in SHARD_FAILURE_POLICIES:
            raise SettingsError(
                f"shard_failure_policy must be one of {SHARD_FAILURE_POLICIES}, got {self.shard_failure_policy!r}"
            )
        if not self.encoder:
            raise SettingsError("encoder: set the encoder service address HOST:PORT")
        if not self.index:
            raise SettingsError("index: set at least one index shard address HOST:PORT")
        for address in [self.encoder, *self.index]:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise SettingsError(f"{address!r} is not HOST:PORT")
        if len(set(self.index)) != len(self.index):
            raise SettingsError(f"index lists a shard twice: {self.index}")
        if self.url_ttl_seconds <= 0 or self.url_ttl_seconds > 7 * 24 * 3600:
            raise SettingsError("url_ttl_seconds must be in 1..604800 (S3's limit is 7 days)")
        if not self.url_ttl_seconds <= self.max_url_ttl_seconds <= 7 * 24 * 3600:
            raise SettingsError("max_url_ttl_seconds must be in url_ttl_seconds..604800 (S3's limit is 7 days)")
        if self.reflection not in REFLECTION_POLICIES:
            raise SettingsError(f"reflection must be one of {REFLECTION_POLICIES}, got {self.reflection!r}")
        if self.api_keys_reload_seconds <= 0:
            raise SettingsError("api_keys_reload_seconds must be > 0")
        if bool(self.internal_tls_cert) != bool(self.internal_tls_key):
            raise SettingsError("internal_tls_cert and internal_tls_key go together (mTLS)")
        if self.internal_tls_cert and not self.internal_tls_ca:
            raise SettingsError("internal_tls_cert needs internal_tls_ca (the CA of the internal services)")
        for name in ("encoder_batch_size", "import_batch_size", "max_upload_items", "max_batch_queries",
                     "mmr_candidates"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1")
        if self.text_cache_size < 0 or self.internal_retries < 0:
            raise SettingsError("text_cache_size and internal_retries must be >= 0")
        if self.internal_retries > 4:
            raise SettingsError("internal_retries must be at most 4 (gRPC allows 5 attempts)")
        if self.reconcile_interval_seconds <= 0:
            raise SettingsError("reconcile_interval_seconds must be > 0")
        return self


def load_gateway_settings(argv: Sequence[str] | None = None, environ=None) -> GatewaySettings:
    settings = load_settings(
        GatewaySettings,
        section="gateway",
        argv=argv,
        environ=environ,
        prog="python -m gateway",
        description="clipsearch gateway: the public search API over the encoder, index shards and image storage.",
    )
    return settings.validate()
