"""``python -m gateway``: the public clipsearch API.

    python -m gateway --encoder HOST:PORT --index HOST:PORT[,HOST:PORT...] \\
        --storage s3://bucket/prefix|DIR --port P --metrics-port M [--http-port H]
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass

from clipsearch.errors import ClipsearchError
from clipsearch.gateway.v1 import gateway_service_pb2, gateway_service_pb2_grpc
from clipsearch.server.app import GrpcService, Registration, run_until_signalled
from clipsearch.server.logs import configure_logging
from clipsearch.server.settings import SettingsError

from gateway.access import KeyRing, SourceAllowList
from gateway.auth import AuthInterceptor
from gateway.engine import Gateway
from gateway.http_api import HttpApi, HttpServer
from gateway.imports import ImportJobs
from gateway.repair import RepairJobs
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings, load_gateway_settings


@dataclass
class Parts:
    engine: Gateway
    imports: ImportJobs
    repairs: RepairJobs

    async def start(self) -> None:
        await self.engine.start()
        await self.imports.start()
        await self.repairs.start()

    async def close(self) -> None:
        await self.imports.close()
        await self.repairs.close()
        await self.engine.close()


def build_service(settings: GatewaySettings) -> tuple[GrpcService, Parts, KeyRing]:
    engine = Gateway(settings)
    parts = Parts(
        engine,
        ImportJobs(settings, engine.collections, engine.ingestor),
        RepairJobs(settings, engine.collections, engine.shards, engine.storage, engine.ingestor),
    )
    keys = KeyRing(settings.api_keys_file, SourceAllowList(settings.import_sources),
                   settings.api_keys_reload_seconds)
    registration = Registration(
        gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"],
        gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server,
        GatewayServicer(engine, parts.imports, parts.repairs),
    )
    auth = AuthInterceptor(keys, settings.default_collection, reflection_needs_key=settings.reflection == "auth")
    service = GrpcService(settings, [registration], name="gateway", extra_interceptors=[auth],
                          reflection=settings.reflection != "off")
    return service, parts, keys


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_gateway_settings(argv)
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run(serve(settings))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClipsearchError as exc:
        print(f"error: gateway could not start: {exc.message}", file=sys.stderr)
        return 1
    return 0


async def serve(settings: GatewaySettings) -> None:
    # Built inside the running loop: grpc.aio channels belong to the loop that made them.
    service, parts, keys = build_service(settings)
    if keys.enabled:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keys.reload)
    http = None

    async def load() -> None:
        nonlocal http
        await parts.start()
        if settings.http_port >= 0:
            http = HttpServer(HttpApi(settings, service.registrations[0].servicer, parts.engine, keys).app(), settings)
            await http.start()
            service.extra_ports["http_port"] = http.port

    async def shutdown() -> None:
        if http is not None:
            await http.stop()
        await parts.close()

    await run_until_signalled(service, load=load, shutdown=shutdown, port_file=settings.port_file)


if __name__ == "__main__":
    sys.exit(main())
