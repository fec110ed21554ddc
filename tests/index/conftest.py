"""Fixtures for the index service tests: in-process engines and real service processes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from clipsearch.index.v1 import index_service_pb2_grpc
from index_service.engine import IndexEngine


@pytest.fixture
def open_engine(tmp_path):
    """Factory: ``open_engine(data_dir=None, **kwargs)`` -> an opened IndexEngine, closed after the test."""
    engines: list[IndexEngine] = []

    def open_(data_dir: Path | None = None, **kwargs) -> IndexEngine:
        kwargs.setdefault("build_threads", 1)
        engine = IndexEngine(data_dir or tmp_path / "engine", **kwargs)
        engine.open()
        engines.append(engine)
        return engine

    yield open_
    for engine in engines:
        engine.close()


class IndexClient:
    """A started index_service process and a stub on it."""

    def __init__(self, process):
        self.process = process
        self.channel = grpc.insecure_channel(process.address)
        self.stub = index_service_pb2_grpc.IndexServiceStub(self.channel)

    def close(self):
        self.channel.close()


@pytest.fixture
def start_index(service_process, tmp_path):
    """Factory: ``start_index(data_dir, *extra_flags, env=None)`` -> IndexClient on a fresh index_service."""
    clients: list[IndexClient] = []

    def start(data_dir: Path | None = None, *flags: str, env: dict | None = None) -> IndexClient:
        args = ["--data-dir", str(data_dir or tmp_path / "data"), "--metrics-port", "0",
                "--build-threads", "1", "--log-level", "INFO", "--drain-delay-seconds", "0", *flags]
        client = IndexClient(service_process("index_service", args, env=env))
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()
