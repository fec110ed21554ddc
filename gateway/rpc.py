"""Plumbing for calls to the internal services: channels (optionally TLS/mTLS),
deadlines that shrink as a request proceeds, and the mapping of downstream gRPC
errors onto ``clipsearch.errors``."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clipsearch.errors import ClipsearchError, DeadlineExceeded, Unavailable, error_for_code

from gateway.settings import GatewaySettings


def channel_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    if not settings.internal_tls_ca:
        return None
    root = Path(settings.internal_tls_ca).read_bytes()
    key = Path(settings.internal_tls_key).read_bytes() if settings.internal_tls_key else None
    cert = Path(settings.internal_tls_cert).read_bytes() if settings.internal_tls_cert else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def make_channel(address: str, settings: GatewaySettings) -> grpc.aio.Channel:
    max_bytes = settings.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        # Reconnect quickly after a shard or the encoder restarts.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),  # retries are ours, so they respect our deadlines
        # Spread calls over every address the name resolves to (all encoder pods behind a
        # headless Service); an index shard's name resolves to its one pod.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    if settings.internal_tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.internal_tls_server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)


class Deadline:
    """The time left for one incoming request; downstream calls get what is left."""

    def __init__(self, seconds: float | None):
        self.expires = None if seconds is None else time.monotonic() + max(seconds, 0.0)

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(seconds)

    def remaining(self) -> float | None:
        return None if self.expires is None else self.expires - time.monotonic()

    def timeout(self, cap: float) -> float:
        """Seconds for the next downstream call: at most ``cap``, never past the deadline."""
        left = self.remaining()
        if left is None:
            return cap
        if left <= 0.001:
            raise DeadlineExceeded("the request deadline passed before the gateway could finish")
        return min(cap, left)

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0


def translate(error: grpc.aio.AioRpcError, what: str) -> ClipsearchError:
    """A ClipsearchError for a failed downstream call, keeping the field violation it named."""
    code = error.code()
    details = error.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"{what} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what} did not answer in time: {details}")
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # The caller did nothing wrong; an internal service misbehaved or refused the gateway.
        return Unavailable(f"{what} failed: {code.name}: {details}")
    exc = error_for_code(code.name, details)
    exc.field, exc.reason = _error_details(error)
    return exc


def _error_details(error: grpc.aio.AioRpcError) -> tuple[str | None, str | None]:
    """The violated field (google.rpc.BadRequest) and the reason (google.rpc.ErrorInfo), when given."""
    try:
        status = rpc_status.from_call(error)
    except Exception:  # noqa: BLE001 - malformed details are not worth failing over
        return None, None
    field = reason = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
    return field, reason
