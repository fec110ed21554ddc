"""The gRPC face of the engine: converts protos to engine calls and back.

Engine errors (``clipsearch.errors``) become gRPC statuses in the shared
interceptor, so there is no error handling here. Engine calls run in worker
threads so the event loop keeps serving while FAISS and SQLite work; the one
exception is a lone, cheap search (see ``IndexServicer.search_inline``).
"""

from __future__ import annotations

import asyncio

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import ClipsearchError, InvalidArgument
from clipsearch.index.v1 import index_service_pb2 as pb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.metadata import metadata_from_proto, metadata_to_proto, value_from_proto
from clipsearch.vectors import pack_vector, unpack_matrix
from index_service.engine import CollectionInfo, IndexEngine, WouldBlock
from index_service.filters import RANGE_BOUNDS, Condition

METRIC_NAMES = {pb.METRIC_UNSPECIFIED: "ip", pb.METRIC_INNER_PRODUCT: "ip", pb.METRIC_L2: "l2"}
METRIC_ENUMS = {"ip": pb.METRIC_INNER_PRODUCT, "l2": pb.METRIC_L2}


def collection_to_proto(info: CollectionInfo) -> pb.Collection:
    return pb.Collection(
        name=info.name, dim=info.dim, metric=METRIC_ENUMS[info.metric], index_spec=info.index_spec,
        num_shards=info.num_shards, model_fingerprint=info.model_fingerprint, vector_count=info.vector_count,
        trained=info.trained, memory_bytes=info.memory_bytes, snapshot_age_seconds=info.snapshot_age_seconds,
        sequence=info.sequence, uid=info.uid,
    )


def conditions_from_proto(message: common_pb2.Filter) -> list[Condition]:
    conditions = []
    for position, condition in enumerate(message.conditions):
        where = f"filter.conditions[{position}]"
        op = condition.WhichOneof("op")
        if op == "equals":
            conditions.append(Condition(condition.key, "equals", _value(condition.equals, f"{where}.equals")))
        elif op == "in_set":
            values = [_value(v, f"{where}.in_set.values[{i}]") for i, v in enumerate(condition.in_set.values)]
            conditions.append(Condition(condition.key, "in", values))
        elif op == "range":
            bounds = {
                bound: _value(getattr(condition.range, bound), f"{where}.range.{bound}")
                for bound in RANGE_BOUNDS
                if condition.range.HasField(bound)
            }
            conditions.append(Condition(condition.key, "range", bounds))
        else:
            conditions.append(Condition(condition.key, "", None))  # the engine says what is missing
    return conditions


def _value(message: common_pb2.MetadataValue, field: str):
    converted = value_from_proto(message, field)
    if converted is None:
        raise InvalidArgument(f"{field} has no value set", field=field)
    return converted


class IndexServicer(index_service_pb2_grpc.IndexServiceServicer):
    def __init__(self, engine: IndexEngine, inline_search_max_ms: float = 0.0):
        self.engine = engine
        self.inline_search_max_seconds = inline_search_max_ms / 1000
        self._searches_in_flight = 0  # SearchVectors calls being handled now (event loop only)

    def search_inline(self, request: pb.SearchVectorsRequest, n_queries: int) -> bool:
        """Whether to run this search on the event loop rather than a worker thread.

        Handing a call to a worker thread and back takes two thread wake-ups and
        ~0.3-0.5 ms of CPU on a 2-vCPU VM, more than a small FAISS search itself, and
        each wake-up waits for a free vCPU on a busy machine. So a search runs inline
        when it reads nothing but memory (no filter, no metadata or vectors from the
        store), its estimated time is at most ``inline_search_max_ms``, and it is the
        only search in flight (concurrent searches go to worker threads, so they
        spread over the cores). The engine raises ``WouldBlock`` rather than wait for
        a write.
        """
        if (self.inline_search_max_seconds <= 0 or self._searches_in_flight > 1 or request.filter.conditions
                or request.include_metadata or request.include_vectors):
            return False
        try:
            cost = self.engine.estimated_search_seconds(
                request.collection, n_queries, request.k, request.params.nprobe, request.params.ef_search)
        except ClipsearchError:
            return False  # the worker-thread path reports it
        return cost <= self.inline_search_max_seconds

    async def CreateCollection(self, request, context):
        info = await asyncio.to_thread(
            self.engine.create_collection, request.name, request.dim, METRIC_NAMES.get(request.metric, "?"),
            request.index_spec, request.num_shards or 1, request.model_fingerprint,
        )
        return pb.CreateCollectionResponse(collection=collection_to_proto(info))

    async def GetCollection(self, request, context):
        info = await asyncio.to_thread(self.engine.get_collection, request.name)
        return pb.GetCollectionResponse(collection=collection_to_proto(info))

    async def ListCollections(self, request, context):
        infos, token = await asyncio.to_thread(self.engine.list_collections, request.page_size, request.page_token)
        return pb.ListCollectionsResponse(collections=[collection_to_proto(i) for i in infos], next_page_token=token)

    async def DeleteCollection(self, request, context):
        await asyncio.to_thread(self.engine.delete_collection, request.name)
        return pb.DeleteCollectionResponse()

    async def UpsertVectors(self, request, context):
        vectors = unpack_matrix(request.vectors, "vectors")
        metadata = [metadata_from_proto(m) for m in request.metadata]
        result = await asyncio.to_thread(
            self.engine.upsert, request.collection, list(request.ids), vectors, metadata, request.model_fingerprint
        )
        return pb.UpsertVectorsResponse(upserted_count=result.count, sequence=result.sequence)

    async def DeleteVectors(self, request, context):
        result = await asyncio.to_thread(self.engine.delete, request.collection, list(request.ids))
        return pb.DeleteVectorsResponse(deleted_count=result.count, sequence=result.sequence)

    async def SearchVectors(self, request, context):
        queries = unpack_matrix(request.queries, "queries")
        args = (request.collection, queries, request.k, conditions_from_proto(request.filter),
                request.params.nprobe, request.params.ef_search, request.include_metadata, request.include_vectors)
        results = None
        self._searches_in_flight += 1
        try:
            await asyncio.sleep(0)  # searches that arrived with this one get to count themselves in
            if self.search_inline(request, len(queries)):
                try:
                    results = self.engine.search(*args, wait=False)
                except WouldBlock:
                    pass
            if results is None:
                results = await asyncio.to_thread(self.engine.search, *args)
        finally:
            self._searches_in_flight -= 1
        return pb.SearchVectorsResponse(results=[
            pb.QueryResult(hits=[
                pb.Hit(
                    id=hit.id,
                    score=hit.score,
                    metadata=metadata_to_proto(hit.metadata) if hit.metadata else None,
                    vector=pack_vector(hit.vector) if hit.vector is not None else b"",
                )
                for hit in hits
            ])
            for hits in results
        ])

    async def FetchVectors(self, request, context):
        records, missing = await asyncio.to_thread(
            self.engine.fetch, request.collection, list(request.ids), request.include_vectors
        )
        return pb.FetchVectorsResponse(records=[_record_to_proto(r) for r in records], missing_ids=missing)

    async def ListVectors(self, request, context):
        records, token = await asyncio.to_thread(
            self.engine.list_vectors, request.collection, request.page_size, request.page_token,
            request.include_metadata,
        )
        return pb.ListVectorsResponse(records=[_record_to_proto(r) for r in records], next_page_token=token)

    async def TrainIndex(self, request, context):
        info = await asyncio.to_thread(self.engine.train, request.collection)
        return pb.TrainIndexResponse(collection=collection_to_proto(info))

    async def CreateSnapshot(self, request, context):
        names = await asyncio.to_thread(self.engine.snapshot, request.collection)
        return pb.CreateSnapshotResponse(collections=names)


def _record_to_proto(record) -> pb.Record:
    return pb.Record(
        id=record.id,
        metadata=metadata_to_proto(record.metadata) if record.metadata else None,
        vector=pack_vector(record.vector) if record.vector is not None else b"",
    )
