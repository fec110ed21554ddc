"""Per-item statuses of batch calls (``clipsearch.common.v1.ItemStatus``) to and
from ``clipsearch.errors`` exceptions."""

from __future__ import annotations

from google.rpc import code_pb2

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import ClipsearchError, error_for_code

OK = code_pb2.OK


def code_name(code: int) -> str:
    """"INVALID_ARGUMENT" for 3; "UNKNOWN" for a number google.rpc.Code does not define."""
    return code_pb2.Code.Name(code) if code in code_pb2.Code.values() else "UNKNOWN"


def item_status(error: ClipsearchError | None) -> common_pb2.ItemStatus:
    """OK for None, else the error's google.rpc code and message."""
    if error is None:
        return common_pb2.ItemStatus(code=OK)
    return common_pb2.ItemStatus(code=getattr(code_pb2, error.code, code_pb2.UNKNOWN), message=error.message)


def error_from_status(code: int, message: str) -> ClipsearchError | None:
    """None for OK, else the matching ``clipsearch.errors`` exception."""
    return None if code == OK else error_for_code(code_name(code), message)
