"""Encoder client: calls under the caller's deadline (the channel's service
config retries UNAVAILABLE), image batches split into encoder-sized calls, and
an LRU cache of text embeddings keyed by text and tagged with the model
fingerprint."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np

from clipsearch.encoder.v1 import encoder_service_pb2, encoder_service_pb2_grpc
from clipsearch.errors import ClipsearchError, DeadlineExceeded, FailedPrecondition, Unavailable
from clipsearch.item_status import error_from_status
from clipsearch.vectors import unpack_matrix

from gateway import metrics
from gateway.deadline import Deadline
from gateway.rpc import call_metadata, make_channel, translate
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

class TextEmbeddingCache:
    """LRU cache: text -> (unit vector, model fingerprint)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str, fingerprint: str | None = None) -> tuple[np.ndarray, str] | None:
        """(vector, fingerprint); a miss when absent or made by another model than ``fingerprint``."""
        entry = self._entries.get(text)
        if entry is None or (fingerprint and entry[1] != fingerprint):
            metrics.TEXT_CACHE_MISSES.inc()
            return None
        self._entries.move_to_end(text)
        metrics.TEXT_CACHE_HITS.inc()
        return entry

    def put(self, text: str, vector: np.ndarray, fingerprint: str) -> None:
        if self.capacity <= 0:
            return
        vector = np.array(vector, dtype=np.float32)
        vector.setflags(write=False)
        self._entries[text] = (vector, fingerprint)
        self._entries.move_to_end(text)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        metrics.TEXT_CACHE_SIZE.set(len(self._entries))

    def clear(self) -> None:
        self._entries.clear()
        metrics.TEXT_CACHE_SIZE.set(0)


@dataclass
class ModelInfo:
    name: str
    dim: int
    fingerprint: str
    max_batch_size: int


@dataclass
class ImageEmbeddings:
    vectors: np.ndarray  # (n, dim); rows of failed items are zeros
    errors: list[ClipsearchError | None]  # one per image; None = OK
    fingerprint: str


class EncoderClient:
    def __init__(self, settings: GatewaySettings, channel: grpc.aio.Channel | None = None):
        self.settings = settings
        self.address = settings.encoder
        self.channel = channel or make_channel(settings.encoder, settings)
        self.stub = encoder_service_pb2_grpc.EncoderServiceStub(self.channel)
        self.cache = TextEmbeddingCache(settings.text_cache_size)
        self.info: ModelInfo | None = None

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: str, request, deadline: Deadline, wait_for_ready: bool = False):
        """One encoder call under the request's deadline. UNAVAILABLE is retried by the
        channel's service config (every encoder call is idempotent)."""
        started = time.perf_counter()
        try:
            return await getattr(self.stub, method)(
                request, timeout=deadline.timeout(self.settings.encoder_timeout_seconds), wait_for_ready=wait_for_ready,
                metadata=call_metadata(),
            )
        except grpc.aio.AioRpcError as error:
            raise translate(error, f"the encoder ({method})", self.address) from None
        finally:
            metrics.DOWNSTREAM_SECONDS.labels("encoder", method).observe(time.perf_counter() - started)

    async def model_info(self, deadline: Deadline, wait_for_ready: bool = False) -> ModelInfo:
        response = await self._call("GetModelInfo", encoder_service_pb2.GetModelInfoRequest(), deadline,
                                    wait_for_ready)
        info = ModelInfo(response.model_name, int(response.dim), response.model_fingerprint,
                         int(response.max_batch_size))
        if self.info is not None and self.info.fingerprint != info.fingerprint:
            log.warning("encoder model changed: fingerprint %s -> %s", self.info.fingerprint, info.fingerprint)
        self.info = info
        return info

    async def wait_ready(self, timeout: float) -> ModelInfo:
        """Model info, waiting up to ``timeout`` seconds for the encoder to come up."""
        try:
            return await self.model_info(Deadline.after(timeout), wait_for_ready=True)
        except (Unavailable, DeadlineExceeded) as exc:
            raise Unavailable(f"encoder {self.address} did not come up within {timeout:.0f}s: {exc.message}") from None

    async def embed_texts(self, texts: Sequence[str], deadline: Deadline) -> tuple[np.ndarray, str]:
        response = await self._call("EmbedTexts", encoder_service_pb2.EmbedTextsRequest(texts=list(texts)), deadline)
        matrix = unpack_matrix(response.embeddings, field="encoder embeddings")
        if matrix.shape[0] != len(texts):
            raise Unavailable(f"encoder returned {matrix.shape[0]} vectors for {len(texts)} texts")
        return matrix, response.model_fingerprint

    async def embed_texts_cached(self, texts: Sequence[str], deadline: Deadline,
                                 fingerprint: str | None = None) -> tuple[np.ndarray, str]:
        """Embeddings of ``texts`` with the LRU cache in front. Entries made by a
        model other than ``fingerprint`` count as misses."""
        found: dict[str, np.ndarray] = {}
        missing: list[str] = []
        used = set()
        for text in dict.fromkeys(texts):
            entry = self.cache.get(text, fingerprint)
            if entry is None:
                missing.append(text)
            else:
                found[text] = entry[0]
                used.add(entry[1])
        if missing:
            matrix, made_by = await self.embed_texts(missing, deadline)
            used.add(made_by)
            for text, vector in zip(missing, matrix):
                self.cache.put(text, vector, made_by)
                found[text] = vector
        if len(used) > 1:  # cached entries of an older model, no fingerprint to filter by
            self.cache.clear()
            return await self.embed_texts_cached(texts, deadline, fingerprint)
        return np.stack([found[t] for t in texts]), used.pop() if used else ""

    async def embed_images(self, images: Sequence[bytes], deadline: Deadline) -> ImageEmbeddings:
        """Embeds images in calls of at most ``encoder_batch_size``, run concurrently."""
        size = self.settings.encoder_batch_size
        chunks = [list(images[i:i + size]) for i in range(0, len(images), size)]

        async def one(chunk: list[bytes]):
            request = encoder_service_pb2.EmbedImagesRequest(
                images=[encoder_service_pb2.ImageInput(data=data) for data in chunk]
            )
            return await self._call("EmbedImages", request, deadline)

        responses = await asyncio.gather(*(one(chunk) for chunk in chunks))
        vectors, errors, fingerprints = [], [], set()
        for chunk, response in zip(chunks, responses):
            matrix = unpack_matrix(response.embeddings, field="encoder embeddings")
            if matrix.shape[0] != len(chunk) or len(response.statuses) not in (0, len(chunk)):
                raise Unavailable(f"encoder returned {matrix.shape[0]} vectors for {len(chunk)} images")
            vectors.append(matrix)
            if response.statuses:
                errors.extend(error_from_status(s.code, s.message) for s in response.statuses)
            else:
                errors.extend([None] * len(chunk))
            fingerprints.add(response.model_fingerprint)
        if len(fingerprints) > 1:
            raise FailedPrecondition(
                f"the encoder changed models in the middle of a batch (fingerprints {sorted(fingerprints)}); retry"
            )
        dim = vectors[0].shape[1] if vectors else 0
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        return ImageEmbeddings(stacked, errors, fingerprints.pop() if fingerprints else "")
