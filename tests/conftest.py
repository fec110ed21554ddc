"""Fixtures shared by every test area: a moto S3 server on loopback and a way
to run a service as a real subprocess on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


class ServiceProcess:
    """A service started as ``python -m <module>`` with a port file, stopped on exit."""

    def __init__(self, module: str, args: list[str], workdir: Path, env: dict | None = None, name: str = ""):
        self.module = module
        self.args = args
        self.workdir = workdir
        self.name = name or module
        self.env = {**os.environ, **(env or {})}
        self.port_file = workdir / f"{self.name}.port.json"
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServiceProcess":
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port-file", str(self.port_file), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            if self.port_file.exists():
                info = json.loads(self.port_file.read_text())
                self.port, self.metrics_port = info["port"], info["metrics_port"]
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{self.name} did not start in {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


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
