"""A local clipsearch stack: encoder, N index shards and the gateway as
subprocesses over one data dir. Used by ``clipsearch up`` and ``clipsearch demo``.

The running stack is recorded in ``<state dir>/stack.json`` (state dir:
``$CLIPSEARCH_STATE_DIR`` or ``~/.clipsearch``), so the other CLI commands find
it without flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STACK_FILE = "stack.json"


def state_dir() -> Path:
    return Path(os.environ.get("CLIPSEARCH_STATE_DIR") or Path.home() / ".clipsearch")


def default_data_dir() -> Path:
    """Where `clipsearch up` keeps shards, images and logs unless --data-dir says otherwise: <state dir>/data."""
    return state_dir() / "data"


def demo_model_dir() -> Path:
    """The bundled demo model: $CLIPSEARCH_DEMO_MODEL, the source checkout's models/demo, or ./models/demo."""
    candidates = [os.environ.get("CLIPSEARCH_DEMO_MODEL", ""),
                  Path(__file__).resolve().parents[3] / "models" / "demo", Path.cwd() / "models" / "demo"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "open_clip_config.json").is_file():
            return Path(candidate)
    raise FileNotFoundError("the demo model was not found; set CLIPSEARCH_DEMO_MODEL to the models/demo folder")


def read_stack() -> dict | None:
    path = state_dir() / STACK_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    try:
        os.kill(info["pid"], 0)
    except (OSError, KeyError):
        return None  # a stack that is no longer running
    return info


@dataclasses.dataclass
class StackConfig:
    data_dir: Path
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    shards: int = 2
    storage: str = ""  # default: <data_dir>/images
    host: str = "127.0.0.1"
    gateway_port: int = 50050
    encoder_port: int = 0
    index_ports: list[int] = dataclasses.field(default_factory=list)  # default: free ports
    s3_endpoint_url: str = ""
    api_keys_file: str = ""  # the gateway's YAML keys file; empty = auth off
    http_port: int = -1  # the gateway's HTTP/JSON API and web page (0 = any free port, -1 = off)
    device: str = "auto"


class ServiceProcess:
    """One service run as ``python -m <module> --port-file F ...``, ready once its
    port file exists and its health check says SERVING."""

    def __init__(self, module: str, args: Sequence[str], workdir: Path, *, name: str = "",
                 host: str = "127.0.0.1", port: int = 0, env: Mapping[str, str] | None = None):
        self.module = module
        self.name = name or module
        self.host = host
        self.args = ["--host", host, "--port", str(port), *args]
        self.workdir = Path(workdir)
        self.env = dict(os.environ if env is None else env)
        self.port_file = self.workdir / f"{self.name}.port.json"
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # the gateway's HTTP front, when it serves one

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def spawn(self) -> "ServiceProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--port-file", str(self.port_file), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 300.0) -> "ServiceProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; its log ends:\n"
                                   f"{self.log_text()[-3000:]}")
            if self.port_file.exists():
                info = json.loads(self.port_file.read_text())
                self.port, self.metrics_port = info["port"], info["metrics_port"]
                self.http_port = info.get("http_port")
                with grpc.insecure_channel(self.address) as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"{self.name} was not healthy after {timeout:.0f}s; its log ends:\n"
                           f"{self.log_text()[-3000:]}")

    def start(self, timeout: float = 300.0) -> "ServiceProcess":
        return self.spawn().wait_ready(timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Exit code; kills the process if it outlives ``timeout``."""
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.children: list[ServiceProcess] = []
        self.data_dir = Path(config.data_dir).resolve()

    @property
    def gateway_address(self) -> str:
        return self._child("gateway").address

    def _child(self, name: str) -> ServiceProcess:
        return next(c for c in self.children if c.name == name)

    def _spawn(self, name: str, module: str, args: list[str], port: int) -> ServiceProcess:
        # CLIPSEARCH_* settings reach every service; the flags below (host, ports, data dirs) win over them.
        child = ServiceProcess(module, ["--drain-delay-seconds", "0", "--metrics-port", "0", *args],
                               self.data_dir / "logs", name=name, host=self.config.host, port=port,
                               env=dict(os.environ))
        self.children.append(child)
        return child.spawn()

    def start(self, timeout: float = 300.0) -> "LocalStack":
        cfg = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            encoder = self._spawn("encoder", "encoder_service", [
                "--model", cfg.model, "--pretrained", cfg.pretrained, "--device", cfg.device,
                *(["--s3-endpoint-url", cfg.s3_endpoint_url] if cfg.s3_endpoint_url else []),
            ], cfg.encoder_port)
            shards = [
                self._spawn(f"index-{i}", "index_service", ["--data-dir", str(self.data_dir / f"index-{i}")],
                            cfg.index_ports[i] if i < len(cfg.index_ports) else 0)
                for i in range(cfg.shards)
            ]
            for child in [*shards, encoder]:
                child.wait_ready(timeout)
            storage = cfg.storage or str(self.data_dir / "images")
            gateway_args = [
                "--encoder", f"{cfg.host}:{encoder.port}",
                "--index", ",".join(f"{cfg.host}:{s.port}" for s in shards),
                "--storage", storage, "--data-dir", str(self.data_dir / "gateway"),
                *(["--s3-endpoint-url", cfg.s3_endpoint_url] if cfg.s3_endpoint_url else []),
                *(["--api-keys-file", cfg.api_keys_file] if cfg.api_keys_file else []),
                *(["--http-port", str(cfg.http_port)] if cfg.http_port >= 0 else []),
            ]
            self._spawn("gateway", "gateway", gateway_args, cfg.gateway_port).wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def describe(self) -> dict:
        return {
            "pid": os.getpid(),
            "target": self.gateway_address,
            "data_dir": str(self.data_dir),
            "services": {c.name: {"address": c.address, "pid": c.proc.pid, "log": str(c.log_path),
                                  "metrics": f"http://{c.host}:{c.metrics_port}/metrics" if c.metrics_port else "",
                                  "web": f"http://{c.host}:{c.http_port}/" if c.http_port else ""}
                         for c in self.children},
        }

    def record(self) -> Path:
        path = state_dir() / STACK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2))
        os.replace(tmp, path)
        return path

    def forget(self) -> None:
        path = state_dir() / STACK_FILE
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass

    def first_exited(self) -> ServiceProcess | None:
        return next((c for c in self.children if not c.running()), None)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the gateway first, then the shards and the encoder; kill what outlives ``timeout``."""
        for child in sorted(self.children, key=lambda c: c.name != "gateway"):
            child.signal(signal.SIGTERM)
            if child.name == "gateway":
                child.wait(timeout)
        for child in self.children:
            child.wait(timeout)
        self.forget()
