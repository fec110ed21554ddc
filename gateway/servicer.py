"""The GatewayService servicer: thin. It turns protos into the engine's plain
types and back, and hands the engine the call's deadline; errors the engine
raises become gRPC statuses in the shared interceptor."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from clipsearch.common.v1 import common_pb2
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.gateway.v1 import gateway_service_pb2_grpc
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.item_status import item_status
from clipsearch.keys import READ, WRITE
from clipsearch.errors import error_for_code
from clipsearch.metadata import metadata_to_proto, value_from_proto

from gateway import access, types
from gateway.deadline import Deadline
from gateway.engine import Gateway
from gateway.imports import ImportJobs
from gateway.repair import RepairJobs

AGGREGATIONS = {gpb.AGGREGATION_UNSPECIFIED: types.AGGREGATION_MEAN, gpb.AGGREGATION_MEAN: types.AGGREGATION_MEAN,
                gpb.AGGREGATION_MAX: types.AGGREGATION_MAX}
METRICS = {"ip": ipb.METRIC_INNER_PRODUCT, "l2": ipb.METRIC_L2}
IMPORT_STATES = {types.JOB_RUNNING: gpb.IMPORT_STATE_RUNNING, types.JOB_SUCCEEDED: gpb.IMPORT_STATE_SUCCEEDED,
                 types.JOB_FAILED: gpb.IMPORT_STATE_FAILED, types.JOB_CANCELLED: gpb.IMPORT_STATE_CANCELLED}
REPAIR_STATES = {types.JOB_RUNNING: gpb.REPAIR_STATE_RUNNING, types.JOB_SUCCEEDED: gpb.REPAIR_STATE_SUCCEEDED,
                 types.JOB_FAILED: gpb.REPAIR_STATE_FAILED}
RANGE_BOUNDS = ("gte", "gt", "lte", "lt")


def deadline_of(context: grpc.aio.ServicerContext) -> Deadline:
    return Deadline(context.time_remaining())


# ---------------------------------------------------------------------- protos in


def metadata_in(message: common_pb2.Metadata) -> types.Metadata:
    """Values with nothing set become None, which validation refuses with the field's name."""
    return {key: value_from_proto(value) for key, value in message.fields.items()}


def condition_in(condition: common_pb2.Condition) -> types.Condition:
    op = condition.WhichOneof("op")
    if op == "equals":
        return types.Condition(condition.key, equals=value_from_proto(condition.equals))
    if op == "in_set":
        return types.Condition(condition.key, in_set=tuple(value_from_proto(v) for v in condition.in_set.values))
    if op == "range":
        bounds = {b: value_from_proto(getattr(condition.range, b)) for b in RANGE_BOUNDS
                  if condition.range.HasField(b)}
        return types.Condition(condition.key, range=bounds)
    return types.Condition(condition.key)


def part_in(part: gpb.QueryPart) -> types.QueryPart:
    source = part.WhichOneof("source")
    out = types.QueryPart(weight=part.weight)
    if source is not None:
        setattr(out, source, getattr(part, source))
    return out


def read_mask_in(paths) -> dict:
    """hit_fields and metadata_keys of a read mask: a path "metadata.<key>" asks for that
    metadata key alone (and implies "metadata"); "metadata" asks for every key."""
    fields = {path for path in paths if not path.startswith("metadata.")}
    keys = tuple(sorted({path[len("metadata."):] for path in paths if path.startswith("metadata.")}))
    if keys:
        fields.add("metadata")
    return {"hit_fields": frozenset(fields) or types.HIT_FIELDS,
            "metadata_keys": keys if keys and "metadata" not in paths else None}


def search_in(request: gpb.SearchImagesRequest) -> types.SearchRequest:
    feedback = request.feedback
    return types.SearchRequest(
        collection=request.collection,
        parts=[part_in(p) for p in request.parts],
        aggregation=AGGREGATIONS.get(request.aggregation, str(request.aggregation)),
        feedback=types.Feedback(list(feedback.positive_ids), list(feedback.negative_ids), feedback.positive_weight,
                                feedback.negative_weight),
        top_k=request.top_k,
        min_score=request.min_score if request.HasField("min_score") else None,
        filter=[condition_in(c) for c in request.filter.conditions],
        diversity=request.diversity,
        page_size=request.page_size,
        page_token=request.page_token,
        nprobe=request.params.nprobe,
        ef_search=request.params.ef_search,
        **read_mask_in(request.read_mask.paths),
        url_ttl_seconds=request.url_ttl_seconds,
    )


# ---------------------------------------------------------------------- protos out


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    if seconds:
        out.FromNanoseconds(int(seconds * 1e9))
    return out


def hits_out(hits: list[types.Hit]) -> list[gpb.SearchHit]:
    return [gpb.SearchHit(id=h.id, score=h.score, url=h.url,
                          metadata=metadata_to_proto(h.metadata) if h.metadata is not None else None) for h in hits]


def image_out(image: types.Image) -> gpb.Image:
    return gpb.Image(id=image.id, url=image.url, metadata=metadata_to_proto(image.metadata),
                     size_bytes=image.size_bytes, content_type=image.content_type)


def collection_out(c: types.CollectionInfo) -> ipb.Collection:
    return ipb.Collection(
        name=c.name, dim=c.dim, metric=METRICS.get(c.metric, ipb.METRIC_UNSPECIFIED), index_spec=c.index_spec,
        num_shards=c.num_shards, model_fingerprint=c.model_fingerprint, vector_count=c.vector_count,
        trained=c.trained, memory_bytes=c.memory_bytes, snapshot_age_seconds=c.snapshot_age_seconds,
        sequence=c.sequence, uid=c.uid,
    )


def job_errors_out(errors: list[types.JobError]) -> list[gpb.ImportError]:
    return [gpb.ImportError(source_key=e.key, status=item_status(error_for_code(e.code, e.message)))
            for e in errors]


def import_job_out(job: types.ImportJob) -> gpb.ImportJob:
    return gpb.ImportJob(
        job_id=job.job_id, collection=job.collection, source=job.source, state=IMPORT_STATES[job.state],
        total=job.total, processed=job.processed, imported=job.imported, skipped=job.skipped, failed=job.failed,
        errors=job_errors_out(job.errors), create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time), listing_done=job.listing_done,
    )


def repair_job_out(job: types.RepairJob) -> gpb.RepairJob:
    return gpb.RepairJob(
        job_id=job.job_id, collection=job.collection, dry_run=job.dry_run, state=REPAIR_STATES[job.state],
        checked=job.checked, reindexed=job.reindexed, dropped=job.dropped, removed=job.removed, failed=job.failed,
        dropped_ids=job.dropped_ids, errors=job_errors_out(job.errors), create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time),
    )


class GatewayServicer(gateway_service_pb2_grpc.GatewayServiceServicer):
    def __init__(self, engine: Gateway, imports: ImportJobs, repairs: RepairJobs):
        self.engine = engine
        self.imports = imports
        self.repairs = repairs

    async def SearchImages(self, request, context):
        result = await self.engine.search(search_in(request), deadline_of(context))
        return gpb.SearchImagesResponse(hits=hits_out(result.hits), next_page_token=result.next_page_token,
                                        partial=bool(result.missing_shards), missing_shards=result.missing_shards)

    async def BatchSearchImages(self, request, context):
        items = await self.engine.batch_search(request.collection, [search_in(q) for q in request.queries],
                                               deadline_of(context))
        return gpb.BatchSearchImagesResponse(results=[
            gpb.BatchSearchResult(status=item_status(item.error), hits=hits_out(item.result.hits),
                                  partial=bool(item.result.missing_shards),
                                  missing_shards=item.result.missing_shards)
            if item.error is None else gpb.BatchSearchResult(status=item_status(item.error))
            for item in items
        ])

    async def UploadImages(self, request, context):
        items = [types.UploadItem(item.data, metadata_in(item.metadata), item.filename) for item in request.items]
        results = await self.engine.upload(request.collection, items, deadline_of(context))
        return gpb.UploadImagesResponse(results=[
            gpb.UploadResult(status=item_status(r.error), id=r.id if r.error is None else "", created=r.created,
                             metadata_updated=r.metadata_updated)
            for r in results
        ])

    async def GetImage(self, request, context):
        image = await self.engine.get_image(request.collection, request.id, deadline_of(context),
                                            request.url_ttl_seconds)
        return gpb.GetImageResponse(image=image_out(image))

    async def UpdateImage(self, request, context):
        image = await self.engine.update_image(request.collection, request.id, metadata_in(request.metadata),
                                               list(request.update_mask.paths), deadline_of(context),
                                               request.url_ttl_seconds)
        return gpb.UpdateImageResponse(image=image_out(image))

    async def ListImages(self, request, context):
        images, token = await self.engine.list_images(request.collection, request.page_size, request.page_token,
                                                      deadline_of(context), request.url_ttl_seconds)
        return gpb.ListImagesResponse(images=[image_out(i) for i in images], next_page_token=token)

    async def DeleteImage(self, request, context):
        await self.engine.delete_image(request.collection, request.id, deadline_of(context))
        return gpb.DeleteImageResponse()

    async def ImportImages(self, request, context):
        job = await self.imports.import_images(request.collection, request.source,
                                                      metadata_in(request.metadata))
        return gpb.ImportImagesResponse(job=import_job_out(job))

    async def GetImportJob(self, request, context):
        job = self.imports.get(request.job_id)
        access.caller().require(READ, job.collection)
        return gpb.GetImportJobResponse(job=import_job_out(job))

    async def ListImportJobs(self, request, context):
        jobs, token = self.imports.list(request.collection, request.page_size, request.page_token,
                                        access.caller().can_read)
        if request.collection:
            access.caller().require(READ, self.engine.collections.resolve(request.collection))
        return gpb.ListImportJobsResponse(jobs=[import_job_out(j) for j in jobs], next_page_token=token)

    async def CancelImportJob(self, request, context):
        access.caller().require(WRITE, self.imports.get(request.job_id).collection)
        return gpb.CancelImportJobResponse(job=import_job_out(await self.imports.cancel(request.job_id)))

    async def RepairCollection(self, request, context):
        job = await self.repairs.repair(request.collection, request.dry_run)
        return gpb.RepairCollectionResponse(job=repair_job_out(job))

    async def GetRepairJob(self, request, context):
        job = self.repairs.get(request.job_id)
        access.caller().require(READ, job.collection)
        return gpb.GetRepairJobResponse(job=repair_job_out(job))

    async def CreateCollection(self, request, context):
        collection = await self.engine.create_collection(request.name, request.index_spec, request.num_shards,
                                                         deadline_of(context))
        return gpb.CreateCollectionResponse(collection=collection_out(collection))

    async def GetCollection(self, request, context):
        collection = await self.engine.get_collection(request.name, deadline_of(context))
        return gpb.GetCollectionResponse(collection=collection_out(collection))

    async def ListCollections(self, request, context):
        collections, token = await self.engine.list_collections(request.page_size, request.page_token,
                                                                deadline_of(context), access.caller().can_read)
        return gpb.ListCollectionsResponse(collections=[collection_out(c) for c in collections],
                                           next_page_token=token)

    async def DeleteCollection(self, request, context):
        deletion = await self.engine.delete_collection(request.name, deadline_of(context))
        return gpb.DeleteCollectionResponse(pending=deletion.pending, waiting_for_shards=deletion.waiting_for_shards)
