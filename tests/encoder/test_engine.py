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


def _jpeg(pixels: np.ndarray, **save_args) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, **save_args)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decoding_turns_images_upright_like_pil(orientation):
    import io

    import torch
    from PIL import Image, ImageOps
    from torchvision.io import ImageReadMode, decode_jpeg

    from encoder_service.images import apply_orientation, inspect_jpeg

    rng = np.random.default_rng(orientation)
    pixels = np.kron(rng.integers(0, 255, (6, 10, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(pixels, exif=exif)
    header = inspect_jpeg(data, max_bytes=1 << 20, max_pixels=1 << 20)
    assert header.orientation == orientation
    ours = apply_orientation(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                         mode=ImageReadMode.RGB), orientation)
    pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert tuple(ours.shape) == (3, *pil.shape[:2])
    assert np.abs(ours.permute(1, 2, 0).numpy().astype(int) - pil.astype(int)).mean() < 2.0


def test_device_decoding_matches_the_cpu_path_and_isolates_corrupt_jpegs():
    rng = np.random.default_rng(5)
    good = [_jpeg(np.kron(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), np.ones((20, 20, 1), dtype=np.uint8)))
            for _ in range(3)]
    corrupt = good[0][:600] + bytes(400) + good[0][1000:]  # valid header, broken scan data
    from encoder_service.engine import ImageSource

    async def embed(decode: str):
        engine = EncoderEngine(EncoderConfig(model="clipsearch-tiny", pretrained="none", image_decode=decode))
        await engine.start()
        try:
            assert (engine.tensor_preprocess is not None) == (decode == "device")
            sources = [ImageSource(data=good[0]), ImageSource(data=corrupt), ImageSource(data=good[1]),
                       ImageSource(data=good[2])]
            return await engine.embed_images(sources)
        finally:
            await engine.close()

    on_device, on_cpu = asyncio.run(embed("device")), asyncio.run(embed("cpu"))
    for result in (on_device, on_cpu):
        assert [e is None for e in result.errors] == [True, False, True, True]
        assert result.errors[1].code == "INVALID_ARGUMENT"
    rows = [0, 2, 3]
    cosine = np.sum(on_device.vectors[rows] * on_cpu.vectors[rows], axis=1)
    assert np.all(cosine > 0.99), cosine
