"""Gateway engine against in-process fakes, where failures can be injected:
encoder retries (the channel's service config) and deadlines, the text cache,
model mismatches, and uploads when a shard is down (nothing half-stored)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from clipsearch.errors import FailedPrecondition, InvalidArgument, Unavailable
from gateway.engine import Gateway
from gateway.deadline import Deadline
from gateway.settings import GatewaySettings
from gateway.shards import shard_for_id
from gateway.storage import image_id_for
from gateway.types import QueryPart, SearchRequest, UploadItem
from tests.gateway.fake_index import start_fake_shard
from tests.gateway.fakes import DIM, start_fake_encoder


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture
def harness(tmp_path):
    def run(scenario, **overrides):
        async def main():
            enc_server, encoder, enc_addr = await start_fake_encoder()
            shards = [await start_fake_shard() for _ in range(2)]
            settings = GatewaySettings(
                encoder=enc_addr, index=[a for _, _, a in shards], storage=str(tmp_path / "images"),
                data_dir=str(tmp_path / "data"), retry_backoff_seconds=0.01, startup_timeout_seconds=10,
                page_token_secret="test", **overrides,
            ).validate()
            gateway = Gateway(settings)
            await gateway.start()
            try:
                await scenario(gateway, encoder, shards)
            finally:
                await gateway.close()
                await enc_server.stop(None)
                for server, _, _ in shards:
                    await server.stop(None)

        asyncio.run(main())

    return run


def text_query(*texts: str, **kwargs) -> SearchRequest:
    return SearchRequest(parts=[QueryPart(text=t) for t in texts], **kwargs)


def test_default_collection_is_created_with_the_encoder_model(harness):
    async def scenario(gateway, encoder, shards):
        for _, fake, _ in shards:
            collection = fake.collections["images"]
            assert collection.dim == DIM and collection.model_fingerprint == "fake-model"

    harness(scenario)


def test_encoder_unavailable_is_retried_then_reported(harness):
    async def scenario(gateway, encoder, shards):
        encoder.fail_next = 2
        calls = len(encoder.timeouts)
        response = await gateway.search(text_query("a red bus"), Deadline.after(10))
        assert len(encoder.timeouts) - calls == 3  # two refused, the third answered
        assert response.hits == []  # empty collection, but the call went through
        encoder.fail_next = 100
        with pytest.raises(Unavailable, match="encoder"):
            await gateway.search(text_query("another text"), Deadline.after(10))

    harness(scenario, internal_retries=3)


def test_deadline_is_passed_down(harness):
    async def scenario(gateway, encoder, shards):
        await gateway.search(text_query("deadline"), Deadline.after(1.5))
        assert encoder.timeouts[-1] is not None and encoder.timeouts[-1] <= 1.6
        await gateway.search(text_query("no deadline"), Deadline(None))
        assert encoder.timeouts[-1] <= gateway.settings.encoder_timeout_seconds + 1  # clocks differ a little

    harness(scenario)


def test_text_cache_hits_and_misses(harness):
    async def scenario(gateway, encoder, shards):
        hits, misses = metric("clipsearch_gateway_text_cache_hits_total"), metric(
            "clipsearch_gateway_text_cache_misses_total")
        await gateway.search(text_query("a cat", "a dog"), Deadline.after(5))
        await gateway.search(text_query("a cat"), Deadline.after(5))
        await gateway.search(text_query("a cat", "a bird"), Deadline.after(5))
        assert encoder.text_calls == [["a cat", "a dog"], ["a bird"]]
        assert metric("clipsearch_gateway_text_cache_hits_total") - hits == 2
        assert metric("clipsearch_gateway_text_cache_misses_total") - misses == 3
        # LRU of 2: "a dog" is the least recently used and was evicted.
        await gateway.search(text_query("a dog"), Deadline.after(5))
        assert encoder.text_calls[-1] == ["a dog"]

    harness(scenario, text_cache_size=2)


def test_model_mismatch_is_refused_clearly(harness):
    async def scenario(gateway, encoder, shards):
        await gateway.shards.create_collection("old", DIM, "Flat", 1, "some-older-model", Deadline.after(5))
        with pytest.raises(FailedPrecondition, match="model mismatch.*some-older-model.*fake-model"):
            await gateway.search(text_query("x", collection="old"), Deadline.after(5))
        with pytest.raises(FailedPrecondition, match="model mismatch"):
            await gateway.upload("old", [UploadItem(png(1))], Deadline.after(5))
        assert not (gateway.storage.root / "old").exists()  # nothing stored

    harness(scenario)


def test_upload_with_a_dead_shard_fails_only_its_items_and_stores_nothing_for_them(harness):
    async def scenario(gateway, encoder, shards):
        datas = [png(i) for i in range(12)]
        await shards[1][0].stop(None)
        results = await gateway.upload("", [UploadItem(d) for d in datas], Deadline.after(10))
        on_dead = [shard_for_id(image_id_for(d), 2) == 1 for d in datas]
        assert any(on_dead) and not all(on_dead)
        for data, dead, result in zip(datas, on_dead, results):
            stored = (gateway.storage.root / "images" / f"{image_id_for(data)}.png").exists()
            if dead:
                assert isinstance(result.error, Unavailable) and not stored
                assert "shard-1" in result.error.message and shards[1][2] not in result.error.message
            else:
                assert result.error is None and result.created and stored

    harness(scenario)


def test_upload_statuses_per_item(harness):
    async def scenario(gateway, encoder, shards):
        good = png(1)
        items = [
            UploadItem(good, filename="a.png"),
            UploadItem(good),  # same bytes again in the same call
            UploadItem(b"not an image"),
            UploadItem(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),  # looks like PNG, is corrupt
            UploadItem(b""),
            UploadItem(png(2) * 40),  # too large for this gateway
        ]
        results = await gateway.upload("", items, Deadline.after(10))
        assert [r.error is None for r in results] == [True, True, False, False, False, False]
        assert all(isinstance(r.error, InvalidArgument) for r in results[2:])
        assert results[0].created and not results[1].created
        assert results[0].id == results[1].id == image_id_for(good)
        assert "corrupt" in results[3].error.message
        assert "limit" in results[5].error.message
        again = await gateway.upload("", items[:1], Deadline.after(10))
        assert again[0].error is None and not again[0].created
        stored = sorted(p.name for p in (gateway.storage.root / "images").iterdir())
        assert stored == [f"{image_id_for(good)}.png"]

    harness(scenario, max_image_bytes=4000)


def test_batch_search_embeds_once_searches_each_shard_once_and_reports_per_query(harness):
    async def scenario(gateway, encoder, shards):
        images = [png(i) for i in range(6)]
        await gateway.upload("", [UploadItem(data) for data in images], Deadline.after(10))
        for _, fake, _ in shards:
            fake.calls.clear()
        encoder.calls.clear()
        encoder.text_calls.clear()
        queries = [text_query(f"query {i}", top_k=3) for i in range(5)]
        queries.append(SearchRequest(parts=[QueryPart(image_data=images[2])], top_k=3))
        queries.append(SearchRequest(parts=[QueryPart(image_data=b"not an image")], top_k=3))  # fails alone
        queries.append(text_query("paged", page_size=1))  # refused alone
        items = await gateway.batch_search("", queries, Deadline.after(10))

        assert encoder.text_calls == [[f"query {i}" for i in range(5)]]  # every text in one call
        assert encoder.calls.count("EmbedImages") == 1
        assert [fake.calls.count("SearchVectors") for _, fake, _ in shards] == [1, 1]
        for i in range(5):
            single = await gateway.search(queries[i], Deadline.after(10))
            assert [h.id for h in items[i].result.hits] == [h.id for h in single.hits] and items[i].error is None
        assert items[5].result.hits[0].id == image_id_for(images[2])
        assert isinstance(items[6].error, InvalidArgument) and items[6].error.field == "parts[0].image_data"
        assert isinstance(items[7].error, InvalidArgument) and items[7].result is None
        with pytest.raises(InvalidArgument):
            await gateway.batch_search("", [text_query("q")] * 65, Deadline.after(10))

    harness(scenario)
