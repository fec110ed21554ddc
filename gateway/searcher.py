"""SearchImages: query parts to vectors, relevance feedback, the shard fan-out,
then MAX aggregation, the score cut-off, MMR and pagination."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Sequence

import numpy as np

from clipsearch.errors import FailedPrecondition, InvalidArgument, NotFound
from clipsearch.metadata import metadata_bytes, select_keys
from clipsearch.vectors import unpack_vector

from gateway.collections import Collections
from gateway.deadline import Deadline
from gateway.encoder import EncoderClient
from gateway.search import (
    MAX_CANDIDATES, Candidate, PageTokens, aggregate_max, combine_mean, cut_min_score, digest, mmr, page, rocchio,
    unit, within_bytes,
)
from gateway.settings import GatewaySettings
from gateway.shards import ShardSet
from gateway.storage import ImageStorage
from gateway.types import (
    AGGREGATION_MAX, CollectionInfo, Feedback, Hit, QueryPart, SearchRequest, SearchResult,
)
from gateway.validation import check_image_bytes, check_search, url_ttl


def query_digest(request: SearchRequest, collection: str) -> str:
    """What a page token is bound to: every field but the collection alias, page_size and page_token."""
    canonical = dataclasses.replace(request, collection=collection, page_size=0, page_token="",
                                    hit_fields=frozenset(sorted(request.hit_fields)))
    return digest(repr(canonical))


class Searcher:
    def __init__(self, settings: GatewaySettings, collections: Collections, encoder: EncoderClient,
                 shards: ShardSet, storage: ImageStorage, tokens: PageTokens):
        self.settings = settings
        self.collections = collections
        self.encoder = encoder
        self.shards = shards
        self.storage = storage
        self.tokens = tokens

    async def search(self, request: SearchRequest, deadline: Deadline) -> SearchResult:
        name = self.collections.resolve(request.collection)
        plan = check_search(request)
        ttl = url_ttl(request.url_ttl_seconds, self.settings)
        for i, part in enumerate(request.parts):
            if part.image_data is not None:
                check_image_bytes(part.image_data, self.settings.max_image_bytes, f"parts[{i}].image_data")
        key = query_digest(request, name)
        offset = int(self.tokens.open(request.page_token, "search", key)["o"]) if request.page_token else 0

        collection = await self.collections.describe(name, deadline)
        vectors, (positive, negative) = await _gather(
            self._part_vectors(request.parts, collection, deadline),
            self._feedback_vectors(request.feedback, name, collection.dim, deadline),
        )

        def moved(q: np.ndarray) -> np.ndarray:
            if positive is None and negative is None:
                return q
            return rocchio(q, positive, negative, plan.positive_weight, plan.negative_weight)

        top_k = plan.top_k
        diverse = request.diversity > 0
        k = min(max(top_k * self.settings.mmr_candidates, top_k), MAX_CANDIDATES) if diverse else top_k
        options = dict(deadline=deadline, filter=request.filter, nprobe=request.nprobe, ef_search=request.ef_search,
                       include_metadata="metadata" in request.hit_fields, include_vectors=diverse,
                       policy=self.settings.shard_failure_policy)
        try:
            if request.aggregation == AGGREGATION_MAX:
                queries = np.stack([moved(v) for v in vectors])
                per_part, missing = await self.shards.search(name, queries, k, **options)
                ranked = aggregate_max(per_part, plan.part_weights)[:k]
            else:
                query = moved(combine_mean(vectors, plan.part_weights))
                hits, missing = await self.shards.search(name, query[None, :], k, **options)
                ranked = hits[0]
        except (NotFound, FailedPrecondition):
            self.collections.forget(name)
            raise
        ranked = cut_min_score(ranked, request.min_score)
        if diverse:
            ranked = mmr(ranked, top_k, request.diversity)
        chunk, following = page(ranked[:top_k], offset, plan.page_size)
        metadata = [select_keys(c.metadata, request.metadata_keys) for c in chunk]
        fits = within_bytes([metadata_bytes(m) for m in metadata], self.settings.max_response_metadata_bytes)
        if fits < len(chunk):  # the page ends early; the next one starts where it stopped
            chunk, following = chunk[:fits], offset + fits
        with_url = "url" in request.hit_fields
        return SearchResult(
            hits=[Hit(c.id, c.score, self._url(name, c.id, ttl) if with_url else "", m)
                  for c, m in zip(chunk, metadata)],
            next_page_token=self.tokens.issue("search", key, o=following) if following is not None else "",
            missing_shards=missing,
        )

    def _url(self, collection: str, image_id: str, ttl_seconds: int) -> str:
        try:
            return self.storage.url(collection, image_id, ttl_seconds)
        except InvalidArgument:  # an id written to the index by something other than the gateway
            return ""

    async def _part_vectors(self, parts: Sequence[QueryPart], collection: CollectionInfo,
                            deadline: Deadline) -> np.ndarray:
        """One unit vector per query part, as the rows of a matrix."""
        vectors: list[np.ndarray | None] = [None] * len(parts)
        texts = [(i, p.text) for i, p in enumerate(parts) if p.text is not None]
        images = [(i, p.image_data) for i, p in enumerate(parts) if p.image_data is not None]
        stored = [(i, p.image_id) for i, p in enumerate(parts) if p.image_id is not None]
        for i, part in enumerate(parts):
            if part.vector is not None:
                at = f"parts[{i}].vector"
                vectors[i] = unit(unpack_vector(part.vector, dim=collection.dim, field=at), at, field=at)

        async def embed_texts() -> None:
            if not texts:
                return
            matrix, fingerprint = await self.encoder.embed_texts_cached(
                [t for _, t in texts], deadline, collection.model_fingerprint or None)
            self.collections.check_model(collection, fingerprint, matrix.shape[1])
            for (i, _), vector in zip(texts, matrix):
                vectors[i] = vector

        async def embed_images() -> None:
            if not images:
                return
            result = await self.encoder.embed_images([data for _, data in images], deadline)
            self.collections.check_model(collection, result.fingerprint, result.vectors.shape[1])
            for (i, _), vector, error in zip(images, result.vectors, result.errors):
                if error is not None:
                    raise InvalidArgument(f"parts[{i}].image_data could not be read as an image: {error.message}",
                                          field=f"parts[{i}].image_data")
                vectors[i] = vector

        async def fetch_stored() -> None:
            if not stored:
                return
            records = await self.shards.fetch(collection.name, [image_id for _, image_id in stored], deadline,
                                              include_vectors=True)
            for i, image_id in stored:
                record = records.get(image_id)
                if record is None:
                    raise NotFound(f"parts[{i}].image_id {image_id} is not in collection {collection.name!r}",
                                   field=f"parts[{i}].image_id")
                vectors[i] = unit(record.vector, f"the stored vector of {image_id}", field=f"parts[{i}].image_id")

        await _gather(embed_texts(), embed_images(), fetch_stored())
        return np.stack(vectors).astype(np.float32)

    async def _feedback_vectors(self, feedback: Feedback, collection: str, dim: int, deadline: Deadline,
                                ) -> tuple[np.ndarray | None, np.ndarray | None]:
        lists = {"positive_ids": feedback.positive_ids, "negative_ids": feedback.negative_ids}
        wanted = list(dict.fromkeys(feedback.positive_ids + feedback.negative_ids))
        if not wanted:
            return None, None
        records = await self.shards.fetch(collection, wanted, deadline, include_vectors=True)
        out = []
        for name, ids in lists.items():
            rows = []
            for j, image_id in enumerate(ids):
                record = records.get(image_id)
                if record is None:
                    raise NotFound(f"feedback.{name}[{j}] {image_id} is not in collection {collection!r}",
                                   field=f"feedback.{name}[{j}]")
                if record.vector is None or record.vector.shape[0] != dim:
                    raise FailedPrecondition(f"the stored vector of {image_id} does not have dim {dim}")
                rows.append(record.vector)
            out.append(np.stack(rows) if rows else None)
        return out[0], out[1]


async def _gather(*aws) -> list:
    """Runs coroutines concurrently; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
