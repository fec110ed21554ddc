"""The gRPC server every service runs on: health, reflection, metrics, message
limits, optional TLS, and SIGTERM -> NOT_SERVING -> drain -> exit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from clipsearch.server.interceptor import ServerInterceptor
from clipsearch.server.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Registration:
    """One gRPC service to serve: its descriptor, the generated add function, and the servicer."""

    service_descriptor: Any  # google.protobuf.descriptor.ServiceDescriptor
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any

    @property
    def full_name(self) -> str:
        return self.service_descriptor.full_name


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    if not settings.tls_key:
        raise ValueError("tls_cert is set but tls_key is not; both are needed for TLS")
    cert = Path(settings.tls_cert).read_bytes()
    key = Path(settings.tls_key).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class GrpcService:
    """A started gRPC server with health (NOT_SERVING until told otherwise),
    reflection, the metrics interceptor and the message/concurrency limits."""

    def __init__(self, settings: ServerSettings, registrations: Sequence[Registration], name: str,
                 extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (), reflection: bool = True):
        self.settings = settings
        self.reflection = reflection
        self.extra_interceptors = list(extra_interceptors)
        self.registrations = list(registrations)
        self.name = name
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self.health: health.aio.HealthServicer | None = None
        self.server: grpc.aio.Server | None = None
        # More ports for the port file, e.g. {"http_port": ...} of a second front.
        self.extra_ports: dict[str, int] = {}

    def _build_server(self) -> grpc.aio.Server:
        """Builds the server; must run inside the event loop that will serve it."""
        max_bytes = self.settings.max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if self.settings.max_connection_age_seconds > 0:
            options += [
                ("grpc.max_connection_age_ms", int(self.settings.max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.settings.grace_seconds * 1000)),
            ]
        server = grpc.aio.server(
            interceptors=[ServerInterceptor(), *self.extra_interceptors],
            options=options,
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        for registration in self.registrations:
            registration.add_to_server(registration.servicer, server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [r.full_name for r in self.registrations]
        if self.reflection:
            reflection.enable_server_reflection(
                names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
                server,
            )
        return server

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        self.server = self._build_server()
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        bind = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(bind)
        else:
            self.port = self.server.add_secure_port(bind, credentials)
        if not self.port:
            raise OSError(f"could not bind {bind}")
        await self.server.start()
        if self.settings.metrics_port >= 0:
            self._metrics_server, _ = start_http_server(self.settings.metrics_port, addr=self.settings.host)
            self.metrics_port = self._metrics_server.server_port
        log.info("%s listening on %s (metrics port %s)", self.name, self.address, self.metrics_port)

    async def _set_all(self, status) -> None:
        await self.health.set("", status)
        for registration in self.registrations:
            await self.health.set(registration.full_name, status)

    async def set_serving(self, serving: bool) -> None:
        await self._set_all(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def stop(self, grace: float | None = None, drain_delay: float = 0.0) -> None:
        """NOT_SERVING; keep answering for ``drain_delay`` seconds so load balancers
        notice; then refuse new calls and let in-flight ones finish within ``grace``."""
        await self.set_serving(False)
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        if self.server is None:
            return
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        self.server = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None

    def write_port_file(self, path: str) -> None:
        """Writes {"port", "metrics_port", extra ports, "pid"} atomically, for callers that bound port 0."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port, **self.extra_ports,
                                   "pid": os.getpid()}))
        os.replace(tmp, target)


async def run_until_signalled(
    service: GrpcService,
    *,
    load: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    port_file: str = "",
    stop_event: asyncio.Event | None = None,
) -> None:
    """Start the server, load the engine, serve until SIGTERM/SIGINT, then drain.

    Health is NOT_SERVING while ``load`` runs and again from the moment the
    signal arrives; in-flight calls get the grace period to finish.
    """
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_event.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await service.start()
    try:
        await load()
        await service.set_serving(True)
        if port_file:
            service.write_port_file(port_file)
        log.info("%s serving on %s", service.name, service.address)
        print(f"{service.name} serving on {service.address} metrics={service.metrics_port}", flush=True)
        await stop_event.wait()
        log.info("%s draining (grace %.1fs)", service.name, service.settings.grace_seconds)
        await service.stop(drain_delay=service.settings.drain_delay_seconds)
    finally:
        await service.stop()
        await shutdown()
        log.info("%s stopped", service.name)
