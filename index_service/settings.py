"""Settings of the index service (flags, ``CLIPSEARCH_*`` environment, YAML section ``index:``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipsearch.metadata import MetadataLimits
from clipsearch.server.settings import ServerSettings

_LIMITS = MetadataLimits()


@dataclass
class IndexSettings(ServerSettings):
    data_dir: str = field(
        default="./data/index", metadata={"help": "directory of the durable store and the FAISS snapshots"}
    )
    snapshot_interval_seconds: float = field(
        default=300.0, metadata={"help": "snapshot collections changed since their last snapshot this often (0: off)"}
    )
    snapshot_on_shutdown: bool = field(
        default=True, metadata={"help": "snapshot changed collections on SIGTERM before exiting"}
    )
    auto_train: bool = field(
        default=True, metadata={"help": "train IVF/PQ indexes in the background once they hold enough vectors"}
    )
    build_threads: int = field(
        default=0, metadata={"help": "FAISS threads for training, index builds and the adds of each upsert "
                                     "(0: every core)"}
    )
    inline_search_max_ms: float = field(
        default=5.0,
        metadata={"help": "a lone unfiltered search estimated to take at most this long runs on the event loop, "
                          "saving two thread wake-ups (~0.3 ms) per call (0: every search on a worker thread)"},
    )
    backup_s3_uri: str = field(
        default="", metadata={"help": "s3://bucket/prefix to back snapshots and the store up to, and restore "
                                      "from when the data dir is empty (empty: no backup)"}
    )
    s3_endpoint_url: str = field(
        default="", metadata={"help": "S3 endpoint URL for MinIO or a test server (empty: AWS); credentials "
                                      "come from boto3's standard chain"}
    )
    max_metadata_keys: int = field(
        default=_LIMITS.max_keys_per_item, metadata={"help": "most metadata keys on one vector"}
    )
    max_metadata_key_bytes: int = field(
        default=_LIMITS.max_key_bytes, metadata={"help": "longest metadata key, in UTF-8 bytes"}
    )
    max_metadata_value_bytes: int = field(
        default=_LIMITS.max_value_bytes,
        metadata={"help": "largest metadata value, in UTF-8 bytes (a number or timestamp counts 8)"},
    )
    max_metadata_bytes: int = field(
        default=_LIMITS.max_item_bytes, metadata={"help": "most metadata bytes (keys + values) on one vector"}
    )
    max_collection_metadata_keys: int = field(
        default=_LIMITS.max_collection_keys,
        metadata={"help": "most distinct metadata (filterable) keys in one collection on this shard"},
    )

    def metadata_limits(self) -> MetadataLimits:
        return MetadataLimits(
            max_keys_per_item=self.max_metadata_keys, max_key_bytes=self.max_metadata_key_bytes,
            max_value_bytes=self.max_metadata_value_bytes, max_item_bytes=self.max_metadata_bytes,
            max_collection_keys=self.max_collection_metadata_keys,
        )
