"""An in-process fake encoder, for engine tests that
need to inject failures (the integration tests use the real services)."""

from __future__ import annotations

import hashlib
import io

import grpc
import numpy as np
from google.rpc import code_pb2
from PIL import Image

from clipsearch.common.v1 import common_pb2
from clipsearch.encoder.v1 import encoder_service_pb2 as epb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.vectors import pack_matrix

DIM = 16


def _vector(seed_bytes: bytes) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed_bytes).digest()[:8], "little"))
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEncoder(encoder_service_pb2_grpc.EncoderServiceServicer):
    """Deterministic vectors from the bytes; corrupt images get INVALID_ARGUMENT.

    ``fail_next`` makes the next N calls UNAVAILABLE; ``timeouts`` records the
    time remaining on each incoming call (deadline propagation)."""

    def __init__(self, fingerprint: str = "fake-model"):
        self.fingerprint = fingerprint
        self.fail_next = 0
        self.calls: list[str] = []
        self.text_calls: list[list[str]] = []
        self.timeouts: list[float | None] = []

    async def _enter(self, name, context):
        self.calls.append(name)
        self.timeouts.append(context.time_remaining())
        if self.fail_next > 0:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    async def EmbedTexts(self, request, context):
        await self._enter("EmbedTexts", context)
        self.text_calls.append(list(request.texts))
        vectors = np.stack([_vector(t.encode()) for t in request.texts])
        return epb.EmbedTextsResponse(embeddings=pack_matrix(vectors), model_fingerprint=self.fingerprint)

    async def EmbedImages(self, request, context):
        await self._enter("EmbedImages", context)
        vectors, statuses = [], []
        for item in request.images:
            try:
                Image.open(io.BytesIO(item.data)).load()
                vectors.append(_vector(item.data))
                statuses.append(common_pb2.ItemStatus(code=code_pb2.OK))
            except Exception as exc:  # noqa: BLE001
                vectors.append(np.zeros(DIM, np.float32))
                statuses.append(common_pb2.ItemStatus(code=code_pb2.INVALID_ARGUMENT, message=f"corrupt: {exc}"))
        return epb.EmbedImagesResponse(embeddings=pack_matrix(np.stack(vectors)), statuses=statuses,
                                       model_fingerprint=self.fingerprint)

    async def GetModelInfo(self, request, context):
        await self._enter("GetModelInfo", context)
        return epb.GetModelInfoResponse(model_name="fake", dim=DIM, model_fingerprint=self.fingerprint,
                                        max_batch_size=8)


async def start_fake_encoder(fingerprint: str = "fake-model") -> tuple[grpc.aio.Server, FakeEncoder, str]:
    server = grpc.aio.server()
    fake = FakeEncoder(fingerprint)
    encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, fake, f"127.0.0.1:{port}"
