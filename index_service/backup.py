"""Optional backup of snapshots and the store to S3, and restore on start.

Layout under ``s3://bucket/prefix/``::

    store.sqlite                       consistent copy of the store (SQLite online backup)
    snapshots/<uid>/shard-*.faiss      snapshot files of collection <uid>
    snapshots/<uid>/manifest.json      uploaded after its shard files

A snapshot uploaded after the last store copy may be ahead of it; restore
then ignores that snapshot (its sequence is above the store's) and rebuilds
the collection from the store, so a restore is always consistent.
Credentials follow boto3's standard chain; ``endpoint_url`` points at MinIO
or a moto server.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

from index_service.collection import MANIFEST

log = logging.getLogger(__name__)


class S3Backup:
    def __init__(self, uri: str, endpoint_url: str = ""):
        if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
            raise ValueError(f"backup_s3_uri must look like s3://bucket/prefix, got {uri!r}")
        bucket, _, prefix = uri[5:].partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint_url or None)

    def _key(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, *parts) if part)

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _keys_under(self, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def _download(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".download")
        self.client.download_file(self.bucket, key, str(tmp))
        os.replace(tmp, target)

    # -- backup -------------------------------------------------------------

    def upload_snapshot(self, uid: int, files: list[Path]) -> None:
        """Uploads a snapshot's files in order (manifest last), then drops its older objects."""
        for path in files:
            self.client.upload_file(str(path), self.bucket, self._key("snapshots", str(uid), path.name))
        current = {self._key("snapshots", str(uid), path.name) for path in files}
        stale = [key for key in self._keys_under(self._key("snapshots", str(uid)) + "/") if key not in current]
        self._delete(stale)

    def upload_store(self, store, live_uids: Iterable[int]) -> None:
        """Uploads a consistent copy of the store, then drops snapshots of deleted collections."""
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "store.sqlite"
            store.backup_to(copy)
            self.client.upload_file(str(copy), self.bucket, self._key("store.sqlite"))
        live = {str(uid) for uid in live_uids}
        snapshots = self._key("snapshots") + "/"
        self._delete([key for key in self._keys_under(snapshots) if key[len(snapshots):].split("/")[0] not in live])

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            objects = [{"Key": key} for key in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})

    # -- restore ------------------------------------------------------------

    def restore_store(self, target: Path) -> bool:
        """Downloads the store copy to ``target``; False when the backup has none."""
        key = self._key("store.sqlite")
        if not self._exists(key):
            log.info("no store backup at s3://%s/%s; starting empty", self.bucket, key)
            return False
        self._download(key, target)
        log.info("restored the store from s3://%s/%s", self.bucket, key)
        return True

    def restore_snapshot(self, uid: int, directory: Path) -> bool:
        """Downloads collection ``uid``'s snapshot files, manifest last; False when there is none."""
        manifest_key = self._key("snapshots", str(uid), MANIFEST)
        if not self._exists(manifest_key):
            return False
        manifest = json.loads(self.client.get_object(Bucket=self.bucket, Key=manifest_key)["Body"].read())
        for name in manifest["shards"]:
            self._download(self._key("snapshots", str(uid), name), directory / name)
        self._download(manifest_key, directory / MANIFEST)
        return True
