"""The shapes of collection names and image ids.

A collection name is always exactly one storage path segment (no dots, colons
or slashes), and an image id is the sha256 of the image bytes in hex, so no
string from a request can name an object outside its collection.
"""

from __future__ import annotations

import re

from clipsearch.errors import InvalidArgument

# \A and \Z, not ^ and $: "$" also matches before a trailing newline.
COLLECTION_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
IMAGE_ID_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def check_collection_name(value: str, field: str = "collection") -> str:
    """``value`` when it is a valid collection name, else InvalidArgument on ``field``."""
    if not COLLECTION_NAME_RE.match(value or ""):
        raise InvalidArgument(
            f"{field} {value[:80]!r} is not a valid collection name: use 1-128 letters, digits, '_' or '-', "
            "starting with a letter or digit",
            field=field,
        )
    return value


def check_image_id(value: str, field: str = "id") -> str:
    """``value`` when it is an image id, else InvalidArgument on ``field``."""
    if not IMAGE_ID_RE.match(value or ""):
        raise InvalidArgument(
            f"{field} must be an image id (64 lowercase hex digits, the sha256 of the image bytes); got {value[:80]!r}",
            field=field,
        )
    return value
