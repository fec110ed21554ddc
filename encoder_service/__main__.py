"""``python -m encoder_service``: serve an open_clip model over gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from clipsearch.encoder.v1 import encoder_service_pb2, encoder_service_pb2_grpc
from clipsearch.server.app import GrpcService, Registration, run_until_signalled
from clipsearch.server.logs import configure_logging
from clipsearch.server.settings import ServerSettings, SettingsError, load_settings
from encoder_service.engine import EncoderConfig, EncoderEngine
from encoder_service.model import ModelLoadError
from encoder_service.servicer import EncoderServicer


@dataclasses.dataclass
class EncoderSettings(EncoderConfig, ServerSettings):
    """Encoder settings: the model and batching (EncoderConfig) plus the server's."""


def build_service(settings: EncoderSettings) -> tuple[GrpcService, EncoderEngine]:
    engine = EncoderEngine(settings)
    registration = Registration(
        encoder_service_pb2.DESCRIPTOR.services_by_name["EncoderService"],
        encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server,
        EncoderServicer(engine),
    )
    return GrpcService(settings, [registration], name="encoder"), engine


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(
            EncoderSettings, section="encoder", argv=argv, prog="python -m encoder_service",
            description="Serve CLIP text and image embeddings over gRPC (clipsearch.encoder.v1.EncoderService).",
        )
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    service, engine = build_service(settings)
    try:
        asyncio.run(run_until_signalled(service, load=engine.start, shutdown=engine.close,
                                        port_file=settings.port_file))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
