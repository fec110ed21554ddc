"""gRPC statuses to and from ``clipsearch.errors`` exceptions, with the
google.rpc details that carry an error's ``field`` (BadRequest) and ``reason``
(ErrorInfo). Servers send with ``status_for_error``; clients, the SDK and
services calling each other read back with ``error_from_rpc``."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from clipsearch.errors import ClipsearchError, error_for_code

ERROR_DOMAIN = "clipsearch"
# Trailer with an error's retry hint in milliseconds, for callers that do not parse
# google.rpc.RetryInfo (it carries the same figure).
RETRY_AFTER_TRAILER = "retry-after-ms"


# The HTTP status of each gRPC code (google.rpc.Code's documented mapping, as Envoy's
# gRPC-JSON transcoder and grpc-gateway use).
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500,
}


def status_for_error(error: ClipsearchError) -> grpc.Status:
    """A rich gRPC status for an error: its code and message, plus its field and reason when set."""
    status = status_proto(error)
    rich = rpc_status.to_status(status)
    if error.retry_after is None:
        return rich
    trailer = (RETRY_AFTER_TRAILER, str(max(0, round(error.retry_after * 1000))))
    return rich._replace(trailing_metadata=(*rich.trailing_metadata, trailer))


def status_proto(error: ClipsearchError) -> status_pb2.Status:
    """The google.rpc.Status of an error: code, message and BadRequest/ErrorInfo/RetryInfo details."""
    details = []
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.reason:
        details.append(_packed(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)))
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(0, round(error.retry_after * 1000)))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message, details=details)


def error_from_rpc(error: grpc.RpcError) -> ClipsearchError:
    """The ``clipsearch.errors`` exception for a failed call (sync or asyncio), with the field
    and reason the server attached. Missing or malformed details are ignored."""
    if isinstance(error, (grpc.Call, grpc.aio.AioRpcError)):
        code, message = error.code(), error.details()
    else:  # a bare RpcError carries no status
        code, message = None, str(error)
    exc = error_for_code(code.name if code else "UNKNOWN", message or "")
    exc.field, exc.reason, exc.retry_after = _field_reason_and_retry(error)
    return exc


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _field_reason_and_retry(error: grpc.RpcError) -> tuple[str | None, str | None, float | None]:
    """The first violated field (google.rpc.BadRequest), the reason (google.rpc.ErrorInfo) and the
    retry delay in seconds (google.rpc.RetryInfo), when sent."""
    try:
        status = rpc_status.from_call(error)
    except Exception:  # noqa: BLE001 - not a call, or details that do not parse or match the status
        return None, None, None
    field = reason = retry_after = None
    for detail in status.details if status is not None else ():
        if field is None and detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request) and bad_request.field_violations:
                field = bad_request.field_violations[0].field or None
        elif reason is None and detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason or None
        elif retry_after is None and detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                retry_after = retry.retry_delay.ToMilliseconds() / 1000
    return field, reason, retry_after
