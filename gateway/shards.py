"""Fan-out over index shards: a stable hash of the id picks the shard of a write;
searches go to every shard in parallel under one deadline and are merged top-k.

When a shard fails a search, the policy decides: ``fail`` raises UNAVAILABLE
naming the shard, ``partial`` answers from the others and names the missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import (
    UNKNOWN_FILTER_KEY, AlreadyExists, ClipsearchError, DeadlineExceeded, FailedPrecondition, NotFound, Unavailable,
)
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.vectors import pack_matrix, unpack_vector

from gateway import metrics
from gateway.rpc import Deadline, make_channel, translate
from gateway.search import Candidate, rank
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

POLICY_FAIL = "fail"
POLICY_PARTIAL = "partial"


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach): adding a shard moves only ~1/n of the ids."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    b, j = -1, 0
    key &= 0xFFFFFFFFFFFFFFFF
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_for_id(image_id: str, shards: int) -> int:
    """The shard that holds ``image_id``: stable across processes, versions and platforms."""
    key = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    return jump_hash(key, shards)


def merge_top_k(per_shard: Sequence[Sequence[Candidate]], k: int) -> list[Candidate]:
    """The k best hits over all shards (an id lives on one shard, so no duplicates)."""
    return rank(hit for hits in per_shard for hit in hits)[:k]


def _candidate(hit: ipb.Hit, with_vector: bool) -> Candidate:
    vector = unpack_vector(hit.vector, field="index hit vector") if with_vector and hit.vector else None
    return Candidate(hit.id, float(hit.score), hit.metadata, vector)


@dataclass
class Shard:
    index: int
    address: str
    stub: Any

    @property
    def name(self) -> str:
        return self.address

    def describe(self) -> str:
        return f"index shard {self.index} ({self.address})"


class ShardSet:
    def __init__(self, settings: GatewaySettings,
                 channel_factory: Callable[[str], grpc.aio.Channel] | None = None):
        self.settings = settings
        factory = channel_factory or (lambda address: make_channel(address, settings))
        self.channels = [factory(address) for address in settings.index]
        self.shards = [
            Shard(i, address, index_service_pb2_grpc.IndexServiceStub(channel))
            for i, (address, channel) in enumerate(zip(settings.index, self.channels))
        ]

    def __len__(self) -> int:
        return len(self.shards)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))

    def shard_of(self, image_id: str) -> Shard:
        return self.shards[shard_for_id(image_id, len(self.shards))]

    def group(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """Positions in ``ids`` grouped by shard index."""
        groups: dict[int, list[int]] = defaultdict(list)
        for position, image_id in enumerate(ids):
            groups[shard_for_id(image_id, len(self.shards))].append(position)
        return groups

    async def _call(self, shard: Shard, method: str, request, timeout: float):
        try:
            return await getattr(shard.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            metrics.SHARD_ERRORS.labels(shard.name, method, error.code().name).inc()
            raise translate(error, f"{shard.describe()} {method}") from None

    async def _fan_out(self, method: str, make_request: Callable[[Shard], Any], deadline: Deadline,
                       shards: Sequence[Shard] | None = None) -> list[Any]:
        """Calls every shard in parallel under one timeout; results or exceptions, in shard order."""
        shards = self.shards if shards is None else shards
        timeout = deadline.timeout(self.settings.index_timeout_seconds)
        started = time.perf_counter()
        try:
            return await asyncio.gather(
                *(self._call(shard, method, make_request(shard), timeout) for shard in shards),
                return_exceptions=True,
            )
        finally:
            metrics.DOWNSTREAM_SECONDS.labels("index", method).observe(time.perf_counter() - started)

    @staticmethod
    def _raise_first(results: Sequence[Any]) -> None:
        """Raises the most telling error: a caller error beats an outage, and outages name every shard."""
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        for error in errors:
            if not isinstance(error, ClipsearchError):
                raise error
        for error in errors:
            if not isinstance(error, (Unavailable, DeadlineExceeded)):
                raise error
        if len(errors) == 1:
            raise errors[0]
        raise Unavailable("; ".join(e.message for e in errors))

    # ------------------------------------------------------------------ search

    async def search(self, collection: str, queries: np.ndarray, k: int, *, deadline: Deadline,
                     filter: common_pb2.Filter | None = None, params: common_pb2.SearchParams | None = None,
                     include_vectors: bool = False, policy: str = POLICY_FAIL,
                     ) -> tuple[list[list[Candidate]], list[str]]:
        """Top-k per query over all shards, and the names of shards that did not answer."""
        request = ipb.SearchVectorsRequest(
            collection=collection, queries=pack_matrix(queries), k=k, filter=filter, params=params,
            include_metadata=True, include_vectors=include_vectors,
        )
        results = await self._fan_out("SearchVectors", lambda shard: request, deadline)
        missing: list[str] = []
        answered: list[ipb.SearchVectorsResponse] = []
        outages: list[ClipsearchError] = []
        unknown_key: ClipsearchError | None = None
        for shard, result in zip(self.shards, results):
            if isinstance(result, (Unavailable, DeadlineExceeded)):
                outages.append(result)
                missing.append(shard.name)
            elif isinstance(result, ClipsearchError) and result.reason == UNKNOWN_FILTER_KEY:
                unknown_key = result  # this shard holds no image with that key: it matches nothing here
            elif isinstance(result, BaseException):
                raise result  # bad filter, unknown collection, ...: every shard would say the same
            else:
                answered.append(result)
        if unknown_key is not None and not answered and not outages:
            raise unknown_key
        if outages and (policy != POLICY_PARTIAL or not answered):
            names = ", ".join(missing)
            raise Unavailable(
                f"index shard(s) {names} did not answer the search ({outages[0].message})"
                + ("" if policy == POLICY_PARTIAL else "; the gateway's shard_failure_policy is 'fail'"),
                reason="SHARD_UNAVAILABLE",
            )
        if missing:
            metrics.PARTIAL_SEARCHES.inc()
        merged: list[list[Candidate]] = []
        for row in range(queries.shape[0]):
            per_shard = []
            for response in answered:
                if row >= len(response.results):
                    raise Unavailable(f"an index shard answered {len(response.results)} results for "
                                      f"{queries.shape[0]} queries")
                per_shard.append([_candidate(hit, include_vectors) for hit in response.results[row].hits])
            merged.append(merge_top_k(per_shard, k))
        return merged, missing

    # ------------------------------------------------------------------ records

    async def upsert(self, collection: str, ids: Sequence[str], vectors: np.ndarray,
                     metadata: Sequence[common_pb2.Metadata], fingerprint: str, deadline: Deadline,
                     ) -> list[ClipsearchError | None]:
        """Writes each id to its shard; one error (or None) per id. Shards are independent,
        so a failing shard fails only its own ids."""
        outcome: list[ClipsearchError | None] = [None] * len(ids)
        groups = self.group(ids)
        shards = [self.shards[i] for i in groups]

        def make(shard: Shard) -> ipb.UpsertVectorsRequest:
            positions = groups[shard.index]
            return ipb.UpsertVectorsRequest(
                collection=collection, ids=[ids[p] for p in positions], vectors=pack_matrix(vectors[positions]),
                metadata=[metadata[p] for p in positions], model_fingerprint=fingerprint,
            )

        results = await self._fan_out("UpsertVectors", make, deadline, shards)
        for shard, result in zip(shards, results):
            if isinstance(result, BaseException):
                if not isinstance(result, ClipsearchError):
                    raise result
                for p in groups[shard.index]:
                    outcome[p] = result
        return outcome

    async def fetch(self, collection: str, ids: Sequence[str], deadline: Deadline,
                    include_vectors: bool = False) -> dict[str, ipb.Record]:
        """Records found, by id. A shard failure raises (naming the shard)."""
        records, errors = await self.fetch_each(collection, ids, deadline, include_vectors)
        if errors:
            self._raise_first(list(dict.fromkeys(errors.values())))
        return records

    async def fetch_each(self, collection: str, ids: Sequence[str], deadline: Deadline,
                         include_vectors: bool = False,
                         ) -> tuple[dict[str, ipb.Record], dict[str, ClipsearchError]]:
        """Records found, by id, and the error of each id whose shard failed."""
        if not ids:
            return {}, {}
        groups = self.group(ids)
        shards = [self.shards[i] for i in groups]
        results = await self._fan_out(
            "FetchVectors",
            lambda shard: ipb.FetchVectorsRequest(collection=collection, ids=[ids[p] for p in groups[shard.index]],
                                                  include_vectors=include_vectors),
            deadline, shards,
        )
        records: dict[str, ipb.Record] = {}
        errors: dict[str, ClipsearchError] = {}
        for shard, result in zip(shards, results):
            if isinstance(result, BaseException):
                if not isinstance(result, ClipsearchError):
                    raise result
                errors.update((ids[p], result) for p in groups[shard.index])
            else:
                records.update((record.id, record) for record in result.records)
        return records, errors

    async def delete(self, collection: str, ids: Sequence[str], deadline: Deadline) -> int:
        groups = self.group(ids)
        shards = [self.shards[i] for i in groups]
        results = await self._fan_out(
            "DeleteVectors",
            lambda shard: ipb.DeleteVectorsRequest(collection=collection, ids=[ids[p] for p in groups[shard.index]]),
            deadline, shards,
        )
        self._raise_first(results)
        return sum(r.deleted_count for r in results)

    async def list(self, collection: str, after: str, page_size: int, deadline: Deadline,
                   ) -> tuple[list[ipb.Record], bool]:
        """The first ``page_size`` records with ids after ``after``, over all shards in id
        order, and whether more follow."""
        results = await self._fan_out(
            "ListVectors",
            lambda shard: ipb.ListVectorsRequest(collection=collection, page_size=page_size, page_token=after,
                                                 include_metadata=True),
            deadline,
        )
        self._raise_first(results)
        records = sorted((r for response in results for r in response.records), key=lambda r: r.id)
        more = len(records) > page_size or any(response.next_page_token for response in results)
        return records[:page_size], more

    # ------------------------------------------------------------------ collections

    async def create_collection(self, request: ipb.CreateCollectionRequest, deadline: Deadline) -> ipb.Collection:
        """Creates the collection on every shard. Shards that already have it (from an
        earlier, partly failed attempt) are accepted when their settings match."""
        results = await self._fan_out("CreateCollection", lambda shard: request, deadline)
        created = [r for r in results if not isinstance(r, BaseException)]
        existing = [r for r in results if isinstance(r, AlreadyExists)]
        others = [r for r in results if isinstance(r, BaseException) and not isinstance(r, AlreadyExists)]
        if others:
            self._raise_first(others)
        if not created:
            raise AlreadyExists(f"collection {request.name!r} already exists", field="name")
        if existing:
            log.warning("collection %s existed on %d of %d shards; created it on the rest",
                        request.name, len(existing), len(self.shards))
        return await self.get_collection(request.name, deadline)

    async def get_collection(self, name: str, deadline: Deadline) -> ipb.Collection:
        """The collection with counts summed over all shards."""
        results = await self._fan_out("GetCollection", lambda shard: ipb.GetCollectionRequest(name=name), deadline)
        missing = [shard.describe() for shard, r in zip(self.shards, results) if isinstance(r, NotFound)]
        if len(missing) == len(self.shards):
            raise NotFound(f"collection {name!r} does not exist", field="collection")
        if missing:
            raise FailedPrecondition(
                f"collection {name!r} is missing on {', '.join(missing)}; call CreateCollection again to repair it"
            )
        self._raise_first(results)
        return merge_collections([r.collection for r in results])

    async def describe_collection(self, name: str, deadline: Deadline) -> ipb.Collection:
        """The collection's settings (dim, fingerprint, ...) from the shards that answer;
        counts are not summed. Serves searches while a shard is down."""
        results = await self._fan_out("GetCollection", lambda shard: ipb.GetCollectionRequest(name=name), deadline)
        found = [r.collection for r in results if not isinstance(r, BaseException)]
        if found:
            return found[0]
        if any(isinstance(r, NotFound) for r in results):
            raise NotFound(f"collection {name!r} does not exist", field="collection")
        self._raise_first(results)
        raise Unavailable(f"no index shard answered for collection {name!r}")

    async def list_collections(self, deadline: Deadline) -> list[ipb.Collection]:
        """Every collection, merged over all shards, sorted by name."""

        async def all_pages(shard: Shard) -> list[ipb.Collection]:
            out, token = [], ""
            while True:
                response = await self._call(
                    shard, "ListCollections", ipb.ListCollectionsRequest(page_size=1000, page_token=token),
                    deadline.timeout(self.settings.index_timeout_seconds),
                )
                out.extend(response.collections)
                token = response.next_page_token
                if not token or not response.collections:
                    return out

        results = await asyncio.gather(*(all_pages(s) for s in self.shards), return_exceptions=True)
        self._raise_first(results)
        by_name: dict[str, list[ipb.Collection]] = defaultdict(list)
        for collections in results:
            for collection in collections:
                by_name[collection.name].append(collection)
        return [merge_collections(by_name[name]) for name in sorted(by_name)]

    async def delete_collection(self, name: str, deadline: Deadline) -> None:
        results = await self._fan_out("DeleteCollection", lambda shard: ipb.DeleteCollectionRequest(name=name),
                                      deadline)
        if all(isinstance(r, NotFound) for r in results):
            raise NotFound(f"collection {name!r} does not exist", field="name")
        self._raise_first([r for r in results if not isinstance(r, NotFound)])


def merge_collections(parts: Sequence[ipb.Collection]) -> ipb.Collection:
    merged = ipb.Collection()
    merged.CopyFrom(parts[0])
    merged.vector_count = sum(p.vector_count for p in parts)
    merged.memory_bytes = sum(p.memory_bytes for p in parts)
    merged.trained = all(p.trained for p in parts)
    merged.snapshot_age_seconds = max(p.snapshot_age_seconds for p in parts) if all(
        p.snapshot_age_seconds >= 0 for p in parts) else -1.0
    merged.sequence = max(p.sequence for p in parts)
    return merged
