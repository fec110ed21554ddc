"""Storage backends: S3 against a moto server over HTTP, and a local folder."""

from __future__ import annotations

import asyncio
import hashlib
import io
import urllib.request

import numpy as np
import pytest
from PIL import Image

from clipsearch.errors import InvalidArgument, NotFound
from gateway.storage import (
    LocalStorage, S3Storage, check_collection_name, image_id_for, make_storage, sniff_content_type,
)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(params=["s3", "local"])
def storage(request, tmp_path):
    if request.param == "s3":
        client, bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_endpoint")
        store = S3Storage(f"s3://{bucket}/some/prefix", endpoint_url=endpoint, url_ttl_seconds=120)
        store.raw = lambda key: client.get_object(Bucket=bucket, Key=key)["Body"].read()
        store.keys = lambda: sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
        store.ext = ""  # S3 keys are ids; the object's ContentType says what it is
    else:
        store = LocalStorage(tmp_path / "images")
        store.raw = lambda key: (store.root / key).read_bytes()
        store.keys = lambda: sorted(p.relative_to(store.root).as_posix()
                                    for p in store.root.rglob("*") if p.is_file())
        store.ext = ".png"  # files keep their content type's extension
    yield store
    store.close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:  # file:// and http:// alike
        return response.read()


def test_put_get_url_delete(storage):
    async def scenario():
        data = png(1)
        image_id = image_id_for(data)
        assert image_id == hashlib.sha256(data).hexdigest()
        assert await storage.put("photos", image_id, data, "image/png") is True
        assert await storage.put("photos", image_id, data, "image/png") is False  # same bytes: one object
        assert await storage.get("photos", image_id) == data
        info = await storage.head("photos", image_id)
        assert info.size == len(data) and info.content_type == "image/png"
        key = storage.key("photos", image_id)
        assert key.startswith(storage.prefix) and storage.keys() == [key + storage.ext]
        url = storage.url("photos", image_id)
        assert await asyncio.to_thread(fetch, url) == data  # presigned over HTTP, or file://
        assert await storage.delete("photos", image_id) is True
        assert await storage.delete("photos", image_id) is False
        assert await storage.head("photos", image_id) is None
        with pytest.raises(NotFound):
            await storage.get("photos", image_id)
        assert storage.keys() == []

    asyncio.run(scenario())


def test_delete_collection(storage):
    async def scenario():
        for seed in range(3):
            data = png(seed)
            await storage.put("a", image_id_for(data), data, "image/png")
        data = png(9)
        await storage.put("b", image_id_for(data), data, "image/png")
        assert await storage.delete_collection("a") == 3
        assert storage.keys() == [storage.key("b", image_id_for(data)) + storage.ext]

    asyncio.run(scenario())


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "a" * 63, "A" * 64, "/" + "a" * 63, "", "a" * 64 + "/x"],
                         ids=["dotdot", "short", "upper", "slash", "empty", "suffix"])
def test_ids_cannot_escape_the_prefix(storage, bad_id):
    with pytest.raises(InvalidArgument):
        storage.key("photos", bad_id)


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../x", "", "x" * 129, "-lead", "with space", "a\\b"])
def test_collection_names_are_single_safe_segments(bad):
    with pytest.raises(InvalidArgument):
        check_collection_name(bad)


def test_s3_url_ttl_is_configurable(s3_endpoint, s3_bucket):
    _, bucket = s3_bucket
    store = S3Storage(f"s3://{bucket}", endpoint_url=s3_endpoint, url_ttl_seconds=77)
    url = store.url("c", "0" * 64)
    assert "X-Amz-Expires=77" in url and store.prefix == ""
    store.close()


def test_sniffing():
    assert sniff_content_type(png(0)) == "image/png"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    assert sniff_content_type(buffer.getvalue()) == "image/jpeg"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "WEBP")
    assert sniff_content_type(buffer.getvalue()) == "image/webp"
    assert sniff_content_type(b"hello world") is None
    assert sniff_content_type(b"") is None


def test_make_storage(tmp_path):
    assert isinstance(make_storage(str(tmp_path / "x")), LocalStorage)
    with pytest.raises(ValueError):
        make_storage("http://example.com/bucket")
