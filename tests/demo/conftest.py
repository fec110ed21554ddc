from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL_DIR = REPO_ROOT / "models" / "demo"


@pytest.fixture(scope="session")
def demo_model():
    """The shipped demo model, loaded the way the encoder service loads any local folder."""
    from encoder_service.model import load_model

    return load_model(model_name=str(DEMO_MODEL_DIR), device="cpu")


@pytest.fixture(scope="session")
def demo_gateway(tmp_path_factory):
    """The real stack on the demo model: encoder, two index shard processes, gateway. Yields its address."""
    from clipsearch.stack import LocalStack, StackConfig

    config = StackConfig(data_dir=tmp_path_factory.mktemp("demo-stack"), model=str(DEMO_MODEL_DIR),
                         pretrained="none", shards=2, gateway_port=0, device="cpu")
    stack = LocalStack(config).start()
    yield stack.gateway_address
    stack.stop()
