"""Encoder client: retries on UNAVAILABLE with backoff under the caller's
deadline, image batches split into encoder-sized calls, and an LRU cache of
text embeddings keyed by text and tagged with the model fingerprint."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np

from clipsearch.encoder.v1 import encoder_service_pb2, encoder_service_pb2_grpc
from clipsearch.errors import FailedPrecondition, Unavailable
from clipsearch.vectors import unpack_matrix

from gateway import metrics
from gateway.rpc import Deadline, make_channel, translate
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


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
    codes: list[int]  # google.rpc codes, 0 = OK
    messages: list[str]
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

    async def _call(self, method: str, request, deadline: Deadline, retries: int | None = None):
        """One encoder call; UNAVAILABLE is retried with jittered exponential backoff
        while the deadline allows (every encoder call is idempotent)."""
        retries = self.settings.encoder_retries if retries is None else retries
        attempt = 0
        started = time.perf_counter()
        try:
            while True:
                timeout = deadline.timeout(self.settings.encoder_timeout_seconds)
                try:
                    return await getattr(self.stub, method)(request, timeout=timeout)
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE or attempt >= retries:
                        raise translate(error, f"encoder {self.address} ({method})") from None
                    delay = self.settings.retry_backoff_seconds * (2 ** attempt) * (0.5 + random.random() / 2)
                    left = deadline.remaining()
                    if left is not None and left < delay + 0.01:
                        raise translate(error, f"encoder {self.address} ({method})") from None
                    attempt += 1
                    metrics.ENCODER_RETRIES.inc()
                    log.info("encoder %s %s unavailable; retry %d in %.3fs", self.address, method, attempt, delay)
                    await asyncio.sleep(delay)
        finally:
            metrics.DOWNSTREAM_SECONDS.labels("encoder", method).observe(time.perf_counter() - started)

    async def model_info(self, deadline: Deadline, retries: int | None = None) -> ModelInfo:
        response = await self._call("GetModelInfo", encoder_service_pb2.GetModelInfoRequest(), deadline, retries)
        info = ModelInfo(response.model_name, int(response.dim), response.model_fingerprint,
                         int(response.max_batch_size))
        if self.info is not None and self.info.fingerprint != info.fingerprint:
            log.warning("encoder model changed: fingerprint %s -> %s", self.info.fingerprint, info.fingerprint)
        self.info = info
        return info

    async def wait_ready(self, timeout: float) -> ModelInfo:
        """Model info, waiting up to ``timeout`` seconds for the encoder to come up."""
        deadline = Deadline.after(timeout)
        delay = 0.2
        while True:
            try:
                return await self.model_info(deadline, retries=0)
            except Unavailable as exc:
                left = deadline.remaining() or 0
                if left <= delay:
                    raise Unavailable(f"encoder {self.address} did not come up within {timeout:.0f}s: {exc.message}")
                log.info("waiting for encoder %s: %s", self.address, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

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
        vectors, codes, messages, fingerprints = [], [], [], set()
        for chunk, response in zip(chunks, responses):
            matrix = unpack_matrix(response.embeddings, field="encoder embeddings")
            if matrix.shape[0] != len(chunk) or len(response.statuses) not in (0, len(chunk)):
                raise Unavailable(f"encoder returned {matrix.shape[0]} vectors for {len(chunk)} images")
            vectors.append(matrix)
            statuses = list(response.statuses) or [None] * len(chunk)
            codes.extend(s.code if s is not None else 0 for s in statuses)
            messages.extend(s.message if s is not None else "" for s in statuses)
            fingerprints.add(response.model_fingerprint)
        if len(fingerprints) > 1:
            raise FailedPrecondition(
                f"the encoder changed models in the middle of a batch (fingerprints {sorted(fingerprints)}); retry"
            )
        dim = vectors[0].shape[1] if vectors else 0
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        return ImageEmbeddings(stacked, codes, messages, fingerprints.pop() if fingerprints else "")
