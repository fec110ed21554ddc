"""Who may do what: the keys file, the caller's scopes, the scope each gateway
method needs, the import-source allow-lists and the audit log. Plain Python,
no gRPC: ``gateway.auth`` is the thin interceptor that applies it per call.

- The keys file (YAML, ``clipsearch.keys`` grammar) is re-read when it changes
  (checked at most every ``reload_seconds``, or at once on SIGHUP). A missing,
  unreadable or invalid file means no key is valid (fail closed); the reason is
  logged once per change.
- The caller of the call being served is a contextvar (``caller()``), set by the
  interceptor, so the servicer can filter ListCollections and check the
  collection of a job it has just loaded.
"""

from __future__ import annotations

import contextvars
import dataclasses
import fnmatch
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import yaml

from clipsearch.errors import ClipsearchError, InvalidArgument, PermissionDenied, Unauthenticated
from clipsearch.keys import (
    ADMIN, LEVELS, READ, SHA256_RE, WRITE, Scope, check_key_id, hash_secret, parse_scope,
)
from clipsearch.s3 import parse_s3_uri
from clipsearch.server.logs import REQUEST_ID

log = logging.getLogger(__name__)
audit_log = logging.getLogger("clipsearch.audit")
T = TypeVar("T")

# ---------------------------------------------------------------------- import sources


@dataclasses.dataclass(frozen=True)
class SourcePlace:
    """``s3://bucket/prefix`` (bucket set) or a local folder (path set)."""

    bucket: str = ""
    prefix: str = ""
    path: Path | None = None

    def holds(self, other: "SourcePlace") -> bool:
        if self.path is not None:
            return other.path is not None and (other.path == self.path or other.path.is_relative_to(self.path))
        if other.bucket != self.bucket:
            return False
        # Prefixes are compared by whole path segments: "team-a" holds "team-a/x", not "team-ab/".
        base = self.prefix.rstrip("/")
        return not base or other.prefix.startswith(base + "/")

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"s3://{self.bucket}/{self.prefix}"


def source_place(source: str, field: str = "source") -> SourcePlace:
    source = source.strip()
    if source.startswith("s3://"):
        location = parse_s3_uri(source, field=field)
        return SourcePlace(bucket=location.bucket, prefix=location.key.lstrip("/"))
    if "://" in source or not source:
        raise InvalidArgument(f"source {source[:200]!r} must be s3://bucket/prefix or a folder path", field=field)
    return SourcePlace(path=Path(os.path.realpath(os.path.expanduser(source))))


class SourceAllowList:
    def __init__(self, entries: Iterable[str]):
        self.places = [source_place(e, "import_sources") for e in entries if e.strip()]

    def allows(self, place: SourcePlace) -> bool:
        return any(p.holds(place) for p in self.places)

    def __bool__(self) -> bool:
        return bool(self.places)


# ---------------------------------------------------------------------- callers


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller: a key id, its scopes and its import sources
    (None: any source the gateway allows; only when auth is off)."""

    key_id: str
    scopes: tuple[Scope, ...]
    sources: SourceAllowList | None = None

    def level_on(self, collection: str) -> int:
        return max((LEVELS[s.level] for s in self.scopes if fnmatch.fnmatchcase(collection, s.pattern)), default=0)

    def can(self, level: str, collection: str) -> bool:
        return self.level_on(collection) >= LEVELS[level]

    def can_read(self, collection: str) -> bool:
        return self.can(READ, collection)

    def require(self, level: str, collection: str) -> None:
        if not self.can(level, collection):
            raise PermissionDenied(
                f"API key {self.key_id!r} lacks scope {level}:{collection} (needs {level} on collection "
                f"{collection!r})", reason="SCOPE_MISSING",
            )

    def require_source(self, source: str) -> None:
        if self.sources is None:
            return
        place = source_place(source)
        if not self.sources.allows(place):
            raise PermissionDenied(
                f"API key {self.key_id!r} may not import from {str(place)[:200]!r}; its import sources are "
                f"{[str(p) for p in self.sources.places]}", field="source", reason="IMPORT_SOURCE_NOT_ALLOWED",
            )


ANONYMOUS = Principal("anonymous", (Scope(ADMIN, "*"),))
_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("caller", default=None)


def caller() -> Principal:
    """The caller of the call being served; outside a call nobody is allowed anything."""
    principal = _CALLER.get()
    if principal is None:
        raise Unauthenticated("no authenticated caller for this call", reason="NO_CALLER")
    return principal


def set_caller(principal: Principal) -> contextvars.Token:
    return _CALLER.set(principal)


def reset_caller(token: contextvars.Token) -> None:
    _CALLER.reset(token)


# ---------------------------------------------------------------------- the keys file


class KeyFileError(ValueError):
    pass


def parse_keys(text: str, allowed_sources: SourceAllowList) -> dict[str, Principal]:
    """Principals by the sha256 of their secret. Raises KeyFileError naming the bad entry."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeyFileError(f"not valid YAML: {exc}") from None
    if document is None:
        document = {"keys": []}
    if not isinstance(document, dict) or not isinstance(document.get("keys", []), list) or set(document) - {"keys"}:
        raise KeyFileError("expected a mapping with one key, 'keys', holding a list of keys")
    by_hash: dict[str, Principal] = {}
    ids: set[str] = set()
    for i, entry in enumerate(document.get("keys") or []):
        where = f"keys[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"id", "sha256", "scopes", "import_sources"}:
            raise KeyFileError(f"{where}: expected id, sha256, scopes and optional import_sources")
        try:
            key_id = check_key_id(str(entry.get("id", "")))
            scopes = tuple(parse_scope(s) for s in entry.get("scopes") or [])
            sources = [str(s) for s in entry.get("import_sources") or []]
            places = SourceAllowList(sources)
        except (ValueError, InvalidArgument) as exc:
            raise KeyFileError(f"{where}: {getattr(exc, 'message', exc)}") from None
        digest = str(entry.get("sha256", "")).lower()
        if not SHA256_RE.match(digest):
            raise KeyFileError(f"{where} ({key_id}): sha256 must be 64 hex digits (the sha256 of the secret)")
        if key_id in ids or digest in by_hash:
            raise KeyFileError(f"{where} ({key_id}): the id or the secret is used twice")
        outside = [str(p) for p in places.places if not allowed_sources.allows(p)]
        if outside:
            raise KeyFileError(f"{where} ({key_id}): import sources {outside} are outside the gateway's "
                               "import_sources")
        ids.add(key_id)
        by_hash[digest] = Principal(key_id, scopes, places)
    return by_hash


class KeyRing:
    """The accepted keys, from the keys file. Without a file, auth is off and every
    caller is ``ANONYMOUS`` (global admin)."""

    def __init__(self, path: str = "", allowed_sources: SourceAllowList | None = None, reload_seconds: float = 2.0):
        self.path = path
        self.allowed_sources = allowed_sources or SourceAllowList([])
        self.reload_seconds = reload_seconds
        self._keys: dict[str, Principal] = {}
        self._stamp: Any = None
        self._checked = 0.0
        if path:
            self.reload(strict=True)

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def reload(self, strict: bool = False) -> None:
        """Re-reads the file if it changed. ``strict`` (startup) raises instead of failing closed."""
        self._checked = time.monotonic()
        try:
            info = os.stat(self.path)
            stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
            if stamp == self._stamp:
                return
            keys = parse_keys(Path(self.path).read_text(), self.allowed_sources)
        except (OSError, KeyFileError) as exc:
            reason = f"api_keys_file {self.path}: {exc}"
            if strict:
                raise KeyFileError(reason) from None
            if self._stamp != ("failed", reason):
                log.error("%s; no API key is valid until the file is fixed", reason)
            self._keys, self._stamp = {}, ("failed", reason)
            return
        self._keys, self._stamp = keys, stamp
        log.info("loaded %d API keys from %s: %s", len(keys), self.path, sorted(p.key_id for p in keys.values()))

    def authenticate(self, secret: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if secret is None:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'",
                                  reason="API_KEY_MISSING")
        if not secret:
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'",
                                  reason="API_KEY_MALFORMED")
        if time.monotonic() - self._checked >= self.reload_seconds:
            self.reload()
        digest = hash_secret(secret)
        for known, principal in self._keys.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")


# ---------------------------------------------------------------------- what each method needs


@dataclasses.dataclass(frozen=True)
class Rule:
    level: str | None  # None: checked by the servicer (job reads) or filtered (ListCollections)
    field: str = "collection"  # the request field naming the collection
    audit: bool = False  # a write or admin action: one audit line per call


RULES: dict[str, Rule] = {
    "SearchImages": Rule(READ),
    "BatchSearchImages": Rule(READ),
    "GetImage": Rule(READ),
    "ListImages": Rule(READ),
    "UploadImages": Rule(WRITE, audit=True),
    "DeleteImage": Rule(WRITE, audit=True),
    "UpdateImage": Rule(WRITE, audit=True),
    "ImportImages": Rule(WRITE, audit=True),
    "GetImportJob": Rule(None),  # read on the job's collection
    "ListImportJobs": Rule(None),  # lists only the jobs of collections the key may read
    "CancelImportJob": Rule(None),  # write on the job's collection
    "RepairCollection": Rule(ADMIN, audit=True),
    "GetRepairJob": Rule(None),  # read on the job's collection
    "CreateCollection": Rule(ADMIN, "name", audit=True),
    "GetCollection": Rule(READ, "name"),
    "ListCollections": Rule(None),  # lists only what the key may read
    "DeleteCollection": Rule(ADMIN, "name", audit=True),
}


def call_collection(method: str, request: Any, default_collection: str) -> str:
    """The collection a call acts on, by its rule; "" when the servicer checks it (jobs) or none applies."""
    rule = RULES.get(method)
    if rule is None or rule.level is None:
        return ""
    return getattr(request, rule.field, "") or default_collection


def check_call(principal: Principal, method: str, request: Any, collection: str) -> None:
    """Raises PermissionDenied unless ``principal`` may make this call on ``collection``
    (from ``call_collection``). Import sources are checked here, before anything is listed."""
    rule = RULES.get(method)
    if rule is None:
        raise PermissionDenied(f"method {method} has no access rule; refused", reason="NO_ACCESS_RULE")
    if rule.level is None:
        return
    principal.require(rule.level, collection)
    if method == "ImportImages":
        principal.require_source(request.source)


def audit_fields(method: str, request: Any) -> dict[str, Any]:
    """What an audit line says about the request besides its collection (ids, sources, counts)."""
    if method in ("DeleteImage", "UpdateImage"):
        return {"image_id": request.id}
    if method == "ImportImages":
        return {"source": request.source[:500]}
    if method == "UploadImages":
        return {"items": len(request.items)}
    if method == "RepairCollection":
        return {"dry_run": request.dry_run}
    return {}


def bearer_secret(authorization: str | bytes | None) -> str | None:
    """The key of an ``authorization: Bearer <key>`` value (gRPC metadata or HTTP header):
    None when there is no such value, "" when it is not ``Bearer <key>``."""
    if authorization is None:
        return None
    if isinstance(authorization, bytes):
        authorization = authorization.decode("utf-8", "replace")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    return token.strip()


async def authorized(keys: KeyRing, default_collection: str, method: str, request: Any, secret: str | None,
                     call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` on behalf of the caller holding ``secret``: authenticated, made the call's
    caller, checked against the method's rule, and audited when the method writes. One rule
    for every front (the gRPC interceptor, the HTTP API)."""
    principal = keys.authenticate(secret)
    audited = RULES[method].audit if method in RULES else False
    token = set_caller(principal)
    collection = call_collection(method, request, default_collection)
    try:
        check_call(principal, method, request, collection)
        response = await call()
    except ClipsearchError as error:
        if audited:
            audit(principal, method, collection, error.code, **audit_fields(method, request))
        raise
    finally:
        reset_caller(token)
    if audited:
        audit(principal, method, collection, "OK", **audit_fields(method, request))
    return response


def audit(principal: Principal, method: str, collection: str, outcome: str, **fields: Any) -> None:
    """One line per write or admin action. Never a secret: key ids only."""
    entry = {"action": method, "key_id": principal.key_id, "collection": collection,
             "request_id": REQUEST_ID.get(), "outcome": outcome, **fields}
    audit_log.info("audit %s", json.dumps(entry, sort_keys=True))
