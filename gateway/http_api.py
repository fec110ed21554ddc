"""The gateway's HTTP/JSON front: a second front beside the gRPC servicer, over the same
servicer methods, keys and scope rules.

- Routes come from the ``google.api.http`` options of the GatewayService RPCs (one source
  of truth with the .proto; the mapping Envoy's gRPC-JSON transcoder uses in a cluster).
- Bodies and responses use the proto3 JSON mapping (``json_format``). Bytes fields are
  base64 in JSON; a ``multipart/form-data`` body may carry a JSON ``request`` part and files
  named after a repeated message field (``items`` of UploadImages, ``parts`` of
  SearchImages): the n-th file fills the bytes field (and ``filename``) of the n-th element.
- ``Authorization: Bearer <key>`` authenticates with the same keys and scopes as gRPC
  (``gateway.access.authorized``). Errors are the HTTP status of the gRPC code with a
  ``google.rpc.Status`` JSON body; ``x-request-id`` is echoed; ``Retry-After`` carries the hint.
- ``GET /v1/collections/{collection}/images/{id}:content`` serves an image's bytes (read
  scope). Local storage has no presigned URLs, so its hits and images point there.
- ``/`` is the web page (``gateway/web``), ``/openapi.json`` the OpenAPI document.

Starlette routes, served by uvicorn in the gateway's own event loop; no HTTP parsing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import uvicorn
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message
from google.rpc import status_pb2
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clipsearch.errors import ClipsearchError, Internal, InvalidArgument, ResourceExhausted
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.server.interceptor import REQUEST_ID_HEADER
from clipsearch.server.logs import REQUEST_ID
from clipsearch.status import HTTP_STATUS, status_proto

from gateway import metrics
from gateway.access import KeyRing, authorized, bearer_secret
from gateway.deadline import Deadline
from gateway.engine import Gateway
from gateway.openapi import openapi_document
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
SERVICE = gpb.DESCRIPTOR.services_by_name["GatewayService"]
TIMEOUT_HEADER = "x-request-timeout"  # seconds; the HTTP stand-in for a gRPC deadline
CONTENT_ROUTE = "/v1/collections/{collection}/images/{id}:content"
VERBS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class HttpRoute:
    method: str  # the RPC name
    verb: str  # GET, POST, ...
    path: str  # the template, e.g. /v1/collections/{collection}/images:search
    body: str  # "*" or ""
    request_class: type[Message]
    path_fields: tuple[str, ...]


def http_routes(service: descriptor.ServiceDescriptor = SERVICE) -> list[HttpRoute]:
    """One route per RPC with a ``google.api.http`` option. Templates use plain ``{field}``
    variables (top-level fields); anything else is refused when the routes are built."""
    routes = []
    for method in service.methods:
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        if verb not in VERBS:
            raise ValueError(f"{method.name}: google.api.http pattern {verb!r} is not supported")
        path = getattr(rule, verb)
        fields = tuple(part.split("}")[0] for part in path.split("{")[1:])
        for name in fields:
            if name not in method.input_type.fields_by_name:
                raise ValueError(f"{method.name}: route {path} names {name!r}, not a field of the request")
        if rule.body not in ("", "*"):
            raise ValueError(f"{method.name}: google.api.http body {rule.body!r} is not supported (use '*')")
        request_class = getattr(gpb, method.input_type.name)
        routes.append(HttpRoute(method.name, verb.upper(), path, rule.body, request_class, fields))
    return routes


class HttpCallContext:
    """What the servicer asks of a call's context: its time left (``x-request-timeout``)."""

    def __init__(self, seconds: float | None):
        self.deadline = Deadline(seconds)

    def time_remaining(self) -> float | None:
        return self.deadline.remaining()


# ---------------------------------------------------------------------- requests in


def _timeout(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw[:50]!r}")
    return seconds


def _parse_json(text: str | bytes, message: Message, what: str) -> None:
    try:
        data = json.loads(text or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        json_format.ParseDict(data, message)
    except (ValueError, json_format.ParseError) as exc:
        raise InvalidArgument(f"{what} is not a {message.DESCRIPTOR.name} in the proto3 JSON mapping: "
                              f"{str(exc)[:300]}") from None


def _query_value(field: descriptor.FieldDescriptor, raw: str) -> Any:
    if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise InvalidArgument(f"query parameter {field.json_name} must be true or false", field=field.name)
        return raw.lower() in ("true", "1")
    return raw


def _query_dict(message: Message, query: list[tuple[str, str]]) -> dict:
    """Query parameters (``page_size=10``, ``params.nprobe=4``, repeated keys for lists) as
    proto3 JSON, following the field paths through the request's descriptor."""
    out: dict = {}
    for key, raw in query:
        target, desc = out, message.DESCRIPTOR
        names = key.split(".")
        for i, name in enumerate(names):
            field = desc.fields_by_name.get(name) or next(
                (f for f in desc.fields if f.json_name == name), None) if desc is not None else None
            if field is None:
                raise InvalidArgument(f"unknown query parameter {key[:100]!r} for {message.DESCRIPTOR.name}")
            last = i == len(names) - 1
            if last:
                value = _query_value(field, raw)
                if field.is_repeated:
                    target.setdefault(field.name, []).append(value)
                else:
                    target[field.name] = value
            else:
                target = target.setdefault(field.name, {})
                desc = field.message_type
    return out


async def _read_form(request: Request, message: Message, max_files: int, max_bytes: int) -> None:
    """A multipart body: an optional ``request`` part (JSON), then files named after a
    repeated message field, filling its elements in order."""
    filled: dict[str, int] = {}
    try:
        form = await request.form(max_files=max_files, max_fields=100, max_part_size=max_bytes)
    except HTTPException as exc:  # starlette's multipart limits and malformed bodies
        raise InvalidArgument(f"the multipart body could not be read: {exc.detail}") from None
    try:
        for name, value in form.multi_items():
            if name == "request":
                text = await value.read() if isinstance(value, UploadFile) else value
                _parse_json(text, message, "the 'request' part")
        for name, value in form.multi_items():
            if name == "request":
                continue
            field = message.DESCRIPTOR.fields_by_name.get(name)
            if not isinstance(value, UploadFile) or field is None or field.message_type is None \
                    or not field.is_repeated:
                raise InvalidArgument(f"unexpected form part {name[:100]!r}: send a JSON 'request' part and files "
                                      f"named after a repeated field of {message.DESCRIPTOR.name}")
            data_field = next((f.name for f in field.message_type.fields
                               if f.type == descriptor.FieldDescriptor.TYPE_BYTES), None)
            if data_field is None:
                raise InvalidArgument(f"form files cannot fill {name!r}: its elements hold no bytes")
            elements = getattr(message, name)
            n = filled.get(name, 0)
            element = elements[n] if n < len(elements) else elements.add()
            filled[name] = n + 1
            setattr(element, data_field, await value.read())
            if value.filename and "filename" in field.message_type.fields_by_name and not element.filename:
                element.filename = value.filename[:1024]
    finally:
        await form.close()


async def read_request(route: HttpRoute, request: Request, max_files: int, max_bytes: int) -> Message:
    message = route.request_class()
    if route.body:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            await _read_form(request, message, max_files, max_bytes)
        else:
            _parse_json(await request.body(), message, "the body")
    else:
        json_format.ParseDict(_query_dict(message, list(request.query_params.multi_items())), message)
    for name in route.path_fields:
        setattr(message, name, request.path_params[name])
    return message


# ---------------------------------------------------------------------- responses out


def error_response(error: ClipsearchError, request_id: str) -> Response:
    headers = {REQUEST_ID_HEADER: request_id}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    if error.code == "UNAUTHENTICATED":
        headers["www-authenticate"] = "Bearer"
    body = json_format.MessageToDict(status_proto(error))
    return JSONResponse(body, status_code=HTTP_STATUS.get(error.code, 500), headers=headers)


def _image_holders(response: Message) -> list:
    """The hits and images of a response (SearchHit, Image), whose ``url`` may need the content route."""
    fields = response.DESCRIPTOR.fields_by_name
    holders = [*(response.hits if "hits" in fields else ()), *(response.images if "images" in fields else ())]
    if "image" in fields and response.HasField("image"):
        holders.append(response.image)
    if "results" in fields:  # batch searches: hits per query
        holders += [hit for result in response.results if "hits" in result.DESCRIPTOR.fields_by_name
                    for hit in result.hits]
    return holders


def content_url(base: str, collection: str, image_id: str) -> str:
    return base.rstrip("/") + CONTENT_ROUTE.format(collection=collection, id=image_id)


# ---------------------------------------------------------------------- the app


class HttpApi:
    def __init__(self, settings: GatewaySettings, servicer: Any, engine: Gateway, keys: KeyRing):
        self.settings = settings
        self.servicer = servicer
        self.engine = engine
        self.keys = keys
        self.routes = http_routes()
        self.max_body = settings.max_message_mb * 1024 * 1024
        # The page, told the gateway's default collection (its picker starts there).
        self.index_html = (WEB_DIR / "index.html").read_text().replace(
            '<meta name="default-collection" content="">',
            f'<meta name="default-collection" content="{html.escape(settings.default_collection)}">')

    def app(self) -> Starlette:
        routes = [Route("/", self.page, methods=["GET"]),
                  Route("/openapi.json", self.openapi, methods=["GET"]),
                  Route(CONTENT_ROUTE, self.image_content, methods=["GET"])]
        routes += [Route(r.path, self.endpoint(r), methods=[r.verb], name=r.method) for r in self.routes]
        routes.append(Mount("/web", StaticFiles(directory=WEB_DIR), name="web"))
        return Starlette(routes=routes, middleware=[Middleware(BodyLimit, max_bytes=self.max_body)])

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.index_html, headers={"cache-control": "no-cache"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.routes, CONTENT_ROUTE))

    async def _authorized(self, request: Request, method: str, message: Message, call: Callable[[], Any]) -> Any:
        """``call()`` as the caller of ``Authorization: Bearer``, under ``method``'s access rule."""
        return await authorized(self.keys, self.settings.default_collection, method, message,
                                bearer_secret(request.headers.get("authorization")), call)

    async def _serve(self, request: Request, name: str, work: Callable[[str], Any]) -> Response:
        """Request id, body limit, errors as google.rpc.Status, metrics: around every API call."""
        request_id = request.headers.get(REQUEST_ID_HEADER) or os.urandom(8).hex()
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        code = "OK"
        try:
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body:
                raise ResourceExhausted(f"the request body is {int(length)} bytes; the limit is {self.max_body} "
                                        "(max_message_mb)")
            response = await work(request_id)
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        except ClipsearchError as error:
            code = error.code
            if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                error.message = f"{error.message} (request id {request_id})"
            log.info("HTTP %s -> %s: %s", name, error.code, error.message)
            return error_response(error, request_id)
        except Exception:  # noqa: BLE001 - the boundary of every call
            code = "INTERNAL"
            log.exception("HTTP %s failed", name)
            return error_response(Internal(f"internal error in {name}; report request id {request_id} (the "
                                           "server log has the details)"), request_id)
        finally:
            metrics.HTTP_REQUESTS.labels(name, code).inc()
            metrics.HTTP_SECONDS.labels(name).observe(time.perf_counter() - started)
            REQUEST_ID.reset(token)

    def endpoint(self, route: HttpRoute):
        call = getattr(self.servicer, route.method)

        async def endpoint(incoming: Request) -> Response:
            return await self._serve(incoming, route.method, lambda _: work_for(incoming))

        async def work_for(incoming: Request) -> Response:
            message = await read_request(route, incoming, self.settings.max_upload_items, self.max_body)
            context = HttpCallContext(_timeout(incoming))
            response = await self._authorized(incoming, route.method, message, lambda: call(message, context))
            holders = _image_holders(response)
            if holders:
                collection = message.collection or self.settings.default_collection
                for holder in holders:
                    if holder.url.startswith("file://"):
                        holder.url = content_url(str(incoming.base_url), collection, holder.id)
            return Response(json_format.MessageToJson(response, indent=None), media_type="application/json")

        return endpoint

    async def image_content(self, request: Request) -> Response:
        async def work(_: str) -> Response:
            message = gpb.GetImageRequest(collection=request.path_params["collection"], id=request.path_params["id"])
            deadline = Deadline(_timeout(request))
            data, content_type = await self._authorized(
                request, "GetImage", message, lambda: self.engine.read_image(message.collection, message.id, deadline))
            # The id is the sha256 of the bytes: the content never changes.
            return Response(data, media_type=content_type, headers={
                "cache-control": "private, max-age=86400, immutable", "etag": f'"{message.id}"'})

        return await self._serve(request, "GetImageContent", work)


class BodyLimit:
    """ASGI middleware: a request body past ``max_bytes`` (chunked ones included) stops being
    read with RESOURCE_EXHAUSTED, which the API call answers as 429."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ResourceExhausted(f"the request body passed {self.max_bytes} bytes (max_message_mb)")
            return message

        await self.app(scope, limited, send)


class _Server(uvicorn.Server):
    """uvicorn inside the gateway's loop: the gateway owns SIGTERM/SIGINT, not uvicorn."""

    def capture_signals(self):
        return contextlib.nullcontext()


class HttpServer:
    """The HTTP front on ``settings.http_port`` (0 picks a free one)."""

    def __init__(self, app: Starlette, settings: GatewaySettings):
        self.app = app
        self.settings = settings
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        family, kind, proto, _, address = socket.getaddrinfo(s.host, s.http_port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OSError(f"could not bind the HTTP port {s.host}:{s.http_port}: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        tls = {}
        if s.tls_cert:
            tls = {"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key}
            if s.tls_client_ca:
                import ssl

                tls |= {"ssl_ca_certs": s.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False, ws="none",
                                limit_concurrency=s.max_concurrent_rpcs,
                                timeout_graceful_shutdown=max(1, math.ceil(s.grace_seconds)), **tls)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        scheme = "https" if tls else "http"
        log.info("HTTP/JSON API and web page on %s://%s:%d/", scheme, s.host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = None
