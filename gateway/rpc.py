"""Plumbing for calls to the internal services: channels (optionally TLS/mTLS)
whose service config retries UNAVAILABLE, and the mapping of downstream gRPC
errors onto ``clipsearch.errors``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
from clipsearch.errors import ClipsearchError, DeadlineExceeded, Unavailable
from clipsearch.server.interceptor import REQUEST_ID_HEADER
from clipsearch.server.logs import REQUEST_ID
from clipsearch.status import error_from_rpc

from gateway.settings import GatewaySettings


def channel_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    if not settings.internal_tls_ca:
        return None
    root = Path(settings.internal_tls_ca).read_bytes()
    key = Path(settings.internal_tls_key).read_bytes() if settings.internal_tls_key else None
    cert = Path(settings.internal_tls_cert).read_bytes() if settings.internal_tls_cert else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


# Every encoder and index method is idempotent (upserts and deletes are by id), so a
# call that found the service unreachable is retried by gRPC itself, within the
# call's own deadline. A repeated CreateCollection answers ALREADY_EXISTS, which the
# shard fan-out accepts.
INTERNAL_SERVICES = ("clipsearch.encoder.v1.EncoderService", "clipsearch.index.v1.IndexService")


def service_config(settings: GatewaySettings) -> str:
    return json.dumps({"methodConfig": [{
        "name": [{"service": service} for service in INTERNAL_SERVICES],
        "retryPolicy": {
            "maxAttempts": settings.internal_retries + 1,
            "initialBackoff": f"{settings.retry_backoff_seconds}s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


def make_channel(address: str, settings: GatewaySettings) -> grpc.aio.Channel:
    max_bytes = settings.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        # Reconnect quickly after a shard or the encoder restarts.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 1 if settings.internal_retries > 0 else 0),
        # Spread calls over every address the name resolves to (all encoder pods behind a
        # headless Service); an index shard's name resolves to its one pod.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if settings.internal_retries > 0:
        options.append(("grpc.service_config", service_config(settings)))
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    if settings.internal_tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.internal_tls_server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)


log = logging.getLogger(__name__)


def call_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata of a downstream call: the request id of the call being served, so the
    services' logs line up with the gateway's."""
    request_id = REQUEST_ID.get()
    return ((REQUEST_ID_HEADER, request_id),) if request_id != "-" else ()


def translate(error: grpc.aio.AioRpcError, what: str, where: str = "") -> ClipsearchError:
    """A ClipsearchError for a failed downstream call. Errors about the request
    (INVALID_ARGUMENT, NOT_FOUND, ...) pass through with their message, field and reason.
    Failures of the service itself say only ``what`` failed: the downstream details (its
    address ``where``, exception text, paths) go to the log under the request id."""
    code = error.code()
    details = error.details() or ""
    outage = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED,
                      grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    if outage:
        log.warning("%s at %s: %s: %s", what, where or "?", code.name, details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"{what} is unavailable; retry later")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what} did not answer in time")
    if outage:
        # The caller did nothing wrong; an internal service misbehaved or refused the gateway.
        return Unavailable(f"{what} failed ({code.name}); retry later")
    return error_from_rpc(error)
