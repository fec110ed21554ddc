"""The server interceptor every service uses: gRPC metrics, request ids, and
engine errors (``clipsearch.errors``) sent as rich gRPC statuses (``clipsearch.status``)."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from clipsearch.errors import ClipsearchError, InvalidArgument
from clipsearch.server.logs import REQUEST_ID
from clipsearch.status import status_for_error

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, reason: str):
        self.reason = reason


def _tolerant(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return _Undecodable(str(exc) or "malformed bytes")

    return deserialize


class _MethodMetrics:
    """The metric children of one method, looked up once (``labels()`` takes a lock and hashes
    the label values on every call)."""

    def __init__(self, service: str, method: str):
        self.service, self.method = service, method
        self.started = STARTED.labels("unary", service, method)
        self.seconds = HANDLING_SECONDS.labels("unary", service, method)
        self._handled: dict[grpc.StatusCode, object] = {}

    def handled(self, code: grpc.StatusCode):
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = HANDLED.labels("unary", self.service, self.method, code.name)
        return child


def _request_id(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and value:
            return value
    return os.urandom(8).hex()


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Metrics, request ids and error mapping around every unary method.

    Every error carries the call's request id (from the caller's ``x-request-id``, or a
    new one) in the trailing metadata ``x-request-id``; the logs carry it too. An
    unexpected exception answers INTERNAL with that id and nothing of the exception.

    It runs on every call, so the wrapped handler of each method is built once
    and reused while the handler underneath stays the same object (the generated
    servicer's handlers do; a handler made per call, such as an auth refusal, is
    wrapped per call).
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        full_method = handler_call_details.method
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, full_method)
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        _, service, method = full_method.split("/")
        behavior = handler.unary_unary
        metrics = _MethodMetrics(service, method)

        async def observed(request, context: grpc.aio.ServicerContext):
            metrics.started.inc()
            request_id = _request_id(context.invocation_metadata())
            token = REQUEST_ID.set(request_id)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, _Undecodable):
                    raise InvalidArgument(
                        f"the request could not be parsed as {method}Request: {request.reason}. "
                        "String fields must hold valid UTF-8; send binary data in bytes fields."
                    )
                return await behavior(request, context)
            except ClipsearchError as error:
                code = grpc.StatusCode[error.code]
                if code in _RETRYABLE:  # nothing to fix but to retry, or to report the id
                    error = copy.copy(error)
                    error.message = f"{error.message} (request id {request_id})"
                status = status_for_error(error)
                log.info("%s/%s -> %s: %s", service, method, error.code, error.message)
                await context.abort(status.code, status.details,
                                    tuple(status.trailing_metadata) + ((REQUEST_ID_HEADER, request_id),))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary of every call
                context_code = context.code()
                if context_code not in (None, grpc.StatusCode.OK):
                    code = context_code  # the servicer aborted on purpose
                    raise
                code = grpc.StatusCode.INTERNAL
                # The exception's class, text and traceback go to the log only: they name paths and internals.
                log.exception("%s/%s failed", service, method)
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal error in {method}; report request id {request_id} (the server log has the details)",
                    ((REQUEST_ID_HEADER, request_id),),
                )
            finally:
                metrics.handled(code).inc()
                metrics.seconds.observe(time.perf_counter() - started)
                REQUEST_ID.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
