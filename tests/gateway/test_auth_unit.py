"""Keys file, scopes and import-source rules (the end-to-end matrix is in test_gateway_access.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from clipsearch.errors import PermissionDenied, Unauthenticated
from clipsearch.keys import hash_secret, key_entry, keys_file_text, parse_scope
from gateway.access import ANONYMOUS, RULES, KeyFileError, KeyRing, SourceAllowList, check_call, source_place
from gateway.auth import bearer_key


def test_bearer_key_parsing():
    assert bearer_key([("authorization", "Bearer abc")]) == "abc"
    assert bearer_key([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_key([("x-other", "1")]) is None
    assert bearer_key(None) is None
    assert bearer_key([("authorization", "Basic abc")]) == ""
    assert bearer_key([("authorization", "Bearer")]) == ""


def test_scope_grammar():
    assert str(parse_scope("read:photos-*")) == "read:photos-*"
    assert parse_scope("admin") == parse_scope("admin:*")
    for bad in ("root", "read", "read:", "write:a/b", "delete:x", "read:a.b"):
        with pytest.raises(ValueError, match="scope"):
            parse_scope(bad)


def write_keys(path, *entries, touch: int = 0):
    path.write_text(keys_file_text(list(entries)))
    if touch:
        os.utime(path, (touch, touch))  # a different mtime, whatever the clock resolution


def test_levels_nest_and_patterns_match(tmp_path):
    path = tmp_path / "keys.yaml"
    write_keys(path, key_entry("r", "s-r", ["read:team-a*"]), key_entry("w", "s-w", ["write:team-a"]),
               key_entry("g", "s-g", ["admin"]))
    keys = KeyRing(str(path))
    reader, writer, admin = keys.authenticate("s-r"), keys.authenticate("s-w"), keys.authenticate("s-g")
    assert reader.can_read("team-a") and reader.can_read("team-abc") and not reader.can_read("team-b")
    assert not reader.can("write", "team-a")
    assert writer.can("write", "team-a") and writer.can_read("team-a") and not writer.can("admin", "team-a")
    assert admin.can("admin", "anything")
    with pytest.raises(PermissionDenied) as info:
        reader.require("write", "team-a")
    assert "write" in info.value.message and "team-a" in info.value.message and "s-r" not in info.value.message


def test_every_gateway_method_has_a_rule():
    from clipsearch.gateway.v1 import gateway_service_pb2

    methods = {m.name for m in gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods}
    assert methods == set(RULES)
    with pytest.raises(PermissionDenied, match="no access rule"):
        check_call(ANONYMOUS, "NewMethod", SimpleNamespace(), "images")


def test_empty_collection_means_the_default(tmp_path):
    path = tmp_path / "keys.yaml"
    write_keys(path, key_entry("d", "s-d", ["read:images"]))
    principal = KeyRing(str(path)).authenticate("s-d")
    check_call(principal, "SearchImages", SimpleNamespace(collection=""), "images")
    with pytest.raises(PermissionDenied):
        check_call(principal, "SearchImages", SimpleNamespace(collection=""), "other")


def test_source_places_are_compared_by_whole_segments(tmp_path):
    allowed = SourceAllowList(["s3://bucket/team-a/", "s3://whole", str(tmp_path / "root")])
    assert allowed.allows(source_place("s3://bucket/team-a/x/"))
    assert allowed.allows(source_place("s3://whole/any/thing"))
    assert not allowed.allows(source_place("s3://bucket/team-ab/"))
    assert not allowed.allows(source_place("s3://bucket/team-a"))  # would list team-ab/ too
    assert not allowed.allows(source_place("s3://bucket/"))
    assert not allowed.allows(source_place("s3://other/team-a/"))
    assert allowed.allows(source_place(str(tmp_path / "root" / "sub")))
    assert not allowed.allows(source_place(str(tmp_path / "root" / ".." / "elsewhere")))


def test_key_sources_must_lie_inside_the_gateways(tmp_path):
    path = tmp_path / "keys.yaml"
    write_keys(path, key_entry("i", "s-i", ["write:x"], ["s3://bucket/team-b/"]))
    with pytest.raises(KeyFileError, match="outside the gateway's import_sources"):
        KeyRing(str(path), SourceAllowList(["s3://bucket/team-a/"]))
    principal = KeyRing(str(path), SourceAllowList(["s3://bucket/"])).authenticate("s-i")
    principal.require_source("s3://bucket/team-b/2024/")
    with pytest.raises(PermissionDenied, match="may not import"):
        principal.require_source("s3://bucket/team-a/")


def test_rotation_and_fail_closed(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    write_keys(path, key_entry("old", "s-old", ["read:*"]), touch=1)
    keys = KeyRing(str(path), reload_seconds=0)
    assert keys.authenticate("s-old").key_id == "old"
    write_keys(path, key_entry("new", "s-new", ["read:*"]), touch=2)
    assert keys.authenticate("s-new").key_id == "new"
    with pytest.raises(Unauthenticated):
        keys.authenticate("s-old")
    path.write_text("keys: [this is not a key]\n")
    os.utime(path, (3, 3))
    with pytest.raises(Unauthenticated):
        keys.authenticate("s-new")
    write_keys(path, key_entry("new", "s-new", ["read:*"]), touch=4)
    assert keys.authenticate("s-new").key_id == "new"
    path.unlink()
    with pytest.raises(Unauthenticated):
        keys.authenticate("s-new")
    assert "no API key is valid" in caplog.text and "s-new" not in caplog.text


def test_bad_files_fail_at_startup(tmp_path):
    with pytest.raises(KeyFileError, match="api_keys_file"):
        KeyRing(str(tmp_path / "absent"))
    path = tmp_path / "keys.yaml"
    for text in ("- a list\n", "keys:\n  - {id: a, sha256: abc, scopes: [read:x]}\n",
                 "keys:\n  - {id: a, secret: plain, scopes: [read:x]}\n",
                 f"keys:\n  - {{id: a, sha256: {hash_secret('x')}, scopes: [read:x]}}\n"
                 f"  - {{id: a, sha256: {hash_secret('y')}, scopes: [read:x]}}\n"):
        path.write_text(text)
        with pytest.raises(KeyFileError):
            KeyRing(str(path))


def test_auth_off_is_anonymous_global_admin():
    keys = KeyRing("")
    assert not keys.enabled and keys.authenticate(None) is ANONYMOUS
