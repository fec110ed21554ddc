"""A tiny in-memory index shard (brute force, equality filters only) for testing
the gateway's fan-out without the real index service."""

from __future__ import annotations

import grpc
import numpy as np

from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.index.v1 import index_service_pb2_grpc
from clipsearch.vectors import pack_vector, unpack_matrix


class FakeIndex(index_service_pb2_grpc.IndexServiceServicer):
    def __init__(self):
        self.collections: dict[str, ipb.Collection] = {}
        self.records: dict[str, dict[str, tuple[np.ndarray, ipb.Record]]] = {}
        self.calls: list[str] = []

    async def CreateCollection(self, request, context):
        self.calls.append("CreateCollection")
        if request.name in self.collections:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "exists")
        self.collections[request.name] = ipb.Collection(
            name=request.name, dim=request.dim, metric=request.metric, index_spec=request.index_spec or "Flat",
            num_shards=request.num_shards or 1, model_fingerprint=request.model_fingerprint, trained=True,
        )
        self.records[request.name] = {}
        return ipb.CreateCollectionResponse(collection=self.collections[request.name])

    async def GetCollection(self, request, context):
        if request.name not in self.collections:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such collection")
        collection = ipb.Collection()
        collection.CopyFrom(self.collections[request.name])
        collection.vector_count = len(self.records[request.name])
        return ipb.GetCollectionResponse(collection=collection)

    async def ListCollections(self, request, context):
        return ipb.ListCollectionsResponse(collections=[self.collections[n] for n in sorted(self.collections)])

    async def DeleteCollection(self, request, context):
        if request.name not in self.collections:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such collection")
        del self.collections[request.name], self.records[request.name]
        return ipb.DeleteCollectionResponse()

    async def UpsertVectors(self, request, context):
        self.calls.append("UpsertVectors")
        if request.collection not in self.collections:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such collection")
        vectors = unpack_matrix(request.vectors)
        for i, image_id in enumerate(request.ids):
            record = ipb.Record(id=image_id, metadata=request.metadata[i] if request.metadata else None)
            self.records[request.collection][image_id] = (vectors[i], record)
        return ipb.UpsertVectorsResponse(upserted_count=len(request.ids))

    async def DeleteVectors(self, request, context):
        records = self.records.get(request.collection, {})
        n = sum(records.pop(i, None) is not None for i in request.ids)
        return ipb.DeleteVectorsResponse(deleted_count=n)

    async def SearchVectors(self, request, context):
        self.calls.append("SearchVectors")
        if request.collection not in self.collections:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such collection")
        queries = unpack_matrix(request.queries)
        records = self.records[request.collection]
        response = ipb.SearchVectorsResponse()
        for q in queries:
            scored = []
            for image_id, (vector, record) in records.items():
                ok = all(record.metadata.fields[c.key] == c.equals for c in request.filter.conditions
                         if c.key in record.metadata.fields) and all(
                    c.key in record.metadata.fields for c in request.filter.conditions)
                if ok:
                    scored.append((float(vector @ q), image_id))
            scored.sort(key=lambda s: (-s[0], s[1]))
            result = response.results.add()
            for score, image_id in scored[:request.k]:
                vector, record = records[image_id]
                result.hits.add(id=image_id, score=score, metadata=record.metadata,
                                vector=pack_vector(vector) if request.include_vectors else b"")
        return response

    async def FetchVectors(self, request, context):
        if request.collection not in self.collections:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such collection")
        records = self.records[request.collection]
        response = ipb.FetchVectorsResponse()
        for image_id in request.ids:
            if image_id in records:
                vector, record = records[image_id]
                out = response.records.add()
                out.CopyFrom(record)
                if request.include_vectors:
                    out.vector = pack_vector(vector)
            else:
                response.missing_ids.append(image_id)
        return response

    async def ListVectors(self, request, context):
        records = self.records.get(request.collection, {})
        ids = sorted(i for i in records if i > request.page_token)
        size = request.page_size or 100
        page = ids[:size]
        return ipb.ListVectorsResponse(records=[records[i][1] for i in page],
                                       next_page_token=page[-1] if len(ids) > size else "")


async def start_fake_shard() -> tuple[grpc.aio.Server, FakeIndex, str]:
    server = grpc.aio.server()
    fake = FakeIndex()
    index_service_pb2_grpc.add_IndexServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, fake, f"127.0.0.1:{port}"
