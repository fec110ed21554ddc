"""A pretrained tag whose weights are neither cached nor reachable fails at once, with the
offline options and no traceback (these machines cannot download weights)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from encoder_service.model import ModelLoadError, load_model


def test_unreachable_weights_fail_within_seconds_naming_the_offline_options(tmp_path):
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="Offline options"):
        load_model("ViT-B-32", "openai", device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - started < 10


def test_the_service_exits_with_one_message_and_no_traceback(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "encoder_service", "--model", "ViT-B-32", "--pretrained", "openai",
                             "--model-cache-dir", str(tmp_path), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and time.monotonic() - started < 60
    assert "Offline options" in result.stderr and "Traceback" not in result.stderr + result.stdout
