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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STACK_FILE = "stack.json"


def state_dir() -> Path:
    return Path(os.environ.get("CLIPSEARCH_STATE_DIR") or Path.home() / ".clipsearch")


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
    api_keys: list[str] = dataclasses.field(default_factory=list)
    device: str = "auto"


@dataclasses.dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    port_file: Path
    log_path: Path
    port: int = 0


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.children: list[_Child] = []
        self.data_dir = Path(config.data_dir).resolve()

    @property
    def gateway_address(self) -> str:
        return f"{self.config.host}:{self._child('gateway').port}"

    def _child(self, name: str) -> _Child:
        return next(c for c in self.children if c.name == name)

    def _spawn(self, name: str, module: str, args: list[str], port: int) -> _Child:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / "run" / f"{name}.port.json"
        port_file.parent.mkdir(parents=True, exist_ok=True)
        port_file.unlink(missing_ok=True)
        log_path = logs / f"{name}.log"
        log = open(log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_") or k == "CLIPSEARCH_CONFIG"}
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--host", self.config.host, "--port", str(port),
             "--port-file", str(port_file), "--drain-delay-seconds", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        child = _Child(name, proc, port_file, log_path)
        self.children.append(child)
        return child

    def _wait_ready(self, child: _Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                tail = child.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}; its log ends:\n{tail}")
            if child.port_file.exists():
                child.port = json.loads(child.port_file.read_text())["port"]
                with grpc.insecure_channel(f"{self.config.host}:{child.port}") as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{child.name} was not healthy after {timeout:.0f}s; see {child.log_path}")

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
                self._wait_ready(child, timeout)
            storage = cfg.storage or str(self.data_dir / "images")
            gateway_args = [
                "--encoder", f"{cfg.host}:{encoder.port}",
                "--index", ",".join(f"{cfg.host}:{s.port}" for s in shards),
                "--storage", storage, "--data-dir", str(self.data_dir / "gateway"),
                *(["--s3-endpoint-url", cfg.s3_endpoint_url] if cfg.s3_endpoint_url else []),
                *(["--api-keys", ",".join(cfg.api_keys)] if cfg.api_keys else []),
            ]
            self._wait_ready(self._spawn("gateway", "gateway", gateway_args, cfg.gateway_port), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def describe(self) -> dict:
        return {
            "pid": os.getpid(),
            "target": self.gateway_address,
            "data_dir": str(self.data_dir),
            "services": {c.name: {"address": f"{self.config.host}:{c.port}", "pid": c.proc.pid,
                                  "log": str(c.log_path)} for c in self.children},
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

    def first_exited(self) -> _Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the gateway first, then the shards and the encoder; kill what outlives ``timeout``."""
        for child in sorted(self.children, key=lambda c: c.name != "gateway"):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                if child.name == "gateway":
                    self._wait(child, timeout)
        for child in self.children:
            self._wait(child, timeout)
        self.forget()

    @staticmethod
    def _wait(child: _Child, timeout: float) -> None:
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
