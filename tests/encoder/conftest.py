from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from clipsearch.encoder.v1 import encoder_service_pb2_grpc

TINY = ["--model", "clipsearch-tiny", "--pretrained", "none"]
LIMITS = ["--max-items-per-request", "64", "--max-text-chars", "300", "--max-image-pixels", "4000000"]


def jpeg_bytes(seed: int, size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def image_bytes(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """One ONNX export cache for the session's in-process loads and encoder processes."""
    import os

    folder = tmp_path_factory.mktemp("onnx-cache")
    previous = os.environ.get("CLIPSEARCH_ONNX_CACHE_DIR")
    os.environ["CLIPSEARCH_ONNX_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("CLIPSEARCH_ONNX_CACHE_DIR", None)
    else:
        os.environ["CLIPSEARCH_ONNX_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, s3_endpoint):
    """One tiny-model encoder subprocess for the module, with S3 pointed at moto."""
    from tests.conftest import ServiceProcess

    workdir = tmp_path_factory.mktemp("encoder")
    proc = ServiceProcess(
        "encoder_service",
        [*TINY, *LIMITS, "--port", "0", "--metrics-port", "0", "--s3-endpoint-url", s3_endpoint,
         "--max-queue-delay-ms", "20"],
        workdir,
        name="encoder",
    ).start()
    yield proc
    proc.terminate()


@pytest.fixture(scope="module")
def stub(encoder):
    channel = grpc.insecure_channel(encoder.address)
    yield encoder_service_pb2_grpc.EncoderServiceStub(channel)
    channel.close()
