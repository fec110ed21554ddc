"""Fan-out over index shards, in plain types: a stable hash of the id picks the
shard of a write; searches go to every shard in parallel and are merged top-k.

Every shard call gets its time from the caller's remaining deadline, less the
margin the gateway needs to answer, so a hung shard ends as a missing shard,
never as the caller's DEADLINE_EXCEEDED. When a shard fails a search, the
policy decides: ``fail`` raises UNAVAILABLE naming the shard, ``partial``
answers from the others and names the missing.

This is the one module that speaks the index service's protos.
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
    UNKNOWN_FILTER_KEY, AlreadyExists, ClipsearchError, DeadlineExceeded, FailedPrecondition, NotFound,
    Unavailable,
)
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.metadata import metadata_from_proto, metadata_to_proto, value_to_proto
from clipsearch.vectors import pack_matrix, unpack_vector

from gateway import metrics
from gateway.deadline import Deadline
from gateway.rpc import call_metadata, make_channel, translate
from gateway.search import Candidate, rank
from gateway.settings import GatewaySettings
from gateway.types import CollectionInfo, Condition, Metadata

log = logging.getLogger(__name__)

POLICY_FAIL = "fail"
POLICY_PARTIAL = "partial"
METRICS = {ipb.METRIC_INNER_PRODUCT: "ip", ipb.METRIC_L2: "l2"}
OUTAGES = (Unavailable, DeadlineExceeded)


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


@dataclass
class Record:
    id: str
    metadata: Metadata
    vector: np.ndarray | None = None


def filter_to_proto(conditions: Sequence[Condition]) -> common_pb2.Filter:
    message = common_pb2.Filter()
    for condition in conditions:
        out = message.conditions.add(key=condition.key)
        if condition.equals is not None:
            out.equals.CopyFrom(value_to_proto(condition.equals))
        elif condition.in_set is not None:
            out.in_set.values.extend(value_to_proto(v) for v in condition.in_set)
        elif condition.range is not None:
            for bound, value in condition.range.items():
                getattr(out.range, bound).CopyFrom(value_to_proto(value))
    return message


def collection_from_proto(c: ipb.Collection) -> CollectionInfo:
    return CollectionInfo(
        name=c.name, dim=c.dim, metric=METRICS.get(c.metric, "ip"), index_spec=c.index_spec, num_shards=c.num_shards,
        model_fingerprint=c.model_fingerprint, vector_count=c.vector_count, trained=c.trained,
        memory_bytes=c.memory_bytes, snapshot_age_seconds=c.snapshot_age_seconds, sequence=c.sequence,
        uid=c.uid,
    )


def merge_collections(parts: Sequence[CollectionInfo]) -> CollectionInfo:
    """One view of a collection over its shards: counts summed."""
    first = parts[0]
    ages = [p.snapshot_age_seconds for p in parts]
    return CollectionInfo(
        name=first.name, dim=first.dim, metric=first.metric, index_spec=first.index_spec,
        num_shards=first.num_shards, model_fingerprint=first.model_fingerprint,
        vector_count=sum(p.vector_count for p in parts), trained=all(p.trained for p in parts),
        memory_bytes=sum(p.memory_bytes for p in parts),
        snapshot_age_seconds=max(ages) if all(a >= 0 for a in ages) else -1.0,
        sequence=max(p.sequence for p in parts), uid="-".join(p.uid for p in parts),
    )


def _record(record: ipb.Record, with_vector: bool) -> Record:
    vector = unpack_vector(record.vector, field="stored vector") if with_vector and record.vector else None
    return Record(record.id, metadata_from_proto(record.metadata), vector)


def _candidate(hit: ipb.Hit, with_metadata: bool, with_vector: bool) -> Candidate:
    vector = unpack_vector(hit.vector, field="index hit vector") if with_vector and hit.vector else None
    return Candidate(hit.id, float(hit.score), metadata_from_proto(hit.metadata) if with_metadata else None, vector)


@dataclass
class Shard:
    index: int
    address: str
    stub: Any

    @property
    def name(self) -> str:
        """The shard's public name, "shard-N" (N: its position in the ``index`` setting, from 0);
        its address stays in the logs."""
        return f"shard-{self.index}"

    def describe(self) -> str:
        return f"index {self.name}"


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

    def group(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """Positions in ``ids`` grouped by shard index."""
        groups: dict[int, list[int]] = defaultdict(list)
        for position, image_id in enumerate(ids):
            groups[shard_for_id(image_id, len(self.shards))].append(position)
        return groups

    async def _call(self, shard: Shard, method: str, request, deadline: Deadline):
        timeout = deadline.timeout(self.settings.index_timeout_seconds)
        try:
            return await getattr(shard.stub, method)(request, timeout=timeout, metadata=call_metadata())
        except grpc.aio.AioRpcError as error:
            metrics.SHARD_ERRORS.labels(shard.name, method, error.code().name).inc()
            raise translate(error, f"{shard.describe()} {method}", shard.address) from None

    async def _fan_out(self, method: str, make_request: Callable[[Shard], Any], deadline: Deadline,
                       shards: Sequence[Shard] | None = None) -> list[Any]:
        """Calls shards in parallel; results or ClipsearchErrors, in shard order."""
        shards = self.shards if shards is None else shards
        started = time.perf_counter()
        try:
            return await asyncio.gather(
                *(self._call(shard, method, make_request(shard), deadline) for shard in shards),
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
            if not isinstance(error, OUTAGES):
                raise error
        if len(errors) == 1:
            raise errors[0]
        raise Unavailable("; ".join(e.message for e in errors))

    # ------------------------------------------------------------------ search

    async def search(self, collection: str, queries: np.ndarray, k: int, *, deadline: Deadline,
                     filter: Sequence[Condition] = (), nprobe: int = 0, ef_search: int = 0,
                     include_metadata: bool = True, include_vectors: bool = False, policy: str = POLICY_FAIL,
                     ) -> tuple[list[list[Candidate]], list[str]]:
        """Top-k per query over all shards, and the names of shards that did not answer."""
        request = ipb.SearchVectorsRequest(
            collection=collection, queries=pack_matrix(queries), k=k, filter=filter_to_proto(filter),
            params=common_pb2.SearchParams(nprobe=nprobe, ef_search=ef_search),
            include_metadata=include_metadata, include_vectors=include_vectors,
        )
        results = await self._fan_out("SearchVectors", lambda shard: request, deadline)
        missing: list[str] = []
        answered: list[ipb.SearchVectorsResponse] = []
        outages: list[ClipsearchError] = []
        unknown_key: ClipsearchError | None = None
        for shard, result in zip(self.shards, results):
            if isinstance(result, OUTAGES):
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
            raise Unavailable(
                f"index shard(s) {', '.join(missing)} did not answer the search ({outages[0].message})"
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
                per_shard.append([_candidate(hit, include_metadata, include_vectors)
                                  for hit in response.results[row].hits])
            merged.append(merge_top_k(per_shard, k))
        return merged, missing

    # ------------------------------------------------------------------ records

    async def upsert(self, collection: str, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[Metadata],
                     fingerprint: str, deadline: Deadline) -> list[ClipsearchError | None]:
        """Writes each id to its shard; one error (or None) per id. Shards are independent,
        so a failing shard fails only its own ids."""
        outcome: list[ClipsearchError | None] = [None] * len(ids)
        groups = self.group(ids)
        shards = [self.shards[i] for i in groups]

        def make(shard: Shard) -> ipb.UpsertVectorsRequest:
            positions = groups[shard.index]
            return ipb.UpsertVectorsRequest(
                collection=collection, ids=[ids[p] for p in positions], vectors=pack_matrix(vectors[positions]),
                metadata=[metadata_to_proto(metadata[p]) for p in positions], model_fingerprint=fingerprint,
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
                    include_vectors: bool = False) -> dict[str, Record]:
        """Records found, by id. A shard failure raises (naming the shard)."""
        records, errors = await self.fetch_each(collection, ids, deadline, include_vectors)
        if errors:
            self._raise_first(list(dict.fromkeys(errors.values())))
        return records

    async def fetch_each(self, collection: str, ids: Sequence[str], deadline: Deadline,
                         include_vectors: bool = False) -> tuple[dict[str, Record], dict[str, ClipsearchError]]:
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
        records: dict[str, Record] = {}
        errors: dict[str, ClipsearchError] = {}
        for shard, result in zip(shards, results):
            if isinstance(result, BaseException):
                if not isinstance(result, ClipsearchError):
                    raise result
                errors.update((ids[p], result) for p in groups[shard.index])
            else:
                records.update((r.id, _record(r, include_vectors)) for r in result.records)
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
                   include_metadata: bool = True) -> tuple[list[Record], bool]:
        """The first ``page_size`` records with ids after ``after``, over all shards in id
        order, and whether more follow."""
        results = await self._fan_out(
            "ListVectors",
            lambda shard: ipb.ListVectorsRequest(collection=collection, page_size=page_size, page_token=after,
                                                 include_metadata=include_metadata),
            deadline,
        )
        self._raise_first(results)
        records = sorted((r for response in results for r in response.records), key=lambda r: r.id)
        more = len(records) > page_size or any(response.next_page_token for response in results)
        # A shard may end its page early (its metadata budget): nothing past its last id is
        # known to be complete, so the merged page stops there too.
        cut = min((response.next_page_token for response in results if response.next_page_token), default=None)
        if cut is not None:
            records = [r for r in records if r.id <= cut]
        return [_record(r, False) for r in records[:page_size]], more

    # ------------------------------------------------------------------ collections

    async def create_collection(self, name: str, dim: int, index_spec: str, num_shards: int, fingerprint: str,
                                deadline: Deadline) -> CollectionInfo:
        """Creates the collection on every shard. Shards that already have it (from an
        earlier, partly failed attempt, or a retried call) are accepted."""
        request = ipb.CreateCollectionRequest(name=name, dim=dim, metric=ipb.METRIC_INNER_PRODUCT,
                                              index_spec=index_spec, num_shards=num_shards,
                                              model_fingerprint=fingerprint)
        results = await self._fan_out("CreateCollection", lambda shard: request, deadline)
        created = [r for r in results if not isinstance(r, BaseException)]
        existing = [r for r in results if isinstance(r, AlreadyExists)]
        self._raise_first([r for r in results if isinstance(r, BaseException) and not isinstance(r, AlreadyExists)])
        if not created:
            raise AlreadyExists(f"collection {name!r} already exists", field="name")
        if existing:
            log.warning("collection %s existed on %d of %d shards; created it on the rest",
                        name, len(existing), len(self.shards))
        return await self.get_collection(name, deadline)

    async def get_collection(self, name: str, deadline: Deadline) -> CollectionInfo:
        """The collection with counts summed over all shards."""
        results = await self._fan_out("GetCollection", lambda shard: ipb.GetCollectionRequest(name=name), deadline)
        missing = [shard.describe() for shard, r in zip(self.shards, results) if isinstance(r, NotFound)]
        if len(missing) == len(self.shards):
            raise NotFound(f"collection {name!r} does not exist", field="name")
        self._raise_first([r for r in results if not isinstance(r, NotFound)])
        if missing:
            raise FailedPrecondition(
                f"collection {name!r} is missing on {', '.join(missing)}; call CreateCollection again to repair it"
            )
        return merge_collections([collection_from_proto(r.collection) for r in results])

    async def describe_collection(self, name: str, deadline: Deadline) -> CollectionInfo:
        """The collection's settings (dim, fingerprint, ...) from the first shard that
        has it; counts are not summed. A down or hung shard does not hold it up."""
        calls = [asyncio.ensure_future(self._call(shard, "GetCollection", ipb.GetCollectionRequest(name=name),
                                                  deadline)) for shard in self.shards]
        errors: list[BaseException] = []
        try:
            for next_done in asyncio.as_completed(calls):
                try:
                    return collection_from_proto((await next_done).collection)
                except ClipsearchError as error:
                    errors.append(error)
        finally:
            for call in calls:
                call.cancel()
        if any(isinstance(e, NotFound) for e in errors):
            raise NotFound(f"collection {name!r} does not exist", field="collection")
        self._raise_first(errors)
        raise Unavailable(f"no index shard answered for collection {name!r}")

    async def list_collections(self, deadline: Deadline) -> list[CollectionInfo]:
        """Every collection, merged over all shards, sorted by name."""

        async def all_pages(shard: Shard) -> list[CollectionInfo]:
            out, token = [], ""
            while True:
                response = await self._call(
                    shard, "ListCollections", ipb.ListCollectionsRequest(page_size=1000, page_token=token), deadline,
                )
                out.extend(collection_from_proto(c) for c in response.collections)
                token = response.next_page_token
                if not token or not response.collections:
                    return out

        results = await asyncio.gather(*(all_pages(s) for s in self.shards), return_exceptions=True)
        self._raise_first(results)
        by_name: dict[str, list[CollectionInfo]] = defaultdict(list)
        for collections in results:
            for collection in collections:
                by_name[collection.name].append(collection)
        return [merge_collections(by_name[name]) for name in sorted(by_name)]

    async def delete_collection(self, name: str, deadline: Deadline) -> list[str]:
        """Deletes the collection on every shard it is on; the shards that could not be reached."""
        results = await self._fan_out("DeleteCollection", lambda shard: ipb.DeleteCollectionRequest(name=name),
                                      deadline)
        failed = [(shard, r) for shard, r in zip(self.shards, results)
                  if isinstance(r, BaseException) and not isinstance(r, NotFound)]
        self._raise_first([r for _, r in failed if not isinstance(r, OUTAGES)])
        return [shard.name for shard, _ in failed]
