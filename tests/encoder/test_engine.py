"""The encoder engine in-process: queue bounds and batching."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clipsearch.errors import ResourceExhausted
from encoder_service.engine import EncoderConfig, EncoderEngine


def test_a_full_queue_refuses_new_work_and_earlier_work_still_completes():
    async def scenario():
        engine = EncoderEngine(EncoderConfig(model="clipsearch-tiny", pretrained="none", max_queue_size=6,
                                             max_batch_size=4, max_queue_delay_ms=50))
        await engine.start()
        try:
            first = asyncio.ensure_future(engine.embed_texts([f"text {i}" for i in range(5)]))
            await asyncio.sleep(0)  # queued, not yet run
            with pytest.raises(ResourceExhausted, match="queue is full"):
                await engine.embed_texts(["one", "two"])
            vectors = await first
            again = await engine.embed_texts(["one", "two"])
            return vectors, again
        finally:
            await engine.close()

    vectors, again = asyncio.run(scenario())
    assert vectors.shape == (5, 64) and again.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_batches_never_exceed_max_batch_size_and_rows_stay_in_request_order():
    async def scenario():
        engine = EncoderEngine(EncoderConfig(model="clipsearch-tiny", pretrained="none", max_batch_size=3,
                                             max_queue_delay_ms=20))
        await engine.start()
        sizes = []
        original = engine.text_batcher.run_batch
        engine.text_batcher.run_batch = lambda items: (sizes.append(len(items)), original(items))[1]
        try:
            texts = [f"prompt {i}" for i in range(10)]
            together = await engine.embed_texts(texts)
            alone = [await engine.embed_texts([t]) for t in texts]
            return sizes, together, np.concatenate(alone)
        finally:
            await engine.close()

    sizes, together, alone = asyncio.run(scenario())
    assert max(sizes) <= 3 and sum(sizes[:4]) == 10
    np.testing.assert_allclose(together, alone, atol=1e-5)
