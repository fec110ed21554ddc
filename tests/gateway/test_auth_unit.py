"""API key parsing and checking (the end-to-end check is in test_gateway.py)."""

from __future__ import annotations

import os

import pytest

from gateway.auth import ApiKeys, bearer_key


def test_bearer_key_parsing():
    assert bearer_key([("authorization", "Bearer abc")]) == "abc"
    assert bearer_key([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_key([("x-other", "1")]) is None
    assert bearer_key(None) is None
    assert bearer_key([("authorization", "Basic abc")]) == ""
    assert bearer_key([("authorization", "Bearer")]) == ""


def test_static_keys():
    keys = ApiKeys(["k1", " k2 ", ""])
    assert keys.enabled
    assert keys.check("k1") and keys.check("k2")
    assert not keys.check("k3") and not keys.check("") and not keys.check("k1 ")
    assert not ApiKeys([]).enabled


def test_key_file_is_reloaded_when_it_changes(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# operators\nalpha\n\nbeta  # rotated 2024\n")
    keys = ApiKeys([], str(path), recheck_seconds=0)
    assert keys.check("alpha") and keys.check("beta") and not keys.check("gamma")
    path.write_text("gamma\n")
    os.utime(path, (1, 1))  # a different mtime, whatever the clock resolution
    assert keys.check("gamma") and not keys.check("alpha")


def test_missing_key_file_fails_at_startup(tmp_path):
    with pytest.raises(ValueError, match="api_keys_file"):
        ApiKeys([], str(tmp_path / "absent"))


def test_empty_key_file_refuses_everyone(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# nobody yet\n")
    keys = ApiKeys([], str(path))
    assert keys.enabled and not keys.check("anything")
