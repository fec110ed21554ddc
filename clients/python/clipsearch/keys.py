"""API keys and their scopes: the grammar the gateway's keys file and
``clipsearch keys create`` share.

A key is an id, the sha256 of its secret (the secret itself is never stored)
and scopes:

- ``read:PATTERN``, ``write:PATTERN``, ``admin:PATTERN`` on the collections
  whose names match PATTERN (``*`` and ``?`` wildcards). The levels nest:
  write includes read, admin includes write.
- ``admin``: global admin, every level on every collection.

and the import sources it may use (``s3://bucket/prefix/`` or a folder), each
inside the gateway's own allow-list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets

import yaml

READ, WRITE, ADMIN = "read", "write", "admin"
LEVELS = {READ: 1, WRITE: 2, ADMIN: 3}
GLOBAL_ADMIN = "admin"
KEY_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
PATTERN_RE = re.compile(r"\A[A-Za-z0-9_*?-]{1,128}\Z")
SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")
SECRET_PREFIX = "csk_"


@dataclasses.dataclass(frozen=True)
class Scope:
    level: str  # read, write or admin
    pattern: str  # collection name pattern; "*" for every collection

    def __str__(self) -> str:
        return f"{self.level}:{self.pattern}"


def parse_scope(text: str) -> Scope:
    """``read:PATTERN``, ``write:PATTERN``, ``admin:PATTERN`` or ``admin``; ValueError otherwise."""
    text = str(text).strip()
    if text == GLOBAL_ADMIN:
        return Scope(ADMIN, "*")
    level, sep, pattern = text.partition(":")
    if not sep or level not in LEVELS or not PATTERN_RE.match(pattern):
        raise ValueError(
            f"scope {text[:80]!r} is not one of read:PATTERN, write:PATTERN, admin:PATTERN or admin "
            "(PATTERN: a collection name with * and ? wildcards)"
        )
    return Scope(level, pattern)


def check_key_id(key_id: str) -> str:
    if not KEY_ID_RE.match(key_id or ""):
        raise ValueError(f"key id {key_id[:80]!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return key_id


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def key_entry(key_id: str, secret: str, scopes: list[str], import_sources: list[str] = ()) -> dict:
    """The keys-file entry for ``secret`` (its hash, never the secret)."""
    parsed = [parse_scope(s) for s in scopes]
    entry = {"id": check_key_id(key_id), "sha256": hash_secret(secret),
             "scopes": [GLOBAL_ADMIN if s == Scope(ADMIN, "*") else str(s) for s in parsed]}
    if import_sources:
        entry["import_sources"] = list(import_sources)
    return entry


def keys_file_text(entries: list[dict]) -> str:
    return yaml.safe_dump({"keys": entries}, sort_keys=False)
