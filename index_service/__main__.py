"""``python -m index_service --data-dir DIR --port P --metrics-port M``: one index shard process.

Health stays NOT_SERVING while the collections load (snapshot + replay); on
SIGTERM the service drains in-flight calls, snapshots changed collections
(``--snapshot-on-shutdown``) and exits.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from clipsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from clipsearch.server.app import GrpcService, Registration, run_until_signalled
from clipsearch.server.logs import configure_logging
from clipsearch.server.settings import load_settings
from index_service.backup import S3Backup
from index_service.engine import IndexEngine
from index_service.memory import configure_malloc
from index_service.servicer import IndexServicer
from index_service.settings import IndexSettings

log = logging.getLogger("index_service")


def build_engine(settings: IndexSettings) -> IndexEngine:
    backup = S3Backup(settings.backup_s3_uri, settings.s3_endpoint_url) if settings.backup_s3_uri else None
    return IndexEngine(
        settings.data_dir,
        snapshot_interval_seconds=settings.snapshot_interval_seconds,
        snapshot_on_close=settings.snapshot_on_shutdown,
        auto_train=settings.auto_train,
        backup=backup,
        build_threads=settings.build_threads or None,
        metadata_limits=settings.metadata_limits(),
    )


async def serve(settings: IndexSettings) -> None:
    engine = build_engine(settings)
    service = GrpcService(
        settings,
        [Registration(
            index_service_pb2.DESCRIPTOR.services_by_name["IndexService"],
            index_service_pb2_grpc.add_IndexServiceServicer_to_server,
            IndexServicer(engine, settings.inline_search_max_ms),
        )],
        name="index",
    )

    async def load() -> None:
        await asyncio.to_thread(engine.open)

    async def shutdown() -> None:
        await asyncio.to_thread(engine.close)

    await run_until_signalled(service, load=load, shutdown=shutdown, port_file=settings.port_file)


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(
        IndexSettings,
        section="index",
        argv=argv,
        prog="python -m index_service",
        description="clipsearch index service: durable, sharded FAISS collections over gRPC.",
    )
    configure_logging(settings.log_level, settings.log_json)
    configure_malloc()
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
