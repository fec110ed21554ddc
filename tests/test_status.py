"""Errors cross gRPC with their field and reason: a server raises a
``clipsearch.errors`` exception, the shared interceptor sends it as a rich
status, and every kind of caller gets the same exception back."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from google.rpc import code_pb2, status_pb2

from clipsearch.client import AsyncClient, Client
from clipsearch.errors import ClipsearchError, FailedPrecondition, InvalidArgument, NotFound
from clipsearch.gateway.v1 import gateway_service_pb2 as pb
from clipsearch.gateway.v1 import gateway_service_pb2_grpc
from clipsearch.server.app import GrpcService, Registration
from clipsearch.server.settings import ServerSettings
from clipsearch.status import error_from_rpc

DETAILS_KEY = "grpc-status-details-bin"


class FailingGateway(gateway_service_pb2_grpc.GatewayServiceServicer):
    """GetCollection fails in the way its ``name`` asks for."""

    async def GetCollection(self, request, context):
        if request.name == "rich":
            raise InvalidArgument("name is reserved", field="name", reason="RESERVED_NAME")
        if request.name == "field-only":
            raise NotFound("collection 'field-only' does not exist", field="name")
        if request.name == "garbage-details":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad", ((DETAILS_KEY, b"\xff\x00not a proto"),))
        if request.name == "mismatched-details":
            other = status_pb2.Status(code=code_pb2.NOT_FOUND, message="something else")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad", ((DETAILS_KEY, other.SerializeToString()),))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no details")


@contextlib.asynccontextmanager
async def failing_gateway():
    service = GrpcService(ServerSettings(host="127.0.0.1", port=0, metrics_port=-1), [Registration(
        pb.DESCRIPTOR.services_by_name["GatewayService"],
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server,
        FailingGateway())], name="failing-gateway")
    await service.start()
    try:
        yield service.address
    finally:
        await service.stop(grace=0)


def sync_client_error(address: str, name: str) -> ClipsearchError:
    with Client(address, timeout=5, retries=0) as client:
        with pytest.raises(ClipsearchError) as info:
            client.get_collection(name)
    return info.value


def stub_error(address: str, name: str) -> ClipsearchError:
    with grpc.insecure_channel(address) as channel:
        stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=5)
    return error_from_rpc(info.value)


async def errors_seen_by_every_caller(name: str) -> list[ClipsearchError]:
    async with failing_gateway() as address:
        async with AsyncClient(address, timeout=5, retries=0) as client:
            with pytest.raises(ClipsearchError) as async_info:
                await client.get_collection(name)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_service_pb2_grpc.GatewayServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as aio_info:
                await stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=5)
        return [
            await asyncio.to_thread(sync_client_error, address, name),
            await asyncio.to_thread(stub_error, address, name),
            async_info.value,
            error_from_rpc(aio_info.value),
        ]


@pytest.mark.parametrize("name, cls, message, field, reason", [
    ("rich", InvalidArgument, "name is reserved", "name", "RESERVED_NAME"),
    ("field-only", NotFound, "collection 'field-only' does not exist", "name", None),
    ("no-details", FailedPrecondition, "no details", None, None),
    ("garbage-details", InvalidArgument, "bad", None, None),
    ("mismatched-details", InvalidArgument, "bad", None, None),
])
def test_sync_and_async_callers_get_the_servers_error_with_its_field_and_reason(name, cls, message, field, reason):
    errors = asyncio.run(errors_seen_by_every_caller(name))
    assert len(errors) == 4
    for error in errors:
        assert (type(error), error.message, error.field, error.reason) == (cls, message, field, reason)


def test_an_rpc_error_that_is_not_a_call_is_unknown():
    error = error_from_rpc(grpc.RpcError("channel closed"))
    assert (error.code, error.message, error.field, error.reason) == ("UNKNOWN", "channel closed", None, None)
