"""API-key authentication for the public service, in one place: a server
interceptor that checks ``authorization: Bearer <key>`` on every gateway call.

Health and reflection stay open (probes and grpcurl need no key). Errors are
raised as ``Unauthenticated`` inside the handler, so the shared interceptor
turns them into the status and counts them like any other call.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Iterable

import grpc

from clipsearch.errors import Unauthenticated

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/clipsearch.gateway.v1.GatewayService/"


def read_key_file(path: str) -> list[str]:
    """Keys from a file: one per line; blank lines and ``#`` comments ignored."""
    keys = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


class ApiKeys:
    """The accepted keys: a fixed list plus a file that is re-read when it changes."""

    def __init__(self, keys: Iterable[str] = (), key_file: str = "", recheck_seconds: float = 2.0):
        self._static = [k.strip() for k in keys if k.strip()]
        self.key_file = key_file
        self.recheck_seconds = recheck_seconds
        self._file_keys: list[str] = []
        self._file_mtime: float | None = None
        self._checked = 0.0
        self._digests: list[bytes] = []
        if key_file:
            self._reload(force=True)
        self._rebuild()

    def _rebuild(self) -> None:
        # Compare digests, so the comparison time says nothing about key lengths.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in [*self._static, *self._file_keys]]

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_seconds:
            return
        self._checked = now
        try:
            mtime = os.stat(self.key_file).st_mtime
        except OSError as exc:
            if force:
                raise ValueError(f"api_keys_file {self.key_file}: {exc}") from exc
            log.warning("cannot read api_keys_file %s (%s); keeping the keys loaded before", self.key_file, exc)
            return
        if mtime != self._file_mtime:
            self._file_keys = read_key_file(self.key_file)
            self._file_mtime = mtime
            self._rebuild()
            log.info("loaded %d API keys from %s", len(self._file_keys), self.key_file)

    @property
    def enabled(self) -> bool:
        return bool(self._static or self.key_file)

    def check(self, key: str) -> bool:
        if self.key_file:
            self._reload()
        offered = hashlib.sha256(key.encode()).digest()
        found = False
        for digest in self._digests:  # no early exit: constant work whatever key matches
            found |= hmac.compare_digest(offered, digest)
        return found


def bearer_key(metadata) -> str | None:
    """The key from ``authorization: Bearer <key>``; None when the header is absent."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return ""
            return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.keys.enabled or not handler_call_details.method.startswith(PROTECTED_PREFIX):
            return handler
        key = bearer_key(handler_call_details.invocation_metadata)
        if key is None:
            error = Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'",
                                    reason="API_KEY_MISSING")
        elif not key:
            error = Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'",
                                    reason="API_KEY_MALFORMED")
        elif not self.keys.check(key):
            error = Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        else:
            return handler

        async def refuse(request, context):
            raise error

        return grpc.unary_unary_rpc_method_handler(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
