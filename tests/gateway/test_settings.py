"""Gateway settings: flags, environment and YAML (in the ``gateway:`` section)."""

from __future__ import annotations

import pytest

from clipsearch.server.settings import SettingsError
from gateway.settings import load_gateway_settings


def test_layers(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "gateway:\n"
        "  encoder: enc:1\n"
        "  index: [a:1, b:2]\n"
        "  storage: s3://bucket/prefix\n"
        "  url_ttl_seconds: 60\n"
        "  shard_failure_policy: partial\n"
    )
    settings = load_gateway_settings(["--config", str(config)], environ={})
    assert (settings.encoder, settings.index, settings.storage) == ("enc:1", ["a:1", "b:2"], "s3://bucket/prefix")
    assert settings.url_ttl_seconds == 60 and settings.shard_failure_policy == "partial"

    env = {"CLIPSEARCH_INDEX": "c:3,d:4,e:5", "CLIPSEARCH_IMPORT_SOURCES": "s3://b/x/,/data",
           "CLIPSEARCH_URL_TTL_SECONDS": "90"}
    settings = load_gateway_settings(["--config", str(config), "--url-ttl-seconds", "120"], environ=env)
    assert settings.index == ["c:3", "d:4", "e:5"] and settings.import_sources == ["s3://b/x/", "/data"]
    assert settings.url_ttl_seconds == 120  # flags win


@pytest.mark.parametrize("argv", [
    ["--shard-failure-policy", "sometimes"],
    ["--index", "a:1,a:1"],
    ["--index", "no-port"],
    ["--url-ttl-seconds", "0"],
    ["--url-ttl-seconds", "600", "--max-url-ttl-seconds", "60"],
    ["--reflection", "maybe"],
    ["--internal-tls-cert", "c.pem"],
])
def test_bad_settings_are_refused(argv):
    with pytest.raises(SettingsError):
        load_gateway_settings(argv, environ={})
