"""Fixtures shared by every test area: a moto S3 server on loopback and a way
to run a service as a real subprocess on a free port."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from clipsearch import stack

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server over HTTP on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket on the moto server; yields (boto3 client, bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = name.strip("-") + f"-{int(time.time() * 1000) % 100000}"
    client.create_bucket(Bucket=name)
    yield client, name


class ServiceProcess(stack.ServiceProcess):
    """``clipsearch.stack.ServiceProcess`` with ``env`` added to this process's environment."""

    def __init__(self, module: str, args: list[str], workdir: Path, env: dict | None = None, name: str = ""):
        super().__init__(module, args, workdir, name=name, env={**os.environ, **(env or {})})


@pytest.fixture
def service_process(tmp_path):
    """Factory: ``service_process("index_service", ["--data-dir", ...])`` -> started ServiceProcess."""
    started: list[ServiceProcess] = []

    def start(module: str, args: list[str], env: dict | None = None, name: str = "", timeout: float = 120.0):
        proc = ServiceProcess(module, args, tmp_path, env=env, name=name or f"{module}-{len(started)}")
        started.append(proc)
        return proc.start(timeout)

    yield start
    for proc in started:
        proc.terminate(10)
