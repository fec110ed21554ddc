"""SearchImages: query parts to vectors, relevance feedback, the shard fan-out,
then MAX aggregation, the score cut-off, MMR and pagination."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Sequence

import numpy as np

from clipsearch.errors import ClipsearchError, FailedPrecondition, InvalidArgument, NotFound
from clipsearch.metadata import metadata_bytes, select_keys
from clipsearch.vectors import unpack_vector

from gateway.collections import Collections
from gateway.deadline import Deadline
from gateway.encoder import EncoderClient
from gateway.search import (
    MAX_CANDIDATES, Candidate, PageTokens, aggregate_max, combine_mean, cut_min_score, digest, mmr, pin_ranking,
    rocchio, unit, unpin_ranking, within_bytes,
)
from gateway.settings import GatewaySettings
from gateway.shards import ShardSet
from gateway.storage import ImageStorage
from gateway.types import (
    AGGREGATION_MAX, BatchSearchItem, CollectionInfo, Feedback, Hit, QueryPart, SearchRequest, SearchResult,
)
from gateway.validation import DEFAULT_TOP_K, SearchPlan, check_image_bytes, check_search, url_ttl


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

    def _check(self, request: SearchRequest, name: str) -> tuple[SearchPlan, int]:
        """The request's plan and its URL lifetime; InvalidArgument for a bad request."""
        plan = check_search(request)
        ttl = url_ttl(request.url_ttl_seconds, self.settings)
        for i, part in enumerate(request.parts):
            if part.image_data is not None:
                check_image_bytes(part.image_data, self.settings.max_image_bytes, f"parts[{i}].image_data")
        return plan, ttl

    async def search(self, request: SearchRequest, deadline: Deadline) -> SearchResult:
        name = self.collections.resolve(request.collection)
        plan, ttl = self._check(request, name)
        key = query_digest(request, name)
        if request.page_token:
            pinned = unpin_ranking(self.tokens.open(request.page_token, "search", key)["r"])
            return await self._pinned_page(name, request, plan, ttl, pinned, key, deadline)

        collection = await self.collections.describe(name, deadline)
        (vectors, errors), feedback = await _gather(
            self._part_vectors(request.parts, collection, deadline),
            self._feedback_vectors(request.feedback, name, collection.dim, deadline),
        )
        if errors:
            raise errors[min(errors)]
        queries = self._queries(request, plan, np.stack(vectors), feedback)
        k, options = self._options(request, deadline)
        per_row, missing = await self._shard_search(name, queries, k, options)
        return self._result(name, request, plan, ttl, per_row, missing, key)

    async def batch_search(self, collection_name: str, requests: Sequence[SearchRequest],
                           deadline: Deadline) -> list[BatchSearchItem]:
        """Independent queries in one pass: every text and image of every query is embedded in one
        encoder call, and each shard is searched once per group of queries that share their search
        options (k, filter, nprobe, ef_search, read mask): once in all, when they all do. Errors
        of one query (a bad part, an unreadable image, a filter a shard refuses) are that query's, and
        name fields within it (``parts[0].image_data``)."""
        name = self.collections.resolve(collection_name)
        items = [BatchSearchItem() for _ in requests]
        plans: dict[int, tuple[SearchPlan, int]] = {}
        for i, request in enumerate(requests):
            try:
                if request.collection and self.collections.resolve(request.collection) != name:
                    raise InvalidArgument(f"a batched query searches the call's collection {name!r}; leave its "
                                          "collection empty", field="collection")
                if request.page_size or request.page_token:
                    raise InvalidArgument("a batched query returns its top_k in one page; page with SearchImages",
                                          field="page_size")
                plans[i] = self._check(request, name)
            except ClipsearchError as error:
                items[i].error = error
        collection = await self.collections.describe(name, deadline)

        owners = [(i, j) for i in plans for j in range(len(requests[i].parts))]
        part_vectors, feedbacks = await _gather(
            self._part_vectors([requests[i].parts[j] for i, j in owners], collection, deadline,
                               [f"parts[{j}]" for _, j in owners]),
            asyncio.gather(*(self._feedback_vectors(requests[i].feedback, name, collection.dim, deadline)
                             for i in plans), return_exceptions=True),
        )
        vectors, errors = part_vectors
        for position, error in sorted(errors.items()):
            items[owners[position][0]].error = items[owners[position][0]].error or error
        rows: dict[int, list[np.ndarray]] = {}
        for (i, _), vector in zip(owners, vectors):
            rows.setdefault(i, []).append(vector)
        groups: dict[str, list[tuple[int, np.ndarray]]] = {}
        for i, feedback in zip(plans, feedbacks):
            if items[i].error is None and isinstance(feedback, BaseException):
                items[i].error = feedback
            if items[i].error is not None:
                continue
            try:
                queries = self._queries(requests[i], plans[i][0], np.stack(rows[i]), feedback)
            except ClipsearchError as error:
                items[i].error = error
                continue
            k, options = self._options(requests[i], deadline)
            groups.setdefault(repr((k, sorted((n, repr(v)) for n, v in options.items() if n != "deadline"))),
                              []).append((i, queries))

        async def run(members: list[tuple[int, np.ndarray]]) -> None:
            first = requests[members[0][0]]
            k, options = self._options(first, deadline)
            try:
                per_row, missing = await self._shard_search(name, np.concatenate([q for _, q in members]), k,
                                                            options)
            except ClipsearchError as error:
                if isinstance(error, (NotFound, FailedPrecondition)):
                    raise
                for i, _ in members:
                    items[i].error = error
                return
            at = 0
            for i, queries in members:
                plan, ttl = plans[i]
                items[i].result = self._result(name, requests[i], plan, ttl, per_row[at:at + len(queries)], missing)
                at += len(queries)

        await _gather(*(run(members) for members in groups.values()))
        return items

    def _queries(self, request: SearchRequest, plan: SearchPlan, vectors: np.ndarray, feedback) -> np.ndarray:
        """The rows to search: one per part (MAX) or their weighted mean (MEAN), moved by feedback."""
        positive, negative = feedback

        def moved(q: np.ndarray) -> np.ndarray:
            if positive is None and negative is None:
                return q
            return rocchio(q, positive, negative, plan.positive_weight, plan.negative_weight)

        if request.aggregation == AGGREGATION_MAX:
            return np.stack([moved(v) for v in vectors])
        return moved(combine_mean(vectors, plan.part_weights))[None, :]

    def _options(self, request: SearchRequest, deadline: Deadline) -> tuple[int, dict]:
        top_k = request.top_k or DEFAULT_TOP_K
        diverse = request.diversity > 0
        k = min(max(top_k * self.settings.mmr_candidates, top_k), MAX_CANDIDATES) if diverse else top_k
        return k, dict(deadline=deadline, filter=request.filter, nprobe=request.nprobe,
                       ef_search=request.ef_search, include_metadata="metadata" in request.hit_fields,
                       include_vectors=diverse, policy=self.settings.shard_failure_policy)

    async def _shard_search(self, name: str, queries: np.ndarray, k: int, options: dict):
        try:
            return await self.shards.search(name, queries, k, **options)
        except (NotFound, FailedPrecondition):
            self.collections.forget(name)
            raise

    def _result(self, name: str, request: SearchRequest, plan: SearchPlan, ttl: int,
                per_row: Sequence[Sequence[Candidate]], missing: list[str], key: str = "") -> SearchResult:
        """Aggregation, the score cut-off, MMR, then the first page. The next page token pins the
        ranking: it carries the ids and scores of every later page, so writes after this page
        neither repeat nor shift the results of the next ones (see _pinned_page)."""
        top_k = plan.top_k
        k, _ = self._options(request, None)
        if request.aggregation == AGGREGATION_MAX:
            ranked = aggregate_max(per_row, plan.part_weights)[:k]
        else:
            ranked = list(per_row[0])
        ranked = cut_min_score(ranked, request.min_score)
        if request.diversity > 0:
            ranked = mmr(ranked, top_k, request.diversity)
        return self._page(name, request, plan, ttl, ranked[:top_k], missing, key)

    def _page(self, name: str, request: SearchRequest, plan: SearchPlan, ttl: int, ranked: Sequence[Candidate],
              missing: list[str], key: str) -> SearchResult:
        """The first page of ``ranked`` (cut short at the response's metadata budget), and a token
        pinning the rest."""
        chunk = list(ranked[:plan.page_size])
        metadata = [select_keys(c.metadata, request.metadata_keys) for c in chunk]
        fits = within_bytes([metadata_bytes(m) for m in metadata], self.settings.max_response_metadata_bytes)
        chunk, metadata = chunk[:fits], metadata[:fits]
        rest = ranked[len(chunk):]
        with_url = "url" in request.hit_fields
        return SearchResult(
            hits=[Hit(c.id, c.score, self._url(name, c.id, ttl) if with_url else "", m)
                  for c, m in zip(chunk, metadata)],
            next_page_token=self.tokens.issue("search", key, r=pin_ranking(rest)) if rest and key else "",
            missing_shards=missing,
        )

    async def _pinned_page(self, name: str, request: SearchRequest, plan: SearchPlan, ttl: int,
                           pinned: list[Candidate], key: str, deadline: Deadline) -> SearchResult:
        """A later page: the next ids of the ranking the first page pinned, with their scores from
        then and their metadata from now. Images deleted since are left out (the page is shorter);
        images written since do not enter, and nothing repeats or moves between pages."""
        await self.collections.describe(name, deadline)
        chunk = pinned[:plan.page_size]
        records = await self.shards.fetch(name, [c.id for c in chunk], deadline)
        present = [Candidate(c.id, c.score, records[c.id].metadata) for c in chunk if c.id in records]
        if "metadata" not in request.hit_fields:
            present = [dataclasses.replace(c, metadata=None) for c in present]
        result = self._page(name, request, dataclasses.replace(plan, page_size=len(present)), ttl, present, [],
                            key)
        shown = {h.id for h in result.hits}
        cut = next((i for i, c in enumerate(chunk) if c.id in records and c.id not in shown), len(chunk))
        rest = pinned[cut:]
        result.next_page_token = self.tokens.issue("search", key, r=pin_ranking(rest)) if rest else ""
        return result

    def _url(self, collection: str, image_id: str, ttl_seconds: int) -> str:
        try:
            return self.storage.url(collection, image_id, ttl_seconds)
        except InvalidArgument:  # an id written to the index by something other than the gateway
            return ""

    async def _part_vectors(self, parts: Sequence[QueryPart], collection: CollectionInfo, deadline: Deadline,
                            fields: Sequence[str] | None = None,
                            ) -> tuple[list[np.ndarray | None], dict[int, ClipsearchError]]:
        """One unit vector per query part (texts in one encoder call, images in one), and the
        error of each part that has none. ``fields`` names the parts in errors (``parts[i]``)."""
        fields = fields or [f"parts[{i}]" for i in range(len(parts))]
        vectors: list[np.ndarray | None] = [None] * len(parts)
        errors: dict[int, ClipsearchError] = {}
        texts = [(i, p.text) for i, p in enumerate(parts) if p.text is not None]
        images = [(i, p.image_data) for i, p in enumerate(parts) if p.image_data is not None]
        stored = [(i, p.image_id) for i, p in enumerate(parts) if p.image_id is not None]
        for i, part in enumerate(parts):
            if part.vector is not None:
                at = f"{fields[i]}.vector"
                try:
                    vectors[i] = unit(unpack_vector(part.vector, dim=collection.dim, field=at), at, field=at)
                except ClipsearchError as error:
                    errors[i] = error

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
                    at = f"{fields[i]}.image_data"
                    errors[i] = InvalidArgument(f"{at} could not be read as an image: {error.message}", field=at)
                vectors[i] = vector

        async def fetch_stored() -> None:
            if not stored:
                return
            records = await self.shards.fetch(collection.name, [image_id for _, image_id in stored], deadline,
                                              include_vectors=True)
            for i, image_id in stored:
                record = records.get(image_id)
                at = f"{fields[i]}.image_id"
                if record is None:
                    errors[i] = NotFound(f"{at} {image_id} is not in collection {collection.name!r}", field=at)
                    continue
                try:
                    vectors[i] = unit(record.vector, f"the stored vector of {image_id}", field=at)
                except ClipsearchError as error:
                    errors[i] = error

        await _gather(embed_texts(), embed_images(), fetch_stored())
        return vectors, errors

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
