"""The thin gRPC side of ``gateway.access``: a server interceptor that takes the
key from ``authorization: Bearer <key>``, authenticates it, makes it the call's
caller, checks the scope the method needs on the request's collection, and
writes the audit line of write and admin calls.

Health stays open (probes need no key). Reflection is open, behind a valid key
(``reflection: auth``), or off (``reflection: off``; then it is never
registered). Errors are raised as ``clipsearch.errors`` inside the handler, so
the shared interceptor turns them into statuses and counts them like any other
call.
"""

from __future__ import annotations

import grpc

from clipsearch.errors import ClipsearchError

from gateway.access import KeyRing, authorized, bearer_secret

PROTECTED_PREFIX = "/clipsearch.gateway.v1.GatewayService/"
REFLECTION_PREFIX = "/grpc.reflection."


def bearer_key(metadata) -> str | None:
    """The key from ``authorization: Bearer <key>``; None when the header is absent."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return bearer_secret(value)
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyRing, default_collection: str, reflection_needs_key: bool = False):
        self.keys = keys
        self.default_collection = default_collection
        self.reflection_needs_key = reflection_needs_key
        # The wrapped handler of each method, reused while the handler underneath stays the same.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method.startswith(PROTECTED_PREFIX):
            cached = self._wrapped.get(method)
            if cached is None or cached[0] is not handler:
                cached = self._wrapped[method] = (handler, self._guard(handler, method[len(PROTECTED_PREFIX):]))
            return cached[1]
        if method.startswith(REFLECTION_PREFIX) and self.reflection_needs_key and self.keys.enabled:
            return self._guard_stream(handler)
        return handler

    def _guard(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary

        async def guarded(request, context):
            return await authorized(self.keys, self.default_collection, method, request,
                                    bearer_key(context.invocation_metadata()), lambda: behavior(request, context))

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guard_stream(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.stream_stream

        async def guarded(request_iterator, context):
            try:
                self.keys.authenticate(bearer_key(context.invocation_metadata()))
            except ClipsearchError as error:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.message)
            async for response in behavior(request_iterator, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
