"""Image storage backends: S3 (boto3, presigned URLs) and a local folder (file:// URLs).

Object keys are ``<prefix><collection>/<sha256 hex of the bytes>``. The id is
validated as 64 hex digits and the collection name against a strict pattern, so
no string from a request can name a key outside the configured prefix; the
local backend also checks the resolved path (defense in depth).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from clipsearch.errors import ClipsearchError, InvalidArgument, NotFound, Unavailable
from clipsearch.s3 import is_missing_error, make_s3_client, parse_s3_uri

from gateway import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_ID_RE = re.compile(r"^[0-9a-f]{64}$")
# No dots or slashes: a collection name is always exactly one path segment.
COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def image_id_for(data: bytes) -> str:
    """The id of an image: the sha256 of its bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


def check_image_id(value: str, field: str = "id") -> str:
    if not IMAGE_ID_RE.match(value or ""):
        raise InvalidArgument(
            f"{field} must be an image id (64 lowercase hex digits, the sha256 of the image bytes); got {value[:80]!r}",
            field=field,
        )
    return value


def check_collection_name(value: str, field: str = "collection") -> str:
    if not COLLECTION_RE.match(value or ""):
        raise InvalidArgument(
            f"{field} {value[:80]!r} is not a valid collection name: use 1-128 letters, digits, '_' or '-', "
            "starting with a letter or digit",
            field=field,
        )
    return value


_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"),
    (b"MM\x00*", 0, "image/tiff"),
)


def sniff_content_type(data: bytes) -> str | None:
    """The MIME type from the leading magic bytes, or None when not a known image format."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, offset, mime in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return mime
    return None


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    content_type: str


class ImageStorage(abc.ABC):
    """Content-addressed image objects, grouped by collection."""

    backend = "abstract"

    def __init__(self, timeout_seconds: float = 30.0, threads: int = 16):
        self.timeout_seconds = timeout_seconds
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"storage-{self.backend}")

    async def _run(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        """Runs a blocking storage call in the pool, timed, under the storage deadline."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, fn, *args), self.timeout_seconds)
        except ClipsearchError:
            raise
        except asyncio.TimeoutError:
            metrics.STORAGE_ERRORS.labels(self.backend, op).inc()
            raise Unavailable(f"{self.backend} storage {op} took longer than {self.timeout_seconds:.0f}s") from None
        except Exception as exc:  # noqa: BLE001 - any backend failure is "storage unavailable"
            metrics.STORAGE_ERRORS.labels(self.backend, op).inc()
            log.warning("%s storage %s failed: %s", self.backend, op, exc)
            raise Unavailable(f"{self.backend} storage {op} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            metrics.STORAGE_OP_SECONDS.labels(self.backend, op).observe(time.perf_counter() - started)

    def key(self, collection: str, image_id: str) -> str:
        check_collection_name(collection)
        check_image_id(image_id)
        return f"{self.prefix}{collection}/{image_id}"

    @property
    @abc.abstractmethod
    def prefix(self) -> str: ...

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where objects go, for logs: s3://bucket/prefix or a folder."""

    @abc.abstractmethod
    async def put(self, collection: str, image_id: str, data: bytes, content_type: str) -> bool:
        """Stores the object unless it exists; True when it was created."""

    @abc.abstractmethod
    async def get(self, collection: str, image_id: str) -> bytes:
        """The object's bytes; NotFound when it does not exist."""

    @abc.abstractmethod
    async def head(self, collection: str, image_id: str) -> ObjectInfo | None: ...

    @abc.abstractmethod
    async def delete(self, collection: str, image_id: str) -> bool:
        """Deletes the object; True when it existed."""

    @abc.abstractmethod
    async def delete_collection(self, collection: str) -> int:
        """Deletes every object of a collection; returns how many."""

    @abc.abstractmethod
    def url(self, collection: str, image_id: str) -> str:
        """A URL a client can fetch the object from (presigned for S3)."""

    async def check(self) -> None:
        """Raises Unavailable when the backend cannot be reached (startup check)."""

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LocalStorage(ImageStorage):
    backend = "local"

    def __init__(self, root: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def prefix(self) -> str:
        return ""

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, collection: str, image_id: str) -> Path:
        path = (self.root / self.key(collection, image_id)).resolve()
        if not path.is_relative_to(self.root):  # unreachable after validation; kept as a guard
            raise InvalidArgument("object key escapes the storage folder", field="id")
        return path

    async def put(self, collection: str, image_id: str, data: bytes, content_type: str) -> bool:
        path = self.path(collection, image_id)

        def write() -> bool:
            if path.exists():
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return True

        return await self._run("put", write)

    async def get(self, collection: str, image_id: str) -> bytes:
        path = self.path(collection, image_id)

        def read() -> bytes:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise NotFound(f"image {image_id} is not in storage", field="id") from None

        return await self._run("get", read)

    async def head(self, collection: str, image_id: str) -> ObjectInfo | None:
        path = self.path(collection, image_id)

        def stat() -> ObjectInfo | None:
            try:
                with open(path, "rb") as fh:
                    head = fh.read(16)
                    size = os.fstat(fh.fileno()).st_size
            except FileNotFoundError:
                return None
            return ObjectInfo(size, sniff_content_type(head) or "application/octet-stream")

        return await self._run("head", stat)

    async def delete(self, collection: str, image_id: str) -> bool:
        path = self.path(collection, image_id)

        def remove() -> bool:
            try:
                path.unlink()
                return True
            except FileNotFoundError:
                return False

        return await self._run("delete", remove)

    async def delete_collection(self, collection: str) -> int:
        folder = self.root / check_collection_name(collection)

        def remove() -> int:
            if not folder.is_dir():
                return 0
            count = sum(1 for p in folder.iterdir() if not p.name.startswith("."))
            shutil.rmtree(folder, ignore_errors=True)
            return count

        return await self._run("delete_collection", remove)

    def url(self, collection: str, image_id: str) -> str:
        return self.path(collection, image_id).as_uri()


class S3Storage(ImageStorage):
    backend = "s3"

    def __init__(self, uri: str, *, endpoint_url: str = "", region: str = "", url_ttl_seconds: int = 3600,
                 client=None, **kwargs):
        super().__init__(**kwargs)
        location = parse_s3_uri(uri, field="storage")
        self.bucket = location.bucket
        prefix = location.key.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ValueError(f"storage prefix {prefix!r} has empty, '.' or '..' segments")
        self._prefix = prefix + "/" if prefix else ""
        self.url_ttl_seconds = url_ttl_seconds
        self.client = client or make_s3_client(endpoint_url, region)

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self._prefix}"

    async def check(self) -> None:
        await self._run("check", lambda: self.client.head_bucket(Bucket=self.bucket))

    def _head(self, key: str) -> ObjectInfo | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if is_missing_error(exc):
                return None
            raise
        return ObjectInfo(int(response["ContentLength"]), response.get("ContentType") or "application/octet-stream")

    async def put(self, collection: str, image_id: str, data: bytes, content_type: str) -> bool:
        key = self.key(collection, image_id)

        def write() -> bool:
            if self._head(key) is not None:
                return False  # same key = same bytes
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
            return True

        return await self._run("put", write)

    async def get(self, collection: str, image_id: str) -> bytes:
        key = self.key(collection, image_id)

        def read() -> bytes:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except Exception as exc:  # noqa: BLE001
                if is_missing_error(exc):
                    raise NotFound(f"image {image_id} is not in storage", field="id") from None
                raise

        return await self._run("get", read)

    async def head(self, collection: str, image_id: str) -> ObjectInfo | None:
        key = self.key(collection, image_id)
        return await self._run("head", self._head, key)

    async def delete(self, collection: str, image_id: str) -> bool:
        key = self.key(collection, image_id)

        def remove() -> bool:
            existed = self._head(key) is not None
            if existed:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            return existed

        return await self._run("delete", remove)

    async def delete_collection(self, collection: str) -> int:
        prefix = f"{self._prefix}{check_collection_name(collection)}/"

        def remove() -> int:
            count = 0
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    count += len(keys)
            return count

        return await self._run("delete_collection", remove)

    def url(self, collection: str, image_id: str) -> str:
        started = time.perf_counter()
        url = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.key(collection, image_id)},
            ExpiresIn=self.url_ttl_seconds,
        )
        metrics.STORAGE_OP_SECONDS.labels(self.backend, "presign").observe(time.perf_counter() - started)
        return url


def make_storage(location: str, *, endpoint_url: str = "", region: str = "", url_ttl_seconds: int = 3600,
                 timeout_seconds: float = 30.0) -> ImageStorage:
    """S3 storage for ``s3://bucket/prefix``; a local folder for anything else."""
    if location.startswith("s3://"):
        return S3Storage(location, endpoint_url=endpoint_url, region=region, url_ttl_seconds=url_ttl_seconds,
                         timeout_seconds=timeout_seconds)
    if "://" in location:
        raise ValueError(f"storage must be s3://bucket/prefix or a folder path, got {location!r}")
    return LocalStorage(location, timeout_seconds=timeout_seconds)
