"""Fixtures for gateway integration tests: one tiny-model encoder and two index
shard processes for the session, gateways started as real subprocesses."""

from __future__ import annotations

import hashlib
import io
import json
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.gateway.v1 import gateway_service_pb2_grpc
from clipsearch.index.v1 import index_service_pb2_grpc
from tests.conftest import ServiceProcess

TINY = ["--model", "clipsearch-tiny", "--pretrained", "none"]


def noise_pixels(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def noise_image(seed: int, size: int = 64) -> bytes:
    """A distinct random-noise PNG."""
    return encode(noise_pixels(seed, size))


def near_duplicate(seed: int, variant: int, amount: int = 3) -> bytes:
    """Image ``seed`` with a small random perturbation: other bytes, almost the same picture."""
    base = noise_pixels(seed).astype(np.int16)
    noise = np.random.default_rng(10_000 + variant).integers(-amount, amount + 1, base.shape)
    return encode(np.clip(base + noise, 0, 255).astype(np.uint8))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


class Client:
    """A sync gateway stub that adds the API key (when given) to every call."""

    def __init__(self, address: str, api_key: str | None = None):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                               ("grpc.max_send_message_length", 64 << 20)])
        self.stub = gateway_service_pb2_grpc.GatewayServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else None

    def __getattr__(self, method):
        call = getattr(self.stub, method)
        return lambda request, **kw: call(request, metadata=kw.pop("metadata", self.metadata),
                                          timeout=kw.pop("timeout", 30), **kw)

    def upload(self, datas, collection: str = "", metadata=None, timeout: float = 30) -> list[gpb.UploadResult]:
        items = [gpb.UploadItem(data=d, metadata=(metadata[i] if metadata else None)) for i, d in enumerate(datas)]
        return list(self.UploadImages(gpb.UploadImagesRequest(collection=collection, items=items),
                                      timeout=timeout).results)

    def search(self, *parts: gpb.QueryPart, timeout: float = 30, **fields) -> gpb.SearchImagesResponse:
        return self.SearchImages(gpb.SearchImagesRequest(parts=list(parts), **fields), timeout=timeout)

    def wait_import(self, job_id: str, timeout: float = 120) -> gpb.ImportJob:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.GetImportJob(gpb.GetImportJobRequest(job_id=job_id)).job
            if job.state != gpb.IMPORT_STATE_RUNNING:
                return job
            time.sleep(0.1)
        raise TimeoutError(f"import {job_id} still running after {timeout}s")

    def close(self):
        self.channel.close()


def index_stub(address: str):
    return index_service_pb2_grpc.IndexServiceStub(grpc.insecure_channel(address))


@pytest.fixture(scope="session")
def encoder_service(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gw-encoder")
    proc = ServiceProcess("encoder_service", [*TINY, "--port", "0", "--max-queue-delay-ms", "2"], workdir,
                          name="encoder").start()
    yield proc
    proc.terminate()


def start_index_shards(workdir: Path, count: int = 2, prefix: str = "index") -> list[ServiceProcess]:
    shards = []
    for i in range(count):
        data = workdir / f"{prefix}-{i}"
        data.mkdir(parents=True, exist_ok=True)
        shards.append(ServiceProcess("index_service", ["--data-dir", str(data), "--port", "0"], workdir,
                                     name=f"{prefix}-{i}").start())
    return shards


@pytest.fixture(scope="session")
def index_shards(tmp_path_factory):
    """Two index shard processes shared by the gateway tests (each gateway uses its own collection)."""
    shards = start_index_shards(tmp_path_factory.mktemp("gw-index"))
    yield shards
    for shard in shards:
        shard.terminate()


def start_gateway(workdir: Path, encoder: ServiceProcess, shards: list[ServiceProcess], *args: str,
                  name: str = "gateway", env: dict | None = None) -> ServiceProcess:
    argv = [
        "--encoder", encoder.address, "--index", ",".join(s.address for s in shards),
        "--port", "0", "--metrics-port", "0", "--page-token-secret", "test-secret",
        "--data-dir", str(workdir / f"{name}-data"), "--grace-seconds", "1", "--drain-delay-seconds", "0",
        *args,
    ]
    return ServiceProcess("gateway", argv, workdir, name=name, env=env).start(timeout=60)


def read_port_file(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def client(gateway):
    """A ``Client`` of the module's ``gateway`` fixture."""
    c = Client(gateway.address)
    yield c
    c.close()
