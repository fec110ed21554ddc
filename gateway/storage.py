"""Image storage backends: S3 (boto3, presigned URLs) and a local folder (file:// URLs).

Object keys are ``<prefix><collection>/<sha256 hex of the bytes>``. Markers, the
gateway's durable notes to itself, live under ``<prefix>.clipsearch/``. The id is
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
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from clipsearch.errors import ClipsearchError, InvalidArgument, NotFound, Unavailable
from clipsearch.image_formats import EXTENSION_BY_CONTENT_TYPE, sniff_content_type
from clipsearch.names import IMAGE_ID_RE, check_collection_name, check_image_id
from clipsearch.s3 import is_missing_error, make_s3_client, parse_s3_uri

from gateway import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Where the gateway keeps its own small control objects (pending collection
# deletions, unfinished image deletions). Collection names start with a letter
# or digit, so this never collides with a collection's objects.
CONTROL_PREFIX = ".clipsearch/"


def collection_deletion_marker(collection: str) -> str:
    """The marker that records a collection deletion until every shard has done it."""
    return f"deleting/{collection}"


def image_deletion_marker(collection: str, image_id: str) -> str:
    """The marker that records an image deletion until its object is gone."""
    return f"deleted/{collection}/{image_id}"


def image_id_for(data: bytes) -> str:
    """The id of an image: the sha256 of its bytes, in hex."""
    return hashlib.sha256(data).hexdigest()


# What may follow "<id>." in a local object's file name ("" for the bare ids written before).
EXTENSION_STEMS = {"", *(ext.lstrip(".") for ext in EXTENSION_BY_CONTENT_TYPE.values())}


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
            # The exception names endpoints, buckets and object keys: the log keeps them, the caller gets none.
            log.warning("%s storage %s failed: %s: %s", self.backend, op, type(exc).__name__, exc)
            raise Unavailable(f"image storage is unavailable ({op} failed); retry later") from exc
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
    def url(self, collection: str, image_id: str, ttl_seconds: int = 0) -> str:
        """A URL a client can fetch the object from (presigned for S3, valid ``ttl_seconds``;
        0 = the storage's default)."""

    @abc.abstractmethod
    async def list_ids(self, collection: str, after: str, limit: int) -> list[str]:
        """Up to ``limit`` image ids of the collection greater than ``after``, in order."""

    @abc.abstractmethod
    async def put_marker(self, name: str) -> None:
        """Records the marker ``name`` (a relative path such as ``deleting/images``)."""

    @abc.abstractmethod
    async def delete_marker(self, name: str) -> None:
        """Removes a marker; no error when it does not exist."""

    @abc.abstractmethod
    async def list_markers(self, prefix: str) -> list[str]:
        """Names of the markers starting with ``prefix``, in order."""

    async def has_marker(self, name: str) -> bool:
        return name in await self.list_markers(name)

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

    def _stored(self, collection: str, image_id: str) -> Path | None:
        """The object's file: ``<id><ext>`` (its content type's extension), or a bare ``<id>`` written
        before objects kept their extension; None when there is neither."""
        base = self.path(collection, image_id)
        for ext in (*EXTENSION_BY_CONTENT_TYPE.values(), ""):
            candidate = base.with_name(base.name + ext)
            if candidate.is_file():
                return candidate
        return None

    async def put(self, collection: str, image_id: str, data: bytes, content_type: str) -> bool:
        base = self.path(collection, image_id)
        path = base.with_name(base.name + EXTENSION_BY_CONTENT_TYPE.get(content_type, ""))

        def write() -> bool:
            if self._stored(collection, image_id) is not None:
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
        def read() -> bytes:
            try:
                return (self._stored(collection, image_id) or self.path(collection, image_id)).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"image {image_id} is not in storage", field="id") from None

        return await self._run("get", read)

    async def head(self, collection: str, image_id: str) -> ObjectInfo | None:
        def stat() -> ObjectInfo | None:
            try:
                with open(self._stored(collection, image_id) or self.path(collection, image_id), "rb") as fh:
                    head = fh.read(16)
                    size = os.fstat(fh.fileno()).st_size
            except FileNotFoundError:
                return None
            return ObjectInfo(size, sniff_content_type(head) or "application/octet-stream")

        return await self._run("head", stat)

    async def delete(self, collection: str, image_id: str) -> bool:
        def remove() -> bool:
            try:
                (self._stored(collection, image_id) or self.path(collection, image_id)).unlink()
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

    def url(self, collection: str, image_id: str, ttl_seconds: int = 0) -> str:
        return (self._stored(collection, image_id) or self.path(collection, image_id)).as_uri()

    async def list_ids(self, collection: str, after: str, limit: int) -> list[str]:
        folder = self.root / check_collection_name(collection)

        def scan() -> list[str]:
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                return []
            ids = {n.partition(".")[0] for n in names if n.partition(".")[2] in EXTENSION_STEMS}
            return sorted(i for i in ids if i > after and IMAGE_ID_RE.match(i))[:limit]

        return await self._run("list", scan)

    def _marker_path(self, name: str) -> Path:
        path = (self.root / CONTROL_PREFIX / name).resolve()
        if not path.is_relative_to(self.root / CONTROL_PREFIX):
            raise ValueError(f"marker {name!r} escapes the control folder")
        return path

    async def put_marker(self, name: str) -> None:
        path = self._marker_path(name)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                os.fsync(fh.fileno())

        await self._run("put_marker", write)

    async def delete_marker(self, name: str) -> None:
        await self._run("delete_marker", lambda: self._marker_path(name).unlink(missing_ok=True))

    async def list_markers(self, prefix: str) -> list[str]:
        control = self.root / CONTROL_PREFIX
        folder = control / prefix.rpartition("/")[0]  # only the folder the prefix points into

        def scan() -> list[str]:
            if not folder.is_dir():
                return []
            found = (p.relative_to(control).as_posix() for p in folder.rglob("*") if p.is_file())
            return sorted(name for name in found if name.startswith(prefix))

        return await self._run("list_markers", scan)


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
        # botocore's own timeouts end a hung request, so a hung S3 cannot hold the pool's threads for long.
        self.client = client or make_s3_client(endpoint_url, region, timeout_seconds=self.timeout_seconds)

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

    async def list_ids(self, collection: str, after: str, limit: int) -> list[str]:
        prefix = f"{self._prefix}{check_collection_name(collection)}/"
        names = await self._list_keys(prefix, prefix + after if after else "", limit, "list")
        return [name for name in names if IMAGE_ID_RE.match(name)]

    def _list_keys_sync(self, prefix: str, start_after: str, limit: int) -> list[str]:
        """Key names (without ``prefix``) after ``start_after``, in order, at most ``limit``."""
        names: list[str] = []
        kwargs = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
            for obj in page.get("Contents", []):
                names.append(obj["Key"][len(prefix):])
                if len(names) >= limit:
                    return names
        return names

    async def _list_keys(self, prefix: str, start_after: str, limit: int, op: str) -> list[str]:
        return await self._run(op, self._list_keys_sync, prefix, start_after, limit)

    def _marker_key(self, name: str) -> str:
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"marker {name!r} has empty, '.' or '..' segments")
        return f"{self._prefix}{CONTROL_PREFIX}{name}"

    async def put_marker(self, name: str) -> None:
        key = self._marker_key(name)
        await self._run("put_marker", lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=b""))

    async def delete_marker(self, name: str) -> None:
        key = self._marker_key(name)
        await self._run("delete_marker", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    async def list_markers(self, prefix: str) -> list[str]:
        names = await self._list_keys(f"{self._prefix}{CONTROL_PREFIX}{prefix}", "", 1_000_000, "list_markers")
        return [prefix + name for name in names]

    def url(self, collection: str, image_id: str, ttl_seconds: int = 0) -> str:
        started = time.perf_counter()
        url = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.key(collection, image_id)},
            ExpiresIn=ttl_seconds or self.url_ttl_seconds,
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
