"""The OpenAPI 3.1 document of the HTTP/JSON API, built from the same descriptors and
``google.api.http`` routes the HTTP front serves (proto3 JSON names and types)."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor
from google.rpc import status_pb2

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb

FD = descriptor.FieldDescriptor
WELL_KNOWN = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "comma-separated field paths"},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}},
                            "additionalProperties": True},
}
SCALARS = {
    FD.TYPE_STRING: {"type": "string"}, FD.TYPE_BYTES: {"type": "string", "format": "byte"},
    FD.TYPE_BOOL: {"type": "boolean"}, FD.TYPE_FLOAT: {"type": "number"}, FD.TYPE_DOUBLE: {"type": "number"},
    FD.TYPE_INT32: {"type": "integer", "format": "int32"}, FD.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FD.TYPE_UINT32: {"type": "integer", "format": "uint32"}, FD.TYPE_FIXED32: {"type": "integer"},
    FD.TYPE_INT64: {"type": "string", "format": "int64"}, FD.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FD.TYPE_SINT64: {"type": "string", "format": "int64"}, FD.TYPE_FIXED64: {"type": "string", "format": "uint64"},
}


class Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, message: descriptor.Descriptor) -> dict:
        if message.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[message.full_name])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder: recursion stops here
            self.components[message.full_name] = {
                "type": "object", "properties": {f.json_name: self.field(f) for f in message.fields}}
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def value(self, field: descriptor.FieldDescriptor) -> dict:
        if field.message_type is not None:
            return self.ref(field.message_type)
        if field.enum_type is not None:
            return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        return dict(SCALARS.get(field.type, {}))

    def field(self, field: descriptor.FieldDescriptor) -> dict:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.value(message.fields_by_name["value"])}
        if field.is_repeated:
            return {"type": "array", "items": self.value(field)}
        return self.value(field)


def openapi_document(routes, content_route: str) -> dict:
    schemas = Schemas()
    status = schemas.ref(status_pb2.Status.DESCRIPTOR)
    errors = {"default": {"description": "an error: the HTTP status of its gRPC code",
                          "content": {"application/json": {"schema": status}}}}
    paths: dict[str, dict] = {}
    service = gpb.DESCRIPTOR.services_by_name["GatewayService"]
    for route in routes:
        method = service.methods_by_name[route.method]
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in route.path_fields]
        operation: dict[str, Any] = {
            "operationId": route.method,
            "responses": {"200": {"description": "OK", "content": {"application/json": {
                "schema": schemas.ref(method.output_type)}}}, **errors},
        }
        if route.body:
            content = {"application/json": {"schema": schemas.ref(method.input_type)}}
            files = [f.name for f in method.input_type.fields
                     if f.is_repeated and f.message_type is not None
                     and any(g.type == FD.TYPE_BYTES for g in f.message_type.fields)]
            if files:
                content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
                    "request": {"type": "string", "description": f"{method.input_type.name} as JSON"},
                    **{name: {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": f"files filling the bytes of {name}[0], {name}[1], ..."}
                       for name in files}}}}
            operation["requestBody"] = {"required": True, "content": content}
        else:
            params += [{"name": f.json_name, "in": "query", "schema": schemas.field(f)}
                       for f in method.input_type.fields
                       if f.name not in route.path_fields and f.message_type is None]
        if params:
            operation["parameters"] = params
        paths.setdefault(route.path, {})[route.verb.lower()] = operation
    paths[content_route] = {"get": {
        "operationId": "GetImageContent",
        "description": "The image's bytes, with its content type (read scope on the collection).",
        "parameters": [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                       for n in ("collection", "id")],
        "responses": {"200": {"description": "the image", "content": {"image/*": {
            "schema": {"type": "string", "format": "binary"}}}}, **errors},
    }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "clipsearch gateway", "version": "v1",
                 "description": "HTTP/JSON mapping of clipsearch.gateway.v1.GatewayService (google.api.http)."},
        "paths": paths,
        "components": {"schemas": schemas.components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
    }
