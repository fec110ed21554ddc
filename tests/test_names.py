"""Collection names are one storage path segment; image ids are sha256 hex."""

from __future__ import annotations

import hashlib

import pytest

from clipsearch.errors import InvalidArgument
from clipsearch.names import check_collection_name, check_image_id


@pytest.mark.parametrize("name", ["a", "Photos_2024", "x-y", "0", "a" * 128])
def test_valid_collection_names_are_returned(name):
    assert check_collection_name(name) == name


@pytest.mark.parametrize("name", ["", "_a", "-a", "a.b", "a:b", "a/b", "..", "a b", "a\n", "é", "a" * 129])
def test_invalid_collection_names_say_the_rule(name):
    with pytest.raises(InvalidArgument, match="is not a valid collection name: use 1-128 letters, digits") as info:
        check_collection_name(name, field="name")
    assert info.value.field == "name"


def test_a_long_bad_name_is_echoed_truncated():
    with pytest.raises(InvalidArgument) as info:
        check_collection_name("." * 1000)
    assert info.value.field == "collection"
    assert repr("." * 80) in info.value.message and "." * 81 not in info.value.message


def test_an_image_id_is_the_sha256_hex_of_the_bytes():
    image_id = hashlib.sha256(b"image bytes").hexdigest()
    assert check_image_id(image_id) == image_id


@pytest.mark.parametrize("value", ["", "abc", "A" * 64, "g" * 64, "a" * 65, "a" * 64 + "\n", "../" + "a" * 61])
def test_anything_else_is_not_an_image_id(value):
    with pytest.raises(InvalidArgument, match="must be an image id") as info:
        check_image_id(value, field="image_ids[2]")
    assert info.value.field == "image_ids[2]"
