"""The GatewayService servicer: thin. It turns the call's deadline into a
Deadline and hands the request to the engine; errors the engine raises become
gRPC statuses in the shared interceptor."""

from __future__ import annotations

import grpc

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.gateway.v1 import gateway_service_pb2_grpc

from gateway.engine import Gateway
from gateway.rpc import Deadline


def deadline_of(context: grpc.aio.ServicerContext) -> Deadline:
    return Deadline(context.time_remaining())


class GatewayServicer(gateway_service_pb2_grpc.GatewayServiceServicer):
    def __init__(self, engine: Gateway):
        self.engine = engine

    async def SearchImages(self, request, context):
        return await self.engine.search(request, deadline_of(context))

    async def UploadImages(self, request, context):
        return await self.engine.upload(request, deadline_of(context))

    async def GetImage(self, request, context):
        return await self.engine.get_image(request, deadline_of(context))

    async def ListImages(self, request, context):
        return await self.engine.list_images(request, deadline_of(context))

    async def DeleteImage(self, request, context):
        return await self.engine.delete_image(request, deadline_of(context))

    async def ImportImages(self, request, context):
        return gpb.ImportImagesResponse(job=await self.engine.imports.import_images(request))

    async def GetImportJob(self, request, context):
        return gpb.GetImportJobResponse(job=self.engine.imports.get(request.job_id))

    async def CreateCollection(self, request, context):
        return await self.engine.create_collection(request, deadline_of(context))

    async def GetCollection(self, request, context):
        return await self.engine.get_collection(request, deadline_of(context))

    async def ListCollections(self, request, context):
        return await self.engine.list_collections(request, deadline_of(context))

    async def DeleteCollection(self, request, context):
        return await self.engine.delete_collection(request, deadline_of(context))
